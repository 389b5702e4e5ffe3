"""Generation from a SqrLLM: sampling controls, streamed text, and a recurrent state you can keep.

    from sqrllm.checkpoint import load_model
    from sqrllm.sampling import Sampler, SamplingParams
    model, tok, _ = load_model("out/small/ckpt.pt")
    s = Sampler(model, tok)
    s.feed("def main(")
    for pieces in s.stream(200, SamplingParams(temperature=0.8, top_p=0.95), stop=["\\n\\n"]):
        print(pieces[0], end="")

The prompt runs through the model in parallel, in chunks of constant memory; then each new token is
one recurrent step (`sqrllm.decode`), so a token costs the same at any position. The state (one
(B, n_mem) tensor per sqrll layer, the next-token logits and the recent tokens) is all there is to
a position: snapshot it, save it to a file, and start later generations from it.

Order of the controls, per step: penalties on the raw logits (over the last `penalty_window`
tokens, prompt included), then greedy argmax if temperature == 0, else logits / temperature, then
top-k, top-p and min-p in that order, each on what the one before kept, then one draw.
"""

import copy
import functools
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sqrllm import checkpoint
from sqrllm.decode import make_step
from sqrllm.gpt import GPT
from sqrllm.model import SqrllLayer, round_to_bf16
from sqrllm.tokenizer import StreamDecoder

HISTORY = 1024  # recent tokens kept per row (and saved with a state) for the penalties
STATE_FORMAT = "sqrllm-state-1"


@dataclass
class SamplingParams:
    temperature: float = 1.0  # divides the logits; 0 = greedy (argmax, no draw)
    top_k: int = 0  # keep only the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the fewest most likely tokens whose probabilities sum to >= top_p
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely one
    repetition_penalty: float = 1.0  # recent tokens' logits: positive ones divided by it, negative multiplied
    presence_penalty: float = 0.0  # subtracted from the logit of every recent token
    frequency_penalty: float = 0.0  # subtracted from a token's logit once per recent occurrence
    penalty_window: int = 64  # how many of the last tokens (prompt included) the penalties look at

    def check(self):
        """Raise ValueError naming the first control out of range."""
        finite = all(map(math.isfinite, (self.repetition_penalty, self.presence_penalty, self.frequency_penalty)))
        if not finite:
            raise ValueError("the penalties must be finite numbers, got repetition "
                             f"{self.repetition_penalty}, presence {self.presence_penalty}, frequency "
                             f"{self.frequency_penalty}")
        rules = [
            ("temperature", self.temperature >= 0, ">= 0 (0 = greedy)"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = all tokens)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0 (1 = off)"),
            ("penalty_window", 1 <= self.penalty_window <= HISTORY, f"in [1, {HISTORY}]"),
        ]
        for name, ok, want in rules:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)}")
        return self

    @property
    def penalized(self):
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0


def apply_penalties(logits, recent, params):
    """Repetition, presence and frequency penalties: logits (B, V), recent (B, n) token ids -> new
    float32 logits. With c the count of a token in `recent`, for tokens with c > 0:
    l = l / repetition_penalty if l > 0 else l * repetition_penalty, then for all tokens
    l = l - frequency_penalty * c - presence_penalty * (c > 0)."""
    logits = logits.float()
    if not params.penalized or recent.shape[1] == 0:
        return logits
    counts = torch.zeros_like(logits).scatter_add_(1, recent, torch.ones_like(recent, dtype=logits.dtype))
    seen = counts > 0
    if params.repetition_penalty != 1:
        rp = params.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
    return logits - params.frequency_penalty * counts - params.presence_penalty * seen.to(logits.dtype)


