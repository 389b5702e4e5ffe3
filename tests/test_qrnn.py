"""QRNN against a plain loop over the paper's equations, and as a drop-in for nn.LSTM / nn.GRU."""

import functools
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sqrllm.qrnn import QRNN, ForgetMult, _FusedPool, _pool_ref, forget_mult

# ||got - want|| / ||want||, for float64 modules against the float64 reference, and for lower
# precisions against float64
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def paper_qrnn(m, x, h0=None):
    """QRNN from the paper's equations, a loop over time: x (T, B, I) -> (output, h_n).

    Per step, in the direction of travel: g = b + sum_j W[:, :, j] x[t - (k-1) + j] (forward) or
    x[t + (k-1) - j] (reverse), inputs outside the sequence being zero; z = tanh(g_z),
    f = sigmoid(g_f), o = sigmoid(g_o); c = f * z + (1 - f) * c; h = o * c (or c).
    """
    T, B, _ = x.shape
    H, k, D = m.hidden_size, m.window, m.num_directions
    finals, inp = [], x
    for layer in range(m.num_layers):
        outs = []
        for d in range(D):
            suffix = "_reverse" if d else ""
            W = getattr(m, f"weight_ih_l{layer}{suffix}").double()
            W = W.view(W.shape[0], -1, k)  # (gates * H, I, k)
            b = getattr(m, f"bias_ih_l{layer}{suffix}")
            c = x.new_zeros(B, H) if h0 is None else h0[layer * D + d]
            hs = [None] * T
            for t in range(T) if d == 0 else reversed(range(T)):
                g = x.new_zeros(B, W.shape[0]) if b is None else b.double().expand(B, -1)
                for j in range(k):
                    s = t - (k - 1) + j if d == 0 else t + (k - 1) - j
                    if 0 <= s < T:
                        g = g + inp[s] @ W[:, :, j].T
                z, f = torch.tanh(g[:, :H]), torch.sigmoid(g[:, H:2 * H])
                c = f * z + (1 - f) * c
                hs[t] = torch.sigmoid(g[:, 2 * H:]) * c if m.output_gate else c
            outs.append(torch.stack(hs))
            finals.append(c)
        inp = torch.cat(outs, -1)
    return inp, torch.stack(finals)


def loss_of(out, h_n, w_out, w_h):
    return (out * w_out).sum() + (h_n * w_h).sum()


@pytest.mark.parametrize("window", [1, 2, 3])
@pytest.mark.parametrize("output_gate", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_matches_paper_equations(window, output_gate, bidirectional):
    torch.manual_seed(window * 4 + output_gate * 2 + bidirectional)
    T, B, I, H, L = 7, 3, 5, 4, 2
    m = QRNN(I, H, num_layers=L, window=window, output_gate=output_gate,
             bidirectional=bidirectional).double()
    D = m.num_directions
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(L * D, B, H, dtype=torch.float64, requires_grad=True)
    w_out, w_h = torch.randn(T, B, D * H, dtype=torch.float64), torch.randn(L * D, B, H, dtype=torch.float64)
    params = [x, h0, *m.parameters()]

    out, h_n = m(x, h0)
    ref_out, ref_h = paper_qrnn(m, x, h0)
    assert out.shape == (T, B, D * H) and h_n.shape == (L * D, B, H)
    assert rel_err(out, ref_out) < RTOL[torch.float64]
    assert rel_err(h_n, ref_h) < RTOL[torch.float64]
    with torch.no_grad():  # inference takes its own, cheaper gate slicing
        out_ng, h_ng = m(x, h0)
    assert torch.equal(out_ng, out) and torch.equal(h_ng, h_n)
    grads = torch.autograd.grad(loss_of(out, h_n, w_out, w_h), params)
    ref_grads = torch.autograd.grad(loss_of(ref_out, ref_h, w_out, w_h), params)
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < RTOL[torch.float64]

    # float32 module, same weights, against the float64 reference
    out32, h32 = m.float()(x.float(), h0.float())
    assert out32.dtype == torch.float32
    assert rel_err(out32, ref_out) < RTOL[torch.float32] and rel_err(h32, ref_h) < RTOL[torch.float32]


def test_gradients_of_gradients_are_exact():
    """A gradient penalty (create_graph=True) through two bidirectional layers with a window and h0."""
    torch.manual_seed(1)
    m = QRNN(3, 4, num_layers=2, window=2, bidirectional=True).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: m(a, b)[0], (x, h0))
    assert torch.autograd.gradgradcheck(lambda a, b: m(a, b)[1], (x, h0))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("output_gate", [True, False])
