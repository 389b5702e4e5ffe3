"""The sqrll recurrence as one op, with its twins.

    y[t] = r[t] * y[t-1] + x[t]          (y[-1] = h0, or 0)

elementwise over (B, T, C). With reverse=True time runs backwards: y[t] = r[t] * y[t+1] + x[t].

Backward, in words (forward direction): g[t] = dy[t] + r[t+1] * g[t+1]; dx = g;
dr[t] = g[t] * y[t-1]; dh0 = r[0] * g[0]. A backward whose result is differentiated again
(create_graph=True) computes the same as ops autograd records: g is itself a scan.

Implementations, all with the signature of `scan`:
- `scan_ref`: a plain loop through autograd, any dtype including float64. The test oracle.
- `scan_doubling`: the same maps composed in log2(T) doubling steps through autograd, for an oracle
  over long sequences, where the loop's T steps each way are slow (held to `scan_ref` by the tests).
- the loop path: one fused multiply-add per time step on (B, C) slices, with its own backward (no
  per-step autograd graph). Runs on any device: the CPU path where the C++ kernel cannot be built,
  the GPU path where CuPy is missing.
- the C++ kernel (`sqrllm.cpu`, `kernels/scan_cpu.cpp`), used for CPU tensors when the system C++
  compiler builds it (once, cached): the loop path spends more on launching its per-step ops than
  on arithmetic.
- the CUDA kernel (`sqrllm.cuda`), used for CUDA tensors when CuPy is installed.

`scan` is registered as the custom ops `sqrllm::scan_fwd` / `sqrllm::scan_bwd`, so
`torch.compile` sees one opaque node with a shape-only fake implementation; eager calls reach the
same implementations through a plain autograd.Function.
"""

import warnings

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def scan_ref(x, r, h0=None, reverse=False):
    """Readable reference: differentiable, computes in the inputs' dtype (use float64 as oracle)."""
    B, T, C = x.shape
    h = x.new_zeros(B, C) if h0 is None else h0
    xs, rs = x.unbind(1), r.unbind(1)  # (unbind's gradient is one stack; indexing x[:, t] would make T)
    ys = [None] * T
    for t in (reversed(range(T)) if reverse else range(T)):
        h = rs[t] * h + xs[t]
        ys[t] = h
    return torch.stack(ys, dim=1)


def scan_doubling(x, r, h0=None, reverse=False):
    """scan_ref's result, from log2(T) steps that each double the span of the map every position holds.

    Position t holds the map h -> A[t] h + b[t] of the steps (t - d, t]; composing it with the map
    held at t - d gives the steps (t - 2d, t]. Once d >= T, b is y (h0 folded into step 0).
    Elementwise products and sums only, so float64 through autograd is an oracle for any T.
    """
    if reverse:
        return scan_doubling(x.flip(1), r.flip(1), h0).flip(1)
    h0 = x.new_zeros(x.shape[0], x.shape[2]) if h0 is None else h0  # (B, C); r[0] in the graph either way
    A, b = r, torch.cat([r[:, :1] * h0[:, None] + x[:, :1], x[:, 1:]], dim=1)
    d, T = 1, x.shape[1]
    while d < T:
        b = torch.cat([b[:, :d], A[:, d:] * b[:, :-d] + b[:, d:]], dim=1)
        A = torch.cat([A[:, :d], A[:, d:] * A[:, :-d]], dim=1)
        d *= 2
    return b


def _loop_fwd(x, r, h0, reverse):
    """(B, T, C) in, (B, T, C) out: one fused multiply-add per step, in place on (B, C) slices.

    Accumulates in float32 (float64 stays float64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa, ra = x.to(acc), r.to(acc)
    y = torch.empty_like(xa)
    h = xa.new_zeros(x.shape[0], x.shape[2]) if h0 is None else h0.to(acc)
    T = x.shape[1]
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h = torch.addcmul(xa[:, t], ra[:, t], h, out=y[:, t])
    return y.to(x.dtype)


def _loop_bwd(dy, r, y, h0, reverse):
    """Returns (dx, dr, dh0) for the loop path; dh0 is zeros when there was no h0."""
    acc = torch.float64 if dy.dtype == torch.float64 else torch.float32
    g = dy.to(acc, copy=True)  # becomes g in place: g[t] = dy[t] + r[t+1] * g[t+1]
    ra, ya = r.to(acc), y.to(acc)
    T = g.shape[1]
    first = T - 1 if reverse else 0  # the step that read h0
    if reverse:
        for t in range(1, T):
            g[:, t].addcmul_(ra[:, t - 1], g[:, t - 1])
    else:
        for t in range(T - 2, -1, -1):
            g[:, t].addcmul_(ra[:, t + 1], g[:, t + 1])
    dr = torch.empty_like(g)
    if T > 1:
        if reverse:
            torch.mul(g[:, :-1], ya[:, 1:], out=dr[:, :-1])
        else:
            torch.mul(g[:, 1:], ya[:, :-1], out=dr[:, 1:])
    if h0 is None:
        dr[:, first] = 0
    else:
        torch.mul(g[:, first], h0.to(acc), out=dr[:, first])
    dh0 = ra[:, first] * g[:, first]
    return g.to(dy.dtype), dr.to(r.dtype), dh0.to(dy.dtype)


_cuda_backend = None  # the sqrllm.cuda module, False once known to be unavailable
_cpu_backend = None  # the sqrllm.cpu module once its scan kernel has loaded, False where it cannot


def _cpu():
    """sqrllm.cpu when its C++ scan builds and loads here, else None: the loop path serves, as fast
    as it ever was, so there is no warning (`sqrllm.cpu.available("scan_cpu")` says why)."""
    global _cpu_backend
    if _cpu_backend is None:
        from sqrllm import cpu
        _cpu_backend = cpu if cpu.available("scan_cpu")[0] else False
    return _cpu_backend or None


def _cuda():
    """The CuPy kernel module, or None (with a one-time warning) when CuPy is missing or a GPU here is
    too old for the kernels."""
    global _cuda_backend
    if _cuda_backend is None:
        from sqrllm import cuda

        try:
            cuda.ensure_available()
            _cuda_backend = cuda
        except ImportError as e:
            fix = "" if isinstance(e, cuda.Unsupported) else (
                ' Install CuPy with pip install -e ".[cuda12]" (CUDA 12) or -e ".[cuda13]" (CUDA 13).')
            warnings.warn(f"sqrllm: the CUDA scan kernel is unavailable ({e}); using the slower pure-PyTorch "
                          f"loop on the GPU.{fix}", stacklevel=3)
            _cuda_backend = False
    return _cuda_backend or None


def _backend(t):
    """The kernel module for t's device (sqrllm.cuda, sqrllm.cpu), or None for the loop path."""
    if t.is_cuda:
        return _cuda() if t.dtype != torch.float64 else None
    return _cpu() if t.device.type == "cpu" else None


