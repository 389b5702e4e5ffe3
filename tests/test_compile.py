"""torch.compile sees each block as one graph (the scan is one opaque op, not a graph break), fuses
the sqrll layer's elementwise work around it, and computes what eager mode computes."""

import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from sqrllm.gpt import GPT
from sqrllm.model import SqrLLM


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_block_is_one_graph():
    torch.manual_seed(0)
    x, mem = torch.randn(2, 16, 32), torch.randn(2, 32)
    sqrll = SqrLLM(65, n_layer=1, n_embd=32, dropout=0.1)
    zoned = SqrLLM(65, n_layer=1, n_embd=32, zoneout=0.1)  # in training: the zone drawn inside the graph
    gpt = GPT(65, 16, n_layer=1, n_head=4, n_embd=32, dropout=0.1)
    calls = [(sqrll.blocks[0], (x,)), (sqrll.blocks[0], (x, mem)), (sqrll.blocks[1], (x,)),
             (zoned.blocks[0], (x, mem)), (gpt.blocks[0], (x,)), (gpt.blocks[1], (x,))]
    for block, inputs in calls:
        e = torch._dynamo.explain(block)(*inputs)
        assert (e.graph_count, e.graph_break_count) == (1, 0), (type(block.inner).__name__, e.break_reasons)
    idx = torch.randint(0, 65, (2, 16))
    for model in (SqrLLM(65, n_layer=2, n_embd=32), gpt):
        e = torch._dynamo.explain(model)(idx, idx)
        assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons


@pytest.mark.slow
def test_compiled_sqrll_block_fuses_and_matches_eager():
    torch.manual_seed(0)
    block = SqrLLM(65, n_layer=1, n_embd=32).blocks[0]
    x, mem = torch.randn(2, 16, 32, requires_grad=True), torch.randn(2, 32)
    (out, new_mem), codes = run_and_get_code(torch.compile(block), x, mem)
    code = next(c for c in codes if "forward" in c.split("\n", 1)[0])  # the forward's module, not the backward's
    # forward: norm | gates, fused with the scan's inputs | softsign * sigmoid(og) | residual add,
    # around the two matrix multiplies and the one scan op
    assert len(set(re.findall(r"cpp_fused_\w+", code))) <= 4
    assert code.count("extern_kernels.addmm(") + code.count("extern_kernels.mm(") == 2
    assert code.count("torch.ops.sqrllm.scan_fwd.default(") == 1
    dy = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, dy)
    want, want_mem = block(x, mem)
    (want_gx,) = torch.autograd.grad(want, x, dy)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(new_mem, want_mem)
    torch.testing.assert_close(gx, want_gx)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_model_on_cuda_is_one_graph_and_matches_the_fused_eager_model(fused_core_calls):
    """On CUDA, eager layers run the fused core op (sqrllm/core.py) and compiled ones the composition
    that Inductor fuses: the model still compiles to one graph, and both give the same loss and gradients."""
    torch.manual_seed(0)
    model = SqrLLM(65, n_layer=2, n_embd=64, n_mem=32).cuda()
    idx = torch.randint(0, 65, (4, 48), device="cuda")
    e = torch._dynamo.explain(model)(idx[:, :-1], idx[:, 1:])
    assert (e.graph_count, e.graph_break_count) == (1, 0), e.break_reasons

    def loss_and_grads(m):
        model.zero_grad()
        _, loss, _ = m(idx[:, :-1], idx[:, 1:])
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters()]

    fused_core_calls.clear()
    eager_loss, eager_grads = loss_and_grads(model)
    assert len(fused_core_calls) == 2  # the eager side is the fused op (CuPy present), not the composition
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model))
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
