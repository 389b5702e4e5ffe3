"""A training micro-step (forward and backward) recorded once as a CUDA graph and replayed.

A small model's eager step is bound by the host: at the shakespeare_char race's size (12 layers,
13.6M parameters, 64 x 256 tokens a step) a step is about a thousand kernels of a few to a few tens
of microseconds each, and Python launches them more slowly than the GPU runs them. Replaying a
recorded graph launches them all at once (docs/benchmarks.md: 2.1-2.8x the tokens/s on an H200). The optimizer step,
clipping, the weights' average and the evaluations stay eager: a handful of launches between replays.

What a replay computes is what the eager step computes: the same kernels on the same inputs, and
dropout draws the same random numbers (a replay takes them from the generator's offset at the
time, as an eager step does), so a run's first micro-step, which runs eagerly to warm up what is
initialised lazily (cuBLAS handles, the scan's compiled kernels, compiled blocks), does not change
what the run computes.
"""

import torch


def graph_wanted(cfg, device, distributed):
    """-> (whether the run's micro-steps are replayed from a CUDA graph, a note for the log or None).
    cfg.cuda_graph on a CUDA device in one process; CPU runs and runs under torchrun (data
    parallelism: DDP's gradient all-reduce is not recorded) take eager steps, the latter with a note."""
    if not (cfg.cuda_graph and device.startswith("cuda")):
        return False, None
    if distributed:
        return False, "cuda_graph=True is for one process: under torchrun the steps run eagerly"
    return True, None


def burn_in_window(model, x, y, keep, K):
    """Random windows with burn_in = K: x, y (B, K + T) -> (the memory the first K tokens leave, zero on
    the rows where keep (B,) is False or 0; x and y of the window itself). Call it under autocast."""
    state = [m * keep[:, None] for m in model.memory_after(x[:, :K])]
    return state, x[:, K:], y[:, K:]


class GraphedStep:
    """step(x, y, state) -> (loss, new state): forward and backward of one micro-batch of `model`.

    x, y: (B, T) token ids on the model's device; state: the memory the batch starts from (None: zero),
    one (B, n_mem) tensor per sqrll layer. The gradients are added into the parameters' .grad, which
    the graph writes in place: between steps, zero them with zero_grad(set_to_none=False).
    amp(): the autocast context (its weight cache off, as recording requires); scale(loss): what to
    backpropagate from the mean loss. keep_state: return the memory the batch leaves (a copy, so that
    later replays leave it alone); without it the step returns None there.
    burn_in = K (random windows, cfg.burn_in): x and y hold K tokens before the window; the step reads
    them first without a gradient and starts the window from the memory they leave on the rows where
    keep (B,) bool is True, from zero on the others (state is not read).
    """

    def __init__(self, model, amp, scale, keep_state, burn_in=0):
        self.model, self.amp, self.scale, self.keep_state, self.burn_in = model, amp, scale, keep_state, burn_in
        self.graph, self.warm = None, False
        self.side = torch.cuda.Stream()  # warm-up and recording off the current stream, as CUDA graphs want

    def _run(self, x, y, state, keep):
        with self.amp():
            if self.burn_in:
                state, x, y = burn_in_window(self.model, x, y, keep, self.burn_in)
            _, loss, new = self.model(x, y, state)
        self.scale(loss).backward()
        return loss.detach(), new

    def __call__(self, x, y, state, keep=None):
        if self.burn_in:
            keep, state = keep.float(), None  # (B,): 1 where a row keeps its burned-in memory (a graph input)
        if self.graph is None:
            # the warm-up and the recording take the same inputs: memory as float32 tensors, zero for None
            # (the GPT baseline has none; with burn_in the step makes its own)
            zero = None if self.burn_in else self.model.init_state(x.shape[0], x.device) or None
            state = zero if state is None or zero is None else [s.float() for s in state]
            if not self.warm:  # the first micro-step, eagerly
                self.warm = True
                self.side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(self.side):
                    loss, new = self._run(x, y, state, keep)
                torch.cuda.current_stream().wait_stream(self.side)
                return loss, (new if self.keep_state else None)
            self.x, self.y = torch.empty_like(x), torch.empty_like(y)  # the graph's inputs
            self.state = None if state is None else [torch.empty_like(s) for s in state]
            self.keep = None if keep is None else torch.empty_like(keep)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.side):
                self.loss, self.new = self._run(self.x, self.y, self.state, self.keep)
        if x.shape != self.x.shape or y.shape != self.y.shape:
            raise ValueError(f"GraphedStep was recorded for batches of {tuple(self.x.shape)}, got {tuple(x.shape)}")
        self.x.copy_(x)
        self.y.copy_(y)
        if self.keep is not None:
            self.keep.copy_(keep)
        if self.state:
            if state is None:
                torch._foreach_zero_(self.state)
            else:
                torch._foreach_copy_(self.state, state)
        self.graph.replay()
        new = [s.clone() for s in self.new] if self.keep_state and self.new else None
        return self.loss.clone(), new
