"""FLOPs per token add up from the model's shapes; MFU divides by the named device's peak."""

import pytest
import torch

from sqrllm.flops import flops_per_token, mfu, peak_flops
from sqrllm.gpt import GPT
from sqrllm.model import SqrLLM


def test_flops_per_token_counts_every_linear_weight_and_the_attention():
    sqrll = SqrLLM(65, n_layer=6, n_embd=384, n_mem=384, n_ffn=768)
    f = flops_per_token(sqrll, 256)
    linear = sum(m.weight.numel() for m in sqrll.modules() if isinstance(m, torch.nn.Linear))
    assert f["matmul"] == 6 * linear  # 2 per weight, forward + backward = 3 forwards
    assert f["scan"] == 3 * 2 * 384 * 6 and f["attention"] == 0
    assert f["total"] == pytest.approx(58.9e6, rel=1e-3)
    gpt = GPT(65, 256, n_layer=6, n_head=6, n_embd=384, n_ffn=1024, bias=False)
    g = flops_per_token(gpt, 256)
    assert g["attention"] == 3 * 6 * (4 * 384 + 5 * 6) * 128.5  # causal: (T + 1) / 2 keys on average
    assert flops_per_token(gpt, 512)["attention"] == pytest.approx(2 * g["attention"], rel=0.01)


def test_peak_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert peak_flops("NVIDIA H200", "float16") == 989e12
    assert peak_flops("NVIDIA H200 NVL", "bfloat16") == 835e12  # the PCIe card: not the SXM's rates
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "float32") == 19.5e12
    assert peak_flops("Some Future GPU", "bfloat16") is None
    assert mfu(60e6, 1e6, 989e12) == pytest.approx(0.0607, rel=1e-3)
    assert mfu(60e6, 2e6, 989e12, devices=2) == mfu(60e6, 1e6, 989e12)
    assert mfu(60e6, 1e6, None) is None
