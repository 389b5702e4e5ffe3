"""Sampling: the controls keep to their allowed sets, the fast decode step computes what the model
does, text streams whole and stops where asked, and a saved state resumes exactly."""

import copy
import dataclasses
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from sqrllm import checkpoint, sampling
from sqrllm.config import Config
from sqrllm import cpu
from sqrllm.decode import CudaGraphStep, FastStep, KernelStep, NativeStep, PlainStep
from sqrllm.model import SqrLLM, round_to_bf16
from sqrllm.sampling import (Sampler, SamplingParams, StateError, TextStream, apply_penalties, filter_logits,
                             generate, pick)
from sqrllm.tokenizer import ByteTokenizer, CharTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import sample  # noqa: E402

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(50))
PROBS = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])  # the fixed model's distribution


class FixedModel(torch.nn.Module):
    """Quacks like a SqrLLM. Its state counts tokens; its next-token logits are `logits[pos % len]`."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(logits, dtype=torch.float32).reshape(-1, logits.shape[-1]))
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size = self.table.shape[-1]

    def init_state(self, batch_size, device=None, dtype=torch.float32):
        return [torch.zeros(batch_size, 1, device=device, dtype=dtype)]

    def forward(self, idx, targets=None, state=None, last_only=False):
        pos = (state[0] if state is not None else self.init_state(idx.shape[0])[0]) + idx.shape[1]
        logits = self.table[pos[:, 0].long() % self.table.shape[0]][:, None]  # (B, 1, V)
        return logits, None, [pos]


def scripted(text):
    """A FixedModel that greedily writes the UTF-8 bytes of `text` after any one-token prompt."""
    data = list(text.encode("utf-8"))
    table = torch.full((len(data) + 1, 256), -10.0)
    for pos, b in enumerate(data, start=1):
        table[pos, b] = 10.0
    return FixedModel(table)


def tiny_model(dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"n_layer": 3, "n_embd": 32, "n_mem": 24, "n_ffn": 40, "mlp_every": 2, "init_std": 0.3, **kw}
    return SqrLLM(kw.pop("vocab_size", 40), **kw).to(dtype).eval()


def write_ckpt(path, model_kw, tokenizer):
    """A checkpoint of a freshly initialised model, as train.py would write one."""
    cfg = Config(**{k: v for k, v in model_kw.items() if k != "seed"})
    torch.manual_seed(model_kw.get("seed", 0))
    model = SqrLLM.from_config(cfg, tokenizer.vocab_size)
    checkpoint.save(path, {"format": checkpoint.FORMAT, "model": model.state_dict(),
                           "config": dataclasses.asdict(cfg), "vocab_size": tokenizer.vocab_size,
                           "tokenizer": tokenizer.to_meta()})
    return path


CHARS = CharTokenizer.from_text(TEXT)
MODEL_KW = {"n_layer": 2, "n_embd": 32, "mlp_every": 1, "init_std": 0.3}


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    return write_ckpt(tmp_path_factory.mktemp("ckpt") / "ckpt.pt", MODEL_KW, CHARS)


pytestmark = pytest.mark.usefixtures("one_thread")


def run_sample(*args, stdin=None):
    """sample.py in a new process."""
    return subprocess.run([sys.executable, "sample.py", *map(str, args), "--device=cpu"], cwd=ROOT,
                          capture_output=True, text=True, input=stdin, check=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def main_stdout(capsys, *args):
    """sample.py's main in this process -> what it printed."""
    sample.main([*map(str, args), "--device=cpu"])
    return capsys.readouterr().out


# --- the decode step ---


NATIVE = pytest.mark.skipif(not cpu.available()[0], reason=f"C++ decode kernel unavailable: {cpu.available()[1]}")
STEPS = {"fast": FastStep, "native": NativeStep}


