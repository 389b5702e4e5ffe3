"""A sqrll layer between its two matrix multiplies, as one op:

    p = [f | a | g | o]                        (B, T, 4C): the layer's one input projection
    r = sigmoid(f)  (0 where reset)            forget gate
    x = a * sigmoid(g)                         gated input
    (r, x) = (1, 0) where zone, unless reset   zoneout: the memory keeps its value there
    y = scan(x, r, h0)                         y[t] = r[t] * y[t-1] + x[t]
    z = softsign(y) * sigmoid(o)               (B, T, C): the output projection's input

`core(p, h0, reset, zone) -> (z, y[:, -1])`. Backward, in words: dy = dz * sigmoid(o) / (1 + |y|)^2,
do = dz * softsign(y) * sigmoid'(o); the scan's backward gives dx, dr (sqrllm/scan.py); then
df = dr * sigmoid'(f) (0 where reset), da = dx * sigmoid(g), dg = dx * a * sigmoid'(g), all three 0
where zoned.

Implementations:
- `core_ref`: the composition of torch ops (what SqrllLayer computed inline); the CPU path, the
  compiled path (Inductor fuses it itself) and the oracle.
- `_Core`: an autograd.Function of four elementwise steps around the scan, each a CUDA kernel
  (`kernels/core.cu`) on CUDA tensors, which reads p's column slices in place and writes dp slice
  by slice: on the GPU the composition runs its elementwise ops on strided views of p, which
  PyTorch's vectorized kernels do not take, and assembles dp with a concatenation. On CPU tensors
  the same steps run as torch ops (`_StepsRef`), so that the backward's formulas are tested without
  a GPU.
"""

import torch
import torch.nn.functional as F

from sqrllm import scan as scan_mod
from sqrllm.scan import scan


def _zone_only(zone, reset):
    """The zoned elements that are not on reset rows: a reset always forgets."""
    return zone if reset is None else zone & ~reset[..., None]


def _masked(r, x, reset, zone):
    """The scan's inputs r, x with zoneout and resets applied."""
    if zone is not None:  # (B, T, C) bool: y[t] = y[t-1] there
        zone = _zone_only(zone, reset)
        r, x = r.masked_fill(zone, 1.0), x.masked_fill(zone, 0.0)
    if reset is not None:  # (B, T) bool: y[t] = x[t] there, nothing before t is remembered
        r = r.masked_fill(reset[..., None], 0.0)
    return r, x


def core_ref(p, h0=None, reset=None, zone=None):
    f, a, g, o = p.chunk(4, dim=-1)
    r, x = _masked(torch.sigmoid(f), a * torch.sigmoid(g), reset, zone)
    y = scan(x, r, h0)
    return F.softsign(y) * torch.sigmoid(o), y[:, -1].detach()


def _acc(t):
    return t.to(torch.promote_types(t.dtype, torch.float32))  # float32 arithmetic (float64 stays)


class _StepsRef:
    """The four elementwise steps of `_Core` as torch ops, in float32 (float64 for float64), stored in
    p's dtype."""

    @staticmethod
    def gates_fwd(p, reset, zone):
        f, a, g, _ = _acc(p).chunk(4, dim=-1)
        r, x = _masked(torch.sigmoid(f), a * torch.sigmoid(g), reset, zone)
        return x.to(p.dtype), r.to(p.dtype)

    @staticmethod
    def out_fwd(y, p):
        o = _acc(p)[..., 3 * y.shape[-1]:]
        return (F.softsign(_acc(y)) * torch.sigmoid(o)).to(y.dtype)

    @staticmethod
    def out_bwd(dz, y, p, dp):
        C = y.shape[-1]
        s, v, d = torch.sigmoid(_acc(p)[..., 3 * C:]), _acc(y), _acc(dz)
        q = 1.0 / (1.0 + v.abs())
        dp[..., 3 * C:] = d * v * q * s * (1.0 - s)
        return (d * s * q * q).to(y.dtype)

    @staticmethod
    def gates_bwd(dx, dr, p, reset, zone, dp):
        C = dx.shape[-1]
        f, a, g, _ = _acc(p).chunk(4, dim=-1)
        rr, s, d = torch.sigmoid(f), torch.sigmoid(g), _acc(dx)
        df = _acc(dr) * rr * (1.0 - rr)
        if zone is not None:
            zone = _zone_only(zone, reset)
            df, d = df.masked_fill(zone, 0.0), d.masked_fill(zone, 0.0)
        if reset is not None:
            df = df.masked_fill(reset[..., None], 0.0)
        dp[..., :C] = df
        dp[..., C:2 * C] = d * s
        dp[..., 2 * C:3 * C] = d * a * s * (1.0 - s)


