"""The LoRA math that the trainer and the serving engine share: one implementation, not two.

An :class:`AdapterBank` holds the factors of S adapters stacked along a leading *slot*
dimension, per LoRA module (a module is an adapter key without its ``.lora_A``/``.lora_B``
suffix, e.g. ``layers.3.self_attn.q_proj`` or ``layers.3.mlp.experts.gate_proj``):

- per-module targets: ``A [S, R, in]``, ``B [S, out, R]``
- expert targets:     ``A [S, E, R, in]``, ``B [S, E, out, R]``
- ``scaling [S]``: alpha / rank of each slot (0 for an empty slot).

R is the bank's largest rank; an adapter of smaller rank r fills ``[:r]`` and the rest stays
zero, so its update ``B[:, :r] @ A[:r]`` is exact and adapters of mixed ranks share one batch.

A forward pass takes a :class:`LoraBatch` (a bank plus one slot index per batch row, ``-1`` for
the plain base model). The model's projections call :func:`apply_module_lora`, which gathers
each row's factors for two batched matmuls, and :func:`apply_expert_lora`, which applies
``A[slot, expert]``/``B[slot, expert]`` to every routed (token, expert) pair following an
:class:`ExpertPlan` built once per MoE layer (a serving bank's factor rows read in place by a
sampled matmul and an ``embedding_bag``; otherwise pairs grouped by (slot, expert) for batched
matmuls; never a Python loop over experts or rows). Rows with index -1 are never touched: their outputs
are the base op's outputs bit for bit.

Two ways to make a bank:

- serving: :class:`DeviceAdapterBank`, fixed capacity, preallocated; ``load(slot, tensors)``
  copies one adapter's engine-form tensors in, ``clear(slot)`` empties it. No autograd.
- training: :func:`stack_adapters` over trainable :class:`AdapterParams` (one per policy),
  rebuilt every step with ``torch.stack`` so each policy's parameters get their own gradient
  while all policies share one forward pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.errors import InvalidRequest
from lorafleet.platform.domain.lora import ALL_TARGETS, LoraConfig, parse_adapter_key

if TYPE_CHECKING:
    from lorafleet.platform.modeling.model import CausalLM

InitMethod = Literal["standard", "olora_tail"]

# Bound on the temporary gathered expert factors (elements), so a long prefill through a wide
# MoE layer does not materialise one [pairs, r, in] tensor of gigabytes; chunks are looped.
_MAX_GATHER_ELEMENTS = 1 << 25
# Grouped expert LoRA pads every (slot, expert) group to the largest; past this many padded
# rows per real pair, the per-pair gather is cheaper.
_MAX_PADDING_FACTOR = 4


def _spend_csr_beta_warning() -> None:
    """The in-place expert layout describes each pair's factor rows as a CSR pattern, and torch
    warns once per process, on the first CSR tensor, that CSR support is beta. Spend that one
    warning here, silenced, instead of in the first serving step (or a test run with -W error)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        empty = torch.zeros(0, dtype=torch.long)
        torch.sparse_csr_tensor(
            torch.zeros(1, dtype=torch.long), empty, torch.zeros(0), size=(0, 0), check_invariants=False
        )


_spend_csr_beta_warning()


def module_of(key: str) -> str:
    """``layers.0.self_attn.q_proj.lora_A`` -> ``layers.0.self_attn.q_proj``."""
    return key.rsplit(".", 1)[0]


def _check_key(key: str) -> tuple[int, str, str, str]:
    try:
        return parse_adapter_key(key)
    except ValueError as exc:
        raise InvalidRequest(str(exc), code="adapter_tensor_unknown") from exc


# ----------------------------------------------------------------------------------------------
# The bank and the per-row selection
# ----------------------------------------------------------------------------------------------


