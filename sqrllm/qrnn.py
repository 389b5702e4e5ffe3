"""QRNN (Bradbury et al., ICLR 2017) on the sqrll scan: a drop-in for nn.LSTM / nn.GRU.

- A layer computes its gates from the inputs alone, as a causal convolution of width `window`
  (one matrix multiply over the last `window` inputs): Z = tanh(W_z * X), F = sigmoid(W_f * X),
  O = sigmoid(W_o * X). fo-pooling c[t] = f[t] * z[t] + (1 - f[t]) * c[t-1] is one `scan` with
  x = f * z and r = 1 - f; the output is h[t] = o[t] * c[t] (c[t] without the output gate).
- On CUDA a layer is its matrix multiply and one launch of kernels/qrnn.cu, which adds the bias and
  applies the gate activations around the same recurrence (forward and backward), since at the
  sizes a QRNN serves the count of launches, not the bytes, sets the speed; packed sequences,
  zoneout in training, few very long sequences and torch.compile take the general path (the
  activations as tensor ops, then `scan`).
- Beyond the original release: bidirectional layers (the scan's reverse direction, the mirror
  image of the forward one, including its window), packed variable-length sequences, any window,
  and no run-time compiler of its own.
- The interface is nn.GRU's (the constructor takes nn.LSTM's arguments, proj_size=0 only, then the
  QRNN's own): output (T, B, D * H) (batch_first: (B, T, D * H)), hx and h_n (num_layers * D, B, H),
  the state being c, the pooled memory. With lstm_state=True the state is nn.LSTM's pair: hx =
  (h_0, c_0) and (h_n, c_n), h_n the last output h; h_0 is checked but not read, since the gates
  come from the inputs alone.
"""

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from sqrllm import cuda, cuda_layers
from sqrllm.scan import scan, twin_grads


def forget_mult(f, x, h0=None, batch_first=False, reverse=False):
    """h[t] = f[t] * x[t] + (1 - f[t]) * h[t-1] over (T, B, C) tensors, (B, T, C) with batch_first.

    h[-1] = h0, a (B, C) tensor, or zeros. reverse=True runs time backwards:
    h[t] = f[t] * x[t] + (1 - f[t]) * h[t+1]. f and x are cast to their common dtype; the result
    has that dtype. One `scan` call on f * x and 1 - f, so it runs on every device `scan` does.
    """
    if f.dim() != 3 or f.shape != x.shape:
        raise ValueError(
            f"forget_mult: f and x must both be (T, B, C) (or (B, T, C) with batch_first), "
            f"got {tuple(f.shape)} and {tuple(x.shape)}"
        )
    if h0 is not None:
        B, C = f.shape[0 if batch_first else 1], f.shape[2]
        if h0.shape != (B, C):
            raise ValueError(f"forget_mult: h0 must be (B, C) = {(B, C)}, got {tuple(h0.shape)}")
    dtype = torch.promote_types(f.dtype, x.dtype)
    return _fo_pool(f.to(dtype), x.to(dtype), h0, batch_first, reverse)


_ONE = torch.tensor(1.0)  # 1 - f with a Python 1 costs a scalar wrap per call; a 0-dim tensor does not


def _fo_pool(f, x, h0, batch_first, reverse):
    """forget_mult without the checks; f and x share a dtype."""
    # traced, a CPU tensor beside CUDA ones is avoided
    xs, r = f * x, (1.0 - f if torch.compiler.is_compiling() else _ONE - f)
    if batch_first:
        return scan(xs, r, h0, reverse)
    T, B, C = xs.shape
    # Time-major (T, B, C) is one (1, T, B*C) scan: every (batch, channel) pair is independent,
    # so no transpose is needed.
    h0 = None if h0 is None else h0.reshape(1, B * C)
    return scan(xs.reshape(1, T, B * C), r.reshape(1, T, B * C), h0, reverse).view(T, B, C)


