"""
Sampling from a model's logits: top-k and top-p (nucleus) filtering, and the next token drawn at a
temperature, or the most likely one at temperature 0. GPT.generate (train_gpt.py) and sample.py use it;
it never imports train_gpt.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenizer import GPT2_VOCAB


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits with everything outside the top-k, and outside the smallest set of mass >= top_p, at -inf."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = F.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the best always stays
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token id per row of logits (B, V)."""
    if logits.size(-1) > GPT2_VOCAB:
        logits = logits[..., :GPT2_VOCAB]  # padded ids decode to nothing
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
