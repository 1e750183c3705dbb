"""Teacher-forced measurements of a built model, recorded in its sidecar.

Teacher forcing answers both questions in one forward pass with no sampling noise: a greedy
decode produces the expected reply exactly when every reply token (and the closing
``<|im_end|>``) is the argmax at its position; and the chance that temperature-1 sampling produces
it is the product of those tokens' probabilities.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorafleet.platform.modeling.tiny_moe._corpus import IM_END
from lorafleet.platform.modeling.tiny_moe.demo_task import COLOR_PICK_PROMPTS, arithmetic_prompt


def _score(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """For (user prompt, reply) pairs: (greedy-exact flags ``[n]`` bool, log P(reply) ``[n]``)."""
    rows: list[tuple[list[int], int]] = []
    for prompt, reply in pairs:
        head = str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
        )
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(head + reply + IM_END, add_special_tokens=False)["input_ids"]
        rows.append((full_ids, len(head_ids)))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), int(tokenizer.pad_token_id), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, (ids, _) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()  # [n, width, vocab]
    logp = torch.log_softmax(logits, dim=-1)
    exact = torch.zeros(len(rows), dtype=torch.bool)
    total = torch.zeros(len(rows))
    for i, (ids, start) in enumerate(rows):
        targets = torch.tensor(ids[start:])  # reply tokens, then <|im_end|>
        row = logp[i, start - 1 : len(ids) - 1]  # [reply_len, vocab]: position t predicts token t+1
        exact[i] = bool((row.argmax(dim=-1) == targets).all())
        total[i] = row.gather(1, targets[:, None]).sum()
    return exact, total


def single_digit_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> float:
    """Greedy exact-match over all 100 sums and 55 non-negative differences of digits 0..9."""
    pairs = [(arithmetic_prompt(a, "+", b), str(a + b)) for a in range(10) for b in range(10)]
    pairs += [(arithmetic_prompt(a, "-", b), str(a - b)) for a in range(10) for b in range(a + 1)]
    exact, _ = _score(model, tokenizer, pairs)
    return float(exact.float().mean())


def color_pick_reward(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, target: str) -> float:
    """Expected color-pick reward under temperature-1 sampling, averaged over the task's prompts."""
    reply = target.capitalize() + "."  # the form the corpus answers in
    _, logp = _score(model, tokenizer, [(p, reply) for p in COLOR_PICK_PROMPTS])
    return float(logp.exp().mean())