def filter_logits(logits, top_k=0, top_p=1.0, min_p=0.0):
    """Set to -inf the logits (B, V) of tokens outside top-k, then top-p, then min-p."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        probs, order = torch.softmax(logits, dim=-1).sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        drop = before >= top_p  # the most likely token always stays (before = 0)
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def tempered(logits, temperature):
    """logits (B, V) / temperature (> 0). Below 1e-3 the row maximum is taken off first: a tiny
    temperature would otherwise overflow logits to inf, and softmax of inf is NaN."""
    if temperature < 1e-3:
        logits = logits - logits.amax(dim=-1, keepdim=True)
    return logits / temperature if temperature != 1 else logits


def pick(logits, params=None, generator=None, recent=None):
    """Choose the next token for each row of logits (B, V) -> (B,) long.

    recent: (B, n) recent token ids for the penalties (None = no penalties)."""
    params = params or SamplingParams()
    if recent is not None:
        logits = apply_penalties(logits, recent[:, -params.penalty_window :], params)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = tempered(logits.float(), params.temperature)
    probs = torch.softmax(filter_logits(logits, params.top_k, params.top_p, params.min_p), dim=-1)
    # one draw per row: argmax of p / E with E ~ Exp(1) picks token i with probability p_i
    # (the first of independent exponential clocks with rates p_i to ring); 4x cheaper than
    # torch.multinomial for one sample on a CPU
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(probs.dtype).tiny)
    return (probs / race).argmax(dim=-1)


class TextStream:
    """Token ids -> text for one row: whole characters only, cut before the first stop string, and
    ended by the tokenizer's end-of-text token (its `eot_id`, if it has one).

    Text that could be the start of a stop string is held back until it is known not to be."""

    def __init__(self, tokenizer, stop=()):
        self.decoder = StreamDecoder(tokenizer)
        self.eot = getattr(tokenizer, "eot_id", None)
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False

    def feed(self, token):
        if self.stopped:
            return ""
        if token == self.eot:
            out = self.flush()
            self.stopped = True
            return out
        return self._emit(self.decoder.feed(token), final=False)

    def flush(self):
        return "" if self.stopped else self._emit(self.decoder.flush(), final=True)

    def _emit(self, text, final):
        self.pending += text
        if not self.stop:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        keep = 0 if final else self._partial_stop()
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out

    def _partial_stop(self):
        """Length of the longest end of `pending` that begins some stop string."""
        for n in range(min(len(self.pending), max(map(len, self.stop)) - 1), 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


@dataclass
class Stats:
    prefill_tokens: int = 0  # prompt tokens run, summed over rows
    prefill_seconds: float = 0.0
    tokens: int = 0  # generated tokens, summed over rows
    seconds: float = 0.0  # wall-clock of generation, from the first draw to the last token

    def report(self):
        def rate(n, s):
            return f"{n / s:,.0f} tokens/s" if s > 0 else "-"
        return (f"prefill: {self.prefill_tokens:,} tokens, {rate(self.prefill_tokens, self.prefill_seconds)}; "
                f"generation: {self.tokens:,} tokens, {rate(self.tokens, self.seconds)}")


class StateError(ValueError):
    """A state file that cannot be used here; the message names the file and why."""


def fingerprint(model, tokenizer=None):
    """What a state depends on: the model's shape and vocabulary, as plain types."""
    blocks = "".join("S" if isinstance(b.inner, SqrllLayer) else "M" for b in model.blocks)
    mlps = [b.inner for b in model.blocks if not isinstance(b.inner, SqrllLayer)]
    return {
        "vocab_size": model.vocab_size,
        "n_embd": model.wte.embedding_dim,
        "n_layer": model.n_layer,
        "n_mem": model.n_mem,
        "n_ffn": mlps[0].out.in_features if mlps else 0,
        "blocks": blocks,  # S = sqrll layer, M = gated MLP, in order
        "tokenizer": tokenizer.to_meta() if tokenizer is not None else None,
    }