class _FusedPool(torch.autograd.Function):
    """A layer's bias, gates and fo-pooling from its pre-activations g, one CUDA launch each way
    (kernels/qrnn.cu): g (T, B, gates * H) (td = 0) or (B, T, gates * H) (td = 1), contiguous,
    bias (gates * H,) float32 or None, c0 (B, H) or None -> (h, the last c (B, H))."""

    @staticmethod
    def forward(ctx, g, bias, c0, H, gates, reverse, s, td):
        keep = any(ctx.needs_input_grad[:3])
        h, c_all, c_last = cuda_layers.qrnn_fwd(g, bias, c0, H, gates, reverse, s, td, keep)
        if keep:
            ctx.save_for_backward(g, bias, c_all, c0)
            ctx.args = (H, gates, reverse, s, td)
        ctx.set_materialize_grads(False)  # an unused h_n (the usual case) costs no zero-filled gradient
        return h, c_last

    @staticmethod
    def backward(ctx, dh, dc_last):
        g, bias, c_all, c0 = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients autograd can differentiate again
            grads = twin_grads(_pool_ref(g, bias, c0, *ctx.args), (dh, dc_last), (g, bias, c0),
                               ctx.needs_input_grad[:3])
            return *grads, None, None, None, None, None
        if dh is None:
            dh = torch.zeros(c_all.shape, dtype=g.dtype, device=g.device)
        dc_last = None if dc_last is None else dc_last.contiguous()
        dg, dc0, dbias = cuda_layers.qrnn_bwd(g, bias, c_all, c0, dh.contiguous(), dc_last, *ctx.args,
                                       want_dbias=ctx.needs_input_grad[1])
        return dg, dbias, dc0, None, None, None, None, None


class _SideProjection(torch.autograd.Function):
    """F.linear(x, w) without a bias, x (.., I) and w (G, I) -> (.., G), whose backward computes the
    weight's gradient on a side stream beside the input's on the current one: the two matrix
    multiplies are independent, and each alone can leave multiprocessors idle (few output tiles).
    Off by default (QRNN.SIDE_WGRAD): on one H100 it helped at two cells of the benchmark's grid and
    cost at one (docs/benchmarks.md); on the CPU it is plain F.linear's math."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, dg):
        x, w = ctx.saved_tensors
        want_x, want_w = ctx.needs_input_grad
        dg_rows, x_rows = dg.reshape(-1, dg.shape[-1]), x.reshape(-1, x.shape[-1])  # (N, G), (N, I)
        if not (dg.is_cuda and want_w) or torch.is_grad_enabled():  # one stream; create_graph differentiable
            return dg @ w if want_x else None, dg_rows.t() @ x_rows if want_w else None
        main, side = torch.cuda.current_stream(), _side_stream(dg.device)
        dw = torch.empty_like(w)  # allocated for the current stream, which waits for the side one below
        side.wait_stream(main)  # dg is ready
        with torch.cuda.stream(side):
            torch.mm(dg_rows.t(), x_rows, out=dw)  # (G, I)
        dx = dg @ w if want_x else None
        main.wait_stream(side)  # before anything on this stream reads dw or reuses dg's and x's memory
        return dx, dw


@functools.cache
def _side_stream(device):
    return torch.cuda.Stream(device)


def _pool_ref(g, bias, c0, H, gates, reverse, s, td):
    """_FusedPool's forward as torch ops (kernels/qrnn.cu's twin): gates [z | f | o] of g (.., gates * H)
    plus bias, f scaled by s -> (h (.., H), the last c (B, H))."""
    if bias is not None:
        g = (g.float() + bias).to(g.dtype)
    z, f = g[..., :H].tanh(), g[..., H:2 * H].sigmoid() * s
    c = _fo_pool(f, z, c0, td == 1, reverse)
    h = c * g[..., 2 * H:].sigmoid() if gates == 3 else c
    return h, c.select(td, 0 if reverse else c.shape[td] - 1)


@functools.cache
def _fused_available():
    try:
        cuda.ensure_available()
        return True
    except ImportError:
        return False


class ForgetMult(nn.Module):
    """Module form of `forget_mult`, called as the original QRNN's: forward(f, x, hidden_init=None)."""

    def __init__(self, batch_first=False, reverse=False):
        super().__init__()
        self.batch_first = batch_first
        self.reverse = reverse

    def forward(self, f, x, hidden_init=None):
        return forget_mult(f, x, hidden_init, self.batch_first, self.reverse)

    def extra_repr(self):
        return f"batch_first={self.batch_first}, reverse={self.reverse}"


