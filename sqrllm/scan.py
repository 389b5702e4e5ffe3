"""The sqrll recurrence as one op, with its twins.

    y[t] = r[t] * y[t-1] + x[t]          (y[-1] = h0, or 0)

elementwise over (B, T, C). With reverse=True time runs backwards: y[t] = r[t] * y[t+1] + x[t].

Backward, in words (forward direction): g[t] = dy[t] + r[t+1] * g[t+1]; dx = g;
dr[t] = g[t] * y[t-1]; dh0 = r[0] * g[0].

Implementations, all with the signature of `scan`:
- `scan_ref`: a plain loop through autograd, any dtype including float64. The test oracle.
- the loop path: one fused multiply-add per time step on a time-major float32 copy, with its own
  backward (no per-step autograd graph). Runs on any device; the CPU path.
- the CUDA kernel (`sqrllm.cuda`), used for CUDA tensors when CuPy is installed.

`scan` is registered as the custom ops `sqrllm::scan_fwd` / `sqrllm::scan_bwd`, so
`torch.compile` sees one opaque node with a shape-only fake implementation.
"""

import warnings

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def scan_ref(x, r, h0=None, reverse=False):
    """Readable reference: differentiable, computes in the inputs' dtype (use float64 as oracle)."""
    B, T, C = x.shape
    h = x.new_zeros(B, C) if h0 is None else h0
    ys = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        h = r[:, t] * h + x[:, t]
        ys[t] = h
    return torch.stack(ys, dim=1)


def _loop_fwd(x, r, h0, reverse):
    """(B, T, C) in, (B, T, C) out; accumulates in float32 (float64 stays float64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(acc).transpose(0, 1).contiguous()  # (T, B, C)
    rs = r.to(acc).transpose(0, 1).contiguous()
    if reverse:
        xs, rs = xs.flip(0), rs.flip(0)
    ys = torch.empty_like(xs)
    h = xs.new_zeros(xs.shape[1:]) if h0 is None else h0.to(acc)
    for t in range(xs.shape[0]):
        h = torch.addcmul(xs[t], rs[t], h, out=ys[t])
    if reverse:
        ys = ys.flip(0)
    return ys.transpose(0, 1).to(x.dtype).contiguous()


def _loop_bwd(dy, r, y, h0, reverse):
    """Returns (dx, dr, dh0) for the loop path, dh0 = zeros when there was no h0."""
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    gs = torch.empty(dy.shape[1], dy.shape[0], dy.shape[2], dtype=acc, device=dy.device)
    gs.copy_(dy.transpose(0, 1))  # (T, B, C), becomes g in place
    rs = r.to(acc).transpose(0, 1)
    ys = y.to(acc).transpose(0, 1)
    if reverse:
        gs, rs, ys = gs.flip(0), rs.flip(0), ys.flip(0)
    rs = rs.contiguous()
    T = gs.shape[0]
    for t in range(T - 2, -1, -1):
        gs[t].addcmul_(rs[t + 1], gs[t + 1])
    h_init = gs.new_zeros(gs.shape[1:]) if h0 is None else h0.to(acc)
    y_prev = torch.cat([h_init[None], ys[:-1]], dim=0)  # (T, B, C)
    dr = gs * y_prev
    dh0 = rs[0] * gs[0]
    if reverse:
        gs, dr = gs.flip(0), dr.flip(0)
    dx = gs.transpose(0, 1).to(dy.dtype).contiguous()
    return dx, dr.transpose(0, 1).to(r.dtype).contiguous(), dh0.to(dy.dtype)


_cuda_backend = None  # the sqrllm.cuda module, False once known to be unavailable


def _cuda():
    """The CuPy kernel module, or None (with a one-time warning) when CuPy is missing."""
    global _cuda_backend
    if _cuda_backend is None:
        try:
            from sqrllm import cuda
            cuda.ensure_available()
            _cuda_backend = cuda
        except ImportError as e:
            warnings.warn(
                f"sqrllm: the CUDA scan kernel is unavailable ({e}); using the slower pure-PyTorch "
                'loop on the GPU. Install CuPy with pip install -e ".[cuda12]" (CUDA 12) or '
                '-e ".[cuda13]" (CUDA 13).',
                stacklevel=3,
            )
            _cuda_backend = False
    return _cuda_backend or None


@torch.library.custom_op("sqrllm::scan_fwd", mutates_args=())
def _scan_fwd(x: torch.Tensor, r: torch.Tensor, h0: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    if x.is_cuda and x.dtype != torch.float64 and (k := _cuda()) is not None:
        return k.scan_fwd(x, r, h0, reverse)
    return _loop_fwd(x, r, h0, reverse)


@_scan_fwd.register_fake
def _(x, r, h0, reverse):
    return torch.empty_like(x)


@torch.library.custom_op("sqrllm::scan_bwd", mutates_args=())
def _scan_bwd(
    dy: torch.Tensor, r: torch.Tensor, y: torch.Tensor, h0: torch.Tensor | None, reverse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if dy.is_cuda and dy.dtype != torch.float64 and (k := _cuda()) is not None:
        return k.scan_bwd(dy, r, y, h0, reverse)
    return _loop_bwd(dy, r, y, h0, reverse)


@_scan_bwd.register_fake
def _(dy, r, y, h0, reverse):
    B, T, C = dy.shape
    return torch.empty_like(dy), torch.empty_like(r), dy.new_empty(B, C)


def _setup_context(ctx, inputs, output):
    x, r, h0, reverse = inputs
    ctx.save_for_backward(r, output, h0)
    ctx.reverse = reverse
    ctx.has_h0 = h0 is not None


def _backward(ctx, dy):
    r, y, h0 = ctx.saved_tensors
    dx, dr, dh0 = _scan_bwd(dy.contiguous(), r, y, h0, ctx.reverse)
    return dx, dr, (dh0 if ctx.has_h0 else None), None


torch.library.register_autograd("sqrllm::scan_fwd", _backward, setup_context=_setup_context)


def _check(x, r, h0):
    if x.dim() != 3:
        raise ValueError(f"scan: x must be (B, T, C), got shape {tuple(x.shape)}")
    if r.shape != x.shape:
        raise ValueError(f"scan: r must have the shape of x {tuple(x.shape)}, got {tuple(r.shape)}")
    if x.shape[1] < 1:
        raise ValueError("scan: T must be at least 1")
    for name, t in (("x", x), ("r", r), ("h0", h0)):
        if t is None:
            continue
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"scan: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16, float64")
        if t.device != x.device:
            raise ValueError(f"scan: {name} is on {t.device} but x is on {x.device}; move both to one device")
    if r.dtype != x.dtype:
        raise TypeError(f"scan: x is {x.dtype} but r is {r.dtype}; cast both to one dtype")
    if h0 is not None and h0.shape != (x.shape[0], x.shape[2]):
        raise ValueError(f"scan: h0 must be (B, C) = {(x.shape[0], x.shape[2])}, got {tuple(h0.shape)}")


def scan(x, r, h0=None, reverse=False):
    """y[t] = r[t] * y[t-1] + x[t] over (B, T, C) tensors; see the module docstring.

    x, r: (B, T, C), same dtype (float32, float16, bfloat16 or float64) and device.
    h0: optional (B, C) initial state. Accumulation is float32 (float64 for float64 inputs).
    The final state for carrying is y[:, -1] (y[:, 0] when reverse=True).
    """
    _check(x, r, h0)
    if h0 is not None:
        h0 = h0.to(x.dtype).contiguous()
    return _scan_fwd(x.contiguous(), r.contiguous(), h0, bool(reverse))
