"""sqrllm.optim.AdamW steps as torch.optim.AdamW does (its foreach form, and with fused=True torch's
fused kernel), and its state moves between the two."""

import torch

from sqrllm.optim import AdamW


def params_and_grads(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (3,), (4, 4, 2)]
    return [torch.randn(s, generator=g) for s in shapes], [[torch.randn(s, generator=g) for s in shapes]
                                                         for _ in range(6)]


def groups(params):
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def test_steps_match_torch_adamw():
    init, grads = params_and_grads(0)
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    opt = AdamW(groups(ours), lr=3e-2, betas=(0.9, 0.95))
    ref_opt = torch.optim.AdamW(groups(ref), lr=3e-2, betas=(0.9, 0.95), foreach=False)
    for step_grads in grads:
        for p, q, g in zip(ours, ref, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert p.grad is None
    assert not torch.equal(ours[0], init[0])


def test_state_dict_round_trips_and_loads_into_torch_adamw():
    init, grads = params_and_grads(1)
    a = [p.clone().requires_grad_() for p in init]
    opt = AdamW(groups(a), lr=1e-2, betas=(0.9, 0.99))
    for p, g in zip(a, grads[0]):
        p.grad = g
    opt.step()
    saved = opt.state_dict()
    b = [p.detach().clone().requires_grad_() for p in a]
    again = AdamW(groups(b), lr=0.5, betas=(0.5, 0.5))
    again.load_state_dict(saved)
    ref = [p.detach().clone().requires_grad_() for p in a]
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.99), foreach=False)
    ref_opt.load_state_dict(saved)
    for p, q, r, g in zip(a, b, ref, grads[1]):
        p.grad, q.grad, r.grad = g.clone(), g.clone(), g.clone()
    opt.step()
    again.step()
    ref_opt.step()
    for p, q, r in zip(a, b, ref):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


def test_fused_steps_are_torch_fused_adamw_to_the_bit():
    """fused=True (the CUDA runs' optimizer) calls torch's fused AdamW kernel as torch.optim does: on
    the CPU, where that kernel also runs, weights and state equal torch.optim.AdamW(fused=True)'s."""
    init, grads = params_and_grads(2)
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    opt = AdamW(groups(ours), lr=3e-2, betas=(0.9, 0.95), fused=True)
    ref_opt = torch.optim.AdamW(groups(ref), lr=3e-2, betas=(0.9, 0.95), fused=True)
    for lr, step_grads in zip((3e-2, 2e-2, 1e-2, 5e-3, 1e-3, 1e-4), grads):
        for group in opt.param_groups + ref_opt.param_groups:
            group["lr"] = lr  # as the trainer sets it every step
        for p, q, g in zip(ours, ref, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
    saved, ref_saved = opt.state_dict(), ref_opt.state_dict()
    for i, s in ref_saved["state"].items():
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved["state"][i][k], s[k]) and saved["state"][i][k].dtype == s[k].dtype


def test_building_the_optimizer_skips_torch_dynamo():
    """The point of this class: no torch.optim import (torch._dynamo, about 2 s of start-up)."""
    import subprocess
    import sys

    code = ("import sys, torch; from sqrllm.optim import AdamW; "
            "p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.ones(2); "
            "AdamW([{'params': [p]}], lr=1e-3, fused=True).step(); assert p.ne(0).all(); "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
