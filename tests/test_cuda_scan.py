"""The CUDA kernel held to the float64 reference. Needs a CUDA device and CuPy; skipped otherwise."""

import pytest
import torch

from sqrllm import cuda
from sqrllm.scan import scan, scan_doubling


def _unavailable():
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        cuda.ensure_available()
    except ImportError as e:
        return f"CuPy unavailable: {e}"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))]

# max |kernel - ref| / (max |ref| + 1), per storage dtype; arithmetic is float32 throughout
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
LENGTHS = [1, 2, 63, 64, 1000, 4097]
SHAPES = [(1, 1), (2, 5), (3, 72), (1, 1024), (2, 4096)]  # (B, C)


def inputs(B, T, C, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(B, T, C, generator=g, device="cuda", dtype=torch.float64)
    r = torch.rand(B, T, C, generator=g, device="cuda", dtype=torch.float64) * 0.3 + 0.7  # long memory
    h0 = torch.randn(B, C, generator=g, device="cuda", dtype=torch.float64)
    dy = torch.randn(B, T, C, generator=g, device="cuda", dtype=torch.float64)
    return tuple(t.to(dtype) for t in (x, r, h0, dy))


def reference(x, r, h0, dy, reverse=False):
    """y, dx, dr, dh0 in float64 from the (rounded) inputs: scan_doubling, which tests/test_scan.py
    holds to the loop of scan_ref, in log2(T) steps instead of T (these tests reach T = 65536)."""
    leaves = [t.double().requires_grad_() for t in (x, r, h0)]
    y = scan_doubling(*leaves, reverse=reverse)
    return (y.detach(), *torch.autograd.grad(y, leaves, dy.double()))


def rel_err(a, ref):
    return ((a.double() - ref).abs().max() / (ref.abs().max() + 1)).item()


def kernel_nan_filled(x, r, h0, dy, reverse=False):
    """y, dx, dr, dh0 from the raw entries, every output buffer filled with NaN first."""
    B, T, C = x.shape
    y = cuda.scan_fwd(x, r, h0, reverse, out=torch.full_like(x, float("nan")))
    outs = (torch.full_like(x, float("nan")), torch.full_like(x, float("nan")), x.new_full((B, C), float("nan")))
    return (y, *cuda.scan_bwd(dy, r, y, h0, reverse, out=outs))


def use_mode(monkeypatch, mode):
    """Long scans with few columns run in chunk mode ("CHUNKS": blocks along time meeting in the range
    tree) or stream mode ("STREAM": resident blocks walking a column); force one of them."""
    monkeypatch.setattr(cuda, "STREAM_MAX_BLOCKS", 0 if mode == "CHUNKS" else 10**6)
    monkeypatch.setattr(cuda, "STREAM_MIN_FILL", 0)  # (columns too short to fill the GPU still stream)
    monkeypatch.setattr(cuda, "LOOP_MIN_FILL", 2)


def assert_matches_reference(got, ref, dtype):
    for name, a, b in zip(("y", "dx", "dr", "dh0"), got, ref):
        assert a.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name}: element left unwritten (NaN)"
        assert rel_err(a, b) < TOL[dtype], f"{name}: error {rel_err(a, b):.2e}"


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("B, C", SHAPES)
def test_forward_and_gradients_match_reference(dtype, T, B, C):
    x, r, h0, dy = inputs(B, T, C, dtype, seed=T + C)
    assert_matches_reference(kernel_nan_filled(x, r, h0, dy), reference(x, r, h0, dy), dtype)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("T", [1, 63, 4097])
@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("reverse", [True, False])
def test_either_direction_with_and_without_initial_state_matches_reference(dtype, T, with_h0, reverse):
    x, r, h0, dy = inputs(2, T, 40, dtype, seed=T)
    h0 = h0 if with_h0 else torch.zeros_like(h0)
    got = kernel_nan_filled(x, r, h0 if with_h0 else None, dy, reverse=reverse)
    assert_matches_reference(got, reference(x, r, h0, dy, reverse=reverse), dtype)