class AdapterBank:
    """S adapters' factors, stacked per module along a leading slot dimension (see module doc)."""

    def __init__(self, factors: Mapping[str, tuple[Tensor, Tensor]], scaling: Tensor) -> None:
        self._factors = dict(factors)
        self.scaling = scaling  # [S]
        self.capacity = int(scaling.shape[0])
        self.max_rank = max((a.shape[-2] for a, _ in self._factors.values()), default=0)
        self._requires_grad = any(a.requires_grad or b.requires_grad for a, b in self._factors.values())
        # Factors laid out row by row (A ``[..., R, in]`` contiguous, B a transposed view of
        # ``[..., R, out]`` storage, like DeviceAdapterBank), float32/64 on the CPU: expert LoRA
        # can read each pair's rows in place (see ExpertPlan).
        self._rows_in_place = bool(self._factors) and all(
            a.device.type == "cpu"
            and a.dtype in (torch.float32, torch.float64)
            and b.dtype == a.dtype
            and a.is_contiguous()
            and b.transpose(-1, -2).is_contiguous()
            for a, b in self._factors.values()
        )

    def get(self, module: str) -> tuple[Tensor, Tensor] | None:
        """(A, B) of one module for every slot, or None when no slot can adapt it."""
        return self._factors.get(module)

    def items(self) -> list[tuple[str, tuple[Tensor, Tensor]]]:
        """Every (module, (A, B)) the bank holds."""
        return list(self._factors.items())

    def reads_rows_in_place(self) -> bool:
        """Whether expert LoRA may read factor rows in place: the layout allows it and no
        gradient has to flow to the factors (the sparse ops used have no bank-layout backward
        worth relying on; training keeps the gather path)."""
        return self._rows_in_place and not (torch.is_grad_enabled() and self._requires_grad)


class LoraBatch:
    """A bank and the slot each batch row uses (``adapter_ids [B]``, -1 = base model)."""

    def __init__(self, bank: AdapterBank, adapter_ids: Tensor | Sequence[int]) -> None:
        ids = adapter_ids.tolist() if isinstance(adapter_ids, Tensor) else list(adapter_ids)
        bad = [i for i in ids if i < -1 or i >= bank.capacity]
        if bad:
            raise InvalidRequest(
                f"adapter index {bad[0]} outside the bank (capacity {bank.capacity}; -1 means base)",
                code="adapter_index_out_of_range",
            )
        self.bank = bank
        device = bank.scaling.device
        self.adapter_ids = torch.tensor(ids, dtype=torch.long, device=device)  # [B]
        active = [row for row, i in enumerate(ids) if i >= 0]
        self.any_active = bool(active)
        self.all_active = len(active) == len(ids)
        self.active_rows = torch.tensor(active, dtype=torch.long, device=device)  # [B_active]
        self.active_slots = self.adapter_ids[self.active_rows]  # [B_active]


# ----------------------------------------------------------------------------------------------
# Application
# ----------------------------------------------------------------------------------------------


def _gather_b_t(b: Tensor, index: Tensor) -> Tensor:
    """``b[index]`` transposed: b ``[N, out, R]`` -> ``[n, R, out]``.

    When b is a transposed view of ``[N, R, out]`` storage (the serving bank lays B out that way)
    the gather reads whole rows and the following bmm gets a contiguous right operand, which
    measured about 2x faster for decode-sized groups on CPU than the ``[out, R]`` layout.
    """
    b_t = b.transpose(1, 2)
    if b_t.is_contiguous():
        return b_t.index_select(0, index)
    return b.index_select(0, index).transpose(1, 2)


