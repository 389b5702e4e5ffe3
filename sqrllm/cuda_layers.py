"""The CUDA kernels of the layers around the scan, compiled and launched as `sqrllm.cuda` does its scan:
a sqrll layer's elementwise steps (`kernels/core.cu`, for sqrllm.core), a QRNN layer's pooling with its
gates (`kernels/qrnn.cu`, for sqrllm.qrnn) and one decoding step (`kernels/decode_cuda.cu`, for
sqrllm.decode.KernelStep). Arguments are trusted: their callers validate them.
"""

import functools

import numpy as np
import torch

from sqrllm.cuda import STORAGE, _on, _ptr, _resident, _source, _stream
from sqrllm.kernels import SOURCE_DIR


# --- one decoding step (kernels/decode_cuda.cu), for sqrllm.decode.KernelStep ---

DEC_WARPS = 8  # warps per block, as in the .cu
DEC_MAX_BATCH = 65535  # rows at once: the grids hold the batch in their y dimension


@functools.cache
def _decode_function(name, device):
    with _on(device):
        source = (SOURCE_DIR / "decode_cuda.cu").read_text()
        return _decode_module(source, device).get_function(name)


@functools.cache
def _decode_module(source, device):
    import cupy

    return cupy.RawModule(code=source, options=("-std=c++17",))