@pytest.mark.parametrize("step", ["plain", "fast"])
def test_greedy_equals_argmax_of_full_forward(step):
    model = tiny_model(torch.float64)
    prompt = [3, 1, 4, 1, 5]
    sampler = Sampler(model, step=step)
    sampler.feed(prompt)
    got = torch.cat(list(sampler.tokens(40, SamplingParams(temperature=0)))).tolist()
    seq = list(prompt)
    for _ in range(40):
        logits, _, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    assert got == seq[len(prompt):]


@pytest.mark.parametrize("step", ["plain", "fast", pytest.param("native", marks=NATIVE)])
def test_every_step_restarts_the_memory_at_the_reset_token(step, monkeypatch):
    # a reset_at_eot model: generating its end-of-text token forgets all before, as the forward does
    model = tiny_model(torch.float32)
    model.reset_token = 7
    drawn = iter([[2, 5], [7, 3], [4, 7], [1, 1], [6, 2]])  # (B=2) ids per step: the reset token in both rows
    monkeypatch.setattr(sampling, "pick", lambda *a: torch.tensor(next(drawn)))
    sampler = Sampler(model, step=step)
    sampler.feed([3, 1, 4])
    got = torch.stack(list(sampler.tokens(5, num_samples=2))).T  # (2, 5)
    seqs = torch.cat([torch.tensor([[3, 1, 4]] * 2), got], dim=1)  # all the position has read
    with torch.no_grad():
        torch.testing.assert_close(sampler.logits, model(seqs)[0][:, -1], rtol=2e-5, atol=2e-5)
        model.reset_token = None  # the test can fail: without the restarts the logits are others
        assert not torch.allclose(model(seqs)[0][:, -1], sampler.logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("step,dtype,tol", [("fast", torch.float64, 1e-12), ("fast", torch.float32, 2e-5),
                                           pytest.param("native", torch.float32, 2e-5, marks=NATIVE)])
@pytest.mark.parametrize("kw", [{}, {"bias": False, "tie_weights": False, "mlp_every": 1, "n_mem": 32, "n_embd": 30},
                                {"mlp_every": 0, "n_layer": 1}])
def test_fast_steps_equal_plain_step(step, dtype, tol, kw):
    model = tiny_model(dtype, **kw)
    B = 3
    plain, fast = PlainStep(model), STEPS[step](model)
    plain_state, fast_state = model.init_state(B, dtype=dtype), fast.bind(model.init_state(B, dtype=dtype))
    ids = torch.randint(0, model.vocab_size, (30, B), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for t in range(30):
            a, b = plain(ids[t], plain_state), fast(ids[t], fast_state)
            scale = a.abs().max()
            torch.testing.assert_close(b, a, rtol=tol, atol=tol * scale)
            for h_a, h_b in zip(plain_state, fast_state):
                torch.testing.assert_close(h_b, h_a, rtol=tol, atol=tol)


def test_fast_greedy_text_equals_plain_greedy_text():
    model = tiny_model(n_layer=4, n_embd=64, n_mem=64, n_ffn=128)
    texts = []
    for step in ("plain", "fast") + (("native",) if cpu.available()[0] else ()):
        sampler = Sampler(model, step=step)
        sampler.feed([1, 2, 3])
        texts.append(torch.cat(list(sampler.tokens(300, SamplingParams(temperature=0)))).tolist())
    assert all(t == texts[0] for t in texts[1:])


@NATIVE
@pytest.mark.parametrize("kw", [{}, {"bias": False, "tie_weights": False, "mlp_every": 1, "n_mem": 32, "n_embd": 30},
                                {"mlp_every": 0, "n_layer": 1}])
def test_native_bf16_step_is_the_model_with_bfloat16_weights(kw):
    # The bf16 step reads 16-bit matrices; it must compute what the float32 model computes once
    # every parameter is rounded to bfloat16 (the exported C++'s model), not something near it.
    model = tiny_model(**kw)
    rounded = round_to_bf16(copy.deepcopy(model))
    B = 3
    ref, half = PlainStep(rounded), NativeStep(model, bf16=True)
    ref_state, half_state = rounded.init_state(B), half.bind(model.init_state(B))
    ids = torch.randint(0, model.vocab_size, (30, B), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for t in range(30):
            a, b = ref(ids[t], ref_state), half(ids[t], half_state)
            torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5 * a.abs().max())
            for h_a, h_b in zip(ref_state, half_state):
                torch.testing.assert_close(h_b, h_a, rtol=2e-5, atol=2e-5)
    assert not torch.equal(ref(ids[0], rounded.init_state(B)), PlainStep(model)(ids[0], model.init_state(B)))


@NATIVE
def test_sample_py_native_bf16_prints_the_rounded_models_greedy_text(char_ckpt, capsys):
    model, tok, _ = checkpoint.load_model(char_ckpt)
    prompt = TEXT[:40]
    sampler = Sampler(round_to_bf16(model), tok, step="plain")
    sampler.feed(tok.encode(prompt))
    want = tok.decode(torch.cat(list(sampler.tokens(200, SamplingParams(temperature=0)))).tolist())
    out = main_stdout(capsys, f"--ckpt={char_ckpt}", f"--prompt={prompt}", "--temperature=0", "--max_new_tokens=200",
                      "--step=native_bf16", "--quiet")
    assert out == prompt + want + "\n"


@NATIVE
def test_native_step_gives_the_same_bits_on_any_number_of_threads():
    model = tiny_model(n_embd=64, n_mem=64, n_ffn=96)
    outs = []
    for threads in (1, 3, None):  # None: it picks between 1 and torch's count (3) as it goes
        torch.set_num_threads(3)
        step = NativeStep(model, threads=threads)
        state = step.bind(model.init_state(2))
        outs.append(torch.stack([step(torch.tensor([t % 40, 7]), state) for t in range(10)]))
    torch.set_num_threads(1)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@NATIVE
def test_native_step_gives_float32_logits_whatever_the_default_dtype():
    model = tiny_model()
    want = PlainStep(model)(torch.tensor([3, 9]), model.init_state(2))
    torch.set_default_dtype(torch.float64)
    try:
        got = NativeStep(model)(torch.tensor([3, 9]), model.init_state(2, dtype=torch.float32))
    finally:
        torch.set_default_dtype(torch.float32)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@NATIVE
def test_native_step_rejects_what_it_cannot_run():
    model = tiny_model()
    step = NativeStep(model)
    with pytest.raises(ValueError, match="token ids must be in"):
        step(torch.tensor([40]), step.bind(model.init_state(1)))
    with pytest.raises(ValueError, match="contiguous float32"):
        step(torch.tensor([1, 2]), [torch.zeros(24, 2).t()] * 3)
    with pytest.raises(ValueError, match="float32 models on the CPU"):
        NativeStep(tiny_model(torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_cuda_graph_step_equals_plain_step():
    model = tiny_model().cuda()
    plain_state, graph_state = model.init_state(2, device="cuda"), model.init_state(2, device="cuda")
    plain, graph = PlainStep(model), CudaGraphStep(model, 2)
    bound = graph.bind(graph_state)
    with torch.inference_mode():
        for t in range(20):
            ids = torch.tensor([t % 7, (3 * t) % 11], device="cuda")
            torch.testing.assert_close(graph(ids, bound), plain(ids, plain_state), rtol=1e-4, atol=1e-4)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("kw", [{}, {"bias": False, "tie_weights": False, "mlp_every": 1, "n_mem": 33, "n_embd": 30},
                                {"n_layer": 8, "n_embd": 384, "n_ffn": 1024, "init_std": 0.02, "vocab_size": 65}])
def test_kernel_step_equals_plain_step(B, kw):
    """kernels/decode_cuda.cu, 16-byte and scalar loads (n_embd 30), against the model's forward."""
    model = tiny_model(**kw).cuda()
    plain_state, kernel_state = model.init_state(B, device="cuda"), model.init_state(B, device="cuda")
    plain, kernel = PlainStep(model), KernelStep(model)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for _ in range(30):
            ids = torch.randint(0, model.vocab_size, (B,), generator=g).cuda()
            torch.testing.assert_close(kernel(ids, kernel_state).clone(), plain(ids, plain_state),
                                       rtol=1e-4, atol=1e-4)
        for a, b in zip(kernel_state, plain_state):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_cuda
@pytest.mark.gpu
def test_graph_of_a_bfloat16_model_replays_the_flat_step():
    """Models that are not float32 are captured through FastStep, in their own dtype."""
    model = tiny_model(torch.bfloat16).cuda()
    plain_state, graph_state = model.init_state(2, device="cuda", dtype=torch.bfloat16), \
        model.init_state(2, device="cuda", dtype=torch.bfloat16)
    plain, graph = PlainStep(model), CudaGraphStep(model, 2)
    assert not graph.can_draw
    bound = graph.bind(graph_state)
    with torch.inference_mode():
        for t in range(10):
            ids = torch.tensor([t % 7, (3 * t) % 11], device="cuda")
            a, b = plain(ids, plain_state).float(), graph(ids, bound).float()
            assert (a - b).abs().max() <= 0.05 * a.abs().max()  # bfloat16 rounding: 0.014 on the CPU


@needs_cuda
@pytest.mark.gpu
def test_graph_greedy_text_takes_the_argmax_of_the_model():
    """Draw and step in one graph replay, greedy: each token is the argmax of the model's own full
    forward over the text so far (up to float32 near-ties)."""
    model = tiny_model(n_layer=4, n_embd=64, n_mem=48, n_ffn=96).cuda()
    sampler = Sampler(model, step="graph")
    sampler.feed([1, 2, 3])
    out = torch.cat(list(sampler.tokens(120, SamplingParams(temperature=0))))
    assert sampler._step().can_draw
    seq = torch.cat([torch.tensor([1, 2, 3], device="cuda"), out])
    with torch.inference_mode():
        logits = model(seq[None, :-1])[0][0, 2:].float()  # (120, V): the logits each token was drawn from
    top = logits.max(dim=-1).values
    chosen = logits.gather(1, out[:, None])[:, 0]
    assert (chosen >= top - 1e-4).all()


@needs_cuda
@pytest.mark.gpu
def test_graph_draws_follow_the_distribution_and_never_leave_the_allowed_set():
    from sqrllm import cuda_layers

    probs = torch.cat([PROBS, torch.zeros(1)]).repeat(2, 1).cuda()  # (2, 8): token 7 impossible
    rng, ids = torch.tensor([1234, 0], device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda")
    n, draws = 20000, []
    for _ in range(n):
        cuda_layers.decode_launch("dec_draw", 0, 2, probs, rng, ids, 8)
        draws.append(ids.clone())
        rng[1:].add_(1)
    draws = torch.stack(draws).cpu()  # (n, 2)
    for row in draws.t():
        freq = torch.bincount(row, minlength=8).float() / n
        assert freq[7] == 0
        torch.testing.assert_close(freq[:7], PROBS, atol=0.012, rtol=0)
    assert (draws[:, 0] != draws[:, 1]).float().mean() > 0.5  # rows draw independently

    model = tiny_model(n_layer=4, n_embd=64, n_mem=48, n_ffn=96).cuda()
    sampler = Sampler(model, step="graph")
    sampler.feed([5])
    tokens = sampler.tokens(200, SamplingParams(temperature=2.0, top_k=3), num_samples=2,
                            generator=torch.Generator(device="cuda").manual_seed(0))
    for _ in range(200):
        allowed = sampler.logits.topk(3, dim=-1).indices
        ids = next(tokens)
        assert (allowed == ids[:, None]).any(dim=-1).all()


@needs_cuda
@pytest.mark.gpu
def test_graph_draws_repeat_with_the_seed():
    model = tiny_model().cuda()

    def run(seed):
        sampler = Sampler(model, step="graph")
        sampler.feed([1, 2])
        gen = torch.Generator(device="cuda").manual_seed(seed)
        return torch.cat(list(sampler.tokens(50, SamplingParams(temperature=1.0), generator=gen))).tolist()
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_chunked_prefill_equals_one_forward():
    model = tiny_model()
    prompt = torch.randint(0, 40, (100,), generator=torch.Generator().manual_seed(2)).tolist()
    whole, chunked = Sampler(model, prefill_chunk=1000), Sampler(model, prefill_chunk=7)
    whole.feed(prompt)
    chunked.feed(prompt)
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(chunked.state, whole.state):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- the controls ---


def draws(params, n=20000):
    logits = PROBS.log().expand(n, -1)
    return pick(logits, params, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("params,allowed", [
    (SamplingParams(top_k=3), {0, 1, 2}),
    (SamplingParams(top_p=0.6), {0, 1}),  # 0.4 < 0.6, 0.4 + 0.25 >= 0.6
    (SamplingParams(top_p=0.75), {0, 1, 2}),
    (SamplingParams(min_p=0.3), {0, 1, 2}),  # p >= 0.12
    (SamplingParams(min_p=0.2), {0, 1, 2, 3}),  # p >= 0.08
    (SamplingParams(top_k=5, top_p=0.85, min_p=0.3), {0, 1, 2}),
    (SamplingParams(top_k=5, temperature=3.0), {0, 1, 2, 3, 4}),
    (SamplingParams(top_k=1), {0}),
])
def test_filters_never_sample_outside_the_allowed_set(params, allowed):
    seen = set(draws(params).tolist())
    assert seen == allowed  # nothing outside, and every allowed token does come up


def test_filtered_draws_follow_the_renormalised_distribution():
    got = torch.bincount(draws(SamplingParams(top_k=3), 40000), minlength=7).float() / 40000
    want = torch.zeros(7)
    want[:3] = PROBS[:3] / PROBS[:3].sum()
    assert (got - want).abs().max() < 0.01


def test_sampler_applies_the_controls_to_every_row():
    sampler = Sampler(FixedModel(PROBS.log()[None]), step="plain")
    sampler.feed([0])
    ids = torch.stack(list(sampler.tokens(5, SamplingParams(top_p=0.6), num_samples=2000,
                                          generator=torch.Generator().manual_seed(0))))
    assert ids.shape == (5, 2000) and set(ids.flatten().tolist()) == {0, 1}


def test_greedy_takes_the_argmax_and_temperature_zero_does_not_crash():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.9, float("-inf")]])
    assert pick(logits, SamplingParams(temperature=0, top_p=0.1)).tolist() == [1, 0]


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6])
def test_a_tiny_temperature_draws_the_argmax(temperature):
    # logits / temperature would overflow to inf, and softmax of inf is NaN (argmax then says token 0)
    logits = 30 * torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    got = pick(logits, SamplingParams(temperature=temperature), torch.Generator().manual_seed(1))
    assert got.tolist() == logits.argmax(dim=-1).tolist()


def test_penalties_change_logits_as_specified():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    recent = torch.tensor([[0, 1, 0, 0]])  # token 0 three times, token 1 once, 2 and 3 never
    rep = apply_penalties(logits, recent, SamplingParams(repetition_penalty=2.0))
    assert rep.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    freq = apply_penalties(logits, recent, SamplingParams(frequency_penalty=0.5))
    assert freq.tolist() == [[0.5, -2.5, 1.0, 0.5]]
    pres = apply_penalties(logits, recent, SamplingParams(presence_penalty=0.25))
    assert pres.tolist() == [[1.75, -2.25, 1.0, 0.5]]
    both = apply_penalties(logits, recent, SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5,
                                                          presence_penalty=0.25))
    assert both.tolist() == [[-0.75, -4.75, 1.0, 0.5]]
    assert apply_penalties(logits, recent, SamplingParams()).tolist() == logits.tolist()