def test_fused_layers_twin_is_the_general_path(batch_first, output_gate):
    """_pool_ref, the torch-ops twin of the fused CUDA layer (kernels/qrnn.cu) that its backward
    differentiates when create_graph=True, equals the general path: bias added, zoneout's scale in
    eval, both directions, h0."""
    torch.manual_seed(2)
    H = 4
    m = QRNN(3, H, bidirectional=True, output_gate=output_gate, zoneout=0.25, batch_first=batch_first).double().eval()
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    h0 = torch.randn(2, 2, H, dtype=torch.float64)
    out, h_n = m(x if batch_first else x.transpose(0, 1), h0)
    td, gates = int(batch_first), 3 if output_gate else 2
    for d, suffix in enumerate(["", "_reverse"]):
        g = F.linear(x if batch_first else x.transpose(0, 1), getattr(m, "weight_ih_l0" + suffix))
        h, c_last = _pool_ref(g, getattr(m, "bias_ih_l0" + suffix).float(), h0[d], H, gates, bool(d), 0.75, td)
        torch.testing.assert_close(h, out[..., d * H:(d + 1) * H], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(c_last, h_n[d], rtol=1e-6, atol=1e-6)


def test_fused_layers_backward_for_a_double_backward_runs_its_twin():
    """_FusedPool.backward with grad enabled (create_graph=True) needs no GPU: it differentiates
    _pool_ref. Its gradients land in the slots of (g, bias, c0), None where not needed or where an
    output's gradient is None, and can be differentiated again."""
    torch.manual_seed(3)
    H = 4
    g, bias = torch.randn(5, 2, 3 * H, dtype=torch.float64), torch.randn(3 * H, dtype=torch.float64)
    c0 = torch.randn(2, H, dtype=torch.float64)
    for t in (g, bias, c0):
        t.requires_grad_()
    dh, dc = torch.randn(5, 2, H, dtype=torch.float64), torch.randn(2, H, dtype=torch.float64)
    for dc_last, needs in ((dc, (True, True, True)), (None, (True, False, True))):
        ctx = types.SimpleNamespace(saved_tensors=(g, bias, None, c0), args=(H, 3, False, 0.75, 0),
                                    needs_input_grad=(*needs, False, False, False, False, False))
        with torch.enable_grad():
            got = _FusedPool.backward(ctx, dh, dc_last)
        h, c_last = _pool_ref(g, bias, c0, H, 3, False, 0.75, 0)
        loss = (h * dh).sum() + ((c_last * dc_last).sum() if dc_last is not None else 0)
        want = torch.autograd.grad(loss, [t for t, need in zip((g, bias, c0), needs) if need])
        assert len(got) == 8 and got[3:] == (None,) * 5 and (got[1] is None) == (not needs[1])
        for a, b in zip([t for t in got[:3] if t is not None], want):
            torch.testing.assert_close(a, b)
        assert got[0].requires_grad  # differentiable again


def test_batch_first_and_unbatched_match_time_major():
    torch.manual_seed(0)
    m = QRNN(3, 4, num_layers=2, window=2, bidirectional=True).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    h0 = torch.randn(4, 2, 4, dtype=torch.float64)
    out, h_n = m(x, h0)
    m.batch_first = True
    out_bf, h_bf = m(x.transpose(0, 1), h0)
    assert torch.allclose(out_bf.transpose(0, 1), out) and torch.allclose(h_bf, h_n)
    m1 = QRNN(3, 4, batch_first=True).double()
    assert m1(x.transpose(0, 1))[1].is_contiguous()  # code written for nn.GRU may .view(h_n)
    out_1, h_1 = m(x[:, 1], h0[:, 1])  # unbatched input is (T, I) whatever batch_first says
    assert torch.allclose(out_1, out[:, 1]) and torch.allclose(h_1, h_n[:, 1])


@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_equals_each_sequence_alone(enforce_sorted):
    torch.manual_seed(1)
    I, H, L = 3, 4, 2
    m = QRNN(I, H, num_layers=L, window=2, bidirectional=True).double()
    lengths = [6, 6, 4, 2, 1] if enforce_sorted else [4, 6, 1, 6, 2]
    B, T = len(lengths), max(lengths)
    x = torch.randn(T, B, I, dtype=torch.float64)
    for b, n in enumerate(lengths):
        x[n:, b] = float("nan")  # padding must not reach any result
    h0 = torch.randn(L * 2, B, H, dtype=torch.float64)

    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
    out, h_n = m(packed, h0)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    assert (out.sorted_indices is None) == enforce_sorted
    if not enforce_sorted:
        assert torch.equal(out.sorted_indices, packed.sorted_indices)
    padded, out_lengths = pad_packed_sequence(out)
    assert out_lengths.tolist() == lengths
    for b, n in enumerate(lengths):
        alone, h_alone = m(x[:n, b:b + 1], h0[:, b:b + 1])
        assert rel_err(padded[:n, b:b + 1], alone) < RTOL[torch.float64]
        assert rel_err(h_n[:, b:b + 1], h_alone) < RTOL[torch.float64]
    assert not padded.isnan().any() and not h_n.isnan().any()


@pytest.mark.parametrize("batch_first", [False, True])
def test_streaming_pieces_equal_one_call(batch_first):
    torch.manual_seed(2)
    T, B, I, H, L = 10, 2, 3, 4, 2
    m = QRNN(I, H, num_layers=L, window=3, batch_first=batch_first, save_prev_x=True).double()
    td = 1 if batch_first else 0
    x = torch.randn(T, B, I, dtype=torch.float64)
    x = x.transpose(0, 1) if batch_first else x
    h0 = torch.randn(L, B, H, dtype=torch.float64)
    full, h_full = m(x, h0)

    m.reset()
    outs, h = [], h0
    for piece in x.split([1, 4, 2, 3], td):  # a piece shorter than window - 1 too
        out, h = m(piece, h)
        outs.append(out)
    assert rel_err(torch.cat(outs, td), full) < RTOL[torch.float64]
    assert rel_err(h, h_full) < RTOL[torch.float64]

    m.reset()  # a new stream starts from zero inputs again
    again, _ = m(x, h0)
    assert torch.equal(again, full)
    with pytest.raises(ValueError, match="reset"):
        m(x.narrow(1 - td, 0, 1), None)  # batch 1 after a stream of batch 2


def test_without_kept_inputs_each_call_starts_fresh():
    torch.manual_seed(3)
    m = QRNN(3, 4, window=2).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    out_a, _ = m(x)
    out_b, _ = m(x)
    assert torch.equal(out_a, out_b)


def test_zoneout_only_in_training():
    torch.manual_seed(4)
    m = QRNN(3, 4, zoneout=0.5).double()
    x = torch.randn(8, 2, 3, dtype=torch.float64)
    h0 = torch.randn(1, 2, 4, dtype=torch.float64)
    m.eval()
    assert torch.equal(m(x, h0)[0], m(x, h0)[0])
    m.train()
    assert not torch.equal(m(x, h0)[0], m(x, h0)[0])
    m.zoneout = 1.0  # every forget gate zeroed: the state never moves from h0
    _, h_n = m(x, h0)
    assert torch.equal(h_n, h0)
    # eval uses the expected forget gate, (1 - zoneout) * f
    m.zoneout = 0.25
    m.eval()
    with torch.no_grad():
        m.bias_ih_l0[4:8] = 0.0
        m.weight_ih_l0[4:8] = 0.0  # f = sigmoid(0) = 0.5, times 0.75
    out, h_n = m(x, h0)
    ref_f = 0.375
    g = F.linear(x, m.weight_ih_l0, m.bias_ih_l0)
    c = h0[0]
    for t in range(8):
        c = ref_f * torch.tanh(g[t, :, :4]) + (1 - ref_f) * c
    assert rel_err(h_n[0], c) < RTOL[torch.float64]


def test_h0_and_input_errors_are_clear():
    m = QRNN(3, 4, num_layers=2, bidirectional=True)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match=r"hx must be \(num_layers \* num_directions, batch, hidden_size\) "
                                         r"= \(4, 2, 4\), got \(2, 2, 4\)"):
        m(x, torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"= \(4, 2, 4\), got \(4, 3, 4\)"):
        m(x, torch.zeros(4, 3, 4))
    with pytest.raises(ValueError, match=r"hx must be .* = \(4, 4\), got \(4, 1, 4\)"):
        m(x[:, 0], torch.zeros(4, 1, 4))
    with pytest.raises(ValueError, match=r"hx is a tuple, as nn.LSTM's \(h_0, c_0\).*lstm_state=True.*c_0 alone"):
        m(x, (torch.zeros(4, 2, 4), torch.zeros(4, 2, 4)))
    with pytest.raises(ValueError, match="input_size=3 features, got 5"):
        m(torch.randn(5, 2, 5))
    with pytest.raises(ValueError, match=r"got \(5,\)"):
        m(torch.randn(5))
    with pytest.raises(ValueError, match="bidirectional"):
        QRNN(3, 4, bidirectional=True, save_prev_x=True)
    with pytest.raises(ValueError, match="window must be a positive int"):
        QRNN(3, 4, window=0)


