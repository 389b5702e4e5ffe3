"""An exponential moving average of a model's weights, for evaluation and checkpoints.

After every optimizer step, `ema = decay * ema + (1 - decay) * w` over the parameters: one foreach
launch a step, on fp32 copies (the parameters are fp32; autocast does the low precision). A weight
tied to another (the head to the embedding) is one parameter and is averaged once.

With EMA on, a checkpoint's "model" holds the average (what was evaluated, and what sample.py and
export read) and "model_raw" the weights that train; a resumed run trains on from "model_raw" and
averages on from "model".
"""

import contextlib

import torch


class EMA:
    """The average of `model`'s parameters, starting from them as they are now."""

    def __init__(self, model, decay, start=0):
        self.decay, self.start = decay, start
        self.params = list(model.parameters())  # deduplicated: tied weights appear once
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step):
        """After the optimizer step that made `step` steps: average it in (until `start`, copy it)."""
        if step <= self.start:
            torch._foreach_copy_(self.shadow, self.params)
        else:
            torch._foreach_lerp_(self.shadow, self.params, 1.0 - self.decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def averaged(self):
        """Inside, the model's parameters hold the average; on exit, the training weights again."""
        raw = [p.detach().clone() for p in self.params]
        torch._foreach_copy_(self.params, self.shadow)
        try:
            yield
        finally:
            torch._foreach_copy_(self.params, raw)

    def state_dict(self, model):
        """model.state_dict() with the averages in place of the parameters (tied names share one tensor)."""
        shadow = dict(zip(self.params, self.shadow))
        out = model.state_dict()
        for name, p in model.named_parameters(remove_duplicate=False):
            out[name] = shadow[p]
        return out

    @torch.no_grad()
    def load_state_dict(self, model, saved):
        """Continue from `saved`, a state_dict written by `state_dict`."""
        names = {p: name for name, p in model.named_parameters()}
        torch._foreach_copy_(self.shadow, [saved[names[p]].to(s.device) for p, s in zip(self.params, self.shadow)])


def ema_for_run(model, cfg, ckpt, notes):
    """The EMA `cfg` asks for (None with ema_decay 0), continued from `ckpt` (None, or the checkpoint
    being resumed, whose raw weights `model` holds) where it holds an average; appends what it did to `notes`.
    With eval_only and ema_decay 0, `model` gets the checkpoint's average, what the run evaluated."""
    ema = EMA(model, cfg.ema_decay, cfg.ema_start) if cfg.ema_decay else None
    if ema:
        notes.append(f"EMA of the weights on (ema_decay {cfg.ema_decay}, averaging after step {cfg.ema_start}): "
                     "evaluations and the checkpoints' \"model\" use the average")
    if ckpt is not None and "model_raw" in ckpt:
        if ema:
            ema.load_state_dict(model, ckpt["model"])
        elif cfg.eval_only:  # evaluate what the run evaluated and sample.py reads, not the raw weights
            model.load_state_dict(ckpt["model"])
            notes.append("evaluating the checkpoint's \"model\", the average of the weights")
        else:
            notes.append("ema_decay is 0 but the checkpoint holds an average: training goes on from its raw "
                         "weights and the average is dropped; pass the run's --ema_decay to keep it")
    elif ckpt is not None and ema:
        notes.append("the checkpoint holds no average (it was trained with ema_decay 0): the average starts "
                     "from the resumed weights")
    return ema