def _steps(device_type):
    if device_type == "cuda":
        from sqrllm import cuda_layers
        return cuda_layers.CoreSteps
    return _StepsRef


class _Core(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, h0, reset, zone):
        steps = _steps(p.device.type)
        x, r = steps.gates_fwd(p, reset, zone)
        y = scan_mod._forward(x, r, h0, False)
        ctx.save_for_backward(p, r, y, h0, reset, zone)
        ctx.has_h0 = h0 is not None
        last = y[:, -1].clone()
        ctx.mark_non_differentiable(last)
        return steps.out_fwd(y, p), last

    @staticmethod
    def backward(ctx, dz, _):
        p, r, y, h0, reset, zone = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
            return _differentiable_grads(p, h0, reset, zone, dz, ctx.needs_input_grad)
        steps = _steps(p.device.type)
        dp = torch.empty_like(p)
        dy = steps.out_bwd(dz.contiguous(), y, p, dp)
        dx, dr, dh0 = scan_mod._grads(dy, r, y, h0, False)
        steps.gates_bwd(dx, dr, p, reset, zone, dp)
        return dp, (dh0 if ctx.has_h0 else None), None, None


def _differentiable_grads(p, h0, reset, zone, dz, needs):
    """_Core's gradients (dp, dh0, None, None) through core_ref, for a backward whose result is
    differentiated again: the recomputed forward costs what it would unfused."""
    return (*scan_mod.twin_grads([core_ref(p, h0, reset, zone)[0]], [dz], (p, h0), needs[:2]), None, None)


def fused_available(p):
    """Whether `core` runs `_Core` with CUDA kernels for p: eager CUDA tensors, CuPy present."""
    return p.is_cuda and p.dtype != torch.float64 and not torch.compiler.is_compiling() and scan_mod._cuda() is not None


def core(p, h0=None, reset=None, zone=None, fused=None):
    """(z, y[:, -1]) for p (B, T, 4C), h0 (B, C) or None, reset (B, T) bool or None, zone (B, T, C)
    bool or None (zoneout); see the module docstring. fused: None = `_Core` where CUDA kernels serve
    it, else `core_ref`; True forces `_Core` (on CPU tensors with its torch steps, for tests)."""
    if p.dim() != 3 or p.shape[-1] % 4:
        raise ValueError(f"core: p must be (B, T, 4C), got shape {tuple(p.shape)}")
    if zone is not None and (zone.dtype != torch.bool or zone.shape != (*p.shape[:-1], p.shape[-1] // 4)):
        raise ValueError(f"core: zone must be a bool tensor of shape {(*p.shape[:-1], p.shape[-1] // 4)} (B, T, C), "
                         f"got {zone.dtype} {tuple(zone.shape)}")
    if fused is None:
        fused = fused_available(p)
    if not fused:
        return core_ref(p, h0, reset, zone)
    if h0 is not None:
        h0 = h0.to(p.dtype).contiguous()
    contiguous = [None if t is None else t.contiguous() for t in (reset, zone)]
    return _Core.apply(p.contiguous(), h0, *contiguous)
