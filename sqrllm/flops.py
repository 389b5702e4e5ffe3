"""Training FLOPs per token and model FLOPs utilisation (MFU).

Counted per token, forward, then x3 for forward + backward (the backward does twice the forward's
work in every term below); recomputation inside kernels (flash attention's backward) is not counted,
as in the usual MFU convention, so MFU measures useful work:

- matmul: 2 FLOPs per weight of every linear layer, the output head included (tied or not); the
  embedding lookups are free.
- attention: QK^T and AV, 2 * 2 * n_embd FLOPs per visible key, and 5 per visible score for the
  softmax; a causal window of T keys shows a token (T + 1) / 2 keys on average.
- scan: y[t] = r[t] * y[t-1] + x[t], 2 FLOPs per memory channel.
- elementwise: one FLOP per add, multiply, divide or exp: sigmoid 4, softsign 3, RMSNorm 4 per
  channel, bias 1, residual add 1, dropout 1, cross-entropy 4 per vocab entry.

MFU = FLOPs per token x tokens/s / (peak FLOP/s per device x devices). Peaks are the datasheets'
dense tensor-core rates (no sparsity), in PEAK_FLOPS; an H100 SXM and an H200 SXM do 989 TFLOP/s in
bf16 or fp16.
"""

import torch.nn as nn

from sqrllm.model import GatedMLP, SqrllLayer

# dense tensor-core peak per device, FLOP/s: (bf16 / fp16, fp32 without TF32); first match wins
PEAK_FLOPS = (
    ("H100 PCIe", 756e12, 51e12),
    ("H100 NVL", 835e12, 60e12),
    ("H100", 989e12, 67e12),  # SXM (HBM3)
    ("H200 NVL", 835e12, 60e12),
    ("H200", 989e12, 67e12),  # SXM
    ("A100", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
)


def flops_per_token(model, block_size):
    """Training FLOPs (forward + backward) per token of `model` on windows of `block_size`, by kind.

    -> {"matmul", "attention", "scan", "elementwise", "total"}. Works for SqrLLM and GPT.
    """
    # imported here: sqrllm.gpt imports sqrllm.model, as this module does
    from sqrllm.gpt import CausalSelfAttention

    fwd = {"matmul": 0.0, "attention": 0.0, "scan": 0.0, "elementwise": 0.0}
    ctx = (block_size + 1) / 2
    for m in model.modules():
        if isinstance(m, nn.Linear):
            fwd["matmul"] += 2 * m.weight.numel()
            fwd["elementwise"] += m.out_features if m.bias is not None else 0
        elif isinstance(m, nn.RMSNorm):
            fwd["elementwise"] += 4 * m.normalized_shape[0]
        elif isinstance(m, SqrllLayer):
            fwd["scan"] += 2 * m.n_mem
            # sigmoid(f), sigmoid(ig) and i * it, softsign(y), sigmoid(og) and the product
            fwd["elementwise"] += (4 + 5 + 3 + 5) * m.n_mem
        elif isinstance(m, GatedMLP):
            fwd["elementwise"] += 5 * m.out.in_features
        elif isinstance(m, CausalSelfAttention):
            width = m.out.in_features
            fwd["attention"] += 2 * 2 * width * ctx + 5 * m.n_head * ctx
    blocks = getattr(model, "blocks", [])
    width = model.wte.embedding_dim
    fwd["elementwise"] += (2 * len(blocks) + 1) * width  # residual adds and dropouts, embedding dropout
    fwd["elementwise"] += 4 * model.vocab_size  # cross-entropy
    out = {k: 3 * v for k, v in fwd.items()}
    out["total"] = sum(out.values())
    return out


def peak_flops(device_name, dtype_name):
    """Per-device dense peak FLOP/s for `dtype_name` ("bfloat16", "float16", "float32"), or None."""
    for key, half, single in PEAK_FLOPS:
        if key.lower() in device_name.lower():
            return single if dtype_name == "float32" else half
    return None


def mfu(flops_per_tok, tokens_per_s, peak, devices=1):
    """Model FLOPs utilisation in [0, 1]; None when the peak is unknown."""
    if not peak:
        return None
    return flops_per_tok * tokens_per_s / (peak * devices)