def test_lstm_state_and_dtype_errors_name_the_fix():
    x, c = torch.randn(5, 2, 3), torch.zeros(1, 2, 4)
    m = QRNN(3, 4, lstm_state=True)
    with pytest.raises(ValueError, match=r"with lstm_state=True, hx is the pair \(h_0, c_0\).*got Tensor"):
        m(x, c)
    with pytest.raises(ValueError, match=r"got a list of 3"):
        m(x, [c, c, c])
    with pytest.raises(ValueError, match=r"c_0 must be .* = \(1, 2, 4\), got \(1, 3, 4\)"):
        m(x, (c, torch.zeros(1, 3, 4)))
    with pytest.raises(ValueError, match=r"h_0 must be .* got NoneType"):
        m(x, (None, c))
    with pytest.raises(ValueError, match=r"h_0 is torch.float64 but the input torch.float32; "
                                         r"convert it: h_0.to\(torch.float32\)"):
        m(x, (c.double(), c))
    with pytest.raises(ValueError, match=r"c_0 is on meta but the input on cpu; move it: c_0.to\('cpu'\)"):
        m(x, (c, c.to("meta")))
    with pytest.raises(ValueError, match=r"hx is torch.float64 but the input torch.float32; convert it: hx.to"):
        QRNN(3, 4)(x, c.double())  # nn.GRU fails inside its matrix multiply
    with pytest.raises(ValueError, match=r"the input is torch.float32 but the parameters torch.float64; "
                                         r"convert the input, input.to\(torch.float64\), or the module, "
                                         r"qrnn.to\(torch.float32\)"):
        QRNN(3, 4).double()(x)
    with pytest.raises(TypeError, match=r"the input is torch.int64; it must be floating point, "
                                        r"e.g. input.to\(torch.float32\)"):
        QRNN(3, 4)(x.long())
    with pytest.raises(ValueError, match=r"the input is on meta but the parameters on cpu"):
        QRNN(3, 4)(x.to("meta"))
    with pytest.raises(ValueError, match=r"proj_size=2, but a QRNN has no projection.*nn.Linear\(hidden_size, 2\)"):
        QRNN(3, 4, proj_size=2)


def test_factory_kwargs_make_the_parameters_there():
    m = QRNN(3, 4, 2, bidirectional=True, proj_size=0, dtype=torch.float64)
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    assert m(torch.randn(5, 2, 3, dtype=torch.float64))[0].dtype == torch.float64
    assert {p.device.type for p in QRNN(3, 4, 2, device="meta").parameters()} == {"meta"}


