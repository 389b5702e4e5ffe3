"""The scan op's host side, on the CPU: dispatch, argument checks, the CuPy fallback, launch planning."""

import contextlib
import importlib
import importlib.util
import re
import sys
import types
import warnings

import pytest
import torch

from sqrllm import cuda
from sqrllm.kernels import SOURCE_DIR
from sqrllm.scan import scan

scan_module = importlib.import_module("sqrllm.scan")  # the package's `scan` attribute is the function


def test_cpu_tensors_never_reach_the_cuda_backend(monkeypatch):
    def fail():
        raise AssertionError("the CUDA backend was asked for with CPU tensors")

    monkeypatch.setattr(cuda, "ensure_available", fail)
    monkeypatch.setattr(scan_module, "_cuda_backend", None)
    x = torch.randn(2, 9, 3, requires_grad=True)
    r = torch.rand(2, 9, 3, requires_grad=True)
    y = scan(x, r)
    y.sum().backward()
    assert x.grad is not None and r.grad is not None


@pytest.mark.parametrize(
    "x, r, h0, error, match",
    [
        (torch.zeros(4, 5), torch.zeros(4, 5), None, ValueError, r"x must be \(B, T, C\)"),
        (torch.zeros(2, 5, 3), torch.zeros(2, 5, 4), None, ValueError, "r must have the shape of x"),
        (torch.zeros(2, 0, 3), torch.zeros(2, 0, 3), None, ValueError, "T must be at least 1"),
        (torch.zeros(2, 5, 3), torch.zeros(2, 5, 3), torch.zeros(3, 2), ValueError, r"h0 must be \(B, C\)"),
        (torch.zeros(2, 5, 3, dtype=torch.int32), torch.zeros(2, 5, 3, dtype=torch.int32), None, TypeError,
         "supported: float32, float16, bfloat16, float64"),
        (torch.zeros(2, 5, 3), torch.zeros(2, 5, 3, dtype=torch.float16), None, TypeError, "cast both to one dtype"),
        (torch.zeros(2, 5, 3), torch.zeros(2, 5, 3, device="meta"), None, ValueError, "move both to one device"),
        (torch.zeros(2, 5, 3), torch.zeros(2, 5, 3), torch.zeros(2, 3, device="meta"), ValueError, "h0 is on meta"),
    ],
)  # fmt: skip
def test_bad_arguments_are_refused_with_what_is_supported(x, r, h0, error, match):
    with pytest.raises(error, match=match):
        scan(x, r, h0)


def test_missing_cupy_warns_once_naming_the_extra_and_falls_back(monkeypatch):
    def missing():
        raise ImportError("CuPy is not installed")

    monkeypatch.setattr(cuda, "ensure_available", missing)
    monkeypatch.setattr(scan_module, "_cuda_backend", None)
    with pytest.warns(UserWarning, match=r'pip install -e "\.\[cuda12\]"'):
        assert scan_module._cuda() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scan_module._cuda() is None  # decided once, no second warning


def test_a_gpu_too_old_for_the_kernels_falls_back_saying_why(monkeypatch):
    # CuPy imports and sees the GPU, but an sm_75 GPU cannot compile cp.async: the loop serves
    device = types.SimpleNamespace(compute_capability="75")
    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1), Device=lambda d: device))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    with pytest.raises(cuda.Unsupported, match=r"compute capability 8\.0 or newer \(cp\.async\); device 0 has 7\.5"):
        cuda.ensure_available()
    monkeypatch.setattr(scan_module, "_cuda_backend", None)
    with pytest.warns(UserWarning, match=r"device 0 has 7\.5\); using the slower pure-PyTorch loop on the GPU\.$"):
        assert scan_module._cuda() is None  # no CuPy to install: it is there
    device.compute_capability = "90"
    cuda.ensure_available()


def test_available_cupy_is_used(monkeypatch):
    monkeypatch.setattr(cuda, "ensure_available", lambda: None)
    monkeypatch.setattr(scan_module, "_cuda_backend", None)
    assert scan_module._cuda() is cuda


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed here")
def test_ensure_available_says_cupy_is_missing():
    with pytest.raises(ImportError, match="CuPy is not installed"):
        cuda.ensure_available()