def test_penalties_look_only_at_the_window():
    sampler = Sampler(FixedModel(torch.tensor([[5.0, 4.0, 0.0]])), step="plain")
    sampler.feed([0, 0, 0, 2])
    params = SamplingParams(temperature=0, presence_penalty=6.0, penalty_window=2)
    # windows [0, 2] -> 1 wins; [2, 1] -> 0; [1, 0] -> 2; [0, 2] -> 1 (token 0's three in the prompt long gone)
    assert torch.cat(list(sampler.tokens(4, params))).tolist() == [1, 0, 2, 1]


def test_filter_keeps_the_top_token_even_with_tiny_top_p():
    out = filter_logits(PROBS.log()[None], top_p=1e-6)
    assert torch.isfinite(out).tolist() == [[True] + [False] * 6]


def test_bad_controls_are_refused_with_their_name():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0).check()


def test_sample_py_refuses_bad_controls(capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt=x", "--min_p=2"])
    assert e.value.code == 2 and "min_p must be in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt=x", f"--seed={2**64}"])  # torch's generator takes no more
    assert e.value.code == 2 and f"--seed must be in [-2**63, 2**64), got {2**64}" in capsys.readouterr().err


@pytest.mark.parametrize("bad, message", [
    ("--prompt_file={tmp}/nofile.txt", "--prompt_file {tmp}/nofile.txt: No such file or directory"),
    ("--prompt_file={tmp}", "--prompt_file {tmp}: Is a directory"),
    ("--prompt_file={tmp}/latin1.txt", "--prompt_file {tmp}/latin1.txt: not UTF-8 text: invalid continuation byte"),
    ("--device=gpu", "device='gpu' is not one of 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'"),
    ("--device=cuda:99", "device='cuda:99' but this "),
])
def test_sample_py_bad_input_is_one_error_line(char_ckpt, tmp_path, bad, message):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(SystemExit) as e:
        sample.main([f"--ckpt={char_ckpt}", bad.format(tmp=tmp_path)] + ([] if "device" in bad else ["--device=cpu"]))
    assert str(e.value.code).startswith("error: " + message.format(tmp=tmp_path))