@pytest.mark.parametrize("case", ["time_major", "batch_first", "unbatched", "packed"])
def test_lstm_state_is_last_output_and_memory(case):
    """With lstm_state, c_n is the memory the plain QRNN returns and h_n each layer's and direction's
    output at its last step (a packed sequence's own last; the reverse direction's first), shaped
    as nn.LSTM's; h_0 is not read."""
    torch.manual_seed(9)
    T, I, H, L = 6, 3, 5, 2
    lengths = torch.tensor([T] if case == "unbatched" else [6, 2, 5, 1] if case == "packed" else [T] * 4)
    B = len(lengths)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0, c0 = torch.randn(2, L * 2, B, H, dtype=torch.float64)
    inp, hx = x, (h0, c0)
    if case == "packed":
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False)
    elif case == "batch_first":
        inp = x.transpose(0, 1)
    elif case == "unbatched":
        inp, hx = x[:, 0], (h0[:, 0], c0[:, 0])
    args = dict(window=2, bidirectional=True, batch_first=case == "batch_first")
    plain = QRNN(I, H, L, **args).double()
    lstm = QRNN(I, H, L, lstm_state=True, **args).double()
    lstm.load_state_dict(plain.state_dict())
    first = QRNN(I, H, 1, **args).double()  # layer 0 alone, for its output
    first.load_state_dict({k: v for k, v in plain.state_dict().items() if "_l0" in k})

    out, (h_n, c_n) = lstm(inp, hx)
    want_out, want_c = plain(inp, hx[1])
    ref_out, (ref_h, ref_c) = nn.LSTM(I, H, L, bidirectional=True, batch_first=args["batch_first"]).double()(inp, hx)
    assert type(out) is type(ref_out) and h_n.shape == ref_h.shape and c_n.shape == ref_c.shape
    assert torch.equal(c_n, want_c)
    out_again, (h_again, c_again) = lstm(inp, (torch.randn_like(hx[0]), hx[1]))  # h_0 is not read
    assert torch.equal(h_again, h_n) and torch.equal(c_again, c_n)

    outs = [out, want_out, first(inp, hx[1][:2])[0], out_again]
    if case == "packed":
        outs = [pad_packed_sequence(o)[0] for o in outs]
    elif case == "batch_first":
        outs = [o.transpose(0, 1) for o in outs]
    elif case == "unbatched":
        outs, h_n = [o[:, None] for o in outs], h_n[:, None]
    out, want_out, out_0, out_again = outs  # (T, B, 2 * H)
    assert torch.equal(out, want_out) and torch.equal(out_again, out)
    last, b = lengths - 1, torch.arange(B)
    for layer, o in enumerate((out_0, out)):
        assert torch.equal(h_n[2 * layer], o[last, b, :H])  # forward: each sequence's last step
        assert torch.equal(h_n[2 * layer + 1], o[0, :, H:])  # reverse: its first


def test_lstm_state_pieces_equal_one_call():
    """A stream fed in two pieces, passing (h_n, c_n) back as hx, gives one call's output and state."""
    torch.manual_seed(10)
    T, B, I, H, L = 9, 2, 3, 4, 2
    m = QRNN(I, H, L, window=2, save_prev_x=True, lstm_state=True).double()
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = tuple(torch.randn(2, L, B, H, dtype=torch.float64))
    full, (h_full, c_full) = m(x, hx)
    m.reset()
    out_a, state = m(x[:4], hx=hx)
    out_b, (h_n, c_n) = m(x[4:], hx=state)
    assert rel_err(torch.cat([out_a, out_b]), full) < RTOL[torch.float64]
    assert rel_err(h_n, h_full) < RTOL[torch.float64] and rel_err(c_n, c_full) < RTOL[torch.float64]
    plain = QRNN(I, H, L, window=2).double()
    assert torch.equal(plain(x, hx=c_full)[0], plain(x, c_full)[0])


def test_forget_mult_matches_loop():
    torch.manual_seed(5)
    T, B, C = 6, 2, 3
    f = torch.rand(T, B, C, dtype=torch.float64)
    x = torch.randn(T, B, C, dtype=torch.float64)
    h0 = torch.randn(B, C, dtype=torch.float64)
    for reverse in (False, True):
        h, want = h0, [None] * T
        for t in reversed(range(T)) if reverse else range(T):
            h = f[t] * x[t] + (1 - f[t]) * h
            want[t] = h
        want = torch.stack(want)
        assert rel_err(forget_mult(f, x, h0, reverse=reverse), want) < RTOL[torch.float64]
        got_bf = ForgetMult(batch_first=True, reverse=reverse)(f.transpose(0, 1), x.transpose(0, 1), h0)
        assert rel_err(got_bf.transpose(0, 1), want) < RTOL[torch.float64]
    assert forget_mult(f.half(), x.float()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"h0 must be \(B, C\) = \(2, 3\)"):
        forget_mult(f, x, h0.t())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_and_autocast_cpu(dtype):
    torch.manual_seed(6)
    m = QRNN(8, 16, num_layers=2, window=2, bidirectional=True)
    x = torch.randn(9, 3, 8)
    want, want_h = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, h_n = m(x, torch.zeros(4, 3, 16))
        assert m(x, h_n)[1].dtype == torch.bfloat16  # h_n goes back in, whatever its dtype, as with nn.LSTM
    assert out.dtype == torch.bfloat16
    assert rel_err(out, want) < RTOL[torch.bfloat16] and rel_err(h_n, want_h) < RTOL[torch.bfloat16]
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in m.parameters())
    out, h_n = m.to(dtype)(x.to(dtype))
    assert out.dtype == dtype and h_n.dtype == dtype
    assert rel_err(out, want) < RTOL[dtype] * 3 and rel_err(h_n, want_h) < RTOL[dtype] * 3


