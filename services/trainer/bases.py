"""Base models: registering a local Hugging Face directory, and keeping loaded bases resident."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.adapters_store import ExpectedBase
from lorafleet.platform.db import models, transaction
from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.errors import InvalidRequest, NotFound
from lorafleet.platform.modeling import CausalLM, fingerprint, load_base_model, read_spec

DEFAULT_MAX_LORA_RANK = 64


def register_base_model(session: Session, path: Path, *, model_id: str | None = None,
                        max_lora_rank: int = DEFAULT_MAX_LORA_RANK) -> models.BaseModelRow:
    """Record (or refresh) a base model row for a local directory. Idempotent per id."""
    path = path.resolve()
    spec, _ = read_spec(path)
    model_id = model_id or path.name
    row = session.get(models.BaseModelRow, model_id)
    if row is None:
        row = models.BaseModelRow(id=model_id)
        session.add(row)
    row.architecture = spec.model_type
    row.path = str(path)
    row.fingerprint = fingerprint(path)
    row.max_lora_rank = max_lora_rank
    row.is_moe = spec.is_moe
    row.num_experts = spec.num_experts
    row.config = {"spec": spec.model_dump(mode="json")}
    return row


@dataclass
class ResidentBase:
    id: str
    model: CausalLM
    spec: ArchitectureSpec
    tokenizer: Any
    expected: ExpectedBase


class ResidentBases:
    """Loads each base once per process and keeps it; its weights are never written."""

    def __init__(self, sessions: sessionmaker[Session], *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        self.sessions = sessions
        self.device = device
        self.dtype = dtype
        self._loaded: dict[str, ResidentBase] = {}
        self._lock = threading.Lock()

    def get(self, base_id: str) -> ResidentBase:
        with self._lock:
            if base_id in self._loaded:
                return self._loaded[base_id]
            with transaction(self.sessions) as s:
                row = s.get(models.BaseModelRow, base_id)
                if row is None:
                    raise NotFound(f"no base model {base_id!r}", code="model_not_found")
                path, fp, max_rank = Path(row.path), row.fingerprint, row.max_lora_rank
            model, spec, tokenizer = load_base_model(path, dtype=self.dtype, device=self.device)
            if tokenizer is None:
                raise InvalidRequest(f"base model {base_id} has no tokenizer", code="tokenizer_unusable")
            for p in model.parameters():
                p.requires_grad_(False)
            base = ResidentBase(base_id, model, spec, tokenizer,
                                ExpectedBase(spec=spec, fingerprint=fp, max_lora_rank=max_rank))
            self._loaded[base_id] = base
            return base
