"""One decoding step: a token per row in, next-token logits out, the recurrent state updated.

- `PlainStep`: the model's own forward at T=1. The reference the others are tested against.
- `FastStep`: the same arithmetic as a flat list of tensor ops on weights prepared once: no scan
  op, no module calls, no chunk copies, and the state updated in place (h = r * h + u). On a
  2-core CPU it is about 1.7x faster than `PlainStep` at batch 1 (docs/benchmarks.md).
- `NativeStep`: the same again as one C++ call per token (kernels/decode_cpu.cpp), its matrix
  rows split among the CPU threads: float32 on the CPU, about 5x `PlainStep` on 2 cores.
- `KernelStep`: the same in float32 as two CUDA kernels per block (kernels/decode_cuda.cu).
- `CudaGraphStep`: `KernelStep` (or `FastStep` without CuPy) captured once in a CUDA graph and
  replayed, so one step costs one launch instead of a hundred; with KernelStep it can also draw
  the next token inside the graph.

Every step has the signature `step(ids, state) -> logits`: ids (B,) long, state a list of
(B, n_mem) float tensors, one per sqrll layer, updated in place; logits (B, vocab).
The weights are read when the step is built: build a new step after changing them.
"""

import collections
import ctypes
import functools
import time
import warnings
import weakref

import torch
import torch.nn.functional as F

from sqrllm import cpu
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


class KernelStep:
    """`FastStep`'s arithmetic in float32 as 2 + 2 * n_blocks launches of kernels/decode_cuda.cu
    (through CuPy), for float32 models on CUDA: each block's norm, input projection and gates in
    one launch, its output projection and residual add in another. The logits land in a buffer
    per batch size that the step owns (each call overwrites it), so a CUDA graph of the step can
    be followed by another that reads them."""

    def __init__(self, model):
        param = next(model.parameters())
        if not param.is_cuda or param.dtype != torch.float32:
            raise ValueError(f"KernelStep runs float32 models on CUDA, not {param.dtype} on {param.device}")
        from sqrllm import cuda, cuda_layers

        cuda.ensure_available()
        self.launch = cuda_layers.decode_launch
        self.vocab_size, self.n_embd = model.vocab_size, model.wte.embedding_dim
        self.wte = model.wte.weight.detach().contiguous()
        self.eps_f = model.norm_f.eps
        self.head = (model.lm_head.weight.detach() * model.norm_f.weight.detach()).contiguous()  # (V, E)
        self.layers = []
        for block in model.blocks:
            inner = block.inner
            if isinstance(inner, SqrllLayer):
                kind, width = "dec_sqrll", inner.n_mem
            elif isinstance(inner, GatedMLP):
                kind, width = "dec_mlp", inner.out.in_features
            else:
                raise TypeError(f"KernelStep: unknown block {type(inner).__name__}")
            w_in = (inner.proj.weight.detach() * block.norm.weight.detach()).contiguous()  # (out, E)
            w_out = inner.out.weight.detach().contiguous()  # (E, width)
            self.layers.append((kind, width, block.norm.eps, w_in, _bias(inner.proj).contiguous(), w_out,
                                _bias(inner.out).contiguous()))
        self._buffers = {}  # batch size -> (x, y, logits)

    def bind(self, state):
        return state

    def __call__(self, ids, state):
        B, E = ids.shape[0], self.n_embd
        ids = ids.to(torch.long).contiguous()
        if B not in self._buffers:
            widest = max(width for _, width, *_ in self.layers) if self.layers else 1
            self._buffers[B] = (self.wte.new_empty(B, E), self.wte.new_empty(B, widest),
                                self.wte.new_empty(B, self.vocab_size))
        x, y, logits = self._buffers[B]
        self.launch("dec_embed", 0, B, ids, self.wte, x, E)
        layer = 0
        for kind, width, eps, w_in, b_in, w_out, b_out in self.layers:
            if kind == "dec_sqrll":
                h = state[layer]
                if not (h.is_contiguous() and h.dtype == torch.float32 and h.shape == (B, width)):
                    raise ValueError(f"KernelStep: state tensors must be contiguous float32 {(B, width)}")
                self.launch(kind, width, B, x, w_in, b_in, h, y, E, width, eps)
                layer += 1
            else:
                self.launch(kind, width, B, x, w_in, b_in, y, E, width, eps)
            self.launch("dec_out", E, B, y, w_out, b_out, x, width, E)
        self.launch("dec_head", self.vocab_size, B, x, self.head, logits, E, self.vocab_size, self.eps_f)
        return logits


