"""GPT: the Transformer baseline, trained and evaluated in the same harness as SqrLLM.

- Causal self-attention through `F.scaled_dot_product_attention` (flash attention on GPUs) and
  learned absolute position embeddings over `block_size`, as nanoGPT's GPT.
- Everything else is SqrLLM's: the pre-norm `Block` with RMSNorm, the gated MLP, tied embedding,
  init and optimizer groups; the data, tokenizer, loop and evaluation are the trainer's.
- It has no memory: `forward` takes and returns the trainer's `state` only to share SqrLLM's
  signature, and every window starts from nothing.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from sqrllm.model import Block, GatedMLP, SqrLLM, init_weights, spread_drop_path


class CausalSelfAttention(nn.Module):
    """x (B, T, n_embd) -> (B, T, n_embd); n_head heads of n_embd // n_head."""

    def __init__(self, n_embd, n_head, dropout=0.0, bias=True):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not a multiple of n_head={n_head}")
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.out = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class GPT(nn.Module):
    def __init__(self, vocab_size, block_size, n_layer=6, n_head=6, n_embd=384, n_ffn=0, dropout=0.0,
                 tie_weights=True, bias=True, init="scaled", init_std=0.02, drop_path=0.0):
        super().__init__()
        self.vocab_size = vocab_size
        self.block_size = block_size
        self.n_layer = n_layer
        n_ffn = n_ffn or 2 * n_embd
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        blocks = []
        for _ in range(n_layer):
            blocks.append(Block(n_embd, CausalSelfAttention(n_embd, n_head, dropout, bias=bias), dropout))
            blocks.append(Block(n_embd, GatedMLP(n_embd, n_ffn, bias=bias), dropout))
        spread_drop_path(blocks, drop_path)
        self.blocks = nn.ModuleList(blocks)
        self.norm_f = nn.RMSNorm(n_embd, eps=1e-6)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.wte.weight
        init_weights(self, init, init_std)

    @classmethod
    def from_config(cls, cfg, vocab_size):
        return cls(vocab_size, cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                   n_ffn=cfg.n_ffn, dropout=cfg.dropout, tie_weights=cfg.tie_weights, bias=cfg.bias,
                   init=cfg.init, init_std=cfg.init_std, drop_path=cfg.drop_path)

    num_params = SqrLLM.num_params
    configure_optimizer = SqrLLM.configure_optimizer
    head = SqrLLM.head

    def init_state(self, batch_size, device=None, dtype=torch.float32):
        return []

    def forward(self, idx, targets=None, state=None, last_only=False):
        """idx (B, T) token ids, T <= block_size -> (logits, loss, []); `state` is ignored."""
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"GPT: sequence of {T} tokens is longer than block_size {self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, n_embd)
        for block in self.blocks:
            x, _ = block(x)
        return (*self.head(x, targets, last_only), [])
