"""Per-row token choice for one engine step.

Greedy rows take the argmax. Sampled rows get temperature, top-k and top-p applied together
(row-wise tensor ops over the whole group) and then draw from their *own* ``torch.Generator``,
so a seeded request draws the same tokens whatever else shares the batch. Filtering follows
:func:`lorafleet.platform.modeling.sampling.sample_tokens`: top-k first, then top-p over the
renormalised remainder, the most likely token always kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class RowSampling:
    temperature: float
    top_p: float
    top_k: int
    generator: torch.Generator | None
    """Required when temperature > 0."""


def choose_tokens(logits: Tensor, rows: Sequence[RowSampling]) -> list[int]:
    """logits ``[B, V]`` (any float dtype) -> one token id per row."""
    out = logits.argmax(dim=-1).tolist()  # greedy answer for every row; sampled rows overwrite
    sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
    if not sampled:
        return out
    vocab = logits.shape[-1]
    device = logits.device
    picked = [rows[i] for i in sampled]
    temps = torch.tensor([r.temperature for r in picked], dtype=torch.float32, device=device)
    scores = logits[sampled].float() / temps[:, None]  # [S, V]
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True, stable=True)  # [S, V] each
    keep = torch.ones_like(sorted_scores, dtype=torch.bool)
    ks = [r.top_k if 0 < r.top_k < vocab else vocab for r in picked]
    if any(k < vocab for k in ks):
        keep &= torch.arange(vocab, device=device)[None, :] < torch.tensor(ks, device=device)[:, None]
    masked = sorted_scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    if any(r.top_p < 1.0 for r in picked):
        top_p = torch.tensor([r.top_p for r in picked], dtype=torch.float32, device=device)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p[:, None]
        probs = torch.softmax(masked.masked_fill(drop, float("-inf")), dim=-1)
    for row, i in enumerate(sampled):
        j = torch.multinomial(probs[row], 1, generator=picked[row].generator)
        out[i] = int(order[row, j])
    return out
