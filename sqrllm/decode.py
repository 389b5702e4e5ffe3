"""One decoding step: a token per row in, next-token logits out, the recurrent state updated.

- `PlainStep`: the model's own forward at T=1. The reference the others are tested against.
- `FastStep`: the same arithmetic as a flat list of tensor ops on weights prepared once: no scan
  op, no module calls, no chunk copies, and the state updated in place (h = r * h + u). On a CPU
  it is 3-4x faster than `PlainStep` at batch 1 (see scripts/bench_sample.py).
- `CudaGraphStep`: `FastStep` captured once in a CUDA graph and replayed, so one step costs one
  launch instead of a hundred.

Every step has the signature `step(ids, state) -> logits`: ids (B,) long, state a list of
(B, n_mem) float tensors, one per sqrll layer, updated in place; logits (B, vocab).
The weights are read when the step is built: build a new step after changing them.
"""

import torch
import torch.nn.functional as F

from sqrllm.model import GatedMLP, SqrllLayer


class PlainStep:
    """model(ids[:, None], state) through its modules; the reference."""

    def __init__(self, model):
        self.model = model

    def bind(self, state):
        return state

    def __call__(self, ids, state):
        logits, _, new_state = self.model(ids[:, None], state=state, last_only=True)
        for h, new in zip(state, new_state):
            h.copy_(new)
        return logits[:, -1]


class FastStep:
    """The model's T=1 forward as plain tensor ops, for any device and batch size.

    The arithmetic is the model's, in the model's dtype, with three rearrangements that change
    rounding in the last bits only: each RMSNorm's weight is folded into the matrix that follows
    it (norm(x) @ W = rstd * (x @ diag(w) W)), each linear layer reads a pre-transposed weight,
    and a sqrll layer's gate rows are reordered so that one sigmoid covers all three gates.
    """

    def __init__(self, model):
        self.vocab_size = model.vocab_size
        self.n_embd = model.wte.embedding_dim
        self.wte = model.wte.weight.detach()
        self.eps_f = model.norm_f.eps
        self.head = _fold(model.norm_f.weight, model.lm_head.weight)  # (n_embd, vocab)
        self.layers = []
        for block in model.blocks:
            inner = block.inner
            w_in = _fold(block.norm.weight, inner.proj.weight)  # (n_embd, out)
            b_in = _bias(inner.proj)
            w_out, b_out = inner.out.weight.detach().t().contiguous(), _bias(inner.out)
            if isinstance(inner, SqrllLayer):
                m = inner.n_mem
                # proj's columns are [forget, input, input gate, output gate]; reorder them to
                # [forget, input gate, output gate, input] so that one sigmoid covers the gates
                order = torch.cat([torch.arange(0, m), torch.arange(2 * m, 4 * m), torch.arange(m, 2 * m)])
                order = order.to(w_in.device)
                w_in, b_in = w_in[:, order].contiguous(), b_in[order].contiguous()
                kind = "sqrll"
            elif isinstance(inner, GatedMLP):
                m = w_in.shape[1] // 2
                kind = "mlp"
            else:
                raise TypeError(f"FastStep: unknown block {type(inner).__name__}")
            self.layers.append((kind, block.norm.eps, w_in, b_in, w_out, b_out, m))

    def bind(self, state):
        return state

    def _rstd(self, x, eps):
        """1 / sqrt(mean(x^2) + eps) per row: (B, 1)."""
        return torch.rsqrt(torch.linalg.vecdot(x, x).div_(self.n_embd).add_(eps))[:, None]

    def __call__(self, ids, state):
        x = F.embedding(ids, self.wte)  # (B, n_embd)
        layer = 0
        for kind, eps, w_in, b_in, w_out, b_out, m in self.layers:
            z = torch.addcmul(b_in, x @ w_in, self._rstd(x, eps))  # proj(norm(x)): (B, out)
            if kind == "sqrll":
                s = torch.sigmoid(z[:, : 3 * m])  # (B, 3 n_mem): r, input gate, output gate
                h = state[layer]
                torch.addcmul(z[:, 3 * m :] * s[:, m : 2 * m], s[:, :m], h, out=h)  # h = r * h + u
                y = torch.mul(h, s[:, 2 * m :]).div_(h.abs().add_(1.0))  # softsign(h) * output gate
                layer += 1
            else:
                y = z[:, :m] * torch.sigmoid(z[:, m:])
            x = torch.addmm(b_out, y, w_out).add_(x)
        return (x @ self.head).mul_(self._rstd(x, self.eps_f))


def _fold(norm_weight, weight):
    """diag(norm_weight) @ weight.T, contiguous (in, out): a norm's scale folded into a linear layer."""
    return (norm_weight.detach()[:, None] * weight.detach().t()).contiguous()


def _bias(linear):
    w = linear.weight
    return linear.bias.detach() if linear.bias is not None else w.new_zeros(w.shape[0]).detach()


class CudaGraphStep:
    """`FastStep` replayed from a CUDA graph captured for one batch size.

    The graph reads ids and state from static buffers: each call copies them in, replays, and
    copies the new state back, so callers see the same in-place semantics as the other steps.
    """

    def __init__(self, model, batch_size):
        if not next(model.parameters()).is_cuda:
            raise ValueError("CudaGraphStep needs a model on a CUDA device")
        self.fast = FastStep(model)
        self.batch_size = batch_size
        device, dtype = self.fast.wte.device, self.fast.wte.dtype
        self.ids = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.state = model.init_state(batch_size, device=device, dtype=dtype)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up kernels and allocator outside the capture
                self.fast(self.ids, self.state)
        torch.cuda.current_stream(device).wait_stream(side)
        for h in self.state:
            h.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.fast(self.ids, self.state)

    def bind(self, state):
        """Copy `state` into the graph's buffers and return them: pass the returned list to later
        calls and they skip the copies in and out."""
        for h, s in zip(self.state, state):
            h.copy_(s)
        return self.state

    def __call__(self, ids, state):
        if ids.shape[0] != self.batch_size:
            raise ValueError(f"CudaGraphStep was captured for batch {self.batch_size}, got {ids.shape[0]}")
        self.ids.copy_(ids)
        bound = state is self.state
        if not bound:
            self.bind(state)
        self.graph.replay()
        if not bound:
            for h, s in zip(self.state, state):
                s.copy_(h)
        return self.logits.clone()


def make_step(model, kind="auto", batch_size=1):
    """A step for `model`: kind "plain", "fast", "graph" (CUDA only) or "auto" (graph on CUDA,
    fast elsewhere)."""
    if kind == "auto":
        kind = "graph" if next(model.parameters()).is_cuda else "fast"
    if kind == "plain":
        return PlainStep(model)
    if kind == "fast":
        return FastStep(model)
    if kind == "graph":
        return CudaGraphStep(model, batch_size)
    raise ValueError(f"unknown step kind {kind!r}; use 'auto', 'plain', 'fast' or 'graph'")