class CudaGraphStep:
    """A step captured once in a CUDA graph for one batch size and replayed: `KernelStep` for
    float32 models when CuPy is there, else `FastStep`.

    The graph reads ids and state from static buffers and updates the state there. `bind(state)`
    copies a state in and returns those buffers; a call with them costs one copy of the ids and
    one replay. A call with any other list copies it in and the result back out, so that callers
    see the in-place semantics of the other steps either way.

    With KernelStep the sampling can go into the graph too (`draw`): one replay then picks the
    next ids from the logits in `self.logits` and runs the step on them, so generating a token
    costs one launch and one read of the ids.
    """

    def __init__(self, model, batch_size):
        param = next(model.parameters())
        if not param.is_cuda:
            raise ValueError("CudaGraphStep needs a model on a CUDA device")
        self.inner = None
        from sqrllm.cuda_layers import DEC_MAX_BATCH

        if param.dtype == torch.float32 and batch_size <= DEC_MAX_BATCH:
            try:
                self.inner = KernelStep(model)
            except ImportError:
                pass  # no CuPy: FastStep below (the scan has warned already, or will)
        self.inner = self.inner or FastStep(model)
        self.batch_size = batch_size
        device, dtype = param.device, param.dtype
        self.ids = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.state = model.init_state(batch_size, device=device, dtype=dtype)
        self.rng = torch.zeros(2, dtype=torch.long, device=device)  # seed, draws so far: dec_draw's
        self._draws = {}  # (temperature, top_k, top_p, min_p) -> graph of draw + step
        self._warm_up(lambda: self.inner(self.ids, self.state))
        for h in self.state:
            h.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.inner(self.ids, self.state)

    def _warm_up(self, fn):
        """Run fn a few times on a side stream: kernels compiled, allocator primed, outside a capture."""
        device = self.ids.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)

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

    @property
    def can_draw(self):
        return isinstance(self.inner, KernelStep)

    def seed(self, generator=None):
        """Start the in-graph draws from a seed taken from `generator` (None: torch's default)."""
        device = self.ids.device
        gen_device = generator.device if generator is not None else device
        seed = torch.randint(0, 2**62, (1,), generator=generator, device=gen_device)
        self.rng[0:1].copy_(seed)

    def draw(self, params):
        """Replay the graph that picks the next ids (B,) from `self.logits` by `params` (no
        penalties) and steps the bound state on them; returns the ids' buffer, which the next
        replay overwrites. `self.logits` then holds the logits after those ids."""
        key = (params.temperature, params.top_k, params.top_p, params.min_p)
        graph = self._draws.get(key)
        if graph is None:
            from sqrllm.sampling import filter_logits, tempered

            def draw_and_step():
                if params.temperature == 0:
                    self.ids.copy_(self.logits.argmax(dim=-1))
                else:
                    logits = tempered(self.logits, params.temperature)
                    probs = torch.softmax(filter_logits(logits, params.top_k, params.top_p, params.min_p), dim=-1)
                    self.inner.launch("dec_draw", 0, self.batch_size, probs, self.rng, self.ids, self.vocab_size)
                    self.rng[1:].add_(1)
                self.inner(self.ids, self.state)  # writes self.logits

            saved = [self.logits.clone(), self.rng.clone()] + [h.clone() for h in self.state]
            self._warm_up(draw_and_step)
            for buffer, value in zip([self.logits, self.rng] + self.state, saved):
                buffer.copy_(value)
            graph = self._draws[key] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                draw_and_step()
        graph.replay()
        return self.ids

    @property
    def vocab_size(self):
        return self.logits.shape[-1]


