"""The sqrll scan on CUDA: `kernels/sqrll.cu`, compiled on first use by NVRTC through CuPy and
launched on PyTorch's current stream, reading and writing the tensors' own memory.

`scan_fwd` and `scan_bwd` are what `sqrllm.scan.scan` hands CUDA tensors to. They trust their
arguments (contiguous (B, T, C), one dtype among float32, float16, bfloat16, one device), which
`scan` has validated. How the kernel splits the work is described at the top of the .cu file.
`scan_fwd_baseline` / `scan_bwd_baseline` run the one-thread-per-feature design, for the benchmark.
The other kernels (a layer's elementwise steps, QRNN pooling, decoding) are launched by sqrllm.cuda_layers.
"""

import contextlib
import functools
import warnings
from typing import NamedTuple

import numpy as np
import torch

from sqrllm.kernels import SOURCE_DIR

NT = 256  # threads per block, as in the .cu
STORAGE = {torch.float32: "float", torch.float16: "f16_t", torch.bfloat16: "bf16_t"}
# (positions per thread L, blocks per multiprocessor): a tile's inputs sit in shared memory,
# 2 (forward) or 3 (backward) * L * NT * 16 bytes, sized to fill an H100's or H200's 227 KB twice
FWD_TILE = (12, 2)
BWD_TILE = (8, 2)
# loop mode's long tiles (L, blocks per multiprocessor), for columns at least LOOP_LONG_MIN_TILES of
# them long: one block an SM, so that columns twice as wide fill the GPU, each buffer 96 KB in flight.
# On one H200, (16, 2048, 1024) bf16 ran 80-85% of copy forward and 88-90.5% forward+backward against
# 73-76% and 80-82% with the tiles above; short columns ((256, 128, 1024): 1.3 long tiles) lost 6
# points forward with them (docs/benchmarks.md). Taken only where the device's shared memory per
# block holds them (208 KB: an H100 or H200, not an A100)
LOOP_FWD_TILE = (24, 1)
LOOP_BWD_TILE = (16, 1)
LOOP_LONG_MIN_TILES = 4
# loop mode (one block walks all of T, the next tile's copies in flight) once the (sequence, feature
# tile) columns fill the GPU's block slots, wave after wave, at least this well; else chunk mode
LOOP_MIN_FILL = 0.8
# chunk mode: log2 of the radix of the tree of tile maps (wider: fewer hops to wait, more nodes to read)
TREE_LOG2 = 3
# chunk mode: rows a thread holds in registers beyond its L in shared memory (forward, backward), so
# that a tile, which waits in place for its carry-in, holds more than shared memory alone allows
CHUNK_REG_ROWS = (6, 3)
# chunk mode: at most this many threads across features (8, 16 or 32). Narrower feature tiles make
# more columns, each with fewer tiles along time and so a shallower tree to wait through, at the
# cost of longer per-feature folds in each tile (NT / CT maps a feature)
CHUNK_MAX_CT = 32
# chunk mode: narrow the feature tiles (down to 8 threads) until there are at least this many
# columns: on one H200 a single sequence of 256 bf16 features ran 58% -> 65% of copy forward with
# 4 columns of 8 in place of one of 32, and 1024 features 66% -> 69% with 8 of 16 (docs/benchmarks.md)
CHUNK_MIN_COLS = 8
# stream mode, in place of chunk mode where each column would get from 2 to this many of the GPU's
# multiprocessors (a resident block each): every block waits on the maps of all the others in its
# column, so the more there are, the more often one slow block holds the rest. On one H200 a
# single sequence of 1024 features ran 67-68% -> 71-74% of copy forward (bf16) and 79-80% -> 83-86%
# (fp32) with 16 blocks a column; 256 bf16 features, 4 columns of 33 blocks, lost to the tree with
# three tile buffers (57-60% against 66%) and beat it with two (forward 65.6-67.8% against 65.9-66.4%,
# forward+backward 72.2-75.3% against 69.2-69.9%, four runs over two sessions; docs/benchmarks.md)
STREAM_MAX_BLOCKS = 40
# stream mode: rows a thread owns per tile, at most (shared memory permitting). 13 forward is what fits
# beside the maps in an H100's or H200's 227 KB, spill-free; 13 for 12 took (1, 131072, 256) bf16 forward
# from 78.8-83.0% of copy to 82.2-83.3% on one H100 (docs/benchmarks.md)
STREAM_MAX_ROWS = 13
STREAM_MIN_FILL = 0.9  # stream mode: the least share of the multiprocessors its grid may use
STREAM_BUFFERS = 2  # stream mode's tile buffers, as scan_stream in the .cu has them
# stream mode cuts a column into whole rounds of tiles, so that every block walks as many (on one H100,
# (1, 131072, 256) bf16 forward 81.3% -> 82.25% of copy, means of six same-run pairs); with this, the
# first round's tiles only as long as leaves the others full, else T split evenly. Meant to publish the
# maps every block's first look-back waits for sooner, it did not (the blocks' first two tiles land
# together), but its runs there spread less: 79.8-81.7% against 76.0-81.7% (docs/benchmarks.md)
STREAM_SHORT_HEAD = True