def weights_digest(model):
    """A short sha256 of the model's weights (names and float32 values): which checkpoint it is."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Sampler:
    """A model, its tokenizer and a position: feed text, generate from it, keep or restore it.

    model: a SqrLLM in eval mode. step: "auto" (a CUDA graph on a GPU, the C++ step for float32
    on a CPU), "native", "native_bf16" (weights rounded to bfloat16), "fast", "graph" or "plain"
    (the model's own forward, the reference); see
    sqrllm.decode. prefill_chunk: prompt tokens per parallel forward (memory stays constant
    however long the prompt).
    """

    def __init__(self, model, tokenizer=None, step="auto", prefill_chunk=1024):
        if isinstance(model, GPT):  # it ignores the state: each step would see one token
            raise ValueError("sampling runs SqrLLM models (model='sqrll'), which carry their memory from token to "
                             "token, not a GPT (model='gpt', the baseline for comparing val losses)")
        self._weights = functools.cache(functools.partial(weights_digest, model))  # the checkpoint's, as given
        if step == "native_bf16":  # the prompt's forward, too, runs the model with bfloat16 weights
            model = round_to_bf16(copy.deepcopy(model))
        self.model = model
        self.tokenizer = tokenizer
        self.step_kind = step
        self.prefill_chunk = prefill_chunk
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._steps = {}
        self.stats = Stats()
        self.reset()

    # --- position ---

    def reset(self):
        """Back to the empty position: zero memory, no logits, batch 1."""
        self.state = None  # list of (B, n_mem), or None for zero memory
        self.logits = None  # (B, V) float32 next-token logits, None before any token
        self.recent = torch.zeros(1, 0, dtype=torch.long, device=self.device)  # (B, <= HISTORY)

    @property
    def batch_size(self):
        return self.recent.shape[0]

    def snapshot(self):
        """A copy of the position, for `restore`."""
        return _copy({"state": self.state, "logits": self.logits, "recent": self.recent})

    def restore(self, snap):
        snap = _copy(snap)
        self.state, self.logits, self.recent = snap["state"], snap["logits"], snap["recent"]

    def encode(self, text):
        if self.tokenizer is None:
            raise ValueError("this Sampler has no tokenizer; feed token ids instead of text")
        return self.tokenizer.encode(text)

    @torch.inference_mode()
    def feed(self, prompt):
        """Run text (or a list of token ids) through the model from the current position, in
        parallel chunks. Every row gets the same tokens. Returns the number of tokens."""
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            return 0
        t0 = time.perf_counter()
        x = torch.tensor(ids, dtype=torch.long, device=self.device).expand(self.batch_size, -1)
        state = self.state
        for lo in range(0, x.shape[1], self.prefill_chunk):
            logits, _, state = self.model(x[:, lo : lo + self.prefill_chunk], state=state, last_only=True)
        self.state, self.logits = state, logits[:, -1].float()
        self._remember(x[:, -HISTORY:])
        self._sync()
        self.stats.prefill_tokens += x.numel()
        self.stats.prefill_seconds += time.perf_counter() - t0
        return len(ids)

    def _remember(self, ids):
        self.recent = torch.cat([self.recent, ids], dim=1)[:, -HISTORY:]

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def expand(self, batch_size):
        """Copy a batch-1 position into `batch_size` rows (a shared prompt, many samples)."""
        if batch_size == self.batch_size:
            return
        if self.batch_size != 1:
            raise ValueError(f"the position has {self.batch_size} rows; it can only grow from 1 row, "
                             f"not to {batch_size}")
        if self.state is not None:
            self.state = [h.expand(batch_size, -1).clone() for h in self.state]
        if self.logits is not None:
            self.logits = self.logits.expand(batch_size, -1).clone()
        self.recent = self.recent.expand(batch_size, -1).clone()

    def _step(self):
        kind, B = self.step_kind, self.batch_size
        key = (kind, B if kind in ("auto", "graph") and self.device.type == "cuda" else 0)
        if key not in self._steps:
            self._steps[key] = make_step(self.model, kind, B)
        return self._steps[key]

    # --- generation ---

    @torch.inference_mode()
    def tokens(self, max_new_tokens, params=None, num_samples=None, generator=None):
        """Yield (B,) tensors of new token ids, one per step; the position advances with each.

        num_samples: rows to generate (a batch-1 position is copied to that many rows)."""
        params = (params or SamplingParams()).check()
        if self.logits is None:
            raise ValueError("nothing to continue from: feed a prompt (at least one token) or load a state first")
        if num_samples is not None:
            self.expand(num_samples)
        step = self._step()
        if self.state is None:
            self.state = self.model.init_state(self.batch_size, device=self.device, dtype=self.dtype)
        self.state = step.bind(self.state)
        recent = self.recent if params.penalized else None
        reset = getattr(self.model, "reset_token", None)  # reset_at_eot: all memory before it is forgotten
        in_graph = getattr(step, "can_draw", False) and not params.penalized and reset is None
        if in_graph:  # the draw and the step are one graph replay; its logits buffer is the position's
            step.logits.copy_(self.logits)
            self.logits = step.logits
            step.seed(generator)
        seconds, t0 = self.stats.seconds, time.perf_counter()
        for _ in range(max_new_tokens):
            if in_graph:
                ids = step.draw(params).clone()
            else:
                ids = pick(self.logits, params, generator, recent)
                if reset is not None:  # as training's forget gate of 0 there: the rows that drew it restart
                    restart = (ids == reset)[:, None]
                    for h in self.state:
                        h.masked_fill_(restart, 0.0)
                self.logits = step(ids, self.state).float()
            self._remember(ids[:, None])
            recent = self.recent if params.penalized else None
            self.stats.tokens += ids.shape[0]
            self.stats.seconds = seconds + time.perf_counter() - t0
            yield ids

    def stream(self, max_new_tokens, params=None, stop=(), num_samples=None, generator=None):
        """Yield lists of text pieces, one per row, as tokens arrive: complete characters only,
        nothing from the first stop string or end-of-text token on. Stops when every row has."""
        if num_samples is not None and self.logits is not None:
            self.expand(num_samples)
        rows = [TextStream(self.tokenizer, stop) for _ in range(self.batch_size)]
        for ids in self.tokens(max_new_tokens, params, num_samples, generator):
            yield [row.feed(t) for row, t in zip(rows, ids.tolist())]
            if all(row.stopped for row in rows):
                return
        tails = [row.flush() for row in rows]
        if any(tails):
            yield tails

    # --- state files ---

    def save_state(self, path):
        """Write the position (state, next-token logits, recent tokens) and the model's
        fingerprint to `path`: plain tensors, written to a temp file then renamed."""
        if self.logits is None:
            raise ValueError("nothing to save: feed a prompt first")
        state = self.state or self.model.init_state(self.batch_size, device=self.device)
        checkpoint.save(path, {
            "format": STATE_FORMAT,
            "model": {**fingerprint(self.model, self.tokenizer), "weights": self._weights()},
            "state": [h.detach().float().cpu().clone() for h in state],
            "logits": self.logits.detach().float().cpu(),
            "recent": self.recent.cpu(),
        })

    def load_state(self, path):
        """Continue from a position saved by `save_state`; refuses files from another model."""
        path = Path(path)
        if not path.is_file():
            raise StateError(f"state file {path} not found" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            saved = checkpoint.load_plain(path)
        except checkpoint.Unreadable as e:
            raise StateError({
                "foreign": f"{path} is not a sqrllm state file; write one with sample.py --save_state or /save",
                "refused": f"{path} holds objects other than tensors and plain types and was refused (nothing in it "
                           "was run)",
                "corrupt": f"state file {path} is truncated or corrupt ({e.detail})",
            }[e.kind]) from None
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT or not {
                "model", "state", "logits", "recent"} <= saved.keys():
            raise StateError(f"{path} is not a sqrllm state file ({STATE_FORMAT}); write one with "
                             "sample.py --save_state or /save")
        ours = fingerprint(self.model, self.tokenizer)
        diff = [f"{k} {saved['model'].get(k)!r} vs {v!r}" for k, v in ours.items()
                if k != "tokenizer" and saved["model"].get(k) != v]
        if not diff and self.tokenizer is not None and saved["model"].get("tokenizer") != ours["tokenizer"]:
            diff.append("another tokenizer or vocabulary")
        if not diff and saved["model"].get("weights", self._weights()) != self._weights():  # older files lack it
            diff.append("other weights: another run, or this run at another step")
        if diff:
            raise StateError(f"state file {path} belongs to another model (file vs this model: "
                             f"{'; '.join(diff)}); make the state with this checkpoint")
        self.state = [h.to(self.device, self.dtype) for h in saved["state"]]
        self.logits = saved["logits"].to(self.device)
        self.recent = saved["recent"].to(self.device)


def _copy(position):
    """Clone the tensors of a position dict (state: a list of tensors or None; others: a tensor or None)."""
    def clone(v):
        return None if v is None else [h.clone() for h in v] if isinstance(v, list) else v.clone()
    return {k: clone(v) for k, v in position.items()}


def generate(model, tokenizer, prompt, max_new_tokens=200, num_samples=1, stop=(), seed=None, step="auto",
             **params):
    """Complete `prompt` -> list of num_samples strings (the new text only).

    params: the fields of SamplingParams (temperature, top_k, top_p, min_p, ...)."""
    sampler = Sampler(model, tokenizer, step=step)
    sampler.feed(prompt)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=sampler.device).manual_seed(seed)
    texts = [""] * num_samples
    for pieces in sampler.stream(max_new_tokens, SamplingParams(**params), stop, num_samples, generator):
        texts = [t + p for t, p in zip(texts, pieces)]
    return texts