def test_sample_py_names_a_missing_tokenizer_file(tmp_path):
    # a SentencePiece run's checkpoint, copied without the tokenizer.model that lies beside it
    meta = {"kind": "sentencepiece", "model_file": "tokenizer.model"}
    spm = types.SimpleNamespace(vocab_size=300, to_meta=lambda: meta)
    ckpt = write_ckpt(tmp_path / "ckpt.pt", MODEL_KW, spm)
    with pytest.raises(SystemExit) as e:
        sample.main([f"--ckpt={ckpt}", "--device=cpu"])
    assert str(e.value.code).startswith(f"error: SentencePiece model {tmp_path / 'tokenizer.model'} not found")


def test_sample_py_takes_and_prints_utf8_in_a_c_locale(tmp_path):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", MODEL_KW, ByteTokenizer())
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONIOENCODING", None)
    run = subprocess.run([sys.executable, "sample.py", f"--ckpt={ckpt}", "--prompt=é中文 ", "--max_new_tokens=3",
                          "--device=cpu", "--quiet"], cwd=ROOT, env=env, capture_output=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("é中文 ".encode())


def test_sample_py_into_a_pipe_that_closes_ends_quietly(char_ckpt):
    # `sample.py ... | head -c 20`: the reader leaves; no traceback, and the sampling stops
    proc = subprocess.Popen([sys.executable, "sample.py", f"--ckpt={char_ckpt}", "--max_new_tokens=1000000",
                             "--device=cpu"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    assert len(proc.stdout.read(20)) == 20
    proc.stdout.close()
    stderr = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 1 and stderr == ""


# --- text: streaming and stop strings ---


def test_stream_holds_partial_characters_and_prints_exactly_the_text():
    text = "héllo 😀 wörld ✓"
    sampler = Sampler(scripted(text), ByteTokenizer(), step="plain")
    sampler.feed([0])
    pieces = [p[0] for p in sampler.stream(len(text.encode()), SamplingParams(temperature=0))]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert "" in pieces  # the bytes of a character came one by one and were held


def test_stop_strings_end_generation_and_are_not_printed():
    text = "abc aXbSTOPdef STOP"
    sampler = Sampler(scripted(text), ByteTokenizer(), step="plain")
    sampler.feed([0])
    out = list(sampler.stream(100, SamplingParams(temperature=0), stop=["XYZ", "STOP", "bS"]))
    assert "".join(p[0] for p in out) == "abc aX"  # "bS" comes first
    assert sampler.stats.tokens == len("abc aXbS")  # generation ended at the stop


def test_end_of_text_token_ends_the_sample():
    class WithEot(ByteTokenizer):
        eot_id = 0

    sampler = Sampler(scripted("ab?\0cd"), WithEot(), step="plain")
    sampler.feed([0])
    out = list(sampler.stream(100, SamplingParams(temperature=0), stop=["?!"]))
    assert "".join(p[0] for p in out) == "ab?" and sampler.stats.tokens == 4


def test_text_stream_releases_a_false_start_of_a_stop_string():
    s = TextStream(CHARS, stop=["ab"])
    out = [s.feed(CHARS.index[c]) for c in "aacab"]
    assert out == ["", "a", "ac", "", ""] and s.stopped
    assert s.flush() == ""


def test_sample_py_streams_exactly_the_decoded_text(tmp_path, capsys):
    ckpt = write_ckpt(tmp_path / "ckpt.pt", {**MODEL_KW, "init_std": 2.0}, ByteTokenizer())
    sample.main([f"--ckpt={ckpt}", "--prompt=é", "--max_new_tokens=300", "--temperature=1.5", "--top_k=0",
                 "--seed=5", "--device=cpu", "--quiet"])
    out = capsys.readouterr().out
    model, tok, _ = checkpoint.load_model(ckpt)
    sampler = Sampler(model, tok)
    sampler.feed("é")
    ids = torch.cat(list(sampler.tokens(300, SamplingParams(temperature=1.5), generator=torch.Generator()
                                        .manual_seed(5)))).tolist()
    assert out == "é" + tok.decode(ids) + "\n"
    assert any(i >= 0x80 for i in ids)  # multi-byte sequences (and broken ones) were in play


def test_num_samples_are_one_batch_of_different_samples(char_ckpt):
    model, tok, _ = checkpoint.load_model(char_ckpt)
    texts = generate(model, tok, "line 1", 50, num_samples=4, seed=0, temperature=1.0)
    assert len(texts) == 4 and len(set(texts)) == 4 and all(len(t) == 50 for t in texts)


# --- the state ---


def test_saved_state_resumes_exactly_in_a_new_process(char_ckpt, tmp_path, capsys):
    controls = ["--max_new_tokens=80", "--seed=3", "--temperature=0.9", "--top_p=0.95", "--min_p=0.02",
                "--repetition_penalty=1.3", "--frequency_penalty=0.2", "--quiet", f"--ckpt={char_ckpt}"]
    prompt = TEXT[:300]
    whole = main_stdout(capsys, f"--prompt={prompt}", *controls)
    state = tmp_path / "prompt.state"
    main_stdout(capsys, f"--prompt={prompt}", f"--save_state={state}", "--max_new_tokens=0", f"--ckpt={char_ckpt}")
    resumed = run_sample(f"--load_state={state}", *controls).stdout
    assert whole == prompt + resumed and len(resumed) > 60


def test_state_from_another_model_shape_is_refused(char_ckpt, tmp_path, capsys):
    model, tok, _ = checkpoint.load_model(char_ckpt)
    sampler = Sampler(model, tok)
    sampler.feed("line 3")
    sampler.save_state(tmp_path / "s.state")
    other = write_ckpt(tmp_path / "other.pt", {**MODEL_KW, "n_embd": 48}, CHARS)
    with pytest.raises(StateError, match=r"belongs to another model .*n_embd 32 vs 48"):
        Sampler(*checkpoint.load_model(other)[:2]).load_state(tmp_path / "s.state")
    with pytest.raises(SystemExit, match="error: state file .* belongs to another model"):
        sample.main([f"--ckpt={other}", f"--load_state={tmp_path / 's.state'}", "--device=cpu"])
    torch.save({"format": "sqrllm-state-1", "x": torch.nn.Linear(1, 1)}, tmp_path / "evil.state")
    with pytest.raises(StateError, match="refused"):
        sampler.load_state(tmp_path / "evil.state")


def test_state_from_other_weights_of_the_same_shape_is_refused(char_ckpt, tmp_path):
    model, tok, _ = checkpoint.load_model(char_ckpt)
    sampler = Sampler(model, tok, step="native_bf16" if cpu.available()[0] else "plain")
    sampler.feed("line 3")
    sampler.save_state(tmp_path / "s.state")
    Sampler(model, tok).load_state(tmp_path / "s.state")  # the same checkpoint, through another step: taken
    other = write_ckpt(tmp_path / "other.pt", {**MODEL_KW, "seed": 1}, CHARS)  # same shape, other weights
    with pytest.raises(StateError, match="belongs to another model .*other weights: another run, or this run "
                                         "at another step"):
        Sampler(*checkpoint.load_model(other)[:2]).load_state(tmp_path / "s.state")


@pytest.mark.parametrize("content", [b"", b"hello\n", b'{"state": []}'])
def test_a_file_that_is_no_state_is_named_as_such(char_ckpt, tmp_path, content):
    (tmp_path / "s.state").write_bytes(content)
    with pytest.raises(SystemExit) as e:
        sample.main([f"--ckpt={char_ckpt}", f"--load_state={tmp_path / 's.state'}", "--device=cpu"])
    assert e.value.code == (f"error: {tmp_path / 's.state'} is not a sqrllm state file; write one with "
                            "sample.py --save_state or /save")


def test_save_state_where_it_cannot_go_is_one_error_line(char_ckpt, tmp_path):
    with pytest.raises(SystemExit) as e:
        sample.main([f"--ckpt={char_ckpt}", "--prompt=line", f"--save_state={tmp_path}", "--device=cpu"])
    assert str(e.value.code).startswith(f"error: --save_state {tmp_path}: ")


def test_penalties_must_be_finite():
    for bad in ({"presence_penalty": float("nan")}, {"frequency_penalty": float("inf")},
                {"repetition_penalty": float("inf")}):
        with pytest.raises(ValueError, match="the penalties must be finite numbers"):
            SamplingParams(**bad).check()


def test_interactive_keeps_state_and_retries_resets_saves(char_ckpt, tmp_path, capsys):
    model, tok, _ = checkpoint.load_model(char_ckpt)
    sampler = Sampler(model, tok)
    sampler.feed("line 1\n")
    greedy = SamplingParams(temperature=0)
    answer = "".join(p[0] for p in sampler.stream(30, greedy))
    more = "".join(p[0] for p in sampler.stream(30, greedy))
    shown = [t if t.endswith("\n") else t + "\n" for t in (answer, more)]

    state = tmp_path / "chat.state"
    lines = ["line 1", "/retry", "", "/reset", "line 1", f"/save {state}", "/set temperature 0.5", "/quit", "x"]
    run = run_sample(f"--ckpt={char_ckpt}", "--interactive", "--temperature=0", "--max_new_tokens=30",
                     stdin="\n".join(lines) + "\n")
    # answer, the same again (/retry), more (empty line: go on), the first answer again (/reset)
    assert run.stdout == shown[0] + shown[0] + shown[1] + shown[0]
    assert "temperature = 0.5" in run.stderr and "generation:" in run.stderr
    resumed = main_stdout(capsys, f"--ckpt={char_ckpt}", f"--load_state={state}", "--temperature=0",
                          "--max_new_tokens=30", "--quiet")
    assert resumed == more + "\n"  # saved after "line 1" and its answer
