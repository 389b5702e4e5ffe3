"""Generation from a SqrLLM: the prompt in one parallel forward, then one step per token.

The recurrent state is all the model keeps, so each new token costs the same whatever its position.
"""

import torch


@torch.no_grad()
def prefill(model, ids, state=None, chunk=4096):
    """Run prompt ids (B, T) through the model in chunks of `chunk` tokens (constant memory).

    Returns (logits of the last position (B, vocab), new state).
    """
    logits = None
    for lo in range(0, ids.shape[1], chunk):
        logits, _, state = model(ids[:, lo : lo + chunk], state=state, last_only=True)
    return logits[:, -1], state


def pick(logits, temperature=1.0, top_k=None, generator=None):
    """Choose the next token for each row of logits (B, vocab): greedy when temperature == 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, num_samples=1, seed=None,
             state=None):
    """Yield (num_samples,) tensors of new token ids, one per step, after prefilling `prompt_ids`.

    prompt_ids: a non-empty list of ints, shared by all samples. state: an optional starting state.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty; give at least one token")
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor(prompt_ids, dtype=torch.long, device=device).expand(num_samples, -1)
    logits, state = prefill(model, ids, state)
    for _ in range(max_new_tokens):
        nxt = pick(logits, temperature, top_k, generator)
        yield nxt
        logits, _, state = model(nxt[:, None], state=state, last_only=True)
        logits = logits[:, -1]
