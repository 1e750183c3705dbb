from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.services.api.conftest import CHAT_ROWS, Platform

RL_ROWS = [{"prompt": "What is 2+2?", "answer": "4"}]


def _job(platform: Platform, file_id: str, key: str | None = None, **extra: Any) -> Any:
    body = {"model": "tiny-test-base", "training_file": file_id, "policy": "support-bot",
            "method": {"type": "supervised"}} | extra
    return platform.client.post("/v1/fine_tuning/jobs", json=body, headers=platform.headers(key))


def test_create_get_list_and_echo_concrete_hyperparameters(platform: Platform) -> None:
    f = platform.upload(CHAT_ROWS)
    r = _job(platform, f["id"], seed=7, metadata={"team": "support"},
             method={"type": "supervised", "hyperparameters": {"learning_rate": 0.01}})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["id"].startswith("ftjob-") and job["status"] == "queued" and job["seed"] == 7
    hp = job["method"]["hyperparameters"]
    assert hp["learning_rate"] == 0.01 and hp["n_epochs"] == 3 and hp["batch_size"] == 8
    assert job["lora"]["rank"] == 1 and set(job["lora"]["targets"]) >= {"q_proj", "gate_proj", "down_proj"}
    assert job["metadata"] == {"team": "support"}
    assert platform.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=platform.headers()).json() == job
    events = platform.client.get(f"/v1/fine_tuning/jobs/{job['id']}/events", headers=platform.headers()).json()
    assert [e["message"] for e in events["data"]] == ["job created and queued"]
    assert platform.client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints",
                               headers=platform.headers()).json()["data"] == []


def test_job_is_enqueued_once(platform: Platform) -> None:
    from lorafleet.platform.db import make_engine
    from lorafleet.platform.queue import make_job_queue

    f = platform.upload(CHAT_ROWS)
    job = _job(platform, f["id"], idempotency_key="k1").json()
    again = _job(platform, f["id"], idempotency_key="k1")
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    engine = make_engine(platform.settings.resolved_database_url)
    queue = make_job_queue(platform.settings, engine)
    message = queue.claim("jobs", worker="t", lease_seconds=30)
    assert message is not None and message.payload == {"job_id": job["id"]}
    assert queue.claim("jobs", worker="t", lease_seconds=30) is None
    engine.dispose()


def test_idempotency_key_reused_for_a_different_job(platform: Platform) -> None:
    f = platform.upload(CHAT_ROWS)
    assert _job(platform, f["id"], idempotency_key="k").status_code == 201
    r = _job(platform, f["id"], idempotency_key="k", policy="other")
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"


def test_list_filters_and_paginates(platform: Platform) -> None:
    f = platform.upload(CHAT_ROWS)
    ids = [_job(platform, f["id"], policy=f"p{i}").json()["id"] for i in range(3)]
    platform.client.post(f"/v1/fine_tuning/jobs/{ids[1]}/cancel", headers=platform.headers())
    page = platform.client.get("/v1/fine_tuning/jobs?limit=2", headers=platform.headers()).json()
    assert [j["id"] for j in page["data"]] == [ids[2], ids[1]] and page["has_more"]
    rest = platform.client.get(f"/v1/fine_tuning/jobs?after={page['last_id']}", headers=platform.headers()).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]]
    cancelled = platform.client.get("/v1/fine_tuning/jobs?status=cancelled", headers=platform.headers()).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[1]]
    bad = platform.client.get("/v1/fine_tuning/jobs?status=bogus", headers=platform.headers())
    assert bad.status_code == 422


def test_cancel_queued_then_again_is_a_conflict(platform: Platform) -> None:
    f = platform.upload(CHAT_ROWS)
    job = _job(platform, f["id"]).json()
    r = platform.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=platform.headers())
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    again = platform.client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel", headers=platform.headers())
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_transition"


@pytest.mark.parametrize(
    ("change", "status", "code", "param"),
    [
        ({"model": "no-such-model"}, 404, "model_not_found", "model"),
        ({"training_file": "file-nope"}, 404, "file_not_found", "training_file"),
        ({"validation_file": "file-nope"}, 404, "file_not_found", "validation_file"),
        ({"method": {"type": "supervised", "hyperparameters": {"learning_rate": -1}}}, 422,
         "invalid_request_schema", "method.supervised.hyperparameters.learning_rate"),
        ({"method": {"type": "supervised", "hyperparameters": {"n_epochs": "many"}}}, 422,
         "invalid_request_schema", "method.supervised.hyperparameters.n_epochs"),
        ({"method": {"type": "supervised", "hyperparameters": {"warp": 9}}}, 422, "invalid_request_schema",
         "method.supervised.hyperparameters.warp"),
        ({"method": {"type": "evolution"}}, 422, "invalid_request_schema", "method"),
        ({"method": {"type": "reinforcement"}}, 422, "invalid_request_schema", "method.reinforcement.grader"),
        ({"method": {"type": "dpo"}}, 400, "file_kind_mismatch", "training_file"),
        ({"lora": {"rank": 64}}, 400, "rank_exceeds_base_limit", "lora.rank"),
        ({"lora": {"rank": 1, "targets": ["lm_head"]}}, 422, "invalid_request_schema", "lora.targets"),
        ({"policy": "Bad Name!"}, 422, "invalid_request_schema", "policy"),
        ({"surprise": True}, 422, "invalid_request_schema", "surprise"),
    ],
)
def test_bad_job_requests(platform: Platform, change: dict[str, Any], status: int, code: str, param: str) -> None:
    f = platform.upload(CHAT_ROWS)
    r = _job(platform, f["id"], **change)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["param"] == param
    # nothing half-written: no job row appeared
    assert platform.client.get("/v1/fine_tuning/jobs", headers=platform.headers()).json()["data"] == []


def test_reinforcement_job_with_grader(platform: Platform) -> None:
    f = platform.upload(RL_ROWS)
    r = _job(platform, f["id"], method={"type": "reinforcement", "grader": {"type": "numeric", "tolerance": 0}})
    assert r.status_code == 201, r.text
    assert r.json()["method"]["hyperparameters"]["grader"] == {"type": "numeric", "reference_field": "answer",
                                                               "tolerance": 0.0}


def test_policy_busy_and_quota(make_platform: Callable[..., Platform]) -> None:
    platform = make_platform(max_queued_jobs_per_tenant=2)
    f = platform.upload(CHAT_ROWS)
    assert _job(platform, f["id"], policy="a").status_code == 201
    busy = _job(platform, f["id"], policy="a")
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "policy_busy"
    assert _job(platform, f["id"], policy="b").status_code == 201
    over = _job(platform, f["id"], policy="c")
    assert over.status_code == 429 and over.json()["error"]["code"] == "job_quota_exceeded"