class Unsupported(ImportError):
    """CuPy works, but a GPU here cannot run the kernels."""


def ensure_available():
    """Raise ImportError unless CuPy imports and sees a CUDA device; Unsupported (an ImportError) if a
    device is older than compute capability 8.0, which the kernels' asynchronous copies need."""
    try:
        import cupy
    except ImportError as e:
        raise ImportError(f"CuPy is not installed ({e})") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
        capabilities = [cupy.cuda.Device(d).compute_capability for d in range(count)]  # "90" for 9.0
    except Exception as e:  # CuPy built for another CUDA, no driver, ...
        raise ImportError(f"CuPy cannot use the GPU ({type(e).__name__}: {e})") from None
    if count == 0:
        raise ImportError("CuPy sees no CUDA device")
    for d, cc in enumerate(capabilities):
        if int(cc) < 80:
            raise Unsupported(f"the kernels need compute capability 8.0 or newer (cp.async); device {d} has "
                              f"{cc[:-1]}.{cc[-1]}")


class Plan(NamedTuple):
    CT: int  # threads across features; NT // CT across time
    n_ct: int  # feature tiles per sequence
    ncol: int  # (sequence, feature tile) columns
    n_chunks: int  # blocks along time: 1 = one block walks all of T
    grid: int
    slots: int  # chunk mode: nodes of the tree per column
    rows: int  # positions per thread and tile
    pipe: int  # loop mode: two half-size buffers, the next tile loading while this one is worked on
    long_tiles: int = 0  # loop mode on its long tiles (LOOP_FWD_TILE / LOOP_BWD_TILE)
    stream: int = 0  # stream mode: resident blocks a column (n_chunks: tiles a column)
    head: int = 0  # stream mode: positions in each tile of the first round (0: T split evenly)

    @property
    def mode(self):
        """The kernel's way of cutting time, as kernels/sqrll.cu names it."""
        if self.stream:
            return "STREAM"
        return "LOOP" if self.pipe else "CHUNKS" if self.n_chunks > 1 else "ONE_TILE"