def apply_module_lora(y: Tensor, x: Tensor, *, module: str, lora: LoraBatch | None) -> Tensor:
    """``y + scale[idx] * (x @ A[idx]^T) @ B[idx]^T`` per row; rows with idx -1 left as they are.

    x: ``[B, T, in]``, y: ``[B, T, out]`` (the base projection of x). Returns ``[B, T, out]``.
    """
    if lora is None or not lora.any_active:
        return y
    factors = lora.bank.get(module)
    if factors is None:
        return y
    a, b = factors  # [S, R, in], [S, out, R]
    slots = lora.active_slots
    xs = x if lora.all_active else x.index_select(0, lora.active_rows)  # [b, T, in]
    # index_select, not a[slots]: advanced indexing is several times slower on CPU for this gather.
    h = torch.bmm(xs, a.index_select(0, slots).to(x.dtype).transpose(1, 2))  # [b, T, R]
    # Scaling is read at use, so a slot (re)loaded after this LoraBatch was built is current.
    h.mul_(lora.bank.scaling.index_select(0, slots).to(x.dtype)[:, None, None])
    b_t = _gather_b_t(b, slots).to(x.dtype)  # [b, R, out]
    if lora.all_active:
        return torch.baddbmm(y, h, b_t)  # y + h @ b_t in one op
    delta = torch.bmm(h, b_t)  # [b, T, out]
    # index_add touches only the active rows, so base rows keep the base op's exact bits.
    return y.index_add(0, lora.active_rows, delta)


@dataclass(frozen=True)
class GroupedLayout:
    """Active pairs sorted by (slot, expert) and padded per group into ``[G, C, in]``."""

    groups: Tensor  # [G] the (slot, expert) combos present, ascending
    group_slots: Tensor  # [G] the adapter slot of each group
    cell: Tensor  # [p] padded row (group * C + rank in its group) of each active pair, in pair order
    width: int  # C, the largest group


@dataclass(frozen=True)
class RowsLayout:
    """Each active pair's R factor rows, read where the bank keeps them (no copy)."""

    rows: Tensor  # [p, R] row (combo * R + r) of the flat ``[S*E*R, in]`` A and ``[S*E*R, out]`` B
    pattern: Tensor  # sparse CSR [p, S*E*R]: those rows as columns; values unused
    pair_slots: Tensor  # [p] the adapter slot of each active pair


@dataclass(frozen=True)
class ExpertPlan:
    """How one MoE layer's routed (token, expert) pairs meet the bank's (slot, expert) factors.

    Built once per layer by :func:`plan_expert_lora` and shared by its gate, up and down
    projections. Three layouts, none with a loop over experts or rows:

    - in place (``rows`` set; serving banks, float32/64 on CPU, no gradient): a sampled matmul
      computes each pair's R dot products against its A rows where they lie, and an
      ``embedding_bag`` sums its B rows weighted by those; nothing is gathered or padded. With
      many adapters nearly every (slot, expert) group holds one pair, so gathering copied
      almost every factor. One projection at moe-large decode shapes (256 pairs, 64 slots x 32
      experts, rank 8, 1 thread) measured 0.54 ms in place vs 13.0 ms grouped.
    - grouped (``grouped`` set): two bmm calls over the padded groups; each group's factors are
      gathered once. Measured 2-3x faster on CPU than per pair, and moves far fewer bytes.
    - per pair (both None): each pair gathers its own factors; used when routing is so
      skewed that padding would more than quadruple the work.

    The in-place layout is chosen by the bank alone, never by the batch, so a row's LoRA is
    computed the same way whatever shares its step; each pair's result depends only on its own
    input and factors.
    """

    active: Tensor | None  # [p] the pairs of adapted rows (None: every pair)
    combos: Tensor  # [p] slot * E + expert of each active pair
    num_experts: int
    grouped: GroupedLayout | None
    rows: RowsLayout | None = None


