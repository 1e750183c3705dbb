from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.adapters_store.objectstore import ObjectStore, make_object_store
from lorafleet.platform.config import Settings
from lorafleet.platform.db import make_engine, make_sessionmaker, models, transaction
from lorafleet.platform.domain.datasets import validate_jsonl
from lorafleet.platform.domain.ids import new_id
from lorafleet.platform.queue import make_job_queue
from lorafleet.services.api import bootstrap
from lorafleet.services.api.routes.jobs import JobCreate, create_job_row
from lorafleet.services.trainer.bases import register_base_model
from lorafleet.services.trainer.worker import JOBS_QUEUE, TrainerWorker

BASE = "tiny-moe"


@dataclass
class TrainerEnv:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ObjectStore
    tenant_id: str

    def upload(self, rows: list[dict[str, Any]]) -> str:
        data = "\n".join(json.dumps(r) for r in rows).encode()
        report = validate_jsonl(data)
        assert report.ok, report.errors
        file_id = new_id("file")
        key = f"files/{self.tenant_id}/{file_id}.jsonl"
        self.store.put_bytes(key, data)
        with transaction(self.sessions) as s:
            s.add(models.FileRow(id=file_id, tenant_id=self.tenant_id, filename="d.jsonl", purpose="fine-tune",
                                 bytes=len(data), sha256="0" * 64, status="validated", kind=report.kind,
                                 line_count=report.rows, errors=[], object_key=key))
        return file_id

    def create_job(self, **body: Any) -> str:
        body.setdefault("model", BASE)
        with transaction(self.sessions) as s:
            job, _ = create_job_row(s, tenant_id=self.tenant_id, body=JobCreate.model_validate(body), max_active=50)
            job_id = job.id
        engine = make_engine(self.settings.resolved_database_url)
        make_job_queue(self.settings, engine).enqueue(JOBS_QUEUE, {"job_id": job_id}, dedupe_key=job_id)
        engine.dispose()
        return job_id

    def worker(self, **kwargs: Any) -> TrainerWorker:
        return TrainerWorker(self.settings, **kwargs)

    def job(self, job_id: str) -> models.Job:
        with self.sessions() as s:
            row = s.get(models.Job, job_id)
            assert row is not None
            return row

    def events(self, job_id: str) -> list[models.JobEvent]:
        with self.sessions() as s:
            return list(s.scalars(select(models.JobEvent).where(models.JobEvent.job_id == job_id)
                                  .order_by(models.JobEvent.seq)))

    def run_until_done(self, worker: TrainerWorker, job_ids: list[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            worker.run_once()
            if all(self.job(j).status in ("succeeded", "failed", "cancelled") for j in job_ids):
                return
        raise AssertionError(f"jobs not finished in {timeout}s: {[self.job(j).status for j in job_ids]}")


@pytest.fixture
def make_env(tmp_path: Path, tiny_moe_path: Path) -> Iterator[Callable[..., TrainerEnv]]:
    engines = []

    def factory(**overrides: Any) -> TrainerEnv:
        settings = Settings(**({"data_dir": tmp_path / "lf"} | overrides))
        bootstrap(settings)
        engine = make_engine(settings.resolved_database_url)
        engines.append(engine)
        sessions = make_sessionmaker(engine)
        with transaction(sessions) as s:
            register_base_model(s, tiny_moe_path, model_id=BASE, max_lora_rank=8)
            tenant_id = s.scalars(select(models.Tenant.id).where(models.Tenant.name == "default")).one()
        return TrainerEnv(settings, sessions, make_object_store(settings), tenant_id)

    yield factory
    for e in engines:
        e.dispose()


@pytest.fixture
def env(make_env: Callable[..., TrainerEnv]) -> TrainerEnv:
    return make_env()
