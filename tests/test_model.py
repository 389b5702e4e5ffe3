"""SqrLLM: the three ways of running it (whole sequence, chunks with carried state, one token at a
time) agree, and the options do what they say."""

import pytest
import torch

from sqrllm.model import GatedMLP, SqrLLM, SqrllLayer


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(vocab_size=37, n_layer=3, n_embd=32, n_mem=24, n_ffn=40, mlp_every=2)
    args.update(kw)
    return SqrLLM(**args).double().eval()


def test_full_equals_chunked_equals_stepwise():
    model = tiny()
    idx = torch.randint(0, 37, (3, 23))
    with torch.no_grad():
        full, _, full_state = model(idx)
        chunks, state = [], None
        for lo, hi in [(0, 5), (5, 6), (6, 17), (17, 23)]:
            logits, _, state = model(idx[:, lo:hi], state=state)
            chunks.append(logits)
        steps, step_state = [], None
        for t in range(idx.shape[1]):
            logits, _, step_state = model(idx[:, t : t + 1], state=step_state)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)
    for a, b, c in zip(full_state, state, step_state):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_greedy_tokens_equal_in_float32():
    model = tiny().float()
    prompt = torch.randint(0, 37, (1, 9))
    with torch.no_grad():
        seq = prompt.clone()
        for _ in range(20):  # re-reading the whole context each time
            nxt = model(seq)[0][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
        logits, _, state = model(prompt, last_only=True)
        gen = []
        for _ in range(20):  # one step per token from the carried state
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            gen.append(nxt)
            logits, _, state = model(nxt, state=state)
    assert torch.equal(torch.cat(gen, 1), seq[:, 9:])


def test_state_carries_information():
    model = tiny()
    idx = torch.randint(0, 37, (2, 8))
    with torch.no_grad():
        _, _, state = model(torch.randint(0, 37, (2, 16)))
        with_state = model(idx, state=state)[0]
        without = model(idx)[0]
    assert not torch.allclose(with_state, without)
    assert all(s.shape == (2, 24) and not s.requires_grad for s in state)


def test_memory_after_is_the_memory_a_forward_leaves():
    model = tiny()
    idx = torch.randint(0, 37, (3, 11))
    start = model.init_state(3, dtype=torch.float64)
    start[0].normal_()
    _, _, state = model(idx, state=start)
    after = model.memory_after(idx, start)
    assert len(after) == 3 and all(torch.equal(a, b) for a, b in zip(after, state))


def test_layout_follows_mlp_every():
    kinds = lambda m: "".join("s" if b.is_sqrll else "m" for b in m.blocks)  # noqa: E731
    assert kinds(tiny(n_layer=4, mlp_every=1)) == "smsmsmsm"
    assert kinds(tiny(n_layer=4, mlp_every=2)) == "ssmssm"
    assert kinds(tiny(n_layer=3, mlp_every=0)) == "sss"
    model = tiny(n_layer=4, mlp_every=3)
    assert kinds(model) == "sssms"
    assert len(model.sqrll_layers()) == 4 and isinstance(model.blocks[3].inner, GatedMLP)
    assert isinstance(model.blocks[0].inner, SqrllLayer)


def test_weight_tying_and_loss():
    tied, untied = tiny(tie_weights=True), tiny(tie_weights=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert untied.num_params() == tied.num_params() + 37 * 32
    idx = torch.randint(0, 37, (2, 10))
    logits, loss, _ = tied(idx[:, :-1], idx[:, 1:])
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 37), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    # an untrained model predicts close to uniform
    assert abs(loss.item() - torch.log(torch.tensor(37.0)).item()) < 0.5


def test_dropout_only_in_training():
    model = tiny(dropout=0.5)
    idx = torch.randint(0, 37, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], model(idx)[0])
        model.train()
        assert not torch.equal(model(idx)[0], model(idx)[0])


def test_drop_path_skips_whole_branches_of_rows_only_in_training():
    """Rates rise linearly over the blocks; in eval mode the output is the model's without drop_path;
    in training, with every block at 0.9999, nearly every row skips every branch: its logits are the
    embedding's alone (through the final norm and head)."""
    model = tiny(drop_path=0.5, mlp_every=1)
    rates = [b.drop_path for b in model.blocks]
    assert rates == pytest.approx([0.5 * i / 5 for i in range(6)])
    idx = torch.randint(0, 37, (64, 10))
    with torch.no_grad():
        plain = tiny(mlp_every=1)(idx)[0]
        assert torch.equal(model(idx)[0], plain)
        for block in model.blocks:
            block.drop_path = 0.9999
        bare = model.head(model.wte(idx))[0]
        trained = model.train()(idx)[0]
    skipped = sum(torch.allclose(a, b) for a, b in zip(trained, bare))
    assert skipped >= 60


def test_zoneout_acts_only_in_training():
    """In eval mode the output is the model's without zoneout. In training, with every feature zoned
    at (nearly) every step, no sqrll layer's memory moves from zero; with 30% zoned, two training
    passes draw different positions."""
    model = tiny(zoneout=0.3)
    idx = torch.randint(0, 37, (4, 12))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], tiny()(idx)[0])
        for layer in model.sqrll_layers():
            layer.zoneout = 1 - 1e-12
        _, _, state = model.train()(idx)
        assert all(torch.all(mem == 0) for mem in state)
        model.eval()
        for layer in model.sqrll_layers():
            layer.zoneout = 0.3
        a, b = model.train()(idx)[0], model(idx)[0]  # two draws of the zoned positions
        assert not torch.equal(a, b)


def test_forget_gates_start_spread_over_timescales():
    """Every layer's memory features start with timescales -1 / log r spaced evenly in log from 1 to
    max_timescale tokens."""
    for layer in tiny(forget_init="spread", max_timescale=100.0).sqrll_layers():
        timescale = -1 / torch.log(torch.sigmoid(layer.proj.bias[:24].detach()))
        torch.testing.assert_close(timescale, torch.logspace(0, 2, 24, dtype=torch.float64), rtol=1e-5, atol=0)
    zero = tiny(forget_init="zero").sqrll_layers()[0]
    assert torch.all(zero.proj.bias == 0)


def test_scaled_init_shrinks_residual_outputs():
    """init="scaled": every residual branch's output projection at std / sqrt(2 * blocks), the other
    matrices at std; init="normal": all at std."""
    torch.manual_seed(0)
    model = SqrLLM(vocab_size=37, n_layer=6, n_embd=128, n_mem=128, n_ffn=256, mlp_every=1, init="scaled")
    scaled = 0.02 / (2 * len(model.blocks)) ** 0.5
    for name, p in model.named_parameters():
        if p.dim() == 2:
            want = scaled if name.endswith("out.weight") else 0.02
            assert p.std().item() == pytest.approx(want, rel=0.05), name
    normal = SqrLLM(vocab_size=37, n_layer=6, n_embd=128, n_mem=128, n_ffn=256, mlp_every=1, init="normal")
    assert all(p.std().item() == pytest.approx(0.02, rel=0.05) for p in normal.parameters() if p.dim() == 2)


def test_gradients_reach_every_parameter():
    model = tiny().float().train()
    idx = torch.randint(0, 37, (2, 12))
    _, loss, _ = model(idx[:, :-1], idx[:, 1:], state=model.init_state(2))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