def _forward(x, r, h0, reverse):
    if (k := _backend(x)) is not None:
        return k.scan_fwd(x, r, h0, reverse)
    return _loop_fwd(x, r, h0, reverse)


def _grads(dy, r, y, h0, reverse):
    if (k := _backend(dy)) is not None:
        return k.scan_bwd(dy, r, y, h0, reverse)
    return _loop_bwd(dy, r, y, h0, reverse)


def _grads_differentiable(dy, r, y, h0, reverse):
    """_grads as ops autograd records, so that gradients of gradients are exact: g is a scan the
    other way, each step's multiplier the next step's r (g[t] = dy[t] + r[t+1] * g[t+1])."""
    first = dy.shape[1] - 1 if reverse else 0  # the step that read h0
    zero = r.new_zeros(r.shape[0], 1, r.shape[2])  # (B, 1, C)
    before = zero if h0 is None else h0[:, None].to(y.dtype)  # the state step `first` read
    if reverse:
        r_next, y_prev = torch.cat([zero, r[:, :-1]], 1), torch.cat([y[:, 1:], before], 1)
    else:
        r_next, y_prev = torch.cat([r[:, 1:], zero], 1), torch.cat([before, y[:, :-1]], 1)
    g = scan(dy, r_next, None, not reverse)
    return g, g * y_prev, r[:, first] * g[:, first]


def twin_grads(outputs, grad_outputs, inputs, needs):
    """For a backward whose result is differentiated again: the gradients of `outputs` (from a
    differentiable twin of a fused op; one whose gradient is None is left out) with respect to the
    `inputs` whose `needs` is set, None for the others."""
    outputs, grad_outputs = zip(*[(o, g) for o, g in zip(outputs, grad_outputs) if g is not None])
    wanted = [t for t, need in zip(inputs, needs) if need]
    grads = iter(torch.autograd.grad(outputs, wanted, grad_outputs, create_graph=True))
    return [next(grads) if need else None for need in needs]


@torch.library.custom_op("sqrllm::scan_fwd", mutates_args=())
def _scan_fwd(x: torch.Tensor, r: torch.Tensor, h0: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    return _forward(x, r, h0, reverse)


@_scan_fwd.register_fake
def _(x, r, h0, reverse):
    return torch.empty_like(x)


@torch.library.custom_op("sqrllm::scan_bwd", mutates_args=())
def _scan_bwd(
    dy: torch.Tensor, r: torch.Tensor, y: torch.Tensor, h0: torch.Tensor | None, reverse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _grads(dy, r, y, h0, reverse)


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
    dx, dr, dh0 = _scan_bwd(dy.contiguous(), r, y, h0, ctx.reverse)  # torch.compile has no double backward
    return dx, dr, (dh0 if ctx.has_h0 else None), None


torch.library.register_autograd("sqrllm::scan_fwd", _backward, setup_context=_setup_context)


class _Scan(torch.autograd.Function):
    """Eager calls: the same implementations without the custom ops' dispatch, which costs about
    as much host time as the CUDA kernels' own launches."""

    @staticmethod
    def forward(ctx, x, r, h0, reverse):
        y = _forward(x, r, h0, reverse)
        ctx.save_for_backward(r, y, h0)
        ctx.reverse = reverse
        return y

    @staticmethod
    def backward(ctx, dy):
        r, y, h0 = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: these gradients are differentiated again
            dx, dr, dh0 = _grads_differentiable(dy, r, y, h0, ctx.reverse)
        else:
            dx, dr, dh0 = _grads(dy.contiguous(), r, y, h0, ctx.reverse)
        return dx, dr, (dh0 if h0 is not None else None), None


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
    x, r, reverse = x.contiguous(), r.contiguous(), bool(reverse)
    if torch.compiler.is_compiling():
        return _scan_fwd(x, r, h0, reverse)  # one opaque node in the graph
    return _Scan.apply(x, r, h0, reverse)
