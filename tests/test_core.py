"""sqrllm.core: the layer's elementwise work around the scan as one op. Its fused form (`_Core`:
four steps, CUDA kernels on the GPU) against the composition of torch ops it replaces."""

import pytest
import torch

from sqrllm.core import core, core_ref
from sqrllm.model import SqrLLM

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def inputs(B, T, C, dtype=torch.float64, device="cpu", seed=0, h0=True, reset=True):
    g = torch.Generator().manual_seed(seed)
    p = (2 * torch.randn(B, T, 4 * C, generator=g, dtype=torch.float64)).to(device, dtype).requires_grad_()
    h = torch.randn(B, C, generator=g, dtype=torch.float64).to(device, dtype).requires_grad_() if h0 else None
    cut = (torch.rand(B, T, generator=g) < 0.1).to(device) if reset else None
    return p, h, cut


def zone_of(B, T, C, device="cpu", seed=1, rate=0.3):
    """A zoneout mask: (B, T, C) bool, True at about `rate` of the elements."""
    return (torch.rand(B, T, C, generator=torch.Generator().manual_seed(seed)) < rate).to(device)


@pytest.mark.parametrize("h0,reset,zoned", [(True, True, False), (False, False, False), (True, False, False),
                                            (True, True, True), (False, False, True)])
def test_fused_backward_matches_numerical_gradients(h0, reset, zoned):
    """First and second derivatives (a backward with create_graph=True is differentiated again)."""
    p, h, cut = inputs(2, 7, 3, h0=h0, reset=reset)
    zone = zone_of(2, 7, 3) if zoned else None
    args = (p, h) if h0 else (p,)
    assert torch.autograd.gradcheck(lambda *a: core(a[0], a[1] if h0 else None, cut, zone, fused=True)[0], args)
    assert torch.autograd.gradgradcheck(lambda *a: core(a[0], a[1] if h0 else None, cut, zone, fused=True)[0], args)
    assert torch.autograd.gradcheck(lambda *a: core_ref(a[0], a[1] if h0 else None, cut, zone)[0], args)


@pytest.mark.parametrize("T,zoned", [(1, False), (5, False), (64, False), (64, True)])
def test_fused_equals_the_composition(T, zoned):
    p, h, cut = inputs(3, T, 8, dtype=torch.float32)
    zone = zone_of(3, T, 8) if zoned else None
    z_ref, last_ref = core_ref(p, h, cut, zone)
    dz = torch.randn_like(z_ref)
    grads_ref = torch.autograd.grad(z_ref, (p, h), dz)
    z, last = core(p, h, cut, zone, fused=True)
    grads = torch.autograd.grad(z, (p, h), dz)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(last, last_ref)
    assert not last.requires_grad  # the memory to carry is detached, as the layer's always was
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_the_layer_on_the_cpu_is_the_composition():
    """CPU runs take core_ref: the model's numbers do not change with the op."""
    p, h, cut = inputs(2, 9, 4, dtype=torch.float32)
    z, last = core(p, h, cut)
    z_ref, last_ref = core_ref(p, h, cut)
    assert torch.equal(z, z_ref) and torch.equal(last, last_ref)