class Tagger(nn.Module):
    """A sequence tagger written against nn.LSTM / nn.GRU: tokens (B, T) -> tag logits (B, T, n_tags)."""

    def __init__(self, rnn_cls, batch_first, n_vocab=12, n_tags=3, hidden=16):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(n_vocab, 16)
        self.rnn = rnn_cls(16, hidden, num_layers=2, batch_first=batch_first, dropout=0.1, bidirectional=True)
        self.head = nn.Linear(2 * hidden, n_tags)

    def forward(self, tokens, h_0=None):
        self.rnn.flatten_parameters()
        x = self.emb(tokens if self.batch_first else tokens.t())
        out, _ = self.rnn(x) if h_0 is None else self.rnn(x, h_0)
        return self.head(out if self.batch_first else out.transpose(0, 1))


@pytest.mark.parametrize("rnn_cls,pass_h0", [(nn.LSTM, False), (nn.GRU, True), (QRNN, False), (QRNN, True)])
@pytest.mark.parametrize("batch_first", [False, True])
def test_drop_in_tagger_trains(rnn_cls, pass_h0, batch_first):
    torch.manual_seed(7)
    model = Tagger(rnn_cls, batch_first)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    B, T = 16, 8
    losses = []
    for _ in range(30):
        tokens = torch.randint(0, 12, (B, T))
        tags = torch.roll(tokens, 1, 1) % 3  # the previous token's class: needs memory
        tags[:, 0] = 0
        h_0 = torch.zeros(2 * 2, B, model.rnn.hidden_size) if pass_h0 else None
        loss = F.cross_entropy(model(tokens, h_0).flatten(0, 1), tags.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)


class ChunkedModel(nn.Module):
    """A model written against nn.LSTM that reads a stream in chunks, carrying (h, c) between them:
    tokens (B, T) -> logits (B, T, n_vocab) and the state to pass with the next chunk."""

    def __init__(self, rnn_cls, n_vocab=8, hidden=16):
        super().__init__()
        self.emb = nn.Embedding(n_vocab, hidden)
        self.rnn = rnn_cls(hidden, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, n_vocab)

    def forward(self, tokens, state=None):
        x = self.emb(tokens)
        out, (h, c) = self.rnn(x) if state is None else self.rnn(x, state)
        return self.head(out), (h.detach(), c.detach())


@pytest.mark.parametrize("rnn_cls", [nn.LSTM, functools.partial(QRNN, lstm_state=True)])
def test_drop_in_for_lstm_state_carries_memory_across_chunks(rnn_cls):
    """The task is to name the previous token, so a chunk's first token is to name the last of the
    chunk before: learnable only through the carried (h, c) (a QRNN's gates see the current token alone;
    without the state this position stays at chance, ln 8 = 2.08)."""
    torch.manual_seed(12)
    model = ChunkedModel(rnn_cls)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    B, T = 16, 4
    prev, state, first_losses = torch.zeros(B, 1, dtype=torch.long), None, []
    for _ in range(80):
        tokens = torch.randint(0, 8, (B, T))
        logits, state = model(tokens, state)
        assert state[0].shape == state[1].shape == (2, B, 16)
        targets = torch.cat([prev, tokens[:, :-1]], 1)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        first_losses.append(F.cross_entropy(logits[:, 0], targets[:, 0]).item())
        prev = tokens[:, -1:]
    assert sum(first_losses[-10:]) / 10 < 0.5 * math.log(8), first_losses


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@cuda
def test_cpu_cuda_parity():
    torch.manual_seed(8)
    T, B, I, H, L = 33, 5, 16, 32, 2
    m = QRNN(I, H, num_layers=L, window=3, bidirectional=True)
    x = torch.randn(T, B, I)
    h0 = torch.randn(2 * L, B, H)
    w_out = torch.randn(T, B, 2 * H)
    out, h_n = m(x, h0)
    loss_of(out, h_n, w_out, 1.0).backward()
    grads = [p.grad.clone() for p in m.parameters()]

    mc = m.cuda()
    mc.zero_grad()
    out_c, h_c = mc(x.cuda(), h0.cuda())
    loss_of(out_c, h_c, w_out.cuda(), 1.0).backward()
    assert rel_err(out_c.cpu(), out) < RTOL[torch.float32] and rel_err(h_c.cpu(), h_n) < RTOL[torch.float32]
    for p, g in zip(mc.parameters(), grads):
        assert rel_err(p.grad.cpu(), g) < 1e-4

    lengths = torch.tensor([33, 20, 33, 1, 7])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    out_p, h_p = m.cpu()(packed, h0)
    out_pc, h_pc = m.cuda()(packed.to("cuda"), h0.cuda())
    assert rel_err(out_pc.data.cpu(), out_p.data) < RTOL[torch.float32]
    assert rel_err(h_pc.cpu(), h_p) < RTOL[torch.float32]

    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            out_a, h_a = m(x.cuda(), h0.cuda())
        assert out_a.dtype == dtype and rel_err(out_a.cpu(), out) < 3 * RTOL[dtype]
        out_a.float().sum().backward()
        md = QRNN(I, H, num_layers=L, window=3, bidirectional=True).cuda().to(dtype)
        md.load_state_dict(m.state_dict())
        out_d, h_d = md(x.cuda().to(dtype), h0.cuda().to(dtype))  # nn.LSTM too wants hx in the input's dtype
        assert out_d.dtype == dtype and rel_err(out_d.cpu(), out) < 3 * RTOL[dtype]
        assert rel_err(h_d.cpu(), h_n) < 3 * RTOL[dtype]


