"""Turning validated dataset rows into token sequences with loss masks.

Chat rows and prompts given as messages are rendered with the base tokenizer's own chat
template; the loss covers each assistant reply and its end-of-turn marker, nothing else. A
plain string prompt (DPO, RL) is sent as a single user turn. Plain SFT rows
(prompt/completion) are raw text: the loss covers the completion and the end-of-text token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from lorafleet.platform.domain.datasets import ChatMessage, ChatRow, PreferenceRow, PromptCompletionRow, RLRow
from lorafleet.platform.domain.errors import InvalidRequest


class RowTooLong(InvalidRequest):
    code = "row_too_long"


@dataclass(frozen=True)
class Sequence:
    ids: list[int]
    loss_mask: list[bool]
    """True where the token is a training target (predicted from the one before it)."""


class Tokenizing:
    """Wraps a Hugging Face fast tokenizer with the rendering rules above."""

    def __init__(self, tokenizer: Any, *, max_len: int, truncation: Literal["reject", "truncate"]) -> None:
        self.tok = tokenizer
        self.max_len = max_len
        self.truncation = truncation
        eos = tokenizer.eos_token_id
        if eos is None:
            raise InvalidRequest("the base tokenizer has no end-of-sequence token", code="tokenizer_unusable")
        self.eos_id: int = int(eos)
        self.pad_id: int = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def _render(self, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
        return str(self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt))

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _fit(self, seq: Sequence, *, line: int | None = None) -> Sequence:
        if len(seq.ids) <= self.max_len:
            return seq
        if self.truncation == "reject":
            where = f" (row {line})" if line is not None else ""
            raise RowTooLong(f"a row{where} has {len(seq.ids)} tokens; max_seq_len is {self.max_len}")
        return Sequence(seq.ids[: self.max_len], seq.loss_mask[: self.max_len])

    @staticmethod
    def _messages(prompt: str | list[ChatMessage]) -> list[dict[str, str]]:
        if isinstance(prompt, str):
            return [{"role": "user", "content": prompt}]
        return [m.model_dump() for m in prompt]

    def chat(self, messages: list[dict[str, str]], *, line: int | None = None) -> Sequence:
        if not self.has_template:
            raise InvalidRequest("chat rows need a base model with a chat template", code="no_chat_template")
        full = self._render(messages, generation_prompt=False)
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                start = len(self._render(messages[:i], generation_prompt=True)) if i else 0
                end = len(self._render(messages[: i + 1], generation_prompt=False))
                spans.append((start, end))
        mask = [any(s <= a and b <= e and b > a for s, e in spans) for a, b in enc["offset_mapping"]]
        return self._fit(Sequence(list(enc["input_ids"]), mask), line=line)

    def sft(self, row: ChatRow | PromptCompletionRow, *, line: int | None = None) -> Sequence:
        if isinstance(row, ChatRow):
            return self.chat([m.model_dump() for m in row.messages], line=line)
        prompt, completion = self._encode(row.prompt), self._encode(row.completion) + [self.eos_id]
        return self._fit(Sequence(prompt + completion, [False] * len(prompt) + [True] * len(completion)), line=line)

    def prompt_ids(self, prompt: str | list[ChatMessage]) -> list[int]:
        """The tokens a sampled reply continues (chat template with the generation prompt)."""
        if self.has_template:
            return self._encode(self._render(self._messages(prompt), generation_prompt=True))
        return self._encode(prompt if isinstance(prompt, str) else "\n".join(m.content for m in prompt))

    def reply(self, prompt_ids: list[int], reply: str, *, line: int | None = None) -> Sequence:
        """A prompt followed by a reply ending with the end-of-turn token; loss on the reply."""
        ids = self._encode(reply) + [self.eos_id]
        return self._fit(Sequence(prompt_ids + ids, [False] * len(prompt_ids) + [True] * len(ids)), line=line)

    def preference(self, row: PreferenceRow, *, line: int | None = None) -> tuple[Sequence, Sequence]:
        prompt = self.prompt_ids(row.prompt)
        return self.reply(prompt, row.chosen, line=line), self.reply(prompt, row.rejected, line=line)

    def rl_prompt(self, row: RLRow) -> list[int]:
        return self.prompt_ids(row.prompt)


@dataclass
class Batch:
    input_ids: Tensor  # [B, T]
    attention_mask: Tensor  # [B, T]
    loss_mask: Tensor  # [B, T]: True where token t is a target (predicted at position t-1)

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(seqs: list[Sequence], *, pad_id: int) -> Batch:
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.bool)
    loss = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        n = len(s.ids)
        ids[i, :n] = torch.tensor(s.ids)
        attn[i, :n] = True
        loss[i, :n] = torch.tensor(s.loss_mask)
    return Batch(ids, attn, loss)


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """logits ``[B, T, V]``, input_ids ``[B, T]`` -> log p(token t | < t) ``[B, T]`` (position 0 is 0)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(picked, (1, 0))
