"""LoRA configuration and the tensor naming contract shared by trainer, bundle and engine.

In-memory ("engine") form of one adapter: a flat ``dict[str, Tensor]`` keyed by
``adapter_key(...)``. Per-module targets hold ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]``;
expert targets hold every expert stacked: ``lora_A`` ``[E, r, in]`` and ``lora_B`` ``[E, out, r]``.
The packed bundle stores exactly these keys; the PEFT layout spells expert factors per expert.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTENTION_TARGETS + MLP_TARGETS

Factor = Literal["lora_A", "lora_B"]
Site = Literal["attn", "mlp", "shared_expert", "experts"]

_SITE_PREFIX = {
    "attn": "self_attn",
    "mlp": "mlp",
    "shared_expert": "mlp.shared_expert",
    "experts": "mlp.experts",
}

_KEY_RE = re.compile(
    r"^layers\.(?P<layer>\d+)\.(?P<prefix>self_attn|mlp\.shared_expert|mlp\.experts|mlp)\."
    r"(?P<target>[a-z_]+)\.(?P<factor>lora_A|lora_B)$"
)
_PREFIX_SITE = {v: k for k, v in _SITE_PREFIX.items()}


class LoraConfig(BaseModel):
    """The LoRA shape of one job or adapter revision."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(default=1, ge=1, le=256)
    """Rank r of every factor pair."""
    alpha: float = Field(default=32.0, gt=0)
    """Scale numerator: the update is (alpha / rank) * B @ A."""
    targets: tuple[str, ...] = ALL_TARGETS
    """Module names; MLP names apply to dense MLPs, shared experts and every routed expert."""
    init: Literal["standard", "olora_tail"] = "standard"
    """standard: A random, B zero. olora_tail: A from the weight's smallest singular directions."""

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [t for t in value if t not in ALL_TARGETS]
        if unknown or not value:
            raise ValueError(f"targets must be a non-empty subset of {list(ALL_TARGETS)}; got {list(value)}")
        return tuple(dict.fromkeys(value))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def adapter_key(layer: int, site: Site, target: str, factor: Factor) -> str:
    return f"layers.{layer}.{_SITE_PREFIX[site]}.{target}.{factor}"


def parse_adapter_key(key: str) -> tuple[int, Site, str, Factor]:
    """Inverse of :func:`adapter_key`; raises ``ValueError`` on a name outside the contract."""
    match = _KEY_RE.match(key)
    if match is None or match["target"] not in ALL_TARGETS:
        raise ValueError(f"not an adapter tensor name: {key!r}")
    site = _PREFIX_SITE[match["prefix"]]
    return int(match["layer"]), site, match["target"], match["factor"]  # type: ignore[return-value]