def test_qrnn_segments_split_few_long_walks_only():
    from sqrllm import cuda_layers as sq_cuda

    assert sq_cuda.qrnn_segments(8, 512, 320) == sq_cuda.QRNN_MAX_SEG  # 2,560 pairs: each walk in 16
    assert sq_cuda.qrnn_segments(8, 32, 320) == 1  # too short to split
    assert sq_cuda.qrnn_segments(256, 512, 320) == 1  # 81,920 pairs fill the GPU alone
    for B, T, H in [(1, 1, 1), (3, 100, 7), (64, 128, 320), (16, 4096, 64)]:
        n = sq_cuda.qrnn_segments(B, T, H)
        assert n in (1, 2, 4, 8, 16) and (n == 1 or T // n >= sq_cuda.QRNN_SEG_STEPS)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that take the fused CUDA layer (kernels/qrnn.cu)."""
    from sqrllm import qrnn

    calls = []
    apply = qrnn._FusedPool.apply
    monkeypatch.setattr(qrnn._FusedPool, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("output_gate", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("segments", [1, 8, 16])
def test_fused_cuda_layer_matches_paper_equations(window, output_gate, bidirectional, batch_first, segments,
                                                  fused_calls, monkeypatch):
    from sqrllm import cuda_layers as sq_cuda

    torch.manual_seed(window * 8 + output_gate * 4 + bidirectional * 2 + batch_first)
    # T: four of the kernel's 8-step rounds and a partial one; B * H = 80 (b, j) pairs: three warps
    T, B, I, H, L = 37, 5, 5, 16, 2
    # segments 8: each pair's 37 steps walked by 8 threads, 5 steps each and 2 in the last;
    # 16: 3 steps each, 1 in the 13th thread, none in the last three
    monkeypatch.setattr(sq_cuda, "QRNN_MIN_THREADS", 10**9 if segments > 1 else 0)
    monkeypatch.setattr(sq_cuda, "QRNN_SEG_STEPS", 4 if segments <= 8 else 1)
    assert sq_cuda.qrnn_segments(B, T, H) == segments
    m = QRNN(I, H, num_layers=L, window=window, output_gate=output_gate, bidirectional=bidirectional,
             batch_first=batch_first)
    D = m.num_directions
    ref = QRNN(I, H, num_layers=L, window=window, output_gate=output_gate, bidirectional=bidirectional).double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(L * D, B, H, dtype=torch.float64, requires_grad=True)
    w_out, w_h = torch.randn(T, B, D * H, dtype=torch.float64), torch.randn(L * D, B, H, dtype=torch.float64)
    ref_out, ref_h = paper_qrnn(ref, x, h0)
    ref_grads = torch.autograd.grad(loss_of(ref_out, ref_h, w_out, w_h), [x, h0, *ref.parameters()])

    mc = m.cuda()
    xc = x.detach().float().cuda().requires_grad_()
    h0c = h0.detach().float().cuda().requires_grad_()
    out, h_n = mc(xc.transpose(0, 1) if batch_first else xc, h0c)
    out = out.transpose(0, 1) if batch_first else out
    assert len(fused_calls) == L * D
    assert rel_err(out.cpu(), ref_out) < RTOL[torch.float32] and rel_err(h_n.cpu(), ref_h) < RTOL[torch.float32]
    grads = torch.autograd.grad(loss_of(out, h_n, w_out.float().cuda(), w_h.float().cuda()),
                                [xc, h0c, *mc.parameters()])
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g.cpu(), rg) < 1e-4
    with torch.no_grad():
        out_ng, h_ng = mc(xc.transpose(0, 1) if batch_first else xc, h0c)
    torch.testing.assert_close(out_ng.transpose(0, 1) if batch_first else out_ng, out, rtol=0, atol=0)
    torch.testing.assert_close(h_ng, h_n, rtol=0, atol=0)


@pytest.mark.gpu
@cuda
def test_fused_cuda_layer_equals_the_general_path(fused_calls):
    """Zoneout in eval, no h0, one step, low precision: fused and unfused agree; the shapes the fused
    kernel does not take (packed, zoneout in training, few very long sequences) go the general way."""
    torch.manual_seed(5)
    m = QRNN(6, 16, num_layers=2, zoneout=0.3).cuda().eval()
    general = QRNN(6, 16, num_layers=2, zoneout=0.3).cuda().eval()
    general.load_state_dict(m.state_dict())
    general.FUSE = False
    for T in (1, 50):
        x = torch.randn(T, 4, 6, device="cuda")
        for (a, b) in zip(m(x), general(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(40, 4, 6, device="cuda")
        with torch.autocast("cuda", dtype=dtype):
            out, h_n = m(x)
            out_g, h_g = general(x)
        assert out.dtype == dtype and rel_err(out, out_g) < 3 * RTOL[dtype] and rel_err(h_n, h_g) < 3 * RTOL[dtype]
    n = len(fused_calls)
    m.train()(torch.randn(9, 4, 6, device="cuda"))  # zoneout's mask
    m.eval()(pack_padded_sequence(torch.randn(9, 2, 6), torch.tensor([9, 4])).to("cuda"))
    m(torch.randn(8192, 1, 6, device="cuda"))  # one sequence of 8192 steps: time split across blocks
    assert len(fused_calls) == n


@pytest.mark.gpu
@cuda
def test_fused_cuda_layer_gradients_of_gradients(fused_calls):
    """A gradient penalty (create_graph=True) through fused layers equals the general path's."""
    torch.manual_seed(4)
    m = QRNN(6, 16, num_layers=2, window=2, bidirectional=True).cuda()
    general = QRNN(6, 16, num_layers=2, window=2, bidirectional=True).cuda()
    general.load_state_dict(m.state_dict())
    general.FUSE = False
    x = torch.randn(30, 4, 6, device="cuda", requires_grad=True)
    h0 = torch.randn(4, 4, 16, device="cuda", requires_grad=True)
    w_out, w_h = torch.randn(30, 4, 32, device="cuda"), torch.randn(4, 4, 16, device="cuda")
    results = []
    for layer in (m, general):
        gx, gh = torch.autograd.grad(loss_of(*layer(x, h0), w_out, w_h), (x, h0), create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum() + gh.square().sum(), [x, h0, *layer.parameters()]))
    assert len(fused_calls) == 4
    for got, want in zip(*results):
        assert want.abs().max() > 0 and rel_err(got, want) < 1e-4


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("bias", [True, False])
def test_fused_kernel_adds_the_bias_as_cublas_would(bias, fused_calls):
    """The fused layer adds the bias in its kernel and sums the bias gradient there: outputs, states
    and every gradient agree with the bias added by the matrix multiply (FOLD_BIAS off), also under
    bf16 autocast and with walks split in 16 segments."""
    torch.manual_seed(11)
    m = QRNN(8, 16, num_layers=2, bias=bias, bidirectional=True).cuda()
    unfolded = QRNN(8, 16, num_layers=2, bias=bias, bidirectional=True).cuda()
    unfolded.load_state_dict(m.state_dict())
    unfolded.FOLD_BIAS = False
    for T, B in [(40, 3), (700, 2)]:  # (700, 2): few long walks, each split in 16 segments
        x = torch.randn(T, B, 8, device="cuda", requires_grad=True)
        h0 = torch.randn(4, B, 16, device="cuda")
        w_out = torch.randn(T, B, 32, device="cuda")
        results = []
        for layer in (m, unfolded):
            layer.zero_grad()
            out, h_n = layer(x, h0)
            grads = torch.autograd.grad((out * w_out).sum() + h_n.sum(), [x, *layer.parameters()])
            results.append((out, h_n, *grads))
        for name, a, b in zip(["output", "h_n", "x", *dict(m.named_parameters())], *results):
            assert rel_err(a, b) < RTOL[torch.float32], name
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_a, h_a = m(x, h0)
            out_b, h_b = unfolded(x, h0)
        assert rel_err(out_a, out_b) < 3 * RTOL[torch.bfloat16] and rel_err(h_a, h_b) < 3 * RTOL[torch.bfloat16]
    from sqrllm import cuda_layers as sq_cuda

    assert sq_cuda.qrnn_segments(2, 700, 16) == 16
    assert len(fused_calls) == 2 * 4 * 4  # two shapes x four calls x (two layers x two directions)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("batch_first", [False, True])
def test_fused_cuda_layer_lstm_state(batch_first, fused_calls):
    """With lstm_state, the fused CUDA layer's (h_n, c_n), and the gradients through h_n alone (the
    output unused), agree with the CPU's."""
    torch.manual_seed(16)
    m = QRNN(6, 16, num_layers=2, window=2, bidirectional=True, batch_first=batch_first, lstm_state=True)
    x = torch.randn(3, 9, 6) if batch_first else torch.randn(9, 3, 6)
    hx = tuple(torch.randn(2, 4, 3, 16))
    results = []
    for device in ("cpu", "cuda"):
        m.to(device)
        xd = x.clone().to(device).requires_grad_()
        out, (h_n, c_n) = m(xd, tuple(t.to(device) for t in hx))
        grads = torch.autograd.grad(h_n.sum(), [xd, *m.parameters()])
        results.append([t.cpu() for t in (out, h_n, c_n, *grads)])
    assert len(fused_calls) == 4  # two layers x two directions, in the CUDA call
    for a, b in zip(*results):
        assert rel_err(b, a) < 1e-4


def _results(layer, x, gy):
    """A layer's output, h_n and the gradients of x and its parameters, detached."""
    params = list(layer.parameters())
    out, h_n = layer(x)
    return tuple(t.detach() for t in (out, h_n, *torch.autograd.grad(out, [x, *params], gy)))


@pytest.mark.gpu
@cuda
def test_graphed_layer_matches_eager(fused_calls):
    """The fused layer (CuPy launches on the current stream) can be captured as CUDA graphs with
    torch.cuda.make_graphed_callables, which is how a training loop drops PyTorch's per-call host
    work; replays give the eager results bitwise."""
    torch.manual_seed(13)
    m = QRNN(32, 32).cuda()
    x = torch.randn(24, 8, 32, device="cuda", requires_grad=True)
    gy = torch.randn(24, 8, 32, device="cuda")
    want = _results(m, x, gy)  # detached: no eager autograd graph lives into the capture
    assert fused_calls  # the fused layer (CuPy present), not the general path
    graphed = torch.cuda.make_graphed_callables(m, (x,))
    for _ in range(2):  # replays, not the capture, are what is checked
        for a, b in zip(_results(graphed, x, gy), want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_side_projection_is_a_linear_map_and_its_gradients():
    """_SideProjection (QRNN.SIDE_WGRAD's matrix multiply) is F.linear(x, w) without a bias, its
    gradients those of that map, to second order (its one-stream backward, which the CPU and
    create_graph take)."""
    from sqrllm.qrnn import _SideProjection

    torch.manual_seed(17)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_SideProjection.apply(x, w), F.linear(x, w), rtol=0, atol=0)
    assert torch.autograd.gradcheck(_SideProjection.apply, (x, w))
    assert torch.autograd.gradgradcheck(_SideProjection.apply, (x, w))
    dw, = torch.autograd.grad(_SideProjection.apply(x.detach(), w).sum(), [w])  # x takes no gradient
    torch.testing.assert_close(dw, x.detach().reshape(-1, 4).sum(0).expand(6, 4))


@pytest.mark.gpu
@cuda
def test_weight_gradient_on_a_side_stream_matches_one_stream(monkeypatch, fused_calls):
    """With SIDE_WGRAD the backward computes each weight's gradient on a side stream: outputs and
    every gradient match the one-stream layer's, eagerly (gradients accumulating over two calls, as
    in a training step) and replayed from CUDA graphs."""
    from sqrllm import qrnn

    torch.manual_seed(18)
    m = QRNN(32, 48, num_layers=2, window=2, bidirectional=True).cuda()
    x = torch.randn(40, 6, 32, device="cuda", requires_grad=True)
    gy = torch.randn(40, 6, 96, device="cuda")
    want = _results(m, x, gy)
    sides = []
    apply = qrnn._SideProjection.apply
    monkeypatch.setattr(qrnn._SideProjection, "apply", lambda *a: sides.append(1) or apply(*a))
    monkeypatch.setattr(QRNN, "SIDE_WGRAD", True)
    got = _results(m, x, gy)
    assert len(sides) == 4  # two layers x two directions took the side stream
    for a, b in zip(got, want):
        assert rel_err(a, b) < RTOL[torch.float32]
    m.zero_grad()
    for _ in range(2):
        m(x)[0].backward(gy)
    for i, (name, p) in enumerate(m.named_parameters()):  # want: output, h_n, x's gradient, then these
        assert rel_err(p.grad, 2 * want[3 + i]) < RTOL[torch.float32], name
    graphed = torch.cuda.make_graphed_callables(m, (x,))
    for _ in range(2):
        for a, b in zip(_results(graphed, x, gy), want):
            assert rel_err(a, b) < RTOL[torch.float32]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])])
