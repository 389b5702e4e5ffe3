"""AdamW computed as torch.optim.AdamW computes it, without building a torch.optim optimizer.

Why: building any torch.optim optimizer imports torch._dynamo, about 2 s of every run's start-up
(8% of a 25-second CPU run; 5% of the 45-second GPU race). On the CPU it is a handful of foreach
ops; with fused=True (CUDA runs) it is torch's own fused AdamW kernel, called as torch.optim's fused
path calls it. The state_dict has torch.optim's layout, so checkpoints read either way.
"""

import math

import torch


class AdamW:
    """Decoupled weight decay, bias-corrected moments, no amsgrad; param_groups as torch.optim's."""

    def __init__(self, groups, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=False):
        self.fused = fused  # torch's fused kernel (one launch a group); the step counts live beside the parameters
        self.param_groups = []
        for group in groups:
            group = dict(group)
            group["params"] = list(group["params"])
            group.setdefault("weight_decay", weight_decay)
            group.update(lr=lr, betas=tuple(betas), eps=eps)
            self.param_groups.append(group)
        self.state = {}  # param -> {"step", "exp_avg", "exp_avg_sq"}

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p not in self.state:
                    step = torch.zeros((), dtype=torch.float32, device=p.device) if self.fused else torch.tensor(0.0)
                    self.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            exp_avg = [s["exp_avg"] for s in states]
            exp_avg_sq = [s["exp_avg_sq"] for s in states]
            beta1, beta2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            torch._foreach_add_([s["step"] for s in states], 1.0)
            if self.fused:
                torch._fused_adamw_(params, grads, exp_avg, exp_avg_sq, [], [s["step"] for s in states], lr=lr,
                                    beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=eps,
                                    amsgrad=False, maximize=False)
                continue
            step = states[0]["step"].item()  # parameters of a group step together
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
            torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
            torch._foreach_mul_(exp_avg_sq, beta2)
            torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1.0 - beta2)
            denom = torch._foreach_sqrt(exp_avg_sq)
            torch._foreach_div_(denom, math.sqrt(1.0 - beta2**step))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, exp_avg, denom, -lr / (1.0 - beta1**step))

    def zero_grad(self, set_to_none=True):
        for p in self._params():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self):
        index = {p: i for i, p in enumerate(self._params())}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        state = {index[p]: {k: v.clone() for k, v in s.items()} for p, s in self.state.items()}
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved):
        params = self._params()
        sizes = [len(g["params"]) for g in saved["param_groups"]]
        if sizes != [len(g["params"]) for g in self.param_groups]:
            raise ValueError(f"optimizer state has parameter groups of sizes {sizes}, the model "
                             f"{[len(g['params']) for g in self.param_groups]}")
        for group, saved_group in zip(self.param_groups, saved["param_groups"]):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved_group.items() if k != "params"})
        self.state = {}
        for i, s in saved["state"].items():
            p = params[int(i)]
            self.state[p] = {"step": s["step"].detach().to(p.device if self.fused else "cpu", torch.float32).clone(),
                             "exp_avg": s["exp_avg"].to(p.device, p.dtype).clone(),
                             "exp_avg_sq": s["exp_avg_sq"].to(p.device, p.dtype).clone()}
