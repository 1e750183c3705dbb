"""Job lifecycle on the trainer: REST end to end, cancel, failures, and crash recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select

from lorafleet.adapters_store import RevisionRef, download_revision, verify_bundle
from lorafleet.platform import metrics
from lorafleet.platform.db import models
from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.lora import LoraConfig
from lorafleet.platform.modeling import load_base_model, new_adapter_params
from lorafleet.platform.modeling.tiny_moe.demo_task import COLOR_PICK_PROMPTS
from lorafleet.services.api import create_app
from lorafleet.services.trainer.data import Tokenizing
from lorafleet.services.trainer.ledger import JobSnapshot
from lorafleet.services.trainer.recipes import SupervisedRun
from lorafleet.services.trainer.scheduler import MultiPolicyStep, RunFailed
from tests.services.trainer.conftest import TrainerEnv
from tests.services.trainer.helpers import revision_tensors

ROWS = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "blue"}]}
        for p in COLOR_PICK_PROMPTS]


def test_whole_path_over_rest(env: TrainerEnv, tmp_path: Path) -> None:
    key = env.settings.admin_key_path.read_text().strip()
    h = {"Authorization": f"Bearer {key}"}
    worker = env.worker()
    thread, stop = worker.start_background()
    try:
        with TestClient(create_app(env.settings)) as client:
            data = "\n".join(__import__("json").dumps(r) for r in ROWS).encode()
            f = client.post("/v1/files", files={"file": ("d.jsonl", data)}, headers=h).json()
            assert f["status"] == "validated"
            job = client.post("/v1/fine_tuning/jobs", headers=h, json={
                "model": "tiny-moe", "training_file": f["id"], "policy": "blue-bot",
                "method": {"type": "supervised", "hyperparameters": {"n_epochs": 2, "batch_size": 3}}}).json()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                got = client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=h).json()
                if got["status"] in ("succeeded", "failed", "cancelled"):
                    break
                time.sleep(0.2)
            assert got["status"] == "succeeded", got
            assert got["progress"]["step"] == got["progress"]["total_steps"] == 4
            events = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=h).json()["data"]
            kinds = [e["type"] for e in events]
            assert kinds.count("metrics") == 4 and "loss" in events[-2]["data"]
            assert events[-1]["data"]["status"] == "succeeded"
            revisions = client.get("/v1/policies/blue-bot/revisions", headers=h).json()["data"]
            assert len(revisions) == 1 and revisions[0]["serving"] and revisions[0]["job_id"] == job["id"]
            assert revisions[0]["handoff_seconds"] > 0
            assert got["result_revision"] == revisions[0]["id"]
            policy = client.get("/v1/policies/blue-bot", headers=h).json()
            assert policy["serving_revision"] == revisions[0]["id"]
    finally:
        stop.set()
        thread.join(timeout=30)
    rev = revisions[0]
    dest = tmp_path / "check"
    download_revision(env.store, RevisionRef(revision_id=rev["id"], uri=rev["uri"], manifest_sha256=rev["sha256"]),
                      dest)
    manifest = verify_bundle(dest, base=worker.bases.get("tiny-moe").expected)
    assert manifest.rank == 1 and manifest.job_id == job["id"]


def test_cancel_stops_within_a_step_and_keeps_the_checkpoint(env: TrainerEnv) -> None:
    job_id = env.create_job(training_file=env.upload(ROWS), policy="c", method={
        "type": "supervised", "hyperparameters": {"n_epochs": 50, "batch_size": 2, "checkpoint_every": 2}})
    worker = env.worker()
    while env.job(job_id).progress.get("step", 0) < 3:
        worker.run_once()
    with env.sessions() as s, s.begin():
        s.get(models.Job, job_id).cancel_requested = True  # what POST .../cancel does for a running job
    step_at_cancel = env.job(job_id).progress["step"]
    worker.run_once()
    job = env.job(job_id)
    assert job.status == "cancelled" and job.progress["step"] == step_at_cancel + 1
    with env.sessions() as s:
        ckpts = list(s.scalars(select(models.Checkpoint).where(models.Checkpoint.job_id == job_id)))
        revisions = list(s.scalars(select(models.AdapterRevision)))
    assert [c.step for c in ckpts] == [2] and env.store.exists(ckpts[0].object_key)
    assert revisions == []
    assert not worker.active


def test_row_too_long_fails_the_job_with_its_code(env: TrainerEnv) -> None:
    long = [{"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]}]
    job_id = env.create_job(training_file=env.upload(long), policy="long", method={
        "type": "supervised", "hyperparameters": {"max_seq_len": 64, "truncation": "reject"}})
    env.run_until_done(env.worker(), [job_id], timeout=60)
    job = env.job(job_id)
    assert job.status == "failed" and job.error["code"] == "row_too_long"
    with env.sessions() as s:
        assert list(s.scalars(select(models.AdapterRevision))) == []


def test_non_finite_loss_names_the_step(tiny_moe_path: Path) -> None:
    model, spec, tok = load_base_model(tiny_moe_path)
    job = JobSnapshot(id="ftjob-x", tenant_id="t", base_model_id="b", method="supervised",
                      hyperparameters={"batch_size": 2}, lora=LoraConfig().model_dump(mode="json"), policy_name="p",
                      training_file_id="f", validation_file_id=None, seed=0, attempts=1, auto_rollout=False,
                      policy_id="pol", revision_id="r")
    from lorafleet.platform.domain.datasets import ChatRow

    run = SupervisedRun(job, model=model, tokenizing=Tokenizing(tok, max_len=64, truncation="truncate"),
                        rows=[ChatRow.model_validate(r) for r in ROWS], validation=[])
    with torch.no_grad():
        next(iter(run.params.parameters())).fill_(float("nan"))
    with pytest.raises(RunFailed) as info:
        MultiPolicyStep(model, pad_id=tok.pad_token_id, stop_ids=[tok.eos_token_id]).step([run])
    assert info.value.job_id == "ftjob-x"
    assert info.value.error.code == "loss_not_finite" and info.value.error.details["step"] == 1


def test_olora_tail_init_is_selectable(env: TrainerEnv) -> None:
    job_id = env.create_job(training_file=env.upload(ROWS), policy="olora", lora={"rank": 2, "init": "olora_tail"},
                            method={"type": "supervised", "hyperparameters": {"n_epochs": 1, "batch_size": 6}})
    env.run_until_done(env.worker(), [job_id], timeout=60)
    assert env.job(job_id).status == "succeeded"


@pytest.mark.slow
def test_kill_9_mid_job_resumes_from_checkpoint_and_exports_once(env: TrainerEnv, tmp_path: Path) -> None:
    hp = {"n_epochs": 12, "batch_size": 2, "checkpoint_every": 5, "learning_rate": 0.01}
    files = env.upload(ROWS)
    crashed = env.create_job(training_file=files, policy="crash", seed=9, method={"type": "supervised",
                                                                                  "hyperparameters": hp})
    envvars = dict(os.environ, LORAFLEET_DATA_DIR=str(env.settings.data_dir), LORAFLEET_JOB_LEASE_SECONDS="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorafleet.services.cli.main", "trainer", "--no-probes"],
        env=envvars,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "trainer.log").open("wb"),
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with env.sessions() as s:
                if s.scalars(select(models.Checkpoint).where(models.Checkpoint.job_id == crashed,
                                                             models.Checkpoint.step >= 10)).first():
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("no checkpoint written by the subprocess trainer: "
                                 + (tmp_path / "trainer.log").read_text()[-3000:])
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    step_at_kill = env.job(crashed).progress["step"]
    assert env.job(crashed).status == "running" and step_at_kill < 36

    time.sleep(2.5)  # the dead trainer's lease expires
    worker = env.worker()
    worker.lease = 2
    env.run_until_done(worker, [crashed], timeout=300)
    job = env.job(crashed)
    assert job.status == "succeeded" and job.attempts == 2
    assert any("resumed" in e.message for e in env.events(crashed))
    with env.sessions() as s:
        revisions = list(s.scalars(select(models.AdapterRevision).where(models.AdapterRevision.job_id == crashed)))
    assert len(revisions) == 1
    prefixes = {info.key.rsplit("/", 2)[0] for info in env.store.list("adapters/")}
    assert len(prefixes) == 1

    # the resumed run ends exactly where an uninterrupted one does
    clean = env.create_job(training_file=files, policy="clean", seed=9, method={"type": "supervised",
                                                                                "hyperparameters": hp})
    env.run_until_done(env.worker(), [clean], timeout=300)
    with env.sessions() as s:
        clean_rev = s.scalars(select(models.AdapterRevision).where(models.AdapterRevision.job_id == clean)).one()
    a = revision_tensors(env.store, revisions[0], tmp_path / "a")[0]
    b = revision_tensors(env.store, clean_rev, tmp_path / "b")[0]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_spec_of_tiny_moe_is_a_moe(tiny_moe_path: Path) -> None:
    import json

    spec = ArchitectureSpec.from_hf_config(json.loads((tiny_moe_path / "config.json").read_text()))
    assert spec.is_moe and spec.num_experts >= 8
    params = new_adapter_params(spec, LoraConfig(), seed=0)
    assert any(k.startswith("layers.0.mlp.experts.") for k in params.keys())


def test_auto_rollout_requests_a_rollout_of_a_later_revision(env: TrainerEnv) -> None:
    hp = {"type": "supervised", "hyperparameters": {"n_epochs": 1, "batch_size": 6}}
    files = env.upload(ROWS)
    first = env.create_job(training_file=files, policy="auto", method=hp, auto_rollout=True)
    env.run_until_done(env.worker(), [first], timeout=60)
    second = env.create_job(training_file=files, policy="auto", method=hp, auto_rollout=True)
    env.run_until_done(env.worker(), [second], timeout=60)
    with env.sessions() as s:
        rollouts = list(s.scalars(select(models.Rollout)))
        policy = s.scalars(select(models.Policy).where(models.Policy.name == "auto")).one()
    # the first revision served at once (nothing to protect); the second waits for its rollout
    assert policy.serving_revision_id == env.job(first).result_revision_id
    assert [(r.revision_id, r.state) for r in rollouts] == [(env.job(second).result_revision_id, "pending")]
    assert any("auto rollout" in e.message for e in env.events(second))


def test_reward_series_lives_only_while_its_job_trains(env: TrainerEnv) -> None:
    rows = [{"prompt": p, "answer": "purple"} for p in COLOR_PICK_PROMPTS]
    job_id = env.create_job(training_file=env.upload(rows), policy="rl-series", method={
        "type": "reinforcement", "grader": {"type": "string_check", "operation": "eq"},
        "hyperparameters": {"steps": 3, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 2}})
    worker = env.worker()
    seen = None
    deadline = time.monotonic() + 120
    while seen is None and time.monotonic() < deadline:
        worker.run_once()
        seen = metrics.REGISTRY.get_sample_value("lorafleet_train_reward_mean", {"job": job_id})
    assert seen is not None and 0.0 <= seen <= 1.0
    env.run_until_done(worker, [job_id], timeout=120)
    assert env.job(job_id).status == "succeeded", env.job(job_id).error
    assert metrics.REGISTRY.get_sample_value("lorafleet_train_reward_mean", {"job": job_id}) is None
