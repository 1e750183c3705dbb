"""Token sampling and a simple batched generator, shared by the trainer (GRPO rollouts) and the
serving engine (which schedules its own steps but samples with :func:`sample_tokens`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lorafleet.platform.modeling.kv_cache import KVCache
from lorafleet.platform.modeling.lora import AdapterBank, LoraBatch
from lorafleet.platform.modeling.model import CausalLM


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k cut."""


def sample_tokens(
    logits: Tensor, params: Sequence[SamplingParams], generator: torch.Generator | None = None
) -> Tensor:
    """logits ``[B, V]`` -> token ids ``[B]``, each row with its own parameters."""
    logits = logits.float()
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.temperature <= 0]
    if greedy:
        idx = torch.tensor(greedy, device=logits.device)
        out[idx] = logits[idx].argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return out
    idx = torch.tensor(sampled, device=logits.device)
    temps = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
    scores = logits[idx] / temps[:, None]  # [S, V]
    for row, i in enumerate(sampled):
        p = params[i]
        if p.top_k > 0 and p.top_k < scores.shape[-1]:
            kth = torch.topk(scores[row], p.top_k).values[-1]
            scores[row] = scores[row].masked_fill(scores[row] < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores[row], descending=True)
            probs = torch.softmax(sorted_scores, dim=-1)
            # keep the smallest prefix whose mass reaches top_p (the first token always stays)
            drop = probs.cumsum(-1) - probs >= p.top_p
            scores[row, order[drop]] = float("-inf")
    probs = torch.softmax(scores, dim=-1)
    out[idx] = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return out


@dataclass
class Generation:
    tokens: list[int]
    logprobs: list[float]
    """log p(token) under the unmodified (temperature 1) model distribution."""
    finished: bool
    """Ended by a stop token (False: hit max_new_tokens)."""


@torch.no_grad()
def generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Sequence[int],
    params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    bank: AdapterBank | None = None,
    adapter_ids: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> list[Generation]:
    """Generate for every prompt at once: one prefill step, then decode steps over the rows that
    are still running. Row i uses slot ``adapter_ids[i]`` of ``bank`` (-1: the base model)."""
    n = len(prompts)
    per_row = list(params) if isinstance(params, Sequence) else [params] * n
    ids = list(adapter_ids) if adapter_ids is not None else [-1] * n
    longest = max(len(p) for p in prompts)
    cache = KVCache(
        model.spec, max_slots=n, max_len=longest + max_new_tokens, dtype=model.dtype, device=model.device
    )
    slots = [cache.acquire() for _ in range(n)]
    stop = set(stop_ids)
    results = [Generation([], [], False) for _ in range(n)]

    prefill = torch.zeros((n, longest), dtype=torch.long, device=model.device)
    for i, p in enumerate(prompts):
        prefill[i, : len(p)] = torch.tensor(list(p), device=model.device)
    lora = LoraBatch(bank, ids) if bank is not None else None
    logits = model.step(
        prefill, cache=cache, slots=slots, num_tokens=[len(p) for p in prompts], lora=lora, last_only=True
    )  # [n, V]
    running = list(range(n))
    for _ in range(max_new_tokens):
        chosen = sample_tokens(logits, [per_row[i] for i in running], generator)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, chosen[:, None]).squeeze(-1)
        still: list[int] = []
        for row, i in enumerate(running):
            token = int(chosen[row])
            results[i].tokens.append(token)
            results[i].logprobs.append(float(logp[row]))
            if token in stop:
                results[i].finished = True
            elif len(results[i].tokens) < max_new_tokens:
                still.append(i)
        if not still:
            break
        keep = [running.index(i) for i in still]
        step_ids = chosen[keep][:, None]
        lora = LoraBatch(bank, [ids[i] for i in still]) if bank is not None else None
        logits = model.step(step_ids, cache=cache, slots=[slots[i] for i in still], lora=lora, last_only=True)
        running = still
    return results