@pytest.mark.parametrize("time_split", ["chunks", "chunks-shared-only", "stream", "loop", "loop-long"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_way_of_splitting_time_matches_reference(monkeypatch, time_split, reverse, dtype):
    # chunk mode (blocks along time, carry-in through the range tree; with rows in registers or not),
    # stream mode (resident blocks each walking every Gc-th tile) or loop mode (one block walks T), on
    # its tiles of L or, where a column is long enough, its long ones
    use_mode(monkeypatch, "STREAM" if time_split == "stream" else "CHUNKS")
    monkeypatch.setattr(cuda, "LOOP_MIN_FILL", 0 if time_split.startswith("loop") else 2)
    if time_split == "chunks-shared-only":
        monkeypatch.setattr(cuda, "CHUNK_REG_ROWS", (0, 0))
    shape = {"loop-long": (2, 6000, 72), "stream": (3, 12000, 72)}.get(time_split, (3, 1000, 72))
    x, r, h0, dy = inputs(*shape, dtype, seed=1)
    for bwd in (False, True):
        p = cuda.launch_plan(x, bwd)
        assert p.mode == {"stream": "STREAM", "loop": "LOOP", "loop-long": "LOOP"}.get(time_split, "CHUNKS")
        assert p.long_tiles == (time_split == "loop-long")
    assert_matches_reference(kernel_nan_filled(x, r, h0, dy, reverse), reference(x, r, h0, dy, reverse), dtype)


@pytest.mark.parametrize("reg_rows", [(0, 0), (2, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_more_tiles_than_resident_blocks_match_reference(monkeypatch, dtype, reg_rows):
    # (1, 200000, 64): thousands of blocks along time, many times what the GPU holds at once
    monkeypatch.setattr(cuda, "CHUNK_REG_ROWS", reg_rows)
    x, r, h0, dy = inputs(1, 200000, 64, dtype, seed=3)
    assert_matches_reference(kernel_nan_filled(x, r, h0, dy), reference(x, r, h0, dy), dtype)


@pytest.mark.parametrize("max_ct", [8, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_narrower_chunk_feature_tiles_match_reference(monkeypatch, max_ct, dtype):
    # (2, 6000, 256): chunk mode with 256 / (max_ct * V) feature tiles a sequence instead of one or two
    monkeypatch.setattr(cuda, "CHUNK_MAX_CT", max_ct)
    monkeypatch.setattr(cuda, "CHUNK_MIN_COLS", 1)
    use_mode(monkeypatch, "CHUNKS")
    x, r, h0, dy = inputs(2, 6000, 256, dtype, seed=4)
    assert_matches_reference(kernel_nan_filled(x, r, h0, dy), reference(x, r, h0, dy), dtype)


@pytest.mark.parametrize("dtype", list(TOL))
def test_loop_mode_on_its_short_tiles_matches_reference(dtype):
    # (16, 200, 4096): columns enough to fill the GPU (two waves of blocks in float32 on 132
    # multiprocessors), too short for the long tiles; other tests reach this mode only when forced
    x, r, h0, dy = inputs(16, 200, 4096, dtype, seed=13)
    for bwd in (False, True):
        p = cuda.launch_plan(x, bwd)
        if p.mode != "LOOP":
            pytest.skip(f"this GPU plans {p.mode} for (16, 200, 4096), not loop mode")
        assert not p.long_tiles
    assert_matches_reference(kernel_nan_filled(x, r, h0, dy), reference(x, r, h0, dy), dtype)


def far_inputs(B, T, C, device="cuda"):
    """float32 x, r, h0, dy whose state carries from far back: r = 1 but for a halving every T / 8
    steps (at places that differ by feature), x = 1..8 at 8 places, h0 = 2, dy = 1 at 10 places. With
    inputs() the product of r over a tile is below 1e-7, so a tile whose carry-in left out all but the
    tile just before it would still pass; here every term of y is 2**-k times a small integer, and
    leaving one out moves y by more than 1e-4 of its largest value (float32's TOL is 1e-5)."""
    t, c = torch.arange(T, device=device)[:, None], torch.arange(C, device=device)
    step = T // 8
    r = torch.where((t + 7 * c) % step == 3, 0.5, 1.0).expand(B, T, C).contiguous()
    x = torch.where(t % step == 0, (t // step + 1).float(), 0.0).expand(B, T, C).contiguous()
    dy = torch.where((t % step == step // 2) | (t == 0) | (t == T - 1), 1.0, 0.0).expand(B, T, C).contiguous()
    return x, r, torch.full((B, C), 2.0, device=device), dy


@pytest.mark.parametrize("time_split", ["chunks-radix-2", "chunks-radix-4", "chunks-radix-8", "stream"])
@pytest.mark.parametrize("reverse", [False, True])
def test_state_from_far_back_reaches_every_tile(monkeypatch, time_split, reverse):
    # (1, 40000, 32): tens of tiles along time in chunk mode (trees of 2 to 5 levels) and rounds of
    # look-back in stream mode; the state entering each tile must hold every tile before it
    use_mode(monkeypatch, "STREAM" if time_split == "stream" else "CHUNKS")
    if time_split != "stream":
        monkeypatch.setattr(cuda, "TREE_LOG2", int(time_split[-1]).bit_length() - 1)
    x, r, h0, dy = far_inputs(1, 40000, 32)
    assert cuda.launch_plan(x).mode == ("STREAM" if time_split == "stream" else "CHUNKS")
    ref = reference(x, r, h0, dy, reverse)
    assert ref[0].abs().min() > 0 and ref[1].abs().min() > 0  # every output and gradient carries something
    assert_matches_reference(kernel_nan_filled(x, r, h0, dy, reverse), ref, torch.float32)


@pytest.mark.parametrize("tree_log2", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_tree_radix_matches_reference(monkeypatch, tree_log2, dtype):
    # (1, 5000, 32): tens of tiles along time, so nodes of several levels carry the state
    monkeypatch.setattr(cuda, "TREE_LOG2", tree_log2)
    x, r, h0, dy = inputs(1, 5000, 32, dtype, seed=2)
    assert_matches_reference(kernel_nan_filled(x, r, h0, dy), reference(x, r, h0, dy), dtype)


@pytest.mark.parametrize("B, T, C", [(1, 40000, 32), (1, 20000, 4), (1, 10000, 1), (2, 16384, 1024), (1, 20000, 72),
                                     (1, 3073, 1024), (1, 3329, 1024)])
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("short_head", [True, False])
def test_stream_mode_matches_reference(monkeypatch, B, T, C, dtype, short_head):
    # from 4 blocks a column to one a multiprocessor, so look-backs from a few maps to several
    # rounds of reads per thread; C = 4 and 1 give a feature's look-back more threads than a warp,
    # C = 72 a part-empty feature tile. short_head: the first round's tiles shorter than the others,
    # or all even. With 16 blocks a column (132 multiprocessors), (1, 3073, 1024) and (1, 3329, 1024)
    # are a little over one or two rounds of full tiles in most of their plans: split evenly, the last
    # threads along time get fewer rows or none (3329 bf16 forward: 32 tiles of 104 positions, 13 rows
    # a thread); with the short first round, its tiles can be a position long (3329 forward, every
    # dtype). (Reverse: test_every_way_of_splitting_time_matches_reference.)
    use_mode(monkeypatch, "STREAM")
    monkeypatch.setattr(cuda, "STREAM_SHORT_HEAD", short_head)
    x, r, h0, dy = inputs(B, T, C, dtype, seed=2)
    p = cuda.launch_plan(x)
    assert p.mode == "STREAM" and (p.head > 0) == (short_head and p.n_chunks > p.stream)
    assert_matches_reference(kernel_nan_filled(x, r, h0, dy), reference(x, r, h0, dy), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_long_sequence_of_1024_features_runs_in_stream_mode(dtype):
    # the benchmark's (1, 32768, 1024): 8 columns of 16 blocks each on an H100 or H200, where stream
    # mode beat chunk mode (docs/benchmarks.md)
    x, r, h0, dy = inputs(1, 32768, 1024, dtype, seed=12)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if not 2 <= sms // 8 <= cuda.STREAM_MAX_BLOCKS:
        pytest.skip(f"{sms} multiprocessors: not 2 to {cuda.STREAM_MAX_BLOCKS} for each of 8 columns")
    assert cuda.launch_plan(x).mode == cuda.launch_plan(x, bwd=True).mode == "STREAM"
    assert_matches_reference(kernel_nan_filled(x, r, h0, dy), reference(x, r, h0, dy), dtype)


@pytest.mark.parametrize("dtype", list(TOL))
def test_misaligned_tensors_take_the_narrow_path(dtype):
    # views one element into their storage cannot use 16-byte vectors
    x, r, h0, dy = inputs(2, 100, 64, dtype, seed=3)

    def shifted(t):
        return torch.empty(t.numel() + 1, dtype=dtype, device="cuda")[1:].view(t.shape).copy_(t)

    assert cuda.vector_width(64, x.element_size(), [shifted(x).data_ptr()]) == 1
    got = kernel_nan_filled(*(shifted(t) for t in (x, r, h0, dy)))
    assert_matches_reference(got, reference(x, r, h0, dy), dtype)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("reverse", [False, True])
def test_op_runs_the_kernel_forward_and_backward(dtype, reverse):
    x, r, h0, dy = inputs(2, 300, 24, dtype, seed=4)
    leaves = [t.clone().requires_grad_() for t in (x, r, h0)]
    y = scan(*leaves, reverse=reverse)
    got = (y, *torch.autograd.grad(y, leaves, dy))
    for a, b in zip(got, kernel_nan_filled(x, r, h0, dy, reverse)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("reverse", [False, True])
def test_chunks_with_carried_state_equal_one_call(dtype, reverse):
    x, r, h0, dy = inputs(2, 3000, 48, dtype, seed=5)
    leaves = [t.requires_grad_() for t in (x, r, h0)]
    whole = scan(x, r, h0, reverse=reverse)
    spans = list(zip([0, 1, 700, 701, 2048], [1, 700, 701, 2048, 3000]))
    pieces, h = [], h0
    for lo, hi in reversed(spans) if reverse else spans:
        y = scan(x[:, lo:hi], r[:, lo:hi], h, reverse=reverse)
        h = y[:, 0] if reverse else y[:, -1]  # the carried state, rounded to the storage dtype
        pieces.append(y)
    chunked = torch.cat(pieces[::-1] if reverse else pieces, dim=1)
    assert rel_err(chunked, whole.double()) < TOL[dtype]
    # gradients through the carried states too (as training with carried memory takes them)
    for a, b in zip(torch.autograd.grad(chunked, leaves, dy), torch.autograd.grad(whole, leaves, dy)):
        assert rel_err(a, b.double()) < TOL[dtype]


def test_non_contiguous_inputs():
    """Transposed, strided and broadcast inputs, and a gradient of stride 0 (y.sum()'s): the values of
    their contiguous copies, held to the reference, gradients included."""
    x, r, h0, _ = inputs(4, 129, 40, torch.float32, seed=6)
    xt, rt = (t.transpose(0, 2).contiguous().transpose(0, 2) for t in (x, r))
    assert not xt.is_contiguous()
    assert torch.equal(scan(xt, rt, h0), scan(x, r, h0))
    assert torch.equal(scan(x[:, ::2], r[:, ::2]), scan(x[:, ::2].contiguous(), r[:, ::2].contiguous()))
    h0s = torch.cat([h0, h0], 1)[:, ::2]  # every other column: not contiguous
    assert not h0s.is_contiguous() and torch.equal(scan(x, r, h0s), scan(x, r, h0s.contiguous()))
    leaves = [t.clone().requires_grad_() for t in (xt, rt, h0s)]
    y = scan(*leaves)
    got = (y.detach(), *torch.autograd.grad(y.sum(), leaves))  # dy: a stride-0 view of one 1
    assert_matches_reference(got, reference(x, r, h0s, torch.ones_like(x)), torch.float32)


def test_runs_on_the_current_stream():
    x, r, h0, dy = inputs(2, 5000, 256, torch.bfloat16, seed=7)
    expected = kernel_nan_filled(x, r, h0, dy)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # a busy side stream: inputs copied on it only exist once the spin ends, so a kernel
        # launched on any other stream would read them too early
        torch.cuda._sleep(50_000_000)
        xs, rs, hs, dys = (t.clone() for t in (x, r, h0, dy))
        got = kernel_nan_filled(xs, rs, hs, dys)
    torch.cuda.synchronize()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["CHUNKS", "STREAM"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_scan_launches_one_after_another_match_reference(monkeypatch, dtype, mode):
    # the same shape with other values right after (the maps at the very slots the last launch
    # wrote), then a shorter and a longer one
    use_mode(monkeypatch, mode)
    for seed, (B, T, C) in enumerate([(1, 40000, 256), (1, 40000, 256), (1, 9000, 256), (2, 60000, 128)]):
        x, r, h0, dy = inputs(B, T, C, dtype, seed=20 + seed)
        assert cuda.launch_plan(x).mode == mode
        assert_matches_reference(kernel_nan_filled(x, r, h0, dy), reference(x, r, h0, dy), dtype)


@pytest.mark.parametrize("mode", ["CHUNKS", "STREAM"])
def test_long_scans_on_two_streams_at_once(monkeypatch, mode):
    # launches running side by side do not read each other's maps (and in stream mode, whose blocks
    # wait on each other, neither launch starves the other of multiprocessors)
    use_mode(monkeypatch, mode)
    data = [inputs(1, 60000, 256, torch.float32, seed=30 + i) for i in range(2)]
    streams = [torch.cuda.Stream() for _ in data]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    got = []
    for (x, r, h0, dy), s in zip(data, streams):
        with torch.cuda.stream(s):
            got.append([cuda.scan_fwd(x, r, h0) for _ in range(3)])
    torch.cuda.synchronize()
    for (x, r, h0, dy), ys in zip(data, got):
        for y in ys:
            assert rel_err(y, reference(x, r, h0, dy)[0]) < TOL[torch.float32]


@pytest.mark.parametrize("mode", ["CHUNKS", "STREAM"])
def test_long_scans_replay_from_a_cuda_graph(monkeypatch, mode):
    use_mode(monkeypatch, mode)
    x, r, h0, dy = inputs(1, 50000, 256, torch.bfloat16, seed=40)
    assert cuda.launch_plan(x).mode == mode
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cuda.scan_fwd(x, r, h0)  # warm-up: compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = cuda.scan_fwd(x, r, h0)
    for seed in range(41, 44):
        new = inputs(1, 50000, 256, torch.bfloat16, seed=seed)
        for static, value in zip((x, r, h0), new):
            static.copy_(value)
        graph.replay()
        assert rel_err(y, reference(*new)[0]) < TOL[torch.bfloat16]
        assert torch.equal(y, cuda.scan_fwd(*new[:3]))  # an eager launch


def test_a_stream_grid_the_gpu_cannot_hold_falls_back_to_chunk_mode(monkeypatch):
    # planned for twice the multiprocessors there are, as for a process limited to part of the GPU
    # while the device reports them all: the driver refuses the cooperative launch, and the scan
    # warns once and runs in chunk mode
    use_mode(monkeypatch, "STREAM")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    tiles = cuda._stream_tiles
    monkeypatch.setattr(cuda, "_stream_tiles", lambda *a: (2 * sms, tiles(*a)[1]))
    monkeypatch.setattr(cuda, "_cooperative_refused", set())
    cuda._recipe.cache_clear()
    try:
        x, r, h0, dy = inputs(1, 40000, 256, torch.float32, seed=45)
        assert cuda.launch_plan(x).mode == "STREAM" and cuda.launch_plan(x).grid > sms
        with pytest.warns(RuntimeWarning, match="cannot run stream mode's"):
            got = kernel_nan_filled(x, r, h0, dy)
        assert cuda.launch_plan(x).mode == "CHUNKS"
        assert_matches_reference(got, reference(x, r, h0, dy), torch.float32)
    finally:
        cuda._recipe.cache_clear()  # its plans assumed the doubled GPU


@pytest.mark.parametrize("mode", ["CHUNKS", "STREAM"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_five_runs_are_bitwise_identical(monkeypatch, dtype, mode):
    # (1, 65536, 256): over a thousand tiles along time, whose carry-ins meet in the range tree
    # (more blocks than fit at once) or in the look-backs of the blocks walking each column
    use_mode(monkeypatch, mode)
    x, r, h0, dy = inputs(1, 65536, 256, dtype, seed=8)
    assert cuda.launch_plan(x).mode == mode
    first = kernel_nan_filled(x, r, h0, dy)
    for _ in range(4):
        for a, b in zip(kernel_nan_filled(x, r, h0, dy), first):
            assert torch.equal(a, b)


def test_compiled_matches_eager():
    x, r, h0, dy = inputs(2, 257, 64, torch.float32, seed=9)

    def f(x, r, h0):
        return scan(torch.tanh(x), torch.sigmoid(r), h0, reverse=False) * 2 + scan(x, torch.sigmoid(r), reverse=True)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)  # fullgraph: a graph break at the scan is an error
    results = []
    for fn in (f, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, r, h0)]
        y = fn(*leaves)
        results.append((y, *torch.autograd.grad(y, leaves, dy)))
    # the scans are the same kernels, but Inductor's fused tanh / sigmoid may differ from eager's in
    # the last bit, and the scans carry that along: float32's default tolerance (1.3e-6 relative,
    # 1e-5 absolute)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_binary_is_native_code_for_the_device():
    x, r, *_ = inputs(1, 10, 8, torch.float32)
    cuda.scan_fwd(x, r)
    major, minor = torch.cuda.get_device_capability()
    L, min_blocks = cuda.FWD_TILE
    kernel, _ = cuda._scan_kernel(torch.float32, 4, L, False, "ONE_TILE", min_blocks, x.device.index)
    assert kernel.binary_version == 10 * major + minor