def _fill(ncol, resident):
    """How well `ncol` blocks fill waves of `resident` block slots."""
    return ncol / (-(-ncol // resident) * resident)


def plan(B, T, C, V, L, resident, min_fill=None, tree_log2=None, reg_rows=0, chunk_max_ct=None,
         chunk_min_cols=None, loop=None, stream=None, stream_max_blocks=None, short_head=None):
    """How to cut a (B, T, C) scan moving V features per thread; `resident` blocks fit on the GPU.
    Loop mode takes the long tiles `loop` = (L, resident blocks) gives, if any, where its columns fill
    the GPU with them and are at least LOOP_LONG_MIN_TILES of them long; else tiles of L.
    In chunk mode a thread holds `reg_rows` rows in registers beyond its L in shared memory, and at
    most `chunk_max_ct` threads go across features, fewer (down to 8) where that makes up to
    `chunk_min_cols` columns. `stream` = (multiprocessors, rows a thread owns in a tile), if given,
    turns chunk mode into stream mode where each column gets 2 to `stream_max_blocks` of them, and
    all columns together at least STREAM_MIN_FILL of them; `short_head` (default STREAM_SHORT_HEAD)
    shortens its first round's tiles."""
    min_fill = LOOP_MIN_FILL if min_fill is None else min_fill
    lg = TREE_LOG2 if tree_log2 is None else tree_log2
    chunk_max_ct = CHUNK_MAX_CT if chunk_max_ct is None else chunk_max_ct
    chunk_min_cols = CHUNK_MIN_COLS if chunk_min_cols is None else chunk_min_cols
    stream_max_blocks = STREAM_MAX_BLOCKS if stream_max_blocks is None else stream_max_blocks
    short_head = STREAM_SHORT_HEAD if short_head is None else short_head
    nvec = C // V
    CT = min(32, 1 << (nvec - 1).bit_length())
    while CT > 8 and (-nvec % CT) * 8 > nvec:  # don't leave most of a last feature tile idle
        CT //= 2
    for ct in [CT] + [c for c in (16, 8) if c < CT]:  # narrower feature tiles: more columns
        n_ct = -(-nvec // ct)
        ncol = B * n_ct
        if T <= NT // ct * L:
            return Plan(ct, n_ct, ncol, 1, ncol, 0, L, 0)
        if loop and _fill(ncol, loop[1]) >= min_fill and T >= LOOP_LONG_MIN_TILES * NT // ct * (loop[0] // 2):
            return Plan(ct, n_ct, ncol, 1, ncol, 0, loop[0] // 2, 1, 1)
        if _fill(ncol, resident) >= min_fill:
            return Plan(ct, n_ct, ncol, 1, ncol, 0, L // 2, 1)
    CT = min(CT, chunk_max_ct)
    while CT > 8 and B * -(-nvec // CT) < chunk_min_cols:
        CT //= 2
    n_ct = -(-nvec // CT)
    ncol = B * n_ct
    if stream is not None:
        sms, rows = stream
        full = NT // CT * rows  # positions in a full tile
        n_tiles = -(-T // full)
        gc = min(sms // ncol, n_tiles)
        if 2 <= gc and sms // ncol <= stream_max_blocks and gc * ncol >= STREAM_MIN_FILL * sms:
            # whole rounds of gc tiles, so that every block walks as many; the first round's as short
            # as leaves the others full (or T split evenly over them all)
            rounds = -(-n_tiles // gc)
            head = -(-(T - (rounds - 1) * gc * full) // gc) if short_head and rounds > 1 else 0
            return Plan(CT, n_ct, ncol, rounds * gc, gc * ncol, 0, rows, 0, stream=gc, head=head)
    # T outgrows one shared-memory tile here; register rows may make one tile long enough, but a
    # single tile runs the ONE_TILE kernel, which has none, so chunk mode keeps at least two
    n_tiles = max(2, -(-T // (NT // CT * (L + reg_rows))))
    if ncol * n_tiles >= 2**31:
        raise ValueError(f"scan: (B, T, C) = {(B, T, C)} needs more than 2^31 blocks")
    slots = sum(n_tiles >> (lg * j) for j in range(32 // lg))  # level j holds floor(n / R^j) nodes
    return Plan(CT, n_ct, ncol, n_tiles, ncol * n_tiles, slots, L + reg_rows, 0)


def vector_width(C, element_size, ptrs):
    """Features per thread: 16 bytes' worth where C and every pointer's alignment allow."""
    V = 16 // element_size
    while V > 1 and (C % V or any(p % (V * element_size) for p in ptrs)):
        V //= 2
    return V


@functools.cache
def _source(name="sqrll.cu"):
    """kernels/<name> behind kernels/storage.cuh."""
    return (SOURCE_DIR / "storage.cuh").read_text() + (SOURCE_DIR / name).read_text()


@functools.cache
def _function(name, entry, device, dyn_smem, cooperative=False):
    """The compiled kernel `name` (a cupy.RawKernel) for `device`, which must be CuPy's current one;
    `cooperative`: launched so that all of its blocks run at once (cuLaunchCooperativeKernel)."""
    import cupy

    # CuPy adds -arch=sm_XY of the current device, so the binary is native code for it
    module = cupy.RawModule(code=_source() + entry, options=("-std=c++17",), enable_cooperative_groups=cooperative)
    kernel = module.get_function(name)
    if dyn_smem:  # allow past 48 KB in all, and favour shared memory over L1 (cp.async skips L1)
        kernel.max_dynamic_shared_size_bytes = dyn_smem
        kernel.preferred_shared_memory_carveout = 100
    return kernel


def _tile_smem(dtype, V, L, bwd):
    """Shared memory of a scan block: the tile buffers (dynamic), and the threads' maps (static)."""
    return (3 if bwd else 2) * L * NT * V * torch.finfo(dtype).bits // 8, 2 * NT * V * 4


@functools.cache
def _smem_per_block(device):
    """The most shared memory a block of `device` may have, opted into."""
    import cupy

    return cupy.cuda.runtime.getDeviceProperties(device)["sharedMemPerBlockOptin"]


def _fitting(tile, dtype, V, bwd, device):
    """tile = (L, blocks per SM) with L lowered, 2 at a time, until a block fits `device`'s shared
    memory: the tiles are sized for an H100's 227 KB, and an sm_86 or sm_89 GPU gives a block 99 KB."""
    L, min_blocks = tile
    while L > 2 and sum(_tile_smem(dtype, V, L, bwd)) > _smem_per_block(device):
        L -= 2
    return L, min_blocks


def _long_loop_tiles(bwd, dtype, V, device, loop_tile):
    """`plan`'s loop argument for loop_tile = (L, blocks per SM) on `device`: (L, resident blocks), or
    None where a block of that L would not fit the device's shared memory."""
    L, min_blocks = loop_tile
    if sum(_tile_smem(dtype, V, L, bwd)) > _smem_per_block(device):
        return None
    return L, _resident(device, min_blocks)


def _scan_kernel(dtype, V, L, bwd, mode, min_blocks, device, reg_rows=0):
    S = STORAGE[dtype]
    name = f"sqrll_{'bwd' if bwd else 'fwd'}_{S}_v{V}_l{L}_{mode.lower()}_b{min_blocks}"
    name += f"_x{reg_rows}" if reg_rows else ""
    entry = f"\nSQRLL_SCAN({name}, {S}, {V}, {L}, {'true' if bwd else 'false'}, {mode}, {min_blocks}, {reg_rows})\n"
    dyn_smem = _tile_smem(dtype, V, L, bwd)[0] * (STREAM_BUFFERS if mode == "STREAM" else 1)
    return _function(name, entry, device, dyn_smem, mode == "STREAM"), dyn_smem


def stream_rows(dtype, V, bwd, smem):
    """Rows a thread owns in a stream-mode tile: as many as STREAM_BUFFERS tile buffers and the maps
    fit in `smem` bytes of shared memory, up to STREAM_MAX_ROWS."""
    maps = _tile_smem(dtype, V, 1, bwd)[1] + NT * 4  # the threads' maps and the states entering the tile
    return min(STREAM_MAX_ROWS, (smem - maps) // (STREAM_BUFFERS * _tile_smem(dtype, V, 1, bwd)[0]))


@functools.cache
def _stream_tiles(bwd, dtype, V, device):
    """`plan`'s stream argument on `device`: (multiprocessors, stream_rows), or None where the device
    cannot launch cooperatively or fit two rows."""
    import cupy

    rows = stream_rows(dtype, V, bwd, _smem_per_block(device))
    if rows < 2 or not cupy.cuda.runtime.deviceGetAttribute(95, device):  # 95: cudaDevAttrCooperativeLaunch
        return None
    return _resident(device, 1), rows


# devices that refused a stream-mode grid (fewer multiprocessors usable than the device reports, as
# may be for a process limited to part of the GPU): their long scans take chunk mode instead
_cooperative_refused = set()
SHRUNK_GRID = "The grid size will be reduced"  # CuPy's warning before it shrinks a cooperative grid


@functools.cache
def _resident(device, min_blocks):
    return torch.cuda.get_device_properties(device).multi_processor_count * min_blocks


_streams = {}


class _Handle:
    """A raw stream handle in the CUDA stream protocol, for CuPy's Stream.from_external."""

    def __init__(self, ptr):
        self.ptr = ptr

    def __cuda_stream__(self):
        return (0, self.ptr)


def _stream(device):
    """PyTorch's current stream on `device`, as a CuPy stream object (not owning it)."""
    import cupy

    ptr = torch.cuda.current_stream(device).cuda_stream
    s = _streams.get(ptr)
    if s is None:
        from_external = getattr(cupy.cuda.Stream, "from_external", None)  # CuPy >= 14; ExternalStream before
        s = _streams[ptr] = from_external(_Handle(ptr)) if from_external else cupy.cuda.ExternalStream(ptr)
    return s


def _ptr(t):
    return np.uint64(0 if t is None else t.data_ptr())


def _on(device):
    """Make `device` CuPy's current device for a launch, if it is not already."""
    import cupy

    return contextlib.nullcontext() if cupy.cuda.runtime.getDevice() == device else cupy.cuda.Device(device)


@functools.lru_cache(maxsize=1024)
def _recipe(bwd, dtype, B, T, C, V, device, tile, loop_tile, min_fill, tree_log2, reg_rows, chunk_max_ct,
            chunk_min_cols, stream_max_blocks, short_head):
    """What a launch needs besides the pointers: its plan, kernel, grid, shared memory, scratch (bytes,
    fill byte), last args."""
    L, min_blocks = _fitting(tile, dtype, V, bwd, device)
    p = plan(B, T, C, V, L, _resident(device, min_blocks), min_fill, tree_log2, reg_rows, chunk_max_ct,
             chunk_min_cols, loop=_long_loop_tiles(bwd, dtype, V, device, loop_tile),
             stream=None if device in _cooperative_refused else _stream_tiles(bwd, dtype, V, device),
             stream_max_blocks=stream_max_blocks, short_head=short_head)
    if p.long_tiles:
        L, min_blocks = loop_tile
    if p.stream:
        L, min_blocks = p.rows, 1
    reg_rows = reg_rows if p.mode == "CHUNKS" else 0
    fn, dyn_smem = _scan_kernel(dtype, V, L, bwd, p.mode, min_blocks, device, reg_rows)
    # scratch, and the byte it is filled with: chunk mode, a tagged map per tree node and feature
    # (zero: none written); stream mode, a map word per tile and feature (0xff: none written)
    if p.mode == "CHUNKS":
        scratch = (p.slots * p.ncol * p.CT * V * 16, 0)
    elif p.mode == "STREAM":
        scratch = (p.n_chunks * p.ncol * p.CT * V * 8, 0xFF)
    else:
        scratch = (0, 0)
    ints = (p.CT, p.n_ct, p.ncol, p.n_chunks, tree_log2, p.head)
    tail = (np.int64(T), np.int64(C), *map(np.int32, ints))
    return p, fn, (p.grid,), dyn_smem, scratch, tail


def _recipe_for(bwd, a, ptrs):
    """_recipe for a launch over (B, T, C) tensors like a, whose data pointers are ptrs, under this
    module's current settings."""
    B, T, C = a.shape
    V = vector_width(C, a.element_size(), ptrs)
    return _recipe(bwd, a.dtype, B, T, C, V, a.device.index, BWD_TILE if bwd else FWD_TILE,
                   LOOP_BWD_TILE if bwd else LOOP_FWD_TILE, LOOP_MIN_FILL,
                   TREE_LOG2, CHUNK_REG_ROWS[bwd], CHUNK_MAX_CT, CHUNK_MIN_COLS, STREAM_MAX_BLOCKS, STREAM_SHORT_HEAD)


def launch_plan(x, bwd=False):
    """The Plan that scan_fwd (bwd: scan_bwd) follows for a contiguous CUDA (B, T, C) tensor x, with
    every tensor of the call aligned as x is (for benchmarks and traces)."""
    with _on(x.device.index):
        return _recipe_for(bwd, x, [x.data_ptr()])[0]


def _launch(bwd, a, r, y, h0, out, dr, dh0, flip):
    if a.numel() == 0:
        return
    device = a.device.index
    tensors = (a, r, y, h0, out, dr, dh0)
    ptrs = [t.data_ptr() for t in tensors if t is not None]
    with _on(device):
        p, fn, grid, dyn_smem, (scratch_bytes, fill), tail = _recipe_for(bwd, a, ptrs)
        nodes = torch.full((scratch_bytes,), fill, dtype=torch.uint8, device=a.device) if scratch_bytes else None
        args = (grid, (NT,), (*map(_ptr, tensors), _ptr(nodes), *tail, np.int32(flip)))
        try:
            if p.mode != "STREAM":
                fn(*args, shared_mem=dyn_smem, stream=_stream(device))
            else:  # CuPy shrinks a cooperative grid that does not fit at once, with a warning, where
                # the driver would refuse it; stream mode's plan needs every block, so that is a refusal
                with warnings.catch_warnings():
                    warnings.filterwarnings("error", SHRUNK_GRID, UserWarning)
                    fn(*args, shared_mem=dyn_smem, stream=_stream(device))
        except Exception as e:  # a refused launch ran nothing, so chunk mode can redo it
            if p.mode != "STREAM" or not any(s in str(e) for s in ("COOPERATIVE_LAUNCH_TOO_LARGE", SHRUNK_GRID)):
                raise
            warnings.warn(f"sqrllm: CUDA device {device} cannot run stream mode's {grid[0]} blocks at once "
                          f"({e}); its long scans take chunk mode from now on", RuntimeWarning, stacklevel=3)
            _cooperative_refused.add(device)
            _recipe.cache_clear()
            _launch(bwd, a, r, y, h0, out, dr, dh0, flip)


def scan_fwd(x, r, h0=None, reverse=False, out=None):
    """y = scan(x, r, h0, reverse) for contiguous CUDA (B, T, C) tensors; written into `out` if given."""
    y = torch.empty_like(x) if out is None else out
    _launch(False, x, r, None, h0, y, None, None, bool(reverse))
    return y


def scan_bwd(dy, r, y, h0=None, reverse=False, out=None):
    """(dx, dr, dh0) of the scan that gave y; dh0 is (B, C) even without h0. `out`: the three buffers."""
    B, T, C = dy.shape
    dx, dr, dh0 = (torch.empty_like(dy), torch.empty_like(dy), dy.new_empty(B, C)) if out is None else out
    _launch(True, dy, r, y, h0, dx, dr, dh0, not reverse)
    return dx, dr, dh0


def _baseline(direction, dtype, device):
    S = STORAGE[dtype]
    return _function(f"sqrll_{direction}_baseline_{S}", f"\nSQRLL_BASELINE({S})\n", device, 0)


def scan_fwd_baseline(x, r, h0=None, reverse=False):
    """The forward with one thread per (sequence, feature) walking T."""
    B, T, C = x.shape
    y = torch.empty_like(x)
    device = x.device.index
    with _on(device):
        args = (_ptr(x), _ptr(r), _ptr(h0), _ptr(y), np.int64(B), np.int64(T), np.int64(C), np.int32(reverse))
        _baseline("fwd", x.dtype, device)((-(-B * C // NT),), (NT,), args, stream=_stream(device))
    return y


def scan_bwd_baseline(dy, r, y, h0=None, reverse=False):
    """The backward with one thread per (sequence, feature) walking T; returns (dx, dr, dh0)."""
    B, T, C = dy.shape
    dx, dr, dh0 = torch.empty_like(dy), torch.empty_like(dy), dy.new_empty(B, C)
    device = dy.device.index
    with _on(device):
        args = (
            _ptr(dy), _ptr(r), _ptr(y), _ptr(h0), _ptr(dx), _ptr(dr), _ptr(dh0),
            np.int64(B), np.int64(T), np.int64(C), np.int32(reverse),
        )  # fmt: skip
        _baseline("bwd", dy.dtype, device)((-(-B * C // NT),), (NT,), args, stream=_stream(device))
    return dx, dr, dh0