def test_kernel_source_ships_with_the_package():
    source = cuda._source()
    assert "SQRLL_SCAN(" in source and "SQRLL_BASELINE(" in source


@pytest.mark.parametrize(
    "C, ptr_offset, V", [(1024, 0, 8), (1024, 2, 1), (1024, 8, 4), (5, 0, 1), (6, 0, 2), (12, 0, 4)]
)
def test_vector_width_follows_features_and_alignment(C, ptr_offset, V):
    assert cuda.vector_width(C, 2, [4096, 4096 + ptr_offset]) == V


@pytest.mark.parametrize("reg_rows", [0, 4])
@pytest.mark.parametrize("B, T, C, V", [(16, 2048, 1024, 8), (1, 131072, 256, 8), (1, 32768, 1024, 4), (64, 256, 384, 8),
                                        (3, 4097, 1, 1), (2, 63, 5, 1), (256, 128, 1024, 4),
                                        (2, 300, 24, 4)])  # fmt: skip
def test_plan_covers_every_feature_and_fills_the_gpu(B, T, C, V, reg_rows):
    resident = 132 * 2
    p = cuda.plan(B, T, C, V, L=8, resident=resident, reg_rows=reg_rows)
    assert (p.n_ct - 1) * p.CT * V < C <= p.n_ct * p.CT * V
    assert p.ncol == B * p.n_ct
    Tc = cuda.NT // p.CT * p.rows
    if p.n_chunks == 1:  # one block walks each column, pipelined when there is more than one tile
        assert p.grid == p.ncol and p.pipe == (T > Tc * 2) and p.rows == (4 if p.pipe else 8)
        assert T <= Tc or p.ncol / (-(-p.ncol // resident) * resident) >= cuda.LOOP_MIN_FILL
    else:  # one block per tile; T outgrew one tile without register rows, so at least two tiles
        assert T > cuda.NT // p.CT * 8
        assert p.n_chunks == max(2, -(-T // Tc)) and p.grid == p.ncol * p.n_chunks and not p.pipe
    # the kernel derives its rows (LR) from the mode; chunk mode adds its register rows
    assert p.rows == {"LOOP": 8 // 2, "ONE_TILE": 8, "CHUNKS": 8 + reg_rows}[p.mode]
    if B * T * C >= 2**24:  # a benchmark-sized scan gets blocks for every multiprocessor, whatever its shape
        assert p.grid >= 132


@pytest.mark.parametrize("B, T, C, V, CT, long_tiles", [
    (16, 2048, 1024, 8, 16, 1),  # 128 columns of 16 threads fill 132 SMs at one block each, 10.7 long tiles
    (8, 2048, 4096, 4, 32, 1),
    (256, 128, 1024, 8, 32, 0),  # columns 1.3 long tiles long: the tiles of L, two blocks an SM
    (64, 256, 384, 4, 8, 0),  # one tile (of L) covers T
])
def test_loop_mode_takes_its_long_tiles_on_long_columns(B, T, C, V, CT, long_tiles):
    L, resident, loop = 12, 132 * 2, (24, 132)
    p = cuda.plan(B, T, C, V, L, resident, reg_rows=6, loop=loop)
    assert p.CT == CT and p.long_tiles == long_tiles
    if long_tiles:
        assert p.mode == "LOOP" and p.rows == 12 and p.grid == B * C // V // CT
        assert T >= cuda.LOOP_LONG_MIN_TILES * cuda.NT // CT * p.rows
    else:  # as without long tiles
        assert p == cuda.plan(B, T, C, V, L, resident, reg_rows=6)


@pytest.mark.parametrize("smem_kb, dtype, bwd, fits", [
    (227, torch.bfloat16, False, True),  # an H100 or H200: 192 KB of tile buffers and 16 KB of maps
    (227, torch.float32, True, True),
    (163, torch.bfloat16, False, False),  # an A100: loop mode keeps its tiles of L
    (163, torch.float32, True, False),
])
def test_long_loop_tiles_only_where_shared_memory_holds_them(monkeypatch, smem_kb, dtype, bwd, fits):
    monkeypatch.setattr(cuda, "_smem_per_block", lambda device: smem_kb * 1024)
    monkeypatch.setattr(cuda, "_resident", lambda device, blocks: 132 * blocks)
    V = 16 // (torch.finfo(dtype).bits // 8)
    tile = cuda.LOOP_BWD_TILE if bwd else cuda.LOOP_FWD_TILE
    assert cuda._long_loop_tiles(bwd, dtype, V, 0, tile) == ((tile[0], 132 * tile[1]) if fits else None)


@pytest.mark.parametrize("max_ct", [8, 16, 32])
def test_chunk_mode_narrows_its_feature_tiles_on_request(max_ct):
    # a single long sequence of 256 features: one column of 32-wide feature tiles without a column
    # floor; at most max_ct threads across features make 32 / max_ct columns, each with that many
    # times fewer tiles
    L, resident, reg_rows = 12, 132 * 2, 6
    p = cuda.plan(1, 131072, 256, 8, L, resident, reg_rows=reg_rows, chunk_max_ct=max_ct, chunk_min_cols=1)
    assert p.mode == "CHUNKS" and p.CT == max_ct and p.ncol == p.n_ct == 32 // max_ct
    assert p.n_chunks == -(-131072 // (cuda.NT // max_ct * (L + reg_rows)))
    assert p.grid == p.ncol * p.n_chunks
    # plans that do not cut time into chunks are left as they were
    for shape in [(16, 2048, 1024), (64, 256, 384), (256, 128, 1024)]:
        assert cuda.plan(*shape, 8, L, resident, chunk_max_ct=max_ct) == cuda.plan(*shape, 8, L, resident)


@pytest.mark.parametrize("B, C, V, cols, CT", [
    (1, 256, 8, 8, 8),  # 32 vectors of features: 4 columns of 8 threads, as narrow as a tile goes
    (1, 1024, 8, 8, 16),  # 128 vectors: 8 columns of 16
    (1, 1024, 4, 8, 32),  # fp32, 256 vectors: 8 columns of 32 already
    (2, 1024, 8, 8, 32),  # two sequences of 4 columns each
    (1, 1024, 8, 1, 32),  # no floor: the widest tiles
])
def test_chunk_mode_narrows_feature_tiles_to_make_columns(B, C, V, cols, CT):
    p = cuda.plan(B, 131072, C, V, 12, 132 * 2, reg_rows=6, chunk_min_cols=cols)
    assert p.mode == "CHUNKS" and p.CT == CT and p.ncol == B * C // V // CT


@pytest.mark.parametrize("reg_rows", [0, 3, 6])
@pytest.mark.parametrize("C, V", [(24, 4), (256, 8), (1, 1)])
def test_the_planned_kernel_reaches_every_position(C, V, reg_rows):
    # what each mode's kernel covers: one tile of L rows per thread (ONE_TILE), tiles walked in a loop
    # (LOOP), or n_chunks tiles of L + reg_rows rows, where the kernel holds reg_rows rows in
    # registers (CHUNKS); any T in between the tile sizes must land in a mode that reaches it
    L, resident = 8, 132 * 2
    for T in sorted({1, 2, 255, 256, 257, 300, 320, 321, 1023, 1024, 1025, 2049, 3000, 40000}):
        for min_fill in (0, 2):  # loop mode wherever a column may walk T, or never
            p = cuda.plan(2, T, C, V, L, resident, min_fill=min_fill, reg_rows=reg_rows)
            per_thread = {"ONE_TILE": L, "LOOP": L // 2, "CHUNKS": L + reg_rows}[p.mode]
            assert p.rows == per_thread, (T, p)
            tile = cuda.NT // p.CT * per_thread
            if p.mode == "ONE_TILE":
                assert T <= tile, (T, p)
            elif p.mode == "CHUNKS":  # as many tiles as T needs, and at least two
                assert p.n_chunks == max(2, -(-T // tile)), (T, p)


@pytest.mark.parametrize("lg", [1, 2, 3])
def test_tree_nodes_fit_the_scratch_and_cover_each_prefix(lg):
    # the kernel's node indexing (kernels/sqrll.cu: node_slot, chunk_carry_in), run on integers
    R = 1 << lg
    for T in [5 * 64, 9 * 64, 63 * 64, 64 * 64, 65 * 64, 512 * 64 + 1, 1000 * 64]:  # 5 .. 1000 tiles
        p = cuda.plan(1, T, 256, 8, L=8, resident=10**6, min_fill=2, tree_log2=lg)
        n, slots = p.n_chunks, p.slots

        def slot(j, i):
            return sum(n >> (lg * level) for level in range(j)) + i

        written = {}
        for k in range(n):
            written[slot(0, k)] = (k, k + 1)
            j = 1
            while (k + 1) % R**j == 0:
                written[slot(j, (k + 1) // R**j - 1)] = (k + 1 - R**j, k + 1)
                j += 1
        assert len(written) == slots and max(written) == slots - 1  # every slot used once, none past the end
        for k in range(n):
            s = 0
            while s < k:  # the carry-in's nodes, longest first, tile s onwards
                j = (k - s).bit_length() - 1
                j = j // lg
                assert written[slot(j, s // R**j)] == (s, s + R**j)
                s += R**j


def stream_tile_sizes(p, T):
    """Positions in each of a stream-mode plan's tiles along a column, as scan_stream's tile_start
    cuts them."""
    P = p.stream if p.head else 0
    q, q_rem = divmod(T - P * p.head, p.n_chunks - P)

    def start(k):
        return k * p.head if k <= P else P * p.head + (k - P) * q + min(k - P, q_rem)

    return [start(k + 1) - start(k) for k in range(p.n_chunks)]


@pytest.mark.parametrize("B, T, C, V, mode, CT, blocks", [
    (1, 32768, 1024, 8, "STREAM", 16, 16),  # bf16: 8 columns of 16 threads, 16 blocks each
    (1, 32768, 1024, 4, "STREAM", 32, 16),  # fp32: 8 columns of 32
    (1, 131072, 256, 4, "STREAM", 8, 16),
    (1, 131072, 256, 8, "STREAM", 8, 33),  # bf16: 4 columns of 8 threads, 33 blocks each
    (1, 131072, 192, 8, "CHUNKS", 8, 0),  # 3 columns would take 44 blocks each
    (16, 65536, 256, 8, "STREAM", 32, 8),  # 16 columns of 32 threads, 8 blocks each
    (40, 20000, 256, 8, "STREAM", 32, 3),  # 40 columns of 3 blocks: 120 of 132 multiprocessors
    (50, 20000, 256, 8, "CHUNKS", 32, 0),  # 50 columns of 2 would leave 32 idle
    (80, 20000, 256, 8, "CHUNKS", 32, 0),  # 80 columns: one block each
    (16, 2048, 1024, 8, "LOOP", 8, 0),  # plans that never were chunk mode stay as they were
    (64, 256, 384, 8, "ONE_TILE", 8, 0),
])
def test_stream_mode_takes_chunk_modes_few_column_plans(B, T, C, V, mode, CT, blocks):
    L, resident, sms, rows = 12, 132 * 2, 132, 8
    p = cuda.plan(B, T, C, V, L, resident, reg_rows=6, stream=(sms, rows))
    assert p.mode == mode and p.CT == CT and p.stream == blocks
    if mode == "STREAM":  # T cut into n_chunks tiles of at most rows a thread, walked by the resident grid
        tile = cuda.NT // CT * rows
        assert p.rows == rows
        assert p.grid == p.ncol * blocks <= sms and p.ncol == B * C // V // CT
        # whole rounds, so that every block walks as many tiles, and no more rounds than full tiles take
        assert p.n_chunks % blocks == 0 and p.n_chunks // blocks == -(-T // (tile * blocks))
        sizes = stream_tile_sizes(p, T)
        assert sum(sizes) == T and 0 < min(sizes) and max(sizes) <= tile
        # the first round short, the others full (to a position); with short_head=False, all even
        head, others = sizes[:blocks], sizes[blocks:]
        assert len(set(head)) == 1 and head[0] <= min(others) and min(others) >= tile - 1
        even = stream_tile_sizes(cuda.plan(B, T, C, V, L, resident, reg_rows=6, stream=(sms, rows),
                                           short_head=False), T)
        assert len(even) == p.n_chunks and sum(even) == T and max(even) - min(even) <= 1
    else:
        assert p == cuda.plan(B, T, C, V, L, resident, reg_rows=6)
    # without a stream argument (no cooperative launch), or with stream mode turned off: chunk mode
    no_stream = cuda.plan(B, T, C, V, L, resident, reg_rows=6)
    assert cuda.plan(B, T, C, V, L, resident, reg_rows=6, stream=(sms, rows), stream_max_blocks=0) == no_stream
    assert no_stream.mode == ("CHUNKS" if mode == "STREAM" else mode)


def test_stream_mode_only_where_its_columns_fill_the_gpu():
    # 8 columns of 1024 features: 16 blocks each once a column is 16 tiles (of 16 x 8 rows) long;
    # shorter, its blocks would leave multiprocessors idle, and chunk mode's tiles run instead
    for tiles, mode in [(4, "CHUNKS"), (14, "CHUNKS"), (15, "STREAM"), (16, "STREAM"), (100, "STREAM")]:
        p = cuda.plan(1, tiles * 128, 1024, 8, 12, 264, stream=(132, 8))
        assert p.mode == mode, tiles
        if mode == "STREAM":  # whole rounds of 16 tiles past 16 tiles
            assert p.n_chunks == -(-tiles // 16) * min(tiles, 16) and p.grid == 8 * min(tiles, 16)
            # one round: T split evenly; more: the first round's tiles as short as leaves the rest full
            assert p.head == (0 if tiles <= 16 else -(-(tiles * 128 - (p.n_chunks - 16) * 128) // 16))


@pytest.mark.parametrize("dtype, bwd, rows", [
    (torch.bfloat16, False, 13),  # 2 buffers x 2 arrays x 4 KB a row: 13 rows fit beside the maps
    (torch.bfloat16, True, 8),  # 2 buffers x 3 arrays x 4 KB a row, beside 17 KB of maps, in 227 KB
    (torch.float32, False, 13),
    (torch.float32, True, 9),
])
def test_stream_tiles_fill_shared_memory(dtype, bwd, rows):
    V = 16 // (torch.finfo(dtype).bits // 8)
    smem = 227 * 1024
    assert cuda.stream_rows(dtype, V, bwd, smem) == rows
    static = 2 * cuda.NT * V * 4 + cuda.NT * 4
    buffers = cuda.STREAM_BUFFERS
    assert static + buffers * cuda._tile_smem(dtype, V, rows, bwd)[0] <= smem
    if rows < cuda.STREAM_MAX_ROWS:  # as many rows as fit
        assert smem < static + buffers * cuda._tile_smem(dtype, V, rows + 1, bwd)[0]


def test_host_sizes_the_launches_as_the_kernel_source_has_them():
    # threads a block and stream mode's tile buffers are written twice, in sqrllm/cuda.py and in
    # kernels/sqrll.cu: launches sized by the one for a kernel built with the other would overrun
    # shared memory or leave blocks' rows unread
    source = (SOURCE_DIR / "sqrll.cu").read_text()
    assert re.search(r"^#define NT (\d+)\b", source, re.M).group(1) == str(cuda.NT)
    assert re.search(r"constexpr int BUFFERS = (\d+),", source).group(1) == str(cuda.STREAM_BUFFERS)


@pytest.fixture
def fake_launches(monkeypatch):
    """Launch planning as on a 132-multiprocessor GPU whose kernels record their mode instead of
    running; a stream-mode launch raises whatever `refusal[0]` holds, as a refused cooperative launch."""
    launched, refusal = [], [None]

    def kernel(dtype, V, L, bwd, mode, min_blocks, device, reg_rows=0):
        def fn(grid, block, args, shared_mem, stream):
            if mode == "STREAM" and isinstance(refusal[0], Warning):
                warnings.warn(refusal[0])  # as CuPy, before it launches a shrunk grid
            elif mode == "STREAM" and refusal[0] is not None:
                raise refusal[0]
            launched.append(mode)
        return fn, 0

    monkeypatch.setattr(cuda, "_on", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "_stream", lambda device: None)
    monkeypatch.setattr(cuda, "_resident", lambda device, blocks: 132 * blocks)
    monkeypatch.setattr(cuda, "_smem_per_block", lambda device: 232448)  # an H100's 227 KB
    monkeypatch.setattr(cuda, "_long_loop_tiles", lambda *a: None)
    monkeypatch.setattr(cuda, "_stream_tiles", lambda *a: (132, 8))
    monkeypatch.setattr(cuda, "_scan_kernel", kernel)
    monkeypatch.setattr(cuda, "_cooperative_refused", set())
    cuda._recipe.cache_clear()
    yield launched, refusal
    cuda._recipe.cache_clear()  # its entries hold the fake kernels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bwd", [False, True])
def test_tiles_shrink_to_fit_a_gpu_with_less_shared_memory(fake_launches, monkeypatch, dtype, bwd):
    """On an sm_86 / sm_89 GPU a block may have 99 KB: the tiles, sized for an H100's 227 KB (about
    106-115 KB with 16-byte vectors), take fewer rows instead of failing to launch."""
    rows = []

    def kernel(dtype, V, L, bwd, mode, min_blocks, device, reg_rows=0):
        rows.append((V, L))
        return (lambda *a, **kw: None), cuda._tile_smem(dtype, V, L, bwd)[0]

    monkeypatch.setattr(cuda, "_scan_kernel", kernel)
    monkeypatch.setattr(cuda, "_smem_per_block", lambda device: 101376)
    x = torch.zeros(64, 1024, 512, dtype=dtype)  # many columns: loop mode, on the base tiles
    assert cuda._recipe_for(bwd, x, (0,))[0].mode == "LOOP"
    (V, L), = rows
    assert V == 16 // x.element_size() and L < (cuda.BWD_TILE if bwd else cuda.FWD_TILE)[0]
    assert sum(cuda._tile_smem(dtype, V, L, bwd)) <= 101376 < sum(cuda._tile_smem(dtype, V, L + 2, bwd))


def test_refused_stream_launch_warns_once_and_runs_chunk_mode(fake_launches):
    # for a process limited to part of the GPU, a grid of one block a multiprocessor may not fit
    launched, refusal = fake_launches
    x = torch.zeros(1, 32768, 1024, dtype=torch.bfloat16)
    refusal[0] = RuntimeError("CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE: too many blocks in cooperative launch")
    with pytest.warns(RuntimeWarning, match="cannot run stream mode's 128 blocks at once"):
        cuda.scan_fwd(x, x)
    assert launched == ["CHUNKS"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cuda.scan_bwd(x, x, x)  # decided for the device: straight to chunk mode, no second warning
    assert launched == ["CHUNKS", "CHUNKS"]
    assert cuda.launch_plan(x).mode == "CHUNKS"


def test_a_stream_grid_cupy_would_shrink_runs_chunk_mode(fake_launches):
    # CuPy shrinks a cooperative grid larger than fits at once (with a UserWarning) instead of letting
    # the driver refuse it; stream mode's blocks each own a share of the tiles, so none may go missing
    launched, refusal = fake_launches
    x = torch.zeros(1, 32768, 1024, dtype=torch.bfloat16)
    refusal[0] = UserWarning("The grid size will be reduced from 128 to 64, as the specified grid size "
                             "exceeds the limit.")
    with pytest.warns(RuntimeWarning, match="cannot run stream mode's 128 blocks at once"):
        cuda.scan_fwd(x, x)
    assert launched == ["CHUNKS"]
    assert cuda.launch_plan(x).mode == "CHUNKS"


def test_other_stream_launch_errors_are_raised(fake_launches):
    launched, refusal = fake_launches
    x = torch.zeros(1, 32768, 1024, dtype=torch.bfloat16)
    refusal[0] = RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="ILLEGAL_ADDRESS"):
        cuda.scan_fwd(x, x)
    refusal[0] = None
    cuda.scan_fwd(x, x)
    assert launched == ["STREAM"]
