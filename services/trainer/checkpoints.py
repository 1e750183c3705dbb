"""Checkpoint bytes: one safetensors blob holding the adapter and optimizer tensors, with the
step and optimizer counters as JSON metadata. No pickle: tenant state never crosses one."""

from __future__ import annotations

import json
from typing import Any

from safetensors.torch import load, save
from torch import Tensor

from lorafleet.platform.domain.errors import IntegrityFailure

META_KEY = "lorafleet"


def checkpoint_key(*, tenant_id: str, job_id: str, step: int) -> str:
    return f"checkpoints/{tenant_id}/{job_id}/step-{step:07d}.safetensors"


def encode(tensors: dict[str, Tensor], meta: dict[str, Any]) -> bytes:
    return save(tensors, metadata={META_KEY: json.dumps(meta)})


def decode(data: bytes) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if len(data) < 8:
        raise IntegrityFailure("checkpoint is truncated", code="checkpoint_unreadable")
    header_len = int.from_bytes(data[:8], "little")
    try:
        metadata = json.loads(data[8: 8 + header_len]).get("__metadata__") or {}
        meta = json.loads(metadata[META_KEY])
    except (ValueError, KeyError) as exc:
        raise IntegrityFailure("checkpoint has no readable lorafleet metadata", code="checkpoint_unreadable") from exc
    return load(data), meta