def decode_launch(name, rows, batch, *args):
    """Launch decode kernel `name` on PyTorch's current stream of its tensors' device: a warp per one
    of `rows` outputs, grid (ceil(rows / DEC_WARPS), batch); args: tensors (passed as pointers), ints,
    floats."""
    if batch > DEC_MAX_BATCH:
        raise ValueError(f"the CUDA decode kernels take at most {DEC_MAX_BATCH:,} rows at once, got {batch}")
    device = next(a for a in args if isinstance(a, torch.Tensor)).device.index
    packed = tuple(_ptr(a) if isinstance(a, torch.Tensor) else np.int32(a) if isinstance(a, int) else np.float32(a)
                   for a in args)
    with _on(device):
        grid = (-(-rows // DEC_WARPS), batch) if rows else (batch,)
        _decode_function(name, device)(grid, (32 * DEC_WARPS,), packed, stream=_stream(device))


# --- a QRNN layer's pooling with its gates (kernels/qrnn.cu), for sqrllm.qrnn ---

QRNN_THREADS = 128  # threads per block: the .cu's QNT
QRNN_MAX_SEG = 16  # the .cu's QMAX_SEG
# Few (b, j) pairs: split each one's walk over time into segments (the .cu's segmented kernels), up
# to QRNN_MAX_SEG, while there are fewer than this many threads and each segment keeps at least
# QRNN_SEG_STEPS steps; 0 turns segments off.
QRNN_MIN_THREADS = 32768
QRNN_SEG_STEPS = 32


def qrnn_segments(B, T, H):
    """Threads per (b, j) pair walking its T steps: 1, or a power of two up to QRNN_MAX_SEG."""
    n = 1
    while n < QRNN_MAX_SEG and B * H * n < QRNN_MIN_THREADS and T >= 2 * n * QRNN_SEG_STEPS:
        n *= 2
    return n


@functools.cache
def _qrnn_function(name, device):
    import cupy

    with _on(device):
        return cupy.RawModule(code=_source("qrnn.cu"), options=("-std=c++17",)).get_function(name)


def _qrnn_launch(direction, g, args, BH, n):
    """One launch of the forward or backward kernel: BH (b, j) pairs, n threads (segments) each."""
    device = g.device.index
    with _on(device):
        if n == 1:
            fn = _qrnn_function(f"qrnn_{direction}_{STORAGE[g.dtype]}", device)
            fn((-(-BH // QRNN_THREADS),), (QRNN_THREADS,), args, stream=_stream(device))
        else:  # blocks of 32 pairs by n segments
            fn = _qrnn_function(f"qrnn_{direction}_seg_{STORAGE[g.dtype]}", device)
            fn((-(-BH // 32),), (32, n), args, stream=_stream(device))


def qrnn_fwd(g, bias, c0, H, gates, reverse, s, td, keep_c):
    """The pooled QRNN layer from its gate pre-activations g, contiguous (T, B, gates * H) (td = 0)
    or (B, T, gates * H) (td = 1), to which the kernel adds bias (gates * H, float32, contiguous, or
    None): -> (h like g with H features, c of every step in float32 if keep_c else None, the last c
    (B, H)). c0: (B, H) in g's dtype, or None."""
    T, B = g.shape[td], g.shape[1 - td]
    h = g.new_empty(*g.shape[:2], H)
    c_all = torch.empty(h.shape, dtype=torch.float32, device=g.device) if keep_c else None
    c_last = g.new_empty(B, H)
    if h.numel():
        sizes = (T, B, H, g.stride(td), g.stride(1 - td), h.stride(td), h.stride(1 - td))
        args = (*map(_ptr, (g, bias, c0, h, c_all, c_last)), *map(np.int64, sizes), np.int32(gates),
                np.int32(reverse), np.float32(s))
        _qrnn_launch("fwd", g, args, B * H, qrnn_segments(B, T, H))
    else:  # no steps: the state passes through
        c_last = c0.clone() if c0 is not None else c_last.zero_()
    return h, c_all, c_last


def qrnn_bwd(g, bias, c_all, c0, dh, dc_last, H, gates, reverse, s, td, want_dbias):
    """Gradients of qrnn_fwd: -> (dg like g, dc0 (B, H) or None without c0, dbias (gates * H,) float32
    or None unless want_dbias). dh like h, contiguous; dc_last (B, H) or None."""
    T, B = g.shape[td], g.shape[1 - td]
    n = qrnn_segments(B, T, H)
    dg = torch.empty_like(g)
    dc0 = g.new_empty(B, H) if c0 is not None else None
    # the kernel's partial sums: one row per (segment, b); their sum over rows is the bias gradient
    make = torch.empty if dg.numel() else torch.zeros  # the kernel writes every row
    parts = make(n * B, g.shape[-1], dtype=torch.float32, device=g.device) if want_dbias else None
    if dg.numel():
        sizes = (T, B, H, g.stride(td), g.stride(1 - td), dh.stride(td), dh.stride(1 - td))
        args = (*map(_ptr, (g, bias, c_all, c0, dh, dc_last, dg, dc0, parts)), *map(np.int64, sizes),
                np.int32(gates), np.int32(reverse), np.float32(s))
        _qrnn_launch("bwd", g, args, B * H, n)
    elif dc0 is not None:
        dc0 = dc_last.clone() if dc_last is not None else dc0.zero_()
    return dg, dc0, None if parts is None else parts.sum(0)


# --- a sqrll layer's elementwise work around its scan (kernels/core.cu), for sqrllm.core ---

CORE_THREADS = 256  # at most, a block: one row's features at a time (kernels/core.cu)


@functools.cache
def _core_function(name, device):
    with _on(device):
        return _core_module(device).get_function(name)


@functools.cache
def _core_module(device):
    """kernels/core.cu as one module: its twelve kernels from one NVRTC compile."""
    import cupy

    return cupy.RawModule(code=_source("core.cu"), options=("-std=c++17",))


@functools.cache
def _threads_per_sm(device):
    return torch.cuda.get_device_properties(device).max_threads_per_multi_processor


def _core_launch(step, ref, *args):
    """Launch core_<step>_<storage> over ref's rows (grid-stride, as many blocks as fit at once) and
    features (a block's threads, a warp multiple up to CORE_THREADS); args: tensors (as pointers) or None."""
    device = ref.device.index
    C = ref.shape[-1]
    n = ref.numel() // C if C else 0
    if n == 0:
        return
    threads = min(CORE_THREADS, -(-C // 32) * 32)
    blocks = min(n, _resident(device, 1) * (_threads_per_sm(device) // threads))
    with _on(device):
        fn = _core_function(f"core_{step}_{STORAGE[ref.dtype]}", device)
        fn((blocks,), (threads,), (*map(_ptr, args), np.int64(n), np.int64(C)), stream=_stream(device))


class CoreSteps:
    """sqrllm.core's four elementwise steps on CUDA tensors: p (B, T, 4C) and the (B, T, C) tensors
    contiguous, reset (B, T) bool or None, zone (B, T, C) bool or None; the same signatures as
    sqrllm.core._StepsRef."""

    @staticmethod
    def gates_fwd(p, reset, zone):
        C = p.shape[-1] // 4
        x, r = p.new_empty(*p.shape[:-1], C), p.new_empty(*p.shape[:-1], C)
        _core_launch("gates_fwd", x, p, reset, zone, x, r)
        return x, r

    @staticmethod
    def out_fwd(y, p):
        z = torch.empty_like(y)
        _core_launch("out_fwd", y, y, p, z)
        return z

    @staticmethod
    def out_bwd(dz, y, p, dp):
        dy = torch.empty_like(y)
        _core_launch("out_bwd", y, dz, y, p, dy, dp)
        return dy

    @staticmethod
    def gates_bwd(dx, dr, p, reset, zone, dp):
        _core_launch("gates_bwd", dx, dx, dr, p, reset, zone, dp)
