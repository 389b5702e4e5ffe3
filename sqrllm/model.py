"""SqrLLM: a language model built from sqrll layers.

How it differs from a vanilla GPT:
- No attention and no positional embedding: each sqrll layer mixes time through the linear
  recurrence y[t] = r[t] * y[t-1] + x[t], so a step costs O(1) in the context length.
- Each layer's last y is its memory; carried (detached) across batches in training and across
  tokens in sampling, so the model can read context far beyond one block.
- The gated MLP sits after every `mlp_every`-th sqrll layer instead of after each mixer.

How it differs from QRNN (Bradbury et al., 2017):
- The recurrence does not scale the input by (1 - r): the input has its own gate, i = (Wi x) *
  sigmoid(Wig x), applied before the scan.
- The output is squashed by softsign rather than tanh and projected back to the model width,
  inside pre-norm residual blocks like a Transformer's.
- Forget gates start at a spread of timescales (1 to `max_timescale` tokens) rather than at 0.5.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sqrllm.core import core
from sqrllm.optim import AdamW


class SqrllLayer(nn.Module):
    """x (B, T, n_in) -> (B, T, n_out), memory (B, n_mem) in and out.

    zoneout: in training, the probability that a memory feature keeps its value at a step (forget
    gate 1, input 0 there; Krueger et al., 2016). Evaluation runs the recurrence as it is, not
    Krueger et al.'s expectation (forget gate p + (1 - p) r, input (1 - p) x, which sqrllm.qrnn uses),
    which scored worse: configs/shakespeare_char_cpu.py trained with zoneout 0.1 evaluates to 1.7660
    (val, 64-character windows) this way and 1.7725 with the expectation.
    """

    def __init__(self, n_in, n_mem, n_out=None, bias=True, zoneout=0.0):
        super().__init__()
        self.n_mem = n_mem
        self.zoneout = zoneout
        # forget gate, input, input gate, output gate: one matrix multiply
        self.proj = nn.Linear(n_in, 4 * n_mem, bias=True)
        self.out = nn.Linear(n_mem, n_out or n_in, bias=bias)

    def forward(self, x, mem=None, reset=None):
        # forget gate, input, input gate, output gate (B, T, 4 n_mem) -> gates, scan, output gate
        # (sqrllm/core.py): (B, T, n_mem) and the last y, the memory to carry
        zone = None
        if self.training and self.zoneout > 0:
            zone = torch.empty(*x.shape[:-1], self.n_mem, dtype=torch.bool, device=x.device).bernoulli_(self.zoneout)
        z, last = core(self.proj(x), mem, reset, zone)
        return self.out(z), last


class GatedMLP(nn.Module):
    """Wo (Wi x * sigmoid(Wg x)), hidden width n_ffn."""

    def __init__(self, n_embd, n_ffn, bias=True):
        super().__init__()
        self.proj = nn.Linear(n_embd, 2 * n_ffn, bias=bias)
        self.out = nn.Linear(n_ffn, n_embd, bias=bias)

    def forward(self, x):
        h, g = self.proj(x).chunk(2, dim=-1)
        return self.out(h * torch.sigmoid(g))


def init_weights(model, init, std):
    """Biases zero, matrices normal(0, std); with init="scaled" the residual branches' output
    projections (`*.out.weight`) get std / sqrt(2 * blocks). GPT-2 scales by 1 / sqrt(residual
    branches); every block here is one branch, so this is 1 / sqrt(2) below that, the scale the
    configs (and the GPT baseline's runs) were tuned and measured with."""
    out_std = std / math.sqrt(2 * len(model.blocks)) if init == "scaled" else std
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            nn.init.zeros_(p)
        elif p.dim() >= 2:
            nn.init.normal_(p, 0.0, out_std if name.endswith("out.weight") else std)


class Block(nn.Module):
    """Pre-norm residual block: x + dropout(f(rmsnorm(x))), f a sqrll layer or a gated MLP.

    drop_path: in training, the probability that a row (a sequence of the batch) skips the branch
    (stochastic depth); kept rows scale it by 1 / (1 - drop_path), so evaluation needs no change.
    """

    def __init__(self, n_embd, inner, dropout):
        super().__init__()
        self.norm = nn.RMSNorm(n_embd, eps=1e-6)
        self.inner = inner
        self.drop = nn.Dropout(dropout)
        self.drop_path = 0.0  # set by spread_drop_path

    @property
    def is_sqrll(self):
        return isinstance(self.inner, SqrllLayer)

    def forward(self, x, mem=None, reset=None):
        if self.is_sqrll:
            out, mem = self.inner(self.norm(x), mem, reset)
            return x + self._branch(out), mem
        return x + self._branch(self.inner(self.norm(x))), None

    def _branch(self, out):
        out = self.drop(out)
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            out = out * (out.new_empty(out.size(0), 1, 1).bernoulli_(keep) / keep)  # (B, 1, 1)
        return out


def spread_drop_path(blocks, drop_path):
    """Give `blocks` stochastic depth rising linearly from 0 at the first to drop_path at the last."""
    for i, block in enumerate(blocks):
        block.drop_path = drop_path * i / max(len(blocks) - 1, 1)


class SqrLLM(nn.Module):
    def __init__(self, vocab_size, n_layer=4, n_embd=256, n_mem=0, n_ffn=0, mlp_every=1, dropout=0.0,
                 tie_weights=True, bias=True, init="scaled", init_std=0.02, forget_init="spread",
                 max_timescale=64.0, drop_path=0.0, zoneout=0.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.n_layer = n_layer
        self.n_mem = n_mem or n_embd
        n_ffn = n_ffn or 2 * n_embd
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.drop = nn.Dropout(dropout)
        blocks = []
        for i in range(n_layer):
            blocks.append(Block(n_embd, SqrllLayer(n_embd, self.n_mem, bias=bias, zoneout=zoneout), dropout))
            if mlp_every and (i + 1) % mlp_every == 0:
                blocks.append(Block(n_embd, GatedMLP(n_embd, n_ffn, bias=bias), dropout))
        spread_drop_path(blocks, drop_path)
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = nn.RMSNorm(n_embd, eps=1e-6)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.wte.weight
        self._init(init, init_std, forget_init, max_timescale)
        self.reset_token = None  # a token id (documents' end-of-text) at which every layer's memory restarts

    @classmethod
    def from_config(cls, cfg, vocab_size):
        return cls(vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_mem=cfg.n_mem, n_ffn=cfg.n_ffn,
                   mlp_every=cfg.mlp_every, dropout=cfg.dropout, tie_weights=cfg.tie_weights, bias=cfg.bias,
                   init=cfg.init, init_std=cfg.init_std, forget_init=cfg.forget_init,
                   max_timescale=cfg.max_timescale, drop_path=cfg.drop_path, zoneout=cfg.zoneout)

    def _init(self, init, std, forget_init, max_timescale):
        init_weights(self, init, std)
        if forget_init == "spread":
            # timescale tau in tokens, log-spaced; r = exp(-1/tau), bias = logit(r)
            tau = torch.logspace(0, math.log10(max_timescale), self.n_mem)
            r = torch.exp(-1.0 / tau)
            for layer in self.sqrll_layers():
                with torch.no_grad():
                    layer.proj.bias[: self.n_mem] = torch.log(r / (1 - r))

    def sqrll_layers(self):
        return [b.inner for b in self.blocks if b.is_sqrll]

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch_size, device=None, dtype=torch.float32):
        """Zero memory for every sqrll layer: a list of (B, n_mem) tensors."""
        return [torch.zeros(batch_size, self.n_mem, device=device, dtype=dtype) for _ in self.sqrll_layers()]

    def forward(self, idx, targets=None, state=None, last_only=False):
        """idx (B, T) token ids -> (logits, loss, new state).

        state: None (zero memory) or a list with one (B, n_mem) tensor per sqrll layer.
        logits: (B, T, vocab), or (B, 1, vocab) with last_only=True. loss: mean cross-entropy
        over all targets (None without targets). The new state is detached. With reset_token set,
        memory restarts at each position holding that token (documents separated by end-of-text).
        """
        x, new_state = self._blocks(idx, state)
        return (*self.head(x, targets, last_only), new_state)

    @torch.no_grad()
    def memory_after(self, idx, state=None):
        """The memory (one (B, n_mem) tensor per sqrll layer) after reading idx (B, K) from `state`
        (None: zero), without the output head."""
        return self._blocks(idx, state)[1]

    def _blocks(self, idx, state):
        x = self.drop(self.wte(idx))  # (B, T, n_embd)
        reset = None if self.reset_token is None else idx == self.reset_token  # (B, T)
        new_state = []
        layer = 0
        for block in self.blocks:
            if block.is_sqrll:
                x, mem = block(x, None if state is None else state[layer], reset)
                new_state.append(mem)
                layer += 1
            else:
                x, _ = block(x)
        return x, new_state

    def head(self, x, targets=None, last_only=False):
        """Final norm and output head on x (B, T, n_embd) -> (logits, mean cross-entropy or None)."""
        x = self.norm_f(x)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(wide.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


def round_to_bf16(model):
    """Round every parameter of `model` in place to the nearest bfloat16 (ties to even); returns it.

    The rounded model computes what the exported C++ computes, up to float32 summation order.
    """
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(p.dtype))
    return model
