"""The Engine seam: what the serving replica's HTTP layer and agent need of an inference engine.

Two implementations live beside this file: ``torch`` (the embedded default; continuous batching,
mixed adapters per batch) and ``vllm`` (GPU deployments). Both take adapters as committed
revisions (:class:`AdapterHandle`) and never let a base-model request run with an adapter.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from lorafleet.adapters_store import RevisionRef


class Tier(StrEnum):
    """Where an adapter's bytes are, fastest first."""

    DEVICE = "device"
    """In a slot of the running batch's adapter bank: usable by the next step."""
    HOST = "host"
    """Engine-form tensors in host memory."""
    DISK = "disk"
    """A verified bundle in the local disk cache."""
    REMOTE = "remote"
    """Only in the object store."""


@dataclass(frozen=True)
class AdapterHandle:
    """A committed adapter revision, as the serving layer resolved it from the database."""

    revision_id: str
    ref: RevisionRef
    policy: str | None = None
    """The policy name, for metric labels only."""
    tenant_id: str | None = None


class SamplingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    """0 means greedy."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    """0 means no top-k cut."""
    seed: int | None = None
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings (not included)."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    adapter: AdapterHandle | None
    """None: the plain base model, with no adapter applied to this row, whatever else is in the batch."""
    sampling: SamplingOptions
    first_request: bool = False
    """The first request to this revision after a rollout (metrics label)."""


FinishReason = Literal["stop", "length", "abort"]


@dataclass
class GenerationChunk:
    """One streamed increment. The last chunk of a request has ``finish_reason`` set."""

    token_ids: list[int]
    """Tokens generated since the previous chunk; the stop token or EOS that ended generation is
    included (and counted) but never rendered in ``text``."""
    text: str
    """Decoded text delta (stop strings already cut out). May be empty while text that could be
    the start of a stop string, or of a multi-byte character, is held back."""
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Running totals: the last chunk's are the request's usage."""
    adapter_wait_seconds: float = 0.0
    """On the first chunk: how long this request waited for its own adapter to load."""


@dataclass(frozen=True)
class ResidentAdapter:
    revision_id: str
    tier: Tier
    bytes: int
    pinned: bool
    in_flight: int


@dataclass
class LoadReport:
    revision_id: str
    tier: Tier
    seconds: dict[str, float] = field(default_factory=dict)
    """Per stage: fetch (object store -> disk), read (disk -> host), install (host -> device)."""
    already_resident: bool = False


@runtime_checkable
class Engine(Protocol):
    base_model_id: str
    tokenizer: Any
    max_context: int
    """Longest prompt + completion the engine accepts, in tokens."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def load(self, adapter: AdapterHandle, *, tier: Tier = Tier.DEVICE, pin: bool = False) -> LoadReport:
        """Make the revision resident in ``tier`` (and every slower tier); concurrent loads of one
        revision share one load. ``pin`` keeps it from eviction until :meth:`unpin`. A bundle that
        fails verification is refused with its error and nothing is installed."""
        ...

    def unpin(self, revision_id: str) -> None: ...

    async def evict(self, revision_id: str) -> None:
        """Drop the revision from every in-memory tier; refused (Conflict) while requests use it."""
        ...

    def resident(self) -> list[ResidentAdapter]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream a generation. The adapter is loaded on demand when not on the device tier (the
        wait is reported on the first chunk). Closing the iterator early aborts the request and
        frees its resources."""
        ...
