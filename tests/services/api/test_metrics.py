"""The control plane's /metrics reports fleet state read from the database at scrape time: the
queued job's age, rollouts by state, and each live replica's heartbeat age, rising while it is silent."""

from __future__ import annotations

from datetime import timedelta

from prometheus_client.parser import text_string_to_metric_families

from lorafleet.platform.db import make_engine, make_sessionmaker, models, transaction
from lorafleet.platform.domain.ids import new_ulid
from tests.services.api.conftest import CHAT_ROWS, Platform


def _samples(platform: Platform, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    r = platform.client.get("/metrics")
    assert r.status_code == 200
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(r.text)
            for s in f.samples if s.name == name}


def test_scrape_reports_queue_age_rollouts_and_heartbeat_age(platform: Platform) -> None:
    file_id = platform.upload(list(CHAT_ROWS))["id"]
    r = platform.client.post("/v1/fine_tuning/jobs", headers=platform.headers(), json={
        "model": "tiny-test-base", "training_file": file_id, "policy": "support-bot",
        "method": {"type": "supervised"}})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    engine = make_engine(platform.settings.resolved_database_url)
    sessions = make_sessionmaker(engine)
    try:
        with transaction(sessions) as s:
            job = s.get(models.Job, job_id)
            assert job is not None
            job.created_at = models.utcnow() - timedelta(hours=1)
            policy = models.Policy(id=new_ulid(), tenant_id=job.tenant_id, name="support-bot",
                                   base_model_id="tiny-test-base")
            s.add(policy)
            s.flush()
            s.add(models.Rollout(id=new_ulid(), tenant_id=job.tenant_id, policy_id=policy.id,
                                 revision_id=new_ulid(), state="warming"))
            s.add(models.Replica(id="serve-silent", role="serving", state="up",
                                 heartbeat_at=models.utcnow() - timedelta(seconds=120)))

        [age] = _samples(platform, "lorafleet_job_queue_oldest_age_seconds").values()
        assert 3600 <= age < 3700
        assert _samples(platform, "lorafleet_jobs")[(("state", "queued"),)] == 1
        rollouts = _samples(platform, "lorafleet_rollouts")
        assert rollouts[(("state", "warming"),)] == 1 and rollouts[(("state", "serving"),)] == 0
        key = (("replica", "serve-silent"), ("role", "serving"))
        first = _samples(platform, "lorafleet_replica_heartbeat_age_seconds")[key]
        assert 120 <= first < 180

        # nobody writes the row: the next scrape reports it older (time moved on, simulated here)
        with transaction(sessions) as s:
            s.get(models.Replica, "serve-silent").heartbeat_at -= timedelta(minutes=5)  # type: ignore[union-attr]
        assert _samples(platform, "lorafleet_replica_heartbeat_age_seconds")[key] >= first + 300

        # a replica that stopped on purpose is not a lost heartbeat
        with transaction(sessions) as s:
            s.get(models.Replica, "serve-silent").state = "down"  # type: ignore[union-attr]
        assert key not in _samples(platform, "lorafleet_replica_heartbeat_age_seconds")
    finally:
        engine.dispose()