class QRNN(nn.Module):
    """Quasi-recurrent layers with the arguments and shapes of nn.GRU, or of nn.LSTM with lstm_state=True:
    forward(input, hx=None) -> (output, h_n), or with lstm_state, (output, (h_n, c_n)).

    input: (T, B, input_size), (B, T, input_size) with batch_first, (T, input_size) unbatched, or
    a PackedSequence (the output is then packed the same way, and the state holds each sequence's
    state at its own last step; for the reverse direction, at its first).
    hx, h_n: (num_layers * num_directions, B, hidden_size), indexed layer * num_directions + d
    ((num_layers * num_directions, hidden_size) unbatched): the pooled memory c, which a layer carries
    from step to step. input and hx on the parameters' device and in their dtype (under autocast,
    any dtype).

    lstm_state: take and return the state as nn.LSTM does, so that code written for it runs
      unchanged: hx = (h_0, c_0) or None, and (output, (h_n, c_n)), all four of the shape above.
      c_0 and c_n are the memory c; h_n is each layer's and direction's output h at the last step
      (h = o * c, or c without the output gate). h_0 is checked like c_0 but not read: a QRNN's
      gates come from its inputs alone, never from the previous h, so only c is carried. Without
      it, nn.LSTM's `out, (h, c) = rnn(x)` would split a one-layer bidirectional QRNN's h_n into
      its two directions, with no error.
    window: width k >= 1 of the causal convolution that computes the gates from the inputs
      x[t-k+1..t] (the reverse direction mirrors it: x[t..t+k-1]).
    zoneout: probability of zeroing each forget-gate value in training, so that the state is
      kept unchanged there; in eval the forget gate is scaled by (1 - zoneout), its expectation.
    dropout: on the outputs of every layer but the last, in training, as in nn.LSTM.
    output_gate: h = o * c if True, else h = c (f-pooling) with two gates instead of three.
    save_prev_x: keep each layer's last k-1 inputs between calls, so that a sequence fed in
      pieces (passing the state back as hx) gives the same result as one call; reset() forgets
      them. Forward direction only.
    proj_size: nn.LSTM's, accepted as 0 only: a QRNN has no projection.
    device, dtype: where and in what dtype the parameters are created, as in every torch.nn module.

    Parameters weight_ih_l{k}[_reverse]: (gates * hidden_size, layer_input * window), rows
    [z; f; o], columns a Conv1d weight (gates * hidden_size, layer_input, window) flattened, whose
    last tap meets the newest input; bias_ih_l{k}[_reverse]: (gates * hidden_size,).
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        bias=True,
        batch_first=False,
        dropout=0.0,
        bidirectional=False,
        window=1,
        zoneout=0.0,
        output_gate=True,
        save_prev_x=False,
        *,
        lstm_state=False,
        proj_size=0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("num_layers", num_layers), ("window", window)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"QRNN: {name} must be a positive int, got {v!r}")
        for name, p in (("dropout", dropout), ("zoneout", zoneout)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"QRNN: {name} must be a probability in [0, 1], got {p!r}")
        if proj_size != 0:
            raise ValueError(
                f"QRNN: proj_size={proj_size!r}, but a QRNN has no projection (its h is hidden_size wide); "
                f"use proj_size=0 and hidden_size={proj_size!r}, or follow the QRNN with "
                f"nn.Linear(hidden_size, {proj_size!r})"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "QRNN: dropout acts between layers, so it does nothing with num_layers=1",
                stacklevel=2,
            )
        if save_prev_x and bidirectional:
            raise ValueError(
                "QRNN: save_prev_x is for streaming, which a bidirectional QRNN cannot do: "
                "its reverse direction needs the whole sequence"
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.window = window
        self.zoneout = float(zoneout)
        self.output_gate = output_gate
        self.save_prev_x = save_prev_x
        self.lstm_state = lstm_state
        self.proj_size = 0  # nn.LSTM's attribute, which code written for it may read

        gates = 3 if output_gate else 2
        factory = {"device": device, "dtype": dtype}
        self._param_names = []  # [(weight name, bias name or None)], index layer * D + d
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * self.num_directions
            for suffix in ("", "_reverse")[: self.num_directions]:
                w, b = f"weight_ih_l{layer}{suffix}", f"bias_ih_l{layer}{suffix}"
                weight = torch.empty(gates * hidden_size, layer_in * window, **factory)
                self.register_parameter(w, nn.Parameter(weight))
                self.register_parameter(b, nn.Parameter(torch.empty(gates * hidden_size, **factory)) if bias else None)
                self._param_names.append((w, b if bias else None))
        self._prev_x = [None] * num_layers  # per layer, its last window-1 inputs
        self.reset_parameters()

    def reset_parameters(self):
        """Uniform in +-1/sqrt(fan_in), fan_in = layer_input * window, as nn.Linear and nn.Conv1d."""
        for w, b in self._param_names:
            bound = 1.0 / math.sqrt(getattr(self, w).shape[1])
            nn.init.uniform_(getattr(self, w), -bound, bound)
            if b is not None:
                nn.init.uniform_(getattr(self, b), -bound, bound)

    def reset(self):
        """Forget the inputs kept by save_prev_x: the next call starts a new stream."""
        self._prev_x = [None] * self.num_layers

    def flatten_parameters(self):
        """No-op, so that code written for cuDNN's nn.LSTM / nn.GRU runs unchanged."""

    def extra_repr(self):
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in (("num_layers", 1), ("bias", True), ("batch_first", False),
                              ("dropout", 0.0), ("bidirectional", False), ("window", 1),
                              ("zoneout", 0.0), ("output_gate", True), ("save_prev_x", False),
                              ("lstm_state", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s

    def forward(self, input, hx=None):
        keep, lengths = None, None  # keep: (T, B, 1) bool, False on the padding of packed sequences
        if isinstance(input, PackedSequence):
            if self.save_prev_x:
                raise ValueError("QRNN: save_prev_x (streaming) takes padded tensors, not a PackedSequence")
            x, lengths = pad_packed_sequence(input)  # (T, B, I), the caller's batch order
            T = x.shape[0]
            keep = (torch.arange(T, device=x.device)[:, None] < lengths.to(x.device)[None, :]).unsqueeze(-1)
            batch_first, unbatched = False, False
        elif isinstance(input, torch.Tensor) and input.dim() in (2, 3):
            unbatched = input.dim() == 2
            x = input.unsqueeze(1) if unbatched else input
            batch_first = self.batch_first and not unbatched
        else:
            got = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(
                f"QRNN: input must be (T, B, input_size), (B, T, input_size) with batch_first, "
                f"(T, input_size) or a PackedSequence; got {got}"
            )
        if x.shape[-1] != self.input_size:
            raise ValueError(f"QRNN: input must have input_size={self.input_size} features, got {x.shape[-1]}")
        w = self.weight_ih_l0
        if x.device != w.device:
            raise ValueError(
                f"QRNN: the input is on {x.device} but the parameters on {w.device}; move the input, "
                f"input.to('{w.device}'), or the module, qrnn.to('{x.device}')"
            )
        autocast = torch.is_autocast_enabled(x.device.type)  # it casts inputs and states itself
        if not x.is_floating_point():
            raise TypeError(f"QRNN: the input is {x.dtype}; it must be floating point, e.g. input.to({w.dtype})")
        if x.dtype != w.dtype and not autocast:
            raise ValueError(
                f"QRNN: the input is {x.dtype} but the parameters {w.dtype}; convert the input, "
                f"input.to({w.dtype}), or the module, qrnn.to({x.dtype}) (or run under torch.autocast)"
            )
        td = 1 if batch_first else 0  # the time dim
        B = x.shape[1 - td]
        h_0, c_0 = self._state(hx, x, B, unbatched, autocast)  # (L * D, B, H) each, or None

        finals, lasts = [], []  # (1, B, H) per layer and direction: its last c, and its last h (lstm_state)
        for layer in range(self.num_layers):
            outs = []
            for d in range(self.num_directions):
                i = layer * self.num_directions + d
                h, c_last = self._direction(x, layer, i, d == 1, None if c_0 is None else c_0[i], keep, td)
                outs.append(h)
                finals.append(c_last)
                if self.lstm_state:
                    lasts.append(self._last_h(h, d == 1, td, lengths, None if h_0 is None else h_0[i]))
            x = outs[0] if len(outs) == 1 else torch.cat(outs, -1)
            if layer < self.num_layers - 1:
                if keep is not None:
                    x = x * keep  # zero padding, which the next reverse window reads
                if self.dropout and self.training:
                    x = F.dropout(x, self.dropout, True)
        c_n = finals[0].contiguous() if len(finals) == 1 else torch.cat(finals)  # (L * D, B, H)
        h_n = (lasts[0].contiguous() if len(lasts) == 1 else torch.cat(lasts)) if self.lstm_state else None

        if keep is not None:
            s = input.sorted_indices
            out = x if s is None else x.index_select(1, s)
            lens = lengths if s is None else lengths[s.cpu()]
            data = pack_padded_sequence(out, lens, enforce_sorted=True).data
            out = PackedSequence(data, input.batch_sizes, s, input.unsorted_indices)
        elif unbatched:
            out, c_n, h_n = x.squeeze(1), c_n.squeeze(1), None if h_n is None else h_n.squeeze(1)
        else:
            out = x
        return out, ((h_n, c_n) if self.lstm_state else c_n)

    def _state(self, hx, x, B, unbatched, autocast):
        """hx, checked against x (.., B, I), -> (h_0, c_0), each (L * D, B, H) or None."""
        pair = isinstance(hx, (tuple, list))
        if self.lstm_state and hx is not None and (not pair or len(hx) != 2):
            got = f"a {type(hx).__name__} of {len(hx)}" if pair else type(hx).__name__
            raise ValueError(
                f"QRNN: with lstm_state=True, hx is the pair (h_0, c_0) as for nn.LSTM, got {got}; "
                f"pass (h_0, c_0), or construct the QRNN without lstm_state to pass the memory c_0 alone"
            )
        if not self.lstm_state and pair:
            raise ValueError(
                f"QRNN: hx is a {type(hx).__name__}, as nn.LSTM's (h_0, c_0), but this QRNN takes its memory "
                f"c_0 alone; construct it with QRNN(..., lstm_state=True) to pass and get (h, c) pairs as "
                f"nn.LSTM does, or pass c_0 alone"
            )
        if hx is None:
            return None, None
        LD = self.num_layers * self.num_directions
        expected = (LD, self.hidden_size) if unbatched else (LD, B, self.hidden_size)
        what = "(num_layers * num_directions, hidden_size)" if unbatched else \
            "(num_layers * num_directions, batch, hidden_size)"
        named = zip(("h_0", "c_0"), hx) if self.lstm_state else [("hx", hx)]
        for name, t in named:
            if not isinstance(t, torch.Tensor) or t.shape != expected:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"QRNN: {name} must be {what} = {expected}, got {got}")
            if t.device != x.device:
                raise ValueError(f"QRNN: {name} is on {t.device} but the input on {x.device}; "
                                 f"move it: {name}.to('{x.device}')")
            if t.dtype != x.dtype and not autocast:
                raise ValueError(f"QRNN: {name} is {t.dtype} but the input {x.dtype}; convert it: {name}.to({x.dtype})")
        h_0, c_0 = hx if self.lstm_state else (None, hx)
        if unbatched:
            h_0, c_0 = (None if t is None else t.unsqueeze(1) for t in (h_0, c_0))
        return h_0, c_0

    @staticmethod
    def _last_h(h, reverse, td, lengths, h0):
        """A direction's output h (.., H) at its last step, (1, B, H): each sequence's own last with
        lengths (B,) (packed, time-major), the first step for the reverse direction."""
        T, B = h.shape[td], h.shape[1 - td]
        if T == 0:  # the fused CUDA layer passes the state through zero steps; h does the same
            return h.new_zeros(1, B, h.shape[-1]) if h0 is None else h0[None].to(h.dtype)
        if lengths is not None and not reverse:
            return h[(lengths - 1).to(h.device), torch.arange(B, device=h.device)][None]
        last = h.narrow(td, 0 if reverse else T - 1, 1)
        return last.transpose(0, 1) if td else last

    def _direction(self, x, layer, i, reverse, h0, keep, td):
        """One layer, one direction: x (.., I) -> h (.., H) and the last c (1, B, H)."""
        w, b = self._param_names[i]
        w, b = getattr(self, w), (None if b is None else getattr(self, b))
        k = self.window
        if k > 1:
            x = self._windows(x, layer, reverse, td)
        H = self.hidden_size
        if self._fuse(x, keep, td):
            fold = self.FOLD_BIAS and b is not None
            linear_bias = None if fold else b
            if self.SIDE_WGRAD and linear_bias is None and w.requires_grad and torch.is_grad_enabled() \
                    and not torch.is_autocast_enabled("cuda"):
                g = _SideProjection.apply(x, w)  # (.., gates * H)
            else:
                g = F.linear(x, w, linear_bias)  # (.., gates * H)
            b = b.float().contiguous() if fold else None
            s = 1 - self.zoneout if self.zoneout else 1.0  # eval: f times its expectation
            c0 = None if h0 is None else h0.to(g.dtype).contiguous()
            gates = 3 if self.output_gate else 2
            if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (g, b, c0)):
                h, c_last = _FusedPool.apply(g, b, c0, H, gates, reverse, s, td)
            else:  # inference: no autograd node to build
                h, _, c_last = cuda_layers.qrnn_fwd(g, b, c0, H, gates, reverse, s, td, keep_c=False)
            return h, c_last[None]
        g = F.linear(x, w, b)  # (.., gates * H)
        if torch.is_grad_enabled():  # split's backward is one cat, narrow's a zero-fill, copy and add
            z, fo = g.split([H, g.shape[-1] - H], -1)
            fo = fo.sigmoid()  # f and o in one kernel
            f, o = fo.split(H, -1) if self.output_gate else (fo, None)
        else:  # narrow costs a third of split's dispatch, which small batches feel
            z, fo = g.narrow(-1, 0, H), g.narrow(-1, H, g.shape[-1] - H).sigmoid()
            f, o = fo.narrow(-1, 0, H), (fo.narrow(-1, H, H) if self.output_gate else None)
        z = z.tanh()
        if self.zoneout:
            if self.training:
                f = f * torch.empty_like(f).bernoulli_(1 - self.zoneout)
            else:
                f = f * (1 - self.zoneout)
        if keep is not None:
            f = f * keep  # f = 0 on padding passes the state through, in both directions
        c = _fo_pool(f, z, h0, td == 1, reverse)
        h = c * o if self.output_gate else c
        last = c.narrow(td, 0 if reverse else c.shape[td] - 1, 1)
        return h, (last.transpose(0, 1) if td else last)  # (1, B, H)

    # CUDA layers run fused (kernels/qrnn.cu) unless they need what only the general path does:
    # packed sequences (their padding), zoneout's random mask in training, time split across
    # blocks (a serial walk over T by B * H threads is too narrow for few, very long sequences), or
    # torch.compile, which traces the general path (the scan is a custom op with a fake kernel;
    # the fused kernel's CuPy launch is not traceable)
    FUSE = True
    # The fused kernel adds the bias (and sums its gradient as it walks) rather than cuBLAS's epilogue
    # and a column reduction; False is the unfolded way, kept for scripts/qrnn_variants.py to compare.
    FOLD_BIAS = True
    # The backward's weight gradient on a side stream beside the input gradient (_SideProjection);
    # off: on one H100, training at batch 8, length 512 went 35.6-35.9x -> 37.0-37.3x cuDNN's LSTM, at
    # batch 8, length 128 21.8x -> 20.9x, level elsewhere (scripts/qrnn_variants.py side_wgrad=1)
    SIDE_WGRAD = False

    def _fuse(self, x, keep, td):
        T, BH = x.shape[td], x.shape[1 - td] * self.hidden_size
        autocast = torch.is_autocast_enabled("cuda") and x.dtype != torch.float64  # float64 is not cast
        dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype  # g's
        return (x.is_cuda and self.FUSE and dtype in cuda.STORAGE and keep is None
                and not torch.compiler.is_compiling()
                and not (self.zoneout and self.training) and (T <= 4096 or BH >= 8192) and _fused_available())

    def _windows(self, x, layer, reverse, td):
        """(.., I) -> (.., I * k): each step's k inputs, oldest first in the direction of travel."""
        k = self.window
        pad_shape = list(x.shape)
        pad_shape[td] = k - 1
        if reverse:
            xp = torch.cat([x, x.new_zeros(pad_shape)], td)  # (T + k - 1) steps
            return xp.unfold(td, k, 1).flip(-1).flatten(-2)  # tap j meets x[t + k-1 - j]
        prev = self._prev_x[layer] if self.save_prev_x else None
        if prev is None:
            prev = x.new_zeros(pad_shape)
        elif prev.shape[1 - td] != x.shape[1 - td]:
            raise ValueError(
                f"QRNN: the inputs kept by save_prev_x are for batch size {prev.shape[1 - td]}, "
                f"got {x.shape[1 - td]}; call reset() to start a new stream"
            )
        xp = torch.cat([prev.to(x.dtype), x], td)
        if self.save_prev_x:
            self._prev_x[layer] = xp.narrow(td, xp.shape[td] - (k - 1), k - 1).detach()
        return xp.unfold(td, k, 1).flatten(-2)  # tap j meets x[t - (k-1) + j]