def test_bad_shape_is_named():
    with pytest.raises(ValueError, match=r"\(B, T, 4C\)"):
        core(torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match=r"zone must be a bool tensor of shape \(2, 3, 5\)"):
        core(torch.zeros(2, 3, 20), zone=torch.zeros(2, 3, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="zone must be a bool tensor"):
        core(torch.zeros(2, 3, 20), zone=torch.zeros(2, 3, 5))


@pytest.mark.parametrize("fused", [False, True])
def test_zoned_memory_keeps_its_value(fused):
    """Where zoned, a feature's memory passes through unchanged and its gates get no gradient; a reset
    row forgets whatever the zone says."""
    B, T, C = 2, 6, 4
    p, h, _ = inputs(B, T, C)
    zone = torch.zeros(B, T, C, dtype=torch.bool)
    zone[:, :, :2] = True  # features 0 and 1 zoned at every step
    zone[1, 3, 2] = True  # feature 2 of row 1 at step 3 only
    cut = torch.zeros(B, T, dtype=torch.bool)
    cut[0, 4] = True  # row 0 resets at step 4, zoned or not
    z, last = core(p, h, cut, zone, fused=fused)
    z_free, _ = core(p, h, cut, None, fused=fused)
    assert torch.equal(last[1, :2], h[1, :2].detach())  # never reset: h0 carried to the end
    assert not torch.equal(last[0, :2], h[0, :2].detach())  # the reset at step 4 took in that step's input
    # row 1, feature 2: the outputs differ from the unzoned run from step 3 on, not before
    assert torch.equal(z[1, :3, 2], z_free[1, :3, 2]) and not torch.equal(z[1, 3:, 2], z_free[1, 3:, 2])
    dp, = torch.autograd.grad(z.sum(), p)
    f, a, g, _ = dp.chunk(4, dim=-1)
    for d in (f, a, g):
        assert torch.all(d[1, :, :2] == 0) and torch.all(d[0, :4, :2] == 0) and d[1, 3, 2] == 0
    assert torch.all(a[0, 4, :2] != 0) and torch.all(g[0, 4, :2] != 0)  # the reset step's input is live


def max_errors(dtype, p, h, cut, zone, dz, ref, fused):
    q = [t.detach().to(dtype).requires_grad_() for t in (p, h)]
    z, last = core(q[0], q[1], cut, zone, fused=fused)
    grads = torch.autograd.grad(z, q, dz.to(dtype))
    return [(a.double() - b).abs().max().item() for a, b in zip((z, last, *grads), ref)]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,T,C", [(1, 1, 1), (2, 63, 5), (4, 256, 128), (1, 4097, 64)])
@pytest.mark.parametrize("zoned", [False, True])
def test_cuda_kernels_are_as_exact_as_the_composition(dtype, B, T, C, zoned):
    """Against float64: in float16 and bfloat16 the fused op errs no more than the composition of torch
    ops in `dtype` (the path it replaces) does, output by output, give or take a quarter and one ulp of
    slack (an ulp at the output's largest magnitude); in float32 it agrees to 1e-5. (In float32 both
    paths err by rounding noise alone, around 1e-7, and which of the two errs less at a given draw is a
    coin toss: the CPU's fused path errs more than 1.25 times the composition in 13 of 200 draws of dz
    at (2, 63, 5).)"""
    p, h, cut = inputs(B, T, C, dtype=torch.float32, device="cuda")
    zone = zone_of(B, T, C, device="cuda") if zoned else None
    ref_in = [t.detach().double().requires_grad_() for t in (p, h)]
    z_ref, last_ref = core_ref(ref_in[0], ref_in[1], cut, zone)
    dz = torch.randn(z_ref.shape, generator=torch.Generator().manual_seed(2), dtype=z_ref.dtype).cuda()
    ref = (z_ref, last_ref, *torch.autograd.grad(z_ref, ref_in, dz))
    fused = max_errors(dtype, p, h, cut, zone, dz, ref, fused=True)
    composed = max_errors(dtype, p, h, cut, zone, dz, ref, fused=False)
    for name, a, b, want in zip(("z", "last", "dp", "dh0"), fused, composed, ref):
        if dtype == torch.float32:
            assert a <= 1e-5, f"{name}: fused errs {a:.3g}"
        else:  # one ulp at the output's largest magnitude: its last bit
            ulp = torch.finfo(dtype).eps * max(1.0, want.abs().max().item())
            assert a <= 1.25 * b + ulp, f"{name}: fused errs {a:.3g}, the composition {b:.3g}, one ulp {ulp:.3g}"


@needs_cuda
@pytest.mark.gpu
def test_model_with_fused_layers_trains_as_the_composition(monkeypatch, fused_core_calls):
    """A SqrLLM's loss and gradients on CUDA in float32 with the fused op and with the composition."""
    torch.manual_seed(0)
    model = SqrLLM(50, n_layer=2, n_embd=32, n_mem=16).cuda()
    idx = torch.randint(0, 50, (4, 40), device="cuda")
    model.reset_token = 7

    def run():
        model.zero_grad()
        _, loss, _ = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    fused_loss, fused_grads = run()
    assert len(fused_core_calls) == 2  # each sqrll layer ran the fused op (CuPy present), not the composition
    monkeypatch.setattr("sqrllm.core.fused_available", lambda p: False)
    ref_loss, ref_grads = run()
    assert len(fused_core_calls) == 2
    assert fused_loss == pytest.approx(ref_loss, rel=1e-5)
    for a, b in zip(fused_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
