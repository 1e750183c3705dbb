"""A slot-based KV cache for continuous batching.

Each running request owns one *slot*. Storage is preallocated once:
``k, v: [layers, max_slots, kv_heads, max_len, head_dim]`` and a length per slot. A model step
(:meth:`lorafleet.platform.modeling.model.CausalLM.step`) names the slots of its rows; row b
appends its ``num_tokens[b]`` new tokens at positions ``length[slot] .. length[slot]+n-1`` and
attends to everything its slot holds up to each query's position. Rows of one step may be at
different lengths, and a step can mix prefills (n = prompt length, right-padded to T) and decodes
(n = 1); requests join (``acquire``) and leave (``release``) between steps.

Slot bookkeeping is deliberately minimal (a free list); admission and scheduling belong to the
engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.errors import InvalidRequest, Unavailable


@dataclass(frozen=True)
class CacheStep:
    """Where one step reads and writes; built by :meth:`KVCache.plan`, used by every layer."""

    slots: Tensor  # [B] long
    positions: Tensor  # [B, T] absolute position of every query (padding included)
    write_rows: Tensor  # [n] batch row of each real (non-padding) token
    write_cols: Tensor  # [n] its column in the step's input
    write_slots: Tensor  # [n] its slot
    write_positions: Tensor  # [n] its position
    mask: Tensor  # [B, 1, T, L] bool: query may attend to key j
    key_len: int  # L: keys read per row (max length after the step)
    num_tokens: tuple[int, ...]  # real tokens per row
    slot_list: tuple[int, ...]


class KVCache:
    """Preallocated per-slot K/V storage for every layer of one model."""

    def __init__(
        self,
        spec: ArchitectureSpec,
        *,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (spec.num_layers, max_slots, spec.num_kv_heads, max_len, spec.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_slots = max_slots
        self.max_len = max_len
        self.device = torch.device(device)
        # Host-side lengths: planning a step never waits on the device.
        self._lengths = [0] * max_slots
        self._free = list(range(max_slots - 1, -1, -1))

    # -- slot bookkeeping --------------------------------------------------------------------

    def acquire(self) -> int:
        """A free slot, emptied; raises :class:`Unavailable` when every slot is taken."""
        if not self._free:
            raise Unavailable(f"all {self.max_slots} KV cache slots are in use", code="kv_cache_full")
        slot = self._free.pop()
        self._lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self._check(slot)
        if slot in self._free:
            raise InvalidRequest(f"KV cache slot {slot} is not in use")
        self._lengths[slot] = 0
        self._free.append(slot)

    def length(self, slot: int) -> int:
        self._check(slot)
        return self._lengths[slot]

    def truncate(self, slot: int, length: int) -> None:
        """Forget tokens after ``length`` (e.g. to re-run a step); stale K/V beyond it is masked."""
        self._check(slot)
        if not 0 <= length <= self._lengths[slot]:
            raise InvalidRequest(f"cannot truncate slot {slot} of length {self._lengths[slot]} to {length}")
        self._lengths[slot] = length

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.max_slots:
            raise InvalidRequest(f"KV cache slot {slot} outside 0..{self.max_slots - 1}")

    # -- one step ----------------------------------------------------------------------------

    def plan(self, slots: Sequence[int], num_tokens: Sequence[int], *, width: int) -> CacheStep:
        """Positions, write indices and attention mask for a step of ``len(slots)`` rows of
        ``width`` columns, where row b holds ``num_tokens[b]`` real tokens (right padding)."""
        if len(set(slots)) != len(slots):
            raise InvalidRequest("a step names the same KV cache slot twice")
        if len(num_tokens) != len(slots):
            raise InvalidRequest("num_tokens needs one entry per row")
        for slot, n in zip(slots, num_tokens, strict=True):
            self._check(slot)
            if not 1 <= n <= width:
                raise InvalidRequest(f"row of slot {slot} has {n} tokens; a step row needs 1..{width}")
            if self._lengths[slot] + n > self.max_len:
                raise InvalidRequest(
                    f"slot {slot} would hold {self._lengths[slot] + n} tokens, over its {self.max_len}",
                    code="context_length_exceeded",
                )
        dev = self.device
        starts = torch.tensor([self._lengths[s] for s in slots], dtype=torch.long, device=dev)  # [B]
        counts = torch.tensor(list(num_tokens), dtype=torch.long, device=dev)  # [B]
        cols = torch.arange(width, device=dev)
        positions = starts[:, None] + cols[None, :]  # [B, T]
        real = cols[None, :] < counts[:, None]  # [B, T]
        rows, write_cols = real.nonzero(as_tuple=True)
        slot_t = torch.tensor(list(slots), dtype=torch.long, device=dev)
        key_len = max(self._lengths[s] + n for s, n in zip(slots, num_tokens, strict=True))
        mask = torch.arange(key_len, device=dev)[None, None, :] <= positions[:, :, None]  # [B, T, L]
        return CacheStep(
            slots=slot_t,
            positions=positions,
            write_rows=rows,
            write_cols=write_cols,
            write_slots=slot_t[rows],
            write_positions=positions[rows, write_cols],
            mask=mask[:, None],
            key_len=key_len,
            num_tokens=tuple(num_tokens),
            slot_list=tuple(slots),
        )

    def update(self, layer: int, step: CacheStep, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write this step's real tokens of one layer, return every row's keys and values.

        k, v: ``[B, kv_heads, T, head_dim]``. Returns ``[B, kv_heads, L, head_dim]`` each.
        """
        index = (step.write_slots, slice(None), step.write_positions)
        self.k[layer][index] = k[step.write_rows, :, step.write_cols]  # [n, kv_heads, head_dim]
        self.v[layer][index] = v[step.write_rows, :, step.write_cols]
        return self.k[layer, step.slots, :, : step.key_len], self.v[layer, step.slots, :, : step.key_len]

    def commit(self, step: CacheStep) -> None:
        """Advance each row's slot length once every layer has written the step."""
        for slot, n in zip(step.slot_list, step.num_tokens, strict=True):
            self._lengths[slot] += n