def test_compiled_layer_matches_eager(device, fused_calls):
    """torch.compile traces a layer (the general path, its scan a custom op) without errors, and
    outputs, state and gradients agree with the eager layer (on CUDA: the fused kernel)."""
    torch.manual_seed(14)
    m = QRNN(16, 16, num_layers=2, bidirectional=True).to(device)
    x = torch.randn(20, 3, 16, device=device, requires_grad=True)
    gy = torch.randn(20, 3, 32, device=device)
    want = _results(m, x, gy)
    assert bool(fused_calls) == (device == "cuda")  # on CUDA the eager side is the fused layer
    for a, b in zip(_results(torch.compile(m), x, gy), want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("split", [False, True])
def test_fused_walk_at_and_around_whole_rounds(split, monkeypatch, fused_calls):
    """The kernel loads 8 steps a round and only a last, partial round checks bounds; walks (and
    segments of walks) at and around whole rounds give the general path's outputs and gradients."""
    from sqrllm import cuda_layers as sq_cuda

    monkeypatch.setattr(sq_cuda, "QRNN_MIN_THREADS", 10**9 if split else 0)
    monkeypatch.setattr(sq_cuda, "QRNN_SEG_STEPS", 8)
    # (T, segments): unsplit, lengths around 8 and 16; split, segments of 8, 9, 10 and 8 steps
    cases = [(64, 8), (72, 8), (40, 4), (128, 16)] if split else [(T, 1) for T in (7, 8, 9, 16, 17, 40)]
    torch.manual_seed(15)
    m = QRNN(6, 16, bidirectional=True).cuda()
    general = QRNN(6, 16, bidirectional=True).cuda()
    general.load_state_dict(m.state_dict())
    general.FUSE = False
    for T, segments in cases:
        assert sq_cuda.qrnn_segments(3, T, 16) == segments
        x = torch.randn(T, 3, 6, device="cuda", requires_grad=True)
        h0 = torch.randn(2, 3, 16, device="cuda", requires_grad=True)
        gy, gh = torch.randn(T, 3, 32, device="cuda"), torch.randn(2, 3, 16, device="cuda")
        results = []
        for layer in (m, general):
            out, h_n = layer(x, h0)
            grads = torch.autograd.grad((out * gy).sum() + (h_n * gh).sum(), [x, h0, *layer.parameters()])
            results.append((out, h_n, *grads))
        assert fused_calls  # m ran the fused kernel (CuPy present), general the general path
        for a, b in zip(*results):
            assert rel_err(a, b) < RTOL[torch.float32], T