def plan_expert_lora(
    lora: LoraBatch | None, *, pair_rows: Tensor, pair_experts: Tensor, num_experts: int
) -> ExpertPlan | None:
    """pair_rows ``[P]`` (batch row of each pair's token), pair_experts ``[P]``; None when no
    pair belongs to an adapted row."""
    if lora is None or not lora.any_active:
        return None
    slots = lora.adapter_ids[pair_rows]  # [P]
    active: Tensor | None = None
    if not lora.all_active:
        active = torch.nonzero(slots >= 0).squeeze(1)  # [p]
        if active.shape[0] == 0:
            return None
        slots, pair_experts = slots[active], pair_experts[active]
    combos = slots * num_experts + pair_experts
    pairs = combos.shape[0]
    if lora.bank.reads_rows_in_place():
        rows = _rows_layout(combos, slots, lora.bank, num_experts)
        return ExpertPlan(active=active, combos=combos, num_experts=num_experts, grouped=None, rows=rows)
    order = torch.argsort(combos, stable=True)
    sorted_combos = combos[order]
    counts = torch.bincount(sorted_combos, minlength=lora.bank.capacity * num_experts)  # [S*E]
    groups = torch.nonzero(counts).squeeze(1)  # [G]
    width = int(counts.max())
    if groups.shape[0] * width > _MAX_PADDING_FACTOR * pairs:
        return ExpertPlan(active=active, combos=combos, num_experts=num_experts, grouped=None)
    starts = torch.cumsum(counts, 0) - counts  # [S*E] first sorted position of each combo
    group_of = torch.searchsorted(groups, sorted_combos)  # [p]
    sorted_cell = group_of * width + (torch.arange(pairs, device=combos.device) - starts[sorted_combos])
    # Indexed by pair, not by sorted position: padding and unpadding are then one op each.
    cell = torch.empty_like(sorted_cell).index_copy_(0, order, sorted_cell)
    grouped = GroupedLayout(groups=groups, group_slots=groups // num_experts, cell=cell, width=width)
    return ExpertPlan(active=active, combos=combos, num_experts=num_experts, grouped=grouped)


def _rows_layout(combos: Tensor, slots: Tensor, bank: AdapterBank, num_experts: int) -> RowsLayout:
    rank = bank.max_rank
    pairs = combos.shape[0]
    rows = combos[:, None] * rank + torch.arange(rank, device=combos.device)  # [p, R]
    dtype = next(a.dtype for _, (a, _) in bank.items())
    pattern = torch.sparse_csr_tensor(
        torch.arange(0, pairs * rank + 1, rank, device=combos.device),
        rows.reshape(-1),
        torch.zeros(pairs * rank, dtype=dtype, device=combos.device),
        size=(pairs, bank.capacity * num_experts * rank),
        check_invariants=False,  # built valid: one row per pair, its columns ascending
    )
    return RowsLayout(rows=rows, pattern=pattern, pair_slots=slots)


def pad_expert_inputs(x: Tensor, plan: ExpertPlan | None) -> Tensor | None:
    """The grouped layout's padded input ``[G, C, in]`` for x ``[P, in]``, or None when the plan
    does not group. Projections that share an input (gate and up) pad it once."""
    if plan is None or plan.grouped is None:
        return None
    return _pad(x, plan, plan.grouped)


def _pad(x: Tensor, plan: ExpertPlan, layout: GroupedLayout) -> Tensor:
    xs = x if plan.active is None else x.index_select(0, plan.active)  # [p, in]
    count = layout.groups.shape[0]
    padded = x.new_zeros(count * layout.width, x.shape[1]).index_copy_(0, layout.cell, xs)
    return padded.view(count, layout.width, x.shape[1])  # [G, C, in]


def apply_expert_lora(
    y: Tensor,
    x: Tensor,
    *,
    module: str,
    lora: LoraBatch | None,
    plan: ExpertPlan | None,
    padded: Tensor | None = None,
) -> Tensor:
    """LoRA of routed experts, per (token, chosen expert) pair.

    x: ``[P, in]`` the inputs of P pairs, y: ``[P, out]`` their base expert outputs. Pair p
    adds ``scale[slot] * B[slot, e] @ A[slot, e] @ x[p]`` (slot = its row's adapter, e = its
    expert); pairs of base rows are left exactly as they are. ``padded``: x already laid out by
    :func:`pad_expert_inputs` for this plan (computed here when None).
    """
    if lora is None or plan is None:
        return y
    factors = lora.bank.get(module)
    if factors is None:
        return y
    a, b = factors  # [S, E, R, in], [S, E, out, R]
    flat_a = a.reshape(-1, a.shape[-2], a.shape[-1])  # [S*E, R, in]
    flat_b = b.reshape(-1, b.shape[-2], b.shape[-1])  # [S*E, out, R]
    if plan.rows is not None:
        xs = x if plan.active is None else x.index_select(0, plan.active)  # [p, in]
        delta = _expert_delta_in_place(xs, plan.rows, a, b, lora.bank.scaling).to(y.dtype)
        if plan.active is None:
            return y + delta
        return y.index_add(0, plan.active, delta)
    scale = lora.bank.scaling.to(x.dtype)  # [S]
    if plan.grouped is not None:
        if padded is None:
            padded = _pad(x, plan, plan.grouped)
        delta = _expert_delta_grouped(padded, plan.grouped, flat_a, flat_b, scale)
    else:
        xs = x if plan.active is None else x.index_select(0, plan.active)  # [p, in]
        delta = _expert_delta_pairs(xs, plan, flat_a, flat_b, scale)
    if plan.active is None:
        return y + delta
    return y.index_add(0, plan.active, delta)


def _expert_delta_grouped(
    padded: Tensor, layout: GroupedLayout, flat_a: Tensor, flat_b: Tensor, scale: Tensor
) -> Tensor:
    groups = layout.groups
    a_g = flat_a.index_select(0, groups).to(padded.dtype)  # [G, R, in]
    h = torch.bmm(padded, a_g.transpose(1, 2))  # [G, C, R]
    h.mul_(scale.index_select(0, layout.group_slots)[:, None, None])
    out = torch.bmm(h, _gather_b_t(flat_b, groups).to(padded.dtype))  # [G, C, out]
    return out.view(-1, out.shape[-1]).index_select(0, layout.cell)  # [p, out], pair order


def _expert_delta_in_place(x: Tensor, layout: RowsLayout, a: Tensor, b: Tensor, scaling: Tensor) -> Tensor:
    """x ``[p, in]`` -> ``[p, out]``: each pair's ``scale * B[c] @ (A[c] @ x)`` with A and B
    read in place (a ``[S, E, R, in]`` contiguous, b the ``[S, E, out, R]`` view of
    ``[S, E, R, out]`` storage)."""
    a_rows = a.reshape(-1, a.shape[-1])  # [S*E*R, in], a view
    b_rows = b.transpose(-1, -2).reshape(-1, b.shape[-2])  # [S*E*R, out], a view
    x = x.to(a.dtype)
    # One dot product per (pair, r), each over its own A row: [p * R] in pair-major order.
    h = torch.sparse.sampled_addmm(layout.pattern, x, a_rows.t(), beta=0.0).values()
    h = h.view(-1, layout.rows.shape[1]) * scaling.index_select(0, layout.pair_slots).to(a.dtype)[:, None]
    # sum_r h[p, r] * B-row(c_p, r): a weighted bag of the pair's B rows, no [p, R, out] copy.
    return F.embedding_bag(layout.rows, b_rows, per_sample_weights=h, mode="sum")


def _expert_delta_pairs(x: Tensor, plan: ExpertPlan, flat_a: Tensor, flat_b: Tensor, scale: Tensor) -> Tensor:
    # Chunks only bound the temporary [p, R, in] gather.
    rank, fan_in, fan_out = flat_a.shape[1], flat_a.shape[2], flat_b.shape[1]
    chunk = max(1, _MAX_GATHER_ELEMENTS // (rank * (fan_in + fan_out)))
    deltas = []
    for start in range(0, x.shape[0], chunk):
        idx = plan.combos[start : start + chunk]
        a_g = flat_a.index_select(0, idx).to(x.dtype)  # [p, R, in]
        b_g = flat_b.index_select(0, idx).to(x.dtype)  # [p, out, R]
        h = torch.bmm(a_g, x[start : start + chunk, :, None])  # [p, R, 1]
        h = h * scale[idx // plan.num_experts][:, None, None]
        deltas.append(torch.bmm(b_g, h)[:, :, 0])  # [p, out]
    return deltas[0] if len(deltas) == 1 else torch.cat(deltas)


# ----------------------------------------------------------------------------------------------
# Serving: a fixed-capacity bank on the device
# ----------------------------------------------------------------------------------------------


class DeviceAdapterBank:
    """A preallocated bank of ``capacity`` slots for every LoRA module of one base model.

    Memory is fixed at construction: for each module ``[capacity, (E,) max_rank, in]`` and
    ``[capacity, (E,) out, max_rank]``. ``load`` copies an adapter's engine-form tensors (keys
    from ``adapter_key``) into a slot; modules the adapter does not target stay zero.
    """

    def __init__(
        self,
        spec: ArchitectureSpec,
        *,
        capacity: int,
        max_rank: int,
        targets: Sequence[str] = ALL_TARGETS,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if capacity < 1 or max_rank < 1:
            raise InvalidRequest("a device adapter bank needs capacity >= 1 and max_rank >= 1")
        self.spec = spec
        self.max_rank = max_rank
        shapes = spec.lora_shapes(LoraConfig(rank=max_rank, targets=tuple(targets)))
        factors: dict[str, tuple[Tensor, Tensor]] = {}
        for key, shape in shapes.items():
            if key.endswith(".lora_A"):
                module = module_of(key)
                b_shape = shapes[f"{module}.lora_B"]
                # B is stored as [..., R, out] and exposed as its [..., out, R] transpose; see
                # _gather_b_t for why.
                b_storage = torch.zeros((capacity, *b_shape[:-2], b_shape[-1], b_shape[-2]), dtype=dtype, device=device)
                factors[module] = (
                    torch.zeros((capacity, *shape), dtype=dtype, device=device),
                    b_storage.transpose(-1, -2),
                )
        # Scaling stays float32 whatever the factor dtype: alpha/rank like 32/3 is not a bf16 number.
        self.bank = AdapterBank(factors, torch.zeros(capacity, dtype=torch.float32, device=device))
        self.capacity = capacity

    def nbytes_per_slot(self) -> int:
        return sum((a[0].numel() + b[0].numel()) * a.element_size() for _, (a, b) in self.bank.items())

    @torch.no_grad()
    def load(self, slot: int, tensors: Mapping[str, Tensor], *, scaling: float) -> None:
        """Copy one adapter (engine form) into ``slot``; everything is validated before any copy."""
        self._check_slot(slot)
        rank = self._validate(tensors)
        for module, (a, b) in self.bank.items():
            ta, tb = tensors.get(f"{module}.lora_A"), tensors.get(f"{module}.lora_B")
            if ta is None or tb is None:
                a[slot].zero_()
                b[slot].zero_()
                continue
            a[slot, ..., :rank, :].copy_(ta)
            a[slot, ..., rank:, :].zero_()
            b[slot, ..., :rank].copy_(tb)
            b[slot, ..., rank:].zero_()
        self.bank.scaling[slot] = scaling

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for _, (a, b) in self.bank.items():
            a[slot].zero_()
            b[slot].zero_()
        self.bank.scaling[slot] = 0.0

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.capacity:
            raise InvalidRequest(f"slot {slot} outside the bank (capacity {self.capacity})")

    def _validate(self, tensors: Mapping[str, Tensor]) -> int:
        """Return the adapter's rank after checking every key and shape against the base."""
        ranks = {t.shape[-2] for k, t in tensors.items() if k.endswith(".lora_A")}
        if len(ranks) != 1:
            raise InvalidRequest(
                f"an adapter needs LoRA factors of one rank; found ranks {sorted(ranks)}",
                code="adapter_shape_mismatch",
            )
        rank = ranks.pop()
        if rank > self.max_rank:
            raise InvalidRequest(
                f"adapter rank {rank} exceeds this bank's max rank {self.max_rank}",
                code="adapter_rank_too_large",
            )
        expected = self.spec.lora_shapes(LoraConfig(rank=rank, targets=ALL_TARGETS))
        for key, tensor in tensors.items():
            _check_key(key)
            if key not in expected:
                raise InvalidRequest(
                    f"{key} does not exist in this base model", code="adapter_shape_mismatch"
                )
            if tuple(tensor.shape) != expected[key]:
                raise InvalidRequest(
                    f"{key} has shape {tuple(tensor.shape)}, expected {expected[key]}",
                    code="adapter_shape_mismatch",
                )
            if self.bank.get(module_of(key)) is None:
                raise InvalidRequest(
                    f"{key} targets a module this bank does not hold", code="adapter_target_unsupported"
                )
            pair = f"{module_of(key)}.lora_{'B' if key.endswith('lora_A') else 'A'}"
            if pair not in tensors:
                raise InvalidRequest(f"{key} has no matching {pair}", code="adapter_shape_mismatch")
        return rank


# ----------------------------------------------------------------------------------------------
# Training: trainable per-adapter parameters, stacked per step
# ----------------------------------------------------------------------------------------------


def _escape(key: str) -> str:
    # nn.Module attribute names cannot contain "."; adapter keys never contain "-".
    return key.replace(".", "-")


class AdapterParams(nn.Module):
    """One adapter's trainable factors, keyed by ``adapter_key`` names (engine form shapes)."""

    def __init__(self, lora_config: LoraConfig, tensors: Mapping[str, Tensor]) -> None:
        super().__init__()
        for key in tensors:
            _check_key(key)
        self.lora_config = lora_config
        self.factors = nn.ParameterDict({_escape(k): nn.Parameter(t) for k, t in tensors.items()})

    def __getitem__(self, key: str) -> nn.Parameter:
        param: nn.Parameter = self.factors[_escape(key)]
        return param

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and _escape(key) in self.factors

    def __len__(self) -> int:
        return len(self.factors)

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return (k.replace("-", ".") for k in self.factors)

    def keys(self) -> list[str]:
        return list(self)

    def items(self) -> list[tuple[str, nn.Parameter]]:
        return [(k, self[k]) for k in self]

    @property
    def scaling(self) -> float:
        return self.lora_config.scaling


def export_adapter(
    params: AdapterParams | Mapping[str, Tensor], *, dtype: torch.dtype | None = None
) -> dict[str, Tensor]:
    """The engine/bundle form: a plain ``dict[str, Tensor]``, detached, contiguous, CPU copies.

    Copies (never views) so later optimiser steps cannot change an exported revision.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in params.items():
        t = tensor.detach().to(device="cpu", dtype=dtype or tensor.dtype, copy=True)
        out[key] = t.contiguous()
    return out


def stack_adapters(adapters: Sequence[AdapterParams], *, dtype: torch.dtype | None = None) -> AdapterBank:
    """Stack trainable adapters into a bank; slot i is ``adapters[i]``. Differentiable.

    Smaller ranks are zero-padded up to the largest (``F.pad`` keeps the gradient path), a module
    one adapter lacks is zeros for it. Rebuild every step: the bank holds autograd graph nodes.
    """
    if not adapters:
        raise InvalidRequest("stack_adapters needs at least one adapter")
    max_rank = max(p.lora_config.rank for p in adapters)
    modules: dict[str, None] = {}
    for p in adapters:
        modules.update((module_of(k), None) for k in p.keys() if k.endswith(".lora_A"))
    first = next(iter(adapters[0].parameters()))
    dtype = dtype or first.dtype
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for module in modules:
        a_parts: list[Tensor] = []
        b_parts: list[Tensor] = []
        template = next(p for p in adapters if f"{module}.lora_A" in p)
        a_shape = template[f"{module}.lora_A"].shape[:-2] + (max_rank, template[f"{module}.lora_A"].shape[-1])
        b_shape = template[f"{module}.lora_B"].shape[:-1] + (max_rank,)
        for p in adapters:
            if f"{module}.lora_A" not in p:
                a_parts.append(torch.zeros(a_shape, dtype=dtype, device=first.device))
                b_parts.append(torch.zeros(b_shape, dtype=dtype, device=first.device))
                continue
            a, b = p[f"{module}.lora_A"].to(dtype), p[f"{module}.lora_B"].to(dtype)
            pad = max_rank - a.shape[-2]
            a_parts.append(F.pad(a, (0, 0, 0, pad)) if pad else a)
            b_parts.append(F.pad(b, (0, pad)) if pad else b)
        factors[module] = (torch.stack(a_parts), torch.stack(b_parts))
    scaling = torch.tensor([p.scaling for p in adapters], dtype=torch.float32, device=first.device)
    return AdapterBank(factors, scaling)


# ----------------------------------------------------------------------------------------------
# Initialisation
# ----------------------------------------------------------------------------------------------


def _smallest_right_singular(weight: Tensor, rank: int) -> Tensor:
    """Rows = the ``rank`` right-singular vectors of ``weight [..., out, in]`` with the smallest
    singular values, each sign-fixed so its largest-magnitude entry is positive. ``[..., r, in]``."""
    _, _, vh = torch.linalg.svd(weight.float(), full_matrices=False)  # vh [..., min(out,in), in]
    tail = vh[..., -rank:, :]
    pivot = tail.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(tail, -1, pivot))
    return tail * torch.where(sign == 0, torch.ones_like(sign), sign)


def new_adapter_params(
    spec: ArchitectureSpec,
    lora_config: LoraConfig,
    *,
    seed: int,
    init: InitMethod | None = None,
    base_model: CausalLM | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> AdapterParams:
    """A fresh trainable adapter for ``spec``: every tensor of ``spec.lora_shapes(lora_config)``.

    ``init`` (default ``lora_config.init``):

    - ``standard``: A uniform in ``±1/sqrt(in)`` (PEFT's ``kaiming_uniform_(a=sqrt(5))``, per
      expert slice), B zero. Seeded, so the same seed gives the same adapter.
    - ``olora_tail``: A = the r right-singular vectors of the base weight with the *smallest*
      singular values (orthonormal rows, not scaled by the singular values), B zero. Training
      then starts in the input directions the base weight uses least, so the update disturbs
      what the base already does as little as possible (the MiLoRA observation), and because B
      is zero the initial model is exactly the base model; unlike PiSSA/OLoRA proper, nothing is
      subtracted from the frozen weight, which the shared base could not allow. Needs
      ``base_model``; per-expert weights are decomposed in one batched SVD.
    """
    method = init or lora_config.init
    generator = torch.Generator(device="cpu").manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for key, shape in spec.lora_shapes(lora_config).items():
        layer, site, target, factor = _check_key(key)
        if factor == "lora_B":
            tensors[key] = torch.zeros(shape, dtype=dtype, device=device)
            continue
        if method == "standard":
            bound = 1.0 / math.sqrt(shape[-1])
            a = torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        else:
            if base_model is None:
                raise InvalidRequest(
                    "olora_tail initialisation needs the base model", code="lora_init_needs_base"
                )
            weight = base_model.base_weight(layer=layer, site=site, target=target)  # [(E,) out, in]
            if lora_config.rank > min(weight.shape[-2:]):
                raise InvalidRequest(
                    f"rank {lora_config.rank} exceeds min(out, in) of {key}", code="lora_rank_too_large"
                )
            a = _smallest_right_singular(weight.detach().to("cpu"), lora_config.rank)
        tensors[key] = a.to(dtype=dtype, device=device)
    return AdapterParams(lora_config, tensors)