class NativeStep:
    """`FastStep`'s arithmetic as one C++ call per token (kernels/decode_cpu.cpp, built by
    sqrllm.cpu): float32 models on the CPU. Every matrix's rows are split among CPU threads, so
    that a batch-1 step, which is bound by memory bandwidth, draws on more than one core.

    bf16=True computes the model with every parameter rounded to bfloat16 (what the exported C++
    computes), keeping the matrices as 16 bits: half the bytes per step. The arithmetic and the
    state stay float32.

    Threads meet at two barriers per block, so one thread that the OS has put aside (the machine
    is busy with other work) stalls them all: a step can then take several times longer than on
    one thread. So the step times itself on 1 thread and on torch.get_num_threads(), keeps to the
    faster (by the median of its last few steps, which a lone stall does not move), and tries the
    other every PROBE_EVERY steps; threads=N fixes the count instead. The result is the same bits
    either way (every output is summed by one thread, in one order).
    """

    PROBE_EVERY = 48

    def __init__(self, model, threads=None, bf16=False):
        self.lib = cpu.load()
        param = next(model.parameters())
        if param.device.type != "cpu" or param.dtype != torch.float32:
            raise ValueError(f"NativeStep runs float32 models on the CPU, not {param.dtype} on {param.device}")
        self.vocab_size = model.vocab_size
        self.n_mem = model.n_mem
        self._keep = []  # the tensors whose memory the kernel reads
        self.threads = threads
        self._seconds = {}  # (batch, threads) -> wall-clock seconds of its last 5 steps
        self._median = {}  # (batch, threads) -> their median
        self._calls = 0
        self._bound = None  # (state list from bind, its data pointers, as a ctypes array)

        def ptr(t, matrix=False):
            if t is None:
                return None
            t = t.detach().contiguous()
            if bf16:  # every parameter rounded to bfloat16: matrices kept as its 16 bits, the rest as float32
                t = t.to(torch.bfloat16)
                t = t.view(torch.int16) if matrix else t.float()
            self._keep.append(t)
            return t.data_ptr()

        def matrix(norm, linear):  # float32: (out, in) with the norm's weight folded into the columns
            if bf16:
                return ptr(linear.weight, matrix=True)
            return ptr(linear.weight.detach() * norm.weight.detach()[None, :])

        def norm_weight(norm):  # bf16: applied to the normalized input; float32: folded, so None
            return ptr(norm.weight) if bf16 else None

        plan = self.lib.sq_plan_new(model.wte.embedding_dim, model.vocab_size, int(bf16), ptr(model.wte.weight),
                                    matrix(model.norm_f, model.lm_head), norm_weight(model.norm_f),
                                    model.norm_f.eps)
        self._free = weakref.finalize(self, self.lib.sq_plan_free, plan)
        self.plan = plan
        for block in model.blocks:
            inner = block.inner
            if isinstance(inner, SqrllLayer):
                kind, m = 0, inner.n_mem
            elif isinstance(inner, GatedMLP):
                kind, m = 1, inner.out.in_features
            else:
                raise TypeError(f"NativeStep: unknown block {type(inner).__name__}")
            self.lib.sq_plan_add(plan, kind, m, block.norm.eps, norm_weight(block.norm), matrix(block.norm, inner.proj),
                                 ptr(_bias(inner.proj)), ptr(inner.out.weight, matrix=True), ptr(_bias(inner.out)))

    def bind(self, state):
        """Contiguous copies where needed; calls with the returned list (its tensors untouched) skip
        the checks."""
        state = [h.contiguous() for h in state]
        self._check(state, state[0].shape[0] if state else 0)
        ptrs = [h.data_ptr() for h in state]
        self._bound = (state, ptrs, (ctypes.c_void_p * len(ptrs))(*ptrs))
        return state

    def _check(self, state, B):
        for h in state:
            if not (h.is_contiguous() and h.dtype == torch.float32 and h.shape == (B, self.n_mem)):
                raise ValueError(f"NativeStep: state tensors must be contiguous float32 (B, n_mem) = "
                                 f"{(B, self.n_mem)}; pass the list that bind() returns")

    def __call__(self, ids, state):
        B = ids.shape[0]
        ids = ids.to(torch.long).contiguous()
        bound = self._bound
        if bound and state is bound[0] and state[0].shape[0] == B and [h.data_ptr() for h in state] == bound[1]:
            pointers = bound[2]
        else:
            self._check(state, B)
            pointers = (ctypes.c_void_p * len(state))(*[h.data_ptr() for h in state])
        logits = torch.empty(B, self.vocab_size, dtype=torch.float32)  # what the kernel writes, whatever the default
        threads = self._threads(B)
        t0 = time.perf_counter()
        if self.lib.sq_step(self.plan, B, ids.data_ptr(), pointers, logits.data_ptr(), threads):
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got {ids.tolist()}")
        seconds = time.perf_counter() - t0
        recent = self._seconds.setdefault((B, threads), collections.deque(maxlen=5))
        recent.append(seconds)
        self._median[(B, threads)] = sorted(recent)[len(recent) // 2]
        return logits

    def _threads(self, B):
        """1 or torch.get_num_threads(): the faster so far, the other one step in PROBE_EVERY."""
        if self.threads:
            return self.threads
        most = torch.get_num_threads()
        if most == 1:
            return 1
        self._calls += 1
        best = 1 if self._median.get((B, 1), 0.0) <= self._median.get((B, most), 0.0) else most  # untried first
        if self._calls % self.PROBE_EVERY == 0:
            return most if best == 1 else 1
        return best


def make_step(model, kind="auto", batch_size=1):
    """A step for `model`. kind: "plain", "fast", "native" (float32 on the CPU), "native_bf16" (the
    same with every parameter rounded to bfloat16, matrices read as 16 bits), "graph" (CUDA), or
    "auto": graph on CUDA, native for float32 on the CPU (fast, with a warning, if the kernel
    cannot be built), fast otherwise."""
    param = next(model.parameters())
    if kind == "auto":
        if param.is_cuda:
            kind = "graph"
        elif param.device.type == "cpu" and param.dtype == torch.float32:
            ok, why = cpu.available()
            if not ok:
                _warn_once(f"sqrllm: the C++ decode step is unavailable ({why}); using the slower PyTorch step")
            kind = "native" if ok else "fast"
        else:
            kind = "fast"
    if kind == "plain":
        return PlainStep(model)
    if kind == "fast":
        return FastStep(model)
    if kind == "native":
        return NativeStep(model)
    if kind == "native_bf16":
        return NativeStep(model, bf16=True)
    if kind == "graph":
        return CudaGraphStep(model, batch_size)
    raise ValueError(f"unknown step kind {kind!r}; use 'auto', 'plain', 'fast', 'native', 'native_bf16' or 'graph'")


@functools.cache
def _warn_once(message):
    warnings.warn(message, stacklevel=3)
