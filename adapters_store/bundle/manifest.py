"""The bundle manifest: what a packed adapter revision is, and the checksums that pin its bytes.

Strict at the boundary: unknown fields are refused (``manifest_invalid``), and a format
version this code does not know is refused with its own code before the schema is applied,
so that a newer writer's bundle fails clearly instead of as a schema error.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafleet.adapters_store.bundle.errors import RejectCode, reject
from lorafleet.platform.domain.lora import ALL_TARGETS, LoraConfig, parse_adapter_key

FORMAT_VERSION: Literal[1] = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
LAYOUT: Literal["packed-moe-v1"] = "packed-moe-v1"
MANIFEST_FILE = "manifest.json"
TENSOR_FILE = "adapter.safetensors"

BundleDtype = Literal["bfloat16", "float16", "float32"]
SAFETENSORS_DTYPE: dict[str, str] = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
"""Manifest dtype name → the dtype code safetensors writes in its header."""

ULID_PATTERN = r"^[0-9a-hjkmnp-tv-z]{26}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"


class TensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: str
    """safetensors dtype code, e.g. "BF16"."""
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]
    """Absolute [begin, end) byte offsets in adapter.safetensors (ranged reads need no header)."""


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=SHA256_PATTERN)
    bytes: int = Field(ge=0)


class BundleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = FORMAT_VERSION
    revision_id: str = Field(pattern=ULID_PATTERN)
    """The AdapterRevision id (a lower-case ULID)."""
    tenant_id: str = Field(min_length=1, max_length=100)
    policy_id: str = Field(min_length=1, max_length=100)
    base_model_id: str = Field(min_length=1, max_length=100)
    base_fingerprint: str = Field(min_length=1, max_length=128)
    """The base model's weights fingerprint; an adapter only serves on the base it was trained on."""
    rank: int = Field(ge=1, le=256)
    alpha: float = Field(gt=0)
    scaling: float
    """alpha / rank, recorded so other tools need not know the convention."""
    dtype: BundleDtype
    targets: tuple[str, ...]
    num_experts: int = Field(ge=0)
    """E of every stacked expert tensor; 0 for a dense adapter."""
    layout: Literal["packed-moe-v1"] = LAYOUT
    tensors: dict[str, TensorEntry]
    """Engine-form tensor name → where it lies in adapter.safetensors."""
    files: dict[str, FileEntry]
    """Every file of the bundle except manifest.json itself (whose sha256 the revision row records)."""
    created_at: datetime
    job_id: str | None = None
    """The training job that produced this revision (None for an import)."""
    step: int | None = Field(default=None, ge=0)

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value) or any(t not in ALL_TARGETS for t in value):
            raise ValueError(f"targets must be distinct names from {list(ALL_TARGETS)}")
        return value

    @field_validator("created_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("created_at must carry a timezone")
        return value.astimezone(UTC)

    @model_validator(mode="after")
    def _consistent(self) -> BundleManifest:
        if not math.isclose(self.scaling, self.alpha / self.rank, rel_tol=1e-9):
            raise ValueError(f"scaling {self.scaling} is not alpha / rank = {self.alpha / self.rank}")
        if set(self.files) != {TENSOR_FILE}:
            raise ValueError(f"files must list exactly {TENSOR_FILE!r}")
        for name in self.tensors:
            parse_adapter_key(name)  # ValueError names the offending tensor
        return self

    @property
    def lora(self) -> LoraConfig:
        return LoraConfig(rank=self.rank, alpha=self.alpha, targets=self.targets)

    @property
    def total_bytes(self) -> int:
        """Bytes of every file except the manifest."""
        return sum(f.bytes for f in self.files.values())

    def to_json_bytes(self) -> bytes:
        """Canonical serialisation: the revision row's sha256 is over exactly these bytes."""
        return (json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1) + "\n").encode()

    @classmethod
    def from_json_bytes(cls, data: bytes) -> BundleManifest:
        try:
            raw: Any = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise reject(RejectCode.MANIFEST_INVALID, f"manifest.json is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise reject(RejectCode.MANIFEST_INVALID, "manifest.json is not a JSON object")
        version = raw.get("format_version")
        if version not in SUPPORTED_FORMAT_VERSIONS:
            raise reject(
                RejectCode.UNSUPPORTED_FORMAT_VERSION,
                f"bundle format_version {version!r} is not one of {list(SUPPORTED_FORMAT_VERSIONS)}",
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            errors = [
                {"loc": ".".join(str(p) for p in e["loc"]), "type": e["type"], "msg": e["msg"]}
                for e in exc.errors()
            ]
            raise reject(
                RejectCode.MANIFEST_INVALID, f"manifest.json breaks the schema: {exc}", details=errors
            ) from None


def utc_now() -> datetime:
    return datetime.now(UTC)
