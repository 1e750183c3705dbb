"""The training worker: claims jobs from the queue, trains every claimed job of a base together,
checkpoints, honours cancellation, and exports the result as an adapter revision.

A job is held through its queue lease, extended every step. If this process dies, the lease
expires, the queue delivers the job again, and whichever trainer claims it resumes from the
last checkpoint. The revision id is fixed on the job row at first start, so however often a job
is resumed it exports one revision, committed once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.adapters_store import publish_revision, revision_prefix
from lorafleet.adapters_store.bundle.pack import BundleMeta, write_bundle
from lorafleet.adapters_store.objectstore import ObjectStore, make_object_store
from lorafleet.platform import metrics as m
from lorafleet.platform.config import Settings
from lorafleet.platform.db import make_engine, make_sessionmaker, models
from lorafleet.platform.domain.datasets import iter_rows
from lorafleet.platform.domain.enums import FileKind, JobStatus
from lorafleet.platform.domain.errors import LorafleetError
from lorafleet.platform.domain.jobs import ReinforcementMethod
from lorafleet.platform.modeling import export_adapter
from lorafleet.platform.queue import JobQueue, Message, make_job_queue
from lorafleet.services.trainer import checkpoints
from lorafleet.services.trainer.bases import ResidentBase, ResidentBases
from lorafleet.services.trainer.data import Tokenizing
from lorafleet.services.trainer.graders import make_grader
from lorafleet.services.trainer.ledger import JobLedger, JobSnapshot
from lorafleet.services.trainer.recipes import DpoRun, JobRun, ReinforcementRun, SupervisedRun
from lorafleet.services.trainer.scheduler import MultiPolicyStep, RunFailed

log = logging.getLogger(__name__)

JOBS_QUEUE = "jobs"


@dataclass
class Active:
    run: JobRun
    message: Message
    base: ResidentBase
    started: float = field(default_factory=time.perf_counter)


class TrainerWorker:
    def __init__(self, settings: Settings, *, worker_id: str | None = None, max_concurrent_jobs: int = 4,
                 sessions: sessionmaker[Session] | None = None, store: ObjectStore | None = None,
                 queue: JobQueue | None = None) -> None:
        self.settings = settings
        self.worker_id = worker_id or f"trainer-{socket.gethostname()}-{os.getpid()}"
        self.max_concurrent_jobs = max_concurrent_jobs
        engine = make_engine(settings.resolved_database_url) if sessions is None or queue is None else None
        self.sessions = sessions or make_sessionmaker(engine)  # type: ignore[arg-type]
        self.store = store or make_object_store(settings)
        self.queue = queue or make_job_queue(settings, engine)  # type: ignore[arg-type]
        self.ledger = JobLedger(self.sessions)
        self.bases = ResidentBases(self.sessions, device=settings.trainer_device)
        self.active: dict[str, Active] = {}
        self.lease = settings.job_lease_seconds

    # -- claiming ----------------------------------------------------------------------------------
    def _claim(self) -> None:
        while len(self.active) < self.max_concurrent_jobs:
            message = self.queue.claim(JOBS_QUEUE, worker=self.worker_id, lease_seconds=self.lease)
            if message is None:
                return
            job_id = str(message.payload.get("job_id", ""))
            if job_id in self.active:
                # our own lease lapsed (a slow step) and nobody else took it: this claim renews it
                self.active[job_id].message = message
                continue
            try:
                snapshot = self.ledger.start(job_id, worker=self.worker_id, resolved={})
            except LorafleetError as exc:
                log.warning("cannot start %s: %s", job_id, exc)
                self.queue.ack(message)
                continue
            if snapshot is None:  # finished or cancelled while queued
                self.queue.ack(message)
                continue
            try:
                base = self.bases.get(snapshot.base_model_id)
                run = self._build_run(snapshot, base)
                self._resume(run)
            except LorafleetError as exc:
                self._fail(snapshot.id, message, exc)
                continue
            self.queue.extend(message, lease_seconds=self.lease)  # loading the base may have taken a while
            initial = {f"initial_{k}": v for k, v in run.evaluate().items()} if run.step == 0 else {}
            self.ledger.message(job_id, f"training {run.method} for {run.total_steps} steps "
                                f"(rank {run.lora_config.rank}, from step {run.step})",
                                data={"hyperparameters": run.hp.model_dump(mode="json"), "step": run.step,
                                      **initial})
            self.active[job_id] = Active(run, message, base)
        m.TRAIN_ACTIVE_JOBS.set(len(self.active))

    def _read_rows(self, job: JobSnapshot, file_id: str | None) -> tuple[FileKind | None, list]:  # type: ignore[type-arg]
        if file_id is None:
            return None, []
        with self.sessions() as s:
            row = s.get(models.FileRow, file_id)
            if row is None or row.tenant_id != job.tenant_id or not row.object_key or not row.kind:
                raise LorafleetError(f"training data {file_id} is gone", code="file_not_found")
            key, kind = row.object_key, FileKind(row.kind)
        return kind, iter_rows(kind, self.store.get_bytes(key))

    def _build_run(self, job: JobSnapshot, base: ResidentBase) -> JobRun:
        max_len = int(job.hyperparameters.get("max_seq_len", 256))
        truncation = job.hyperparameters.get("truncation", "truncate")
        tokenizing = Tokenizing(base.tokenizer, max_len=max_len, truncation=truncation)
        _, rows = self._read_rows(job, job.training_file_id)
        _, validation = self._read_rows(job, job.validation_file_id)
        if job.method == "supervised":
            return SupervisedRun(job, model=base.model, tokenizing=tokenizing, rows=rows, validation=validation)
        if job.method == "dpo":
            return DpoRun(job, model=base.model, tokenizing=tokenizing, rows=rows, validation=validation)
        method = ReinforcementMethod.model_validate({"type": "reinforcement", "grader": job.hyperparameters["grader"]})
        return ReinforcementRun(job, model=base.model, tokenizing=tokenizing, rows=rows,
                                grader=make_grader(method.grader))

    def _resume(self, run: JobRun) -> None:
        ckpt = self.ledger.latest_checkpoint(run.job.id)
        if ckpt is None:
            return
        data = self.store.get_bytes(ckpt.object_key)
        if hashlib.sha256(data).hexdigest() != ckpt.sha256:
            raise LorafleetError(f"checkpoint {ckpt.id} does not match its checksum", code="checkpoint_corrupt")
        tensors, meta = checkpoints.decode(data)
        run.load_state(tensors, meta)

    # -- stepping ----------------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        for job_id, active in list(self.active.items()):
            if not self.queue.extend(active.message, lease_seconds=self.lease):
                log.warning("lost the lease on %s; another trainer has it", job_id)
                del self.active[job_id]

    def run_once(self) -> bool:
        """Claim what fits, then advance every active job by one step. True if anything ran."""
        self._claim()
        if not self.active:
            return False
        self._heartbeat()
        groups: dict[str, list[Active]] = {}
        for a in self.active.values():
            groups.setdefault(a.base.id, []).append(a)
        for base_id, group in groups.items():
            self._step_group(self.bases.get(base_id), group)
        m.TRAIN_ACTIVE_JOBS.set(len(self.active))
        return True

    def _step_group(self, base: ResidentBase, group: list[Active]) -> None:
        tokenizing = group[0].run.tokenizing
        stepper = MultiPolicyStep(base.model, pad_id=tokenizing.pad_id, stop_ids=[tokenizing.eos_id],
                                  max_tokens_per_pass=self.settings.trainer_max_tokens_per_pass)
        runs = [a.run for a in group]
        try:
            results = stepper.step(runs)
        except RunFailed as exc:
            self._fail(exc.job_id, self.active[exc.job_id].message, exc.error)
            return
        except torch.OutOfMemoryError as exc:
            for a in group:
                self._fail(a.run.job.id, a.message, LorafleetError(f"out of memory: {exc}", code="out_of_memory"))
            return
        for a, result in zip(group, results, strict=True):
            run = a.run
            m.TRAIN_STEP_SECONDS.labels(run.method).observe(result.seconds)
            m.TRAIN_TOKENS.labels(run.method).inc(result.tokens)
            if "reward_mean" in result.metrics:
                m.TRAIN_REWARD.labels(run.job.id).set(result.metrics["reward_mean"])
            metrics = dict(result.metrics)
            if run.done:
                metrics |= run.evaluate()
            cancel = self.ledger.progress(run.job.id, step=run.step, total_steps=run.total_steps, metrics=metrics)
            if cancel:
                self.ledger.finish(run.job.id, JobStatus.CANCELLED)
                self._drop(a)
                continue
            if run.done:
                self._export(a)
            elif run.step % run.hp.checkpoint_every == 0:
                self._checkpoint(run)

    def _checkpoint(self, run: JobRun) -> None:
        tensors, meta = run.state_tensors()
        data = checkpoints.encode(tensors, meta)
        key = checkpoints.checkpoint_key(tenant_id=run.job.tenant_id, job_id=run.job.id, step=run.step)
        self.store.put_bytes(key, data)
        stale = self.ledger.add_checkpoint(run.job, step=run.step, object_key=key,
                                           sha256=hashlib.sha256(data).hexdigest(),
                                           metrics={"step": run.step}, keep=run.hp.keep_checkpoints)
        for old in stale:
            self.store.delete(old)

    def _export(self, a: Active) -> None:
        run, job = a.run, a.run.job
        trained_at = time.perf_counter()
        try:
            # an earlier attempt of this job may have uploaded part of this very revision and died
            # before committing it: nobody can have read those objects, so they are replaced.
            prefix = revision_prefix(tenant_id=job.tenant_id, policy_id=job.policy_id, revision_id=job.revision_id)
            for info in list(self.store.list(prefix)):
                self.store.delete(info.key)
            with tempfile.TemporaryDirectory(prefix="lorafleet-export-") as tmp:
                bundle_dir = Path(tmp) / job.revision_id
                meta = BundleMeta(revision_id=job.revision_id, tenant_id=job.tenant_id, policy_id=job.policy_id,
                                  base_model_id=job.base_model_id, base_fingerprint=a.base.expected.fingerprint,
                                  job_id=job.id, step=run.step)
                write_bundle(bundle_dir, export_adapter(run.params), meta=meta, lora=run.lora_config,
                             base=a.base.expected)
                published = publish_revision(self.store, bundle_dir, base=a.base.expected)
            handoff = time.perf_counter() - trained_at
            self.ledger.commit_revision(job, uri=published.uri, sha256=published.sha256, size=published.bytes,
                                        manifest=published.manifest, rank=published.rank, step=run.step,
                                        handoff_seconds=handoff)
            m.HANDOFF_SECONDS.observe(handoff)
        except LorafleetError as exc:
            self._fail(job.id, a.message, exc)
            return
        self._drop(a)

    def _fail(self, job_id: str, message: Message, error: BaseException) -> None:
        code = getattr(error, "code", "training_error")
        details = getattr(error, "details", None) or {}
        body = {"code": code, "message": str(getattr(error, "message", error)), "step": details.get("step")}
        log.warning("job %s failed: %s", job_id, body)
        try:
            self.ledger.finish(job_id, JobStatus.FAILED, error=body)
        except LorafleetError as exc:  # already finished (cancelled meanwhile): nothing to record
            log.info("job %s not marked failed: %s", job_id, exc)
        self.queue.ack(message)
        self.active.pop(job_id, None)
        _forget_job_series(job_id)

    def _drop(self, a: Active) -> None:
        self.queue.ack(a.message)
        self.active.pop(a.run.job.id, None)
        _forget_job_series(a.run.job.id)

    # -- lifecycle ---------------------------------------------------------------------------------
    def run_forever(self, stop: threading.Event, *, idle_sleep: float = 0.5) -> None:
        log.info("trainer %s started", self.worker_id)
        while not stop.is_set():
            try:
                busy = self.run_once()
            except LorafleetError as exc:
                log.error("trainer loop error: %s", exc)
                busy = False
            if not busy:
                stop.wait(idle_sleep)
        for job_id, active in list(self.active.items()):
            self.ledger.requeue(job_id, "trainer shut down")
            self.queue.release(active.message)
        self.active.clear()

    def start_background(self) -> tuple[threading.Thread, threading.Event]:
        stop = threading.Event()
        thread = threading.Thread(target=self.run_forever, args=(stop,), name="lorafleet-trainer", daemon=True)
        thread.start()
        return thread, stop


def _forget_job_series(job_id: str) -> None:
    """Per-job series live only while the job trains, so the metric's cardinality is the number of
    active jobs, not every job this process ever ran."""
    with contextlib.suppress(KeyError):
        m.TRAIN_REWARD.remove(job_id)
