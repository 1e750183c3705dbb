"""The rollout controller against real serving replicas: two ``lorafleet serve`` processes over a
small MoE base, PostgreSQL, a local object store, the control-plane API.

Each test uses its own policy, so the tests do not depend on each other's pointers; they share
the replicas (starting them is the expensive part). The one that kills a replica runs last.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from lorafleet.platform.db import models
from lorafleet.platform.events import InProcessBus
from lorafleet.services.api import create_app
from lorafleet.services.rollout import ControllerOptions, start_background
from tests.services.rollout._fleet import (
    Answer,
    Fleet,
    build_fleet,
    eventually,
    fresh_database,
    random_moe_base,
    with_chat_template,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TERMINAL = ("serving", "failed", "cancelled")


@pytest.fixture(scope="module")
def base_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny-moe (built once per machine and cached); ``LORAFLEET_TEST_ROLLOUT_BASE=random`` swaps in a
    random base of the same architecture for quick local runs."""
    if os.environ.get("LORAFLEET_TEST_ROLLOUT_BASE") == "random":
        return random_moe_base(tmp_path_factory.mktemp("rollout-random-base"))
    raw: Path = request.getfixturevalue("tiny_moe_path")
    return with_chat_template(raw, tmp_path_factory.mktemp("rollout-base-tpl"))


@pytest.fixture(scope="module")
def fleet(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("fleet")
    with fresh_database() as url:
        f = build_fleet(url, work, base_dir)
        try:
            f.start_replicas("rep-a", "rep-b")
            yield f
        finally:
            f.stop()
            f.sessions.kw["bind"].dispose()


@pytest.fixture(scope="module")
def api(fleet: Fleet) -> Iterator[TestClient]:
    with TestClient(create_app(fleet.settings)) as client:
        yield client


def train(fleet: Fleet) -> dict[str, str]:
    return {"Authorization": f"Bearer {fleet.train_key}"}


def options(fleet: Fleet, **overrides: Any) -> ControllerOptions:
    values: dict[str, Any] = {
        "rollout_admin_key": fleet.admin_key,
        "rollout_poll_seconds": 0.1,
        "rollout_lease_seconds": 2.0,
        "rollout_reconcile_seconds": 0.5,
        "rollout_heartbeat_timeout_seconds": 10.0,
        "rollout_call_timeout_seconds": 30.0,
        "rollout_keep_warm_seconds": 3600.0,
        "rollout_timeout_seconds": 60.0,
    }
    return ControllerOptions(**(values | overrides))


@contextmanager
def controller(
    fleet: Fleet, bus: InProcessBus | None = None, **overrides: Any
) -> Iterator[ControllerOptions]:
    opts = options(fleet, **overrides)
    thread, stop = start_background(fleet.settings, bus=bus or InProcessBus(), options=opts)
    try:
        yield opts
    finally:
        stop()
        thread.join(timeout=30)
        assert not thread.is_alive()


def start_rollout(api: TestClient, fleet: Fleet, policy: str, body: dict[str, Any]) -> str:
    r = api.post(f"/v1/policies/{policy}/rollouts", json=body, headers=train(fleet))
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def wait_done(
    api: TestClient, fleet: Fleet, policy: str, rollout_id: str, timeout: float = 60
) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        view = api.get(f"/v1/policies/{policy}/rollouts/{rollout_id}", headers=train(fleet)).json()
        return view if view["state"] in TERMINAL else None

    return eventually(done, timeout=timeout, what=f"rollout {rollout_id} to finish", every=0.1)  # type: ignore[no-any-return]


def pinned(fleet: Fleet, replica: str, revision: str) -> bool:
    entry = fleet.replicas[replica].resident(fleet.admin_key).get(revision)
    return bool(entry and entry["pinned"])


def test_rollout_reaches_serving_then_rollback_is_a_flip_with_no_load(fleet: Fleet, api: TestClient) -> None:
    policy_id, r0 = fleet.new_policy("chat")
    replicas = [fleet.replicas["rep-a"], fleet.replicas["rep-b"]]
    for rp in replicas:  # users of the old revision: it loads on their first request (the lazy way)
        assert rp.chat(fleet.infer_key, "chat").revision == r0
    r1 = fleet.publish(policy_id)
    waited_before = sum(rp.metric("lorafleet_user_visible_adapter_load_seconds_sum") for rp in replicas)

    answers: list[Answer] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            for rp in replicas:
                answers.append(rp.chat(fleet.infer_key, "chat"))

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        with controller(fleet):
            time.sleep(0.3)
            rollout_id = start_rollout(
                api, fleet, "chat", {"revision": r1, "smoke": {"prompt": "hello", "max_tokens": 4}}
            )
            view = wait_done(api, fleet, "chat", rollout_id)
            observed = time.time()
            time.sleep(0.5)
    finally:
        stop.set()
        sender.join(timeout=30)

    assert view["state"] == "serving", view
    assert view["from_revision"] == r0 and view["targets"] == ["rep-a", "rep-b"] and view["required"] == 2
    assert [p["phase"] for p in view["progress"]] == ["ready", "ready"]
    assert all(p["smoke_output"] is not None and p["load_seconds"] for p in view["progress"])
    assert (
        view["stage_seconds"]["warming"] > 0
        and view["stage_seconds"]["total"] >= view["stage_seconds"]["warming"]
    )
    policy = fleet.policy(policy_id)
    assert (policy.serving_revision_id, policy.previous_revision_id) == (r1, r0)

    flip_at = fleet.flips(policy_id)[-1].created_at.timestamp()  # written inside the flip transaction
    assert all(a.status == 200 for a in answers), [a.text for a in answers if a.status != 200][:3]
    before = [a for a in answers if a.ended < flip_at]
    after = [a for a in answers if a.started > observed]
    assert before and after, (len(before), len(after))
    assert {a.revision for a in before} == {r0}, "a request saw the new revision before the flip"
    assert {a.revision for a in after} == {r1}, "a request after the flip did not see the new revision"
    assert {a.revision for a in answers} == {r0, r1}
    waited = (
        sum(rp.metric("lorafleet_user_visible_adapter_load_seconds_sum") for rp in replicas) - waited_before
    )
    assert waited < 0.05, f"requests waited {waited:.3f}s on adapter loads during the rollout"
    for name in ("rep-a", "rep-b"):  # the new revision and the previous one are pinned on the device tier
        resident = fleet.replicas[name].resident(fleet.admin_key)
        assert resident[r1]["tier"] == "device" and resident[r1]["pinned"]
        assert resident[r0]["tier"] == "device" and resident[r0]["pinned"]

    loads = sum(rp.metric("lorafleet_adapter_load_seconds_count") for rp in replicas)
    waited_before = sum(rp.metric("lorafleet_user_visible_adapter_load_seconds_sum") for rp in replicas)
    r = api.post("/v1/policies/chat/rollback", json={}, headers=train(fleet))
    assert r.status_code == 200, r.text
    assert r.json()["to_revision"] == r0 and r.json()["rolled_back_rollout"] == rollout_id
    for rp in replicas:  # visible to the very next request, served from memory
        answer = rp.chat(fleet.infer_key, "chat")
        assert (answer.status, answer.revision) == (200, r0)
    assert sum(rp.metric("lorafleet_adapter_load_seconds_count") for rp in replicas) == loads, (
        "rollback loaded"
    )
    assert (
        sum(rp.metric("lorafleet_user_visible_adapter_load_seconds_sum") for rp in replicas) - waited_before
        < 0.01
    )
    assert fleet.rollout(rollout_id).state == "rolled_back"


def test_smoke_failure_fails_the_rollout_and_leaves_the_pointer(fleet: Fleet, api: TestClient) -> None:
    policy_id, r0 = fleet.new_policy("smoky")
    r1 = fleet.publish(policy_id)
    with controller(fleet):
        rollout_id = start_rollout(
            api,
            fleet,
            "smoky",
            {
                "revision": r1,
                "smoke": {"prompt": "hello", "expect": "§ never in any answer §", "max_tokens": 4},
            },
        )
        view = wait_done(api, fleet, "smoky", rollout_id)
        assert view["state"] == "failed", view
        assert view["error"]["code"] == "smoke_failed" and view["error"]["replica"] in ("rep-a", "rep-b")
        # the first failure ends the rollout ("all" targets must pass); the other may be cut short
        failing = {p["replica"]: p for p in view["progress"]}[view["error"]["replica"]]
        assert failing["phase"] == "failed" and failing["error"]["code"] == "smoke_failed"
        assert failing["smoke_output"] is not None
        for name in ("rep-a", "rep-b"):  # the revision it loaded is unpinned again
            eventually(lambda n=name: not pinned(fleet, n, r1), timeout=10, what=f"unpin on {name}")
    policy = fleet.policy(policy_id)
    assert (policy.serving_revision_id, policy.previous_revision_id) == (r0, None)
    assert fleet.flips(policy_id) == []
    assert fleet.replicas["rep-a"].chat(fleet.infer_key, "smoky").revision == r0


def test_corrupted_bundle_fails_the_rollout_and_replicas_keep_serving(fleet: Fleet, api: TestClient) -> None:
    policy_id, r0 = fleet.new_policy("corrupt")
    r1 = fleet.publish(policy_id)
    fleet.corrupt(r1)
    with controller(fleet):
        rollout_id = start_rollout(api, fleet, "corrupt", {"revision": r1})
        view = wait_done(api, fleet, "corrupt", rollout_id)
    assert view["state"] == "failed", view
    failing = {p["replica"]: p for p in view["progress"]}[view["error"]["replica"]]
    assert failing["phase"] == "failed" and failing["error"]["status"] == 500, (
        failing
    )  # refused at verification
    assert view["error"]["code"] == failing["error"]["code"] not in ("rollout_timeout", "replica_lost")
    assert fleet.policy(policy_id).serving_revision_id == r0
    for rp in fleet.replicas.values():
        answer = rp.chat(fleet.infer_key, "corrupt")
        assert (answer.status, answer.revision) == (200, r0)
        assert r1 not in rp.resident(fleet.admin_key) or not pinned(fleet, rp.id, r1)


def test_pins_are_released_after_the_keep_warm_window(fleet: Fleet, api: TestClient) -> None:
    policy_id, r0 = fleet.new_policy("brief")
    r1 = fleet.publish(policy_id)
    for rp in fleet.replicas.values():  # r0 is serving traffic, so it is resident where it will be kept
        assert rp.chat(fleet.infer_key, "brief").revision == r0
    with controller(fleet, rollout_keep_warm_seconds=1.5, rollout_reconcile_seconds=0.3):
        view = wait_done(api, fleet, "brief", start_rollout(api, fleet, "brief", {"revision": r1}))
        assert view["state"] == "serving"
        assert pinned(fleet, "rep-a", r1) and pinned(fleet, "rep-a", r0)  # within the window
        for name in ("rep-a", "rep-b"):
            eventually(
                lambda n=name: not pinned(fleet, n, r1) and not pinned(fleet, n, r0),
                timeout=15,
                what=f"pins released on {name}",
            )
    # unpinned is not evicted: still resident, still served from memory
    assert fleet.replicas["rep-b"].resident(fleet.admin_key)[r1]["tier"] == "device"


def test_cancel_stops_the_controller_and_unpins(fleet: Fleet, api: TestClient) -> None:
    policy_id, r0 = fleet.new_policy("cancel")
    r1 = fleet.publish(policy_id)
    rep_b = fleet.replicas["rep-b"]
    with controller(fleet):
        rep_b.pause()  # its warm hangs, so the rollout stays in flight until cancelled
        try:
            rollout_id = start_rollout(api, fleet, "cancel", {"revision": r1})
            eventually(lambda: fleet.rollout(rollout_id).replica_states.get("rep-a", {}).get("phase") == "ready",
                       timeout=10, what="rep-a to be warmed")
            r = api.post(f"/v1/policies/cancel/rollouts/{rollout_id}/cancel", headers=train(fleet))
            assert r.status_code == 200 and r.json()["state"] == "cancelled"
            eventually(lambda: not pinned(fleet, "rep-a", r1), timeout=10, what="unpin on rep-a")
            eventually(lambda: fleet.rollout(rollout_id).lease_owner is None, timeout=10, what="lease release")
        finally:
            rep_b.resume()
    row = fleet.rollout(rollout_id)
    assert row.state == "cancelled" and row.error == {"code": "cancelled", "message": "cancelled by request"}
    assert fleet.policy(policy_id).serving_revision_id == r0 and fleet.flips(policy_id) == []


def test_controller_killed_mid_rollout_is_resumed_by_another(fleet: Fleet, api: TestClient) -> None:
    """Controller A (a process) warms rep-a, while rep-b hangs; A is SIGKILLed. Controller B takes
    the rollout over once A's lease expires, keeps rep-a's progress, warms rep-b, flips."""
    policy_id, r0 = fleet.new_policy("crash")
    r1 = fleet.publish(policy_id)
    rep_b = fleet.replicas["rep-b"]
    env = fleet.env(
        LORAFLEET_DATA_DIR=str(fleet.settings.data_dir),
        LORAFLEET_ROLLOUT_CONTROLLER_ID="ctl-a",
        LORAFLEET_ROLLOUT_LEASE_SECONDS="2",
        LORAFLEET_ROLLOUT_POLL_SECONDS="0.1",
        LORAFLEET_ROLLOUT_HEARTBEAT_TIMEOUT_SECONDS="30",
    )
    code = (
        "from lorafleet.platform.config import load_settings\n"
        "from lorafleet.services.rollout import run_controller\n"
        "run_controller(load_settings())\n"
    )
    rep_b.pause()
    ctl_a: subprocess.Popen[bytes] | None = None
    try:
        rollout_id = start_rollout(api, fleet, "crash", {"revision": r1})
        ctl_a = subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            cwd=fleet.work,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def a_warmed_rep_a() -> bool:
            row = fleet.rollout(rollout_id)
            phases = {k: v["phase"] for k, v in row.replica_states.items()}
            return (
                row.lease_owner == "ctl-a"
                and phases.get("rep-a") == "ready"
                and phases.get("rep-b") == "loading"
            )

        eventually(a_warmed_rep_a, timeout=30, what="controller A to warm rep-a", every=0.05)
        os.kill(ctl_a.pid, signal.SIGKILL)
        ctl_a.wait(timeout=10)
    finally:
        rep_b.resume()
        if ctl_a is not None and ctl_a.poll() is None:
            ctl_a.kill()
    row = fleet.rollout(rollout_id)
    assert row.state == "warming" and row.lease_owner == "ctl-a"  # left as it was: nothing lost
    assert fleet.policy(policy_id).serving_revision_id == r0

    with controller(fleet, rollout_controller_id="ctl-b"):
        view = wait_done(api, fleet, "crash", rollout_id)
    assert view["state"] == "serving", view
    assert view["drivers"] == ["ctl-a", "ctl-b"]
    assert {p["replica"]: p["phase"] for p in view["progress"]} == {"rep-a": "ready", "rep-b": "ready"}
    assert {p["replica"]: p["attempts"] for p in view["progress"]}["rep-a"] == 1  # not warmed again by B
    flips = fleet.flips(policy_id)
    assert len(flips) == 1 and flips[0].data["controller"] == "ctl-b"  # type: ignore[index]
    assert fleet.policy(policy_id).serving_revision_id == r1


def test_two_controllers_never_drive_the_same_rollout(fleet: Fleet, api: TestClient) -> None:
    """Three rollouts, two controllers polling together: each rollout is driven by exactly one
    (the drivers recorded; and every driver mints its own smoke key, each rollout has one) and
    flips exactly once."""
    rollouts: dict[str, tuple[str, str]] = {}
    for i in range(3):
        policy_id, _ = fleet.new_policy(f"duo-{i}")
        rollouts[f"duo-{i}"] = (
            policy_id,
            start_rollout(
                api,
                fleet,
                f"duo-{i}",
                {"revision": fleet.publish(policy_id), "smoke": {"prompt": "hi", "max_tokens": 2},
                 "replicas": {"count": 1} if i == 0 else "all"},
            ),
        )
    with controller(fleet, rollout_controller_id="ctl-x"), controller(fleet, rollout_controller_id="ctl-y"):
        views = {name: wait_done(api, fleet, name, rid) for name, (_, rid) in rollouts.items()}
    assert {v["state"] for v in views.values()} == {"serving"}
    assert all(len(v["drivers"]) == 1 for v in views.values()), [v["drivers"] for v in views.values()]
    assert len(views["duo-0"]["targets"]) == 1 and views["duo-0"]["required"] == 1  # {"count": 1}
    assert views["duo-1"]["targets"] == ["rep-a", "rep-b"]
    drivers = set()
    with fleet.sessions() as s:
        for name, (policy_id, rid) in rollouts.items():
            keys = s.scalar(
                select(func.count())
                .select_from(models.ApiKey)
                .where(models.ApiKey.name == f"rollout-smoke:{rid}")
            )
            assert keys == 1, f"{name} was driven by {keys} drivers"
            unrevoked = s.scalar(
                select(func.count())
                .select_from(models.ApiKey)
                .where(models.ApiKey.name == f"rollout-smoke:{rid}", models.ApiKey.revoked_at.is_(None))
            )
            assert unrevoked == 0, "a smoke key outlived its rollout"
            flips = fleet.flips(policy_id)
            assert len(flips) == 1
            drivers.add(flips[0].data["controller"])  # type: ignore[index]
            assert [flips[0].data["controller"]] == views[name]["drivers"]  # type: ignore[index]
    assert drivers <= {"ctl-x", "ctl-y"}


def test_replica_killed_mid_warm_fails_the_rollout(fleet: Fleet, api: TestClient) -> None:
    """Runs last: it kills rep-b. The rollout fails with replica_lost; the pointer is untouched and
    rep-a, which had loaded the revision, is told to unpin it."""
    policy_id, r0 = fleet.new_policy("lost")
    r1 = fleet.publish(policy_id)
    rep_b = fleet.replicas["rep-b"]
    with controller(fleet, rollout_heartbeat_timeout_seconds=3.0, rollout_call_timeout_seconds=5.0):
        rep_b.pause()  # hangs mid-request from now on, and stops heartbeating
        rollout_id = start_rollout(api, fleet, "lost", {"revision": r1})
        eventually(
            lambda: fleet.rollout(rollout_id).replica_states.get("rep-b", {}).get("phase") == "loading",
            timeout=10,
            what="the warm of rep-b to begin",
        )
        rep_b.kill()
        view = wait_done(api, fleet, "lost", rollout_id, timeout=30)
        assert view["state"] == "failed", view
        assert view["error"]["code"] == "replica_lost" and view["error"]["replica"] == "rep-b"
        progress = {p["replica"]: p for p in view["progress"]}
        assert progress["rep-b"]["phase"] == "lost" and progress["rep-a"]["phase"] == "ready"
        eventually(lambda: not pinned(fleet, "rep-a", r1), timeout=10, what="unpin on rep-a")
    assert fleet.policy(policy_id).serving_revision_id == r0
    answer = fleet.replicas["rep-a"].chat(fleet.infer_key, "lost")
    assert (answer.status, answer.revision) == (200, r0)


def test_a_target_restarted_after_ready_is_warmed_again_before_the_flip(fleet: Fleet, api: TestClient) -> None:
    """The flip needs no call to a target whose heartbeat still comes from the process that
    loaded the revision; one that restarted since (same id, new incarnation, the revision gone
    from its memory) is warmed again before the flip, so no user request pays for the load."""
    for name in ("rep-a", "rep-b"):  # an earlier test of the module may have killed one
        if not fleet.replicas[name].alive():
            fleet.start_replicas(name)
    policy_id, _ = fleet.new_policy("restarted")
    r1 = fleet.publish(policy_id)
    rep_b = fleet.replicas["rep-b"]
    # A heartbeat timeout longer than a replica's restart, so that rep-a is not lost meanwhile.
    with controller(fleet, rollout_heartbeat_timeout_seconds=120.0):
        rep_b.pause()  # its warm hangs, so the rollout waits between rep-a's ready and the flip
        try:
            rollout_id = start_rollout(api, fleet, "restarted", {"revision": r1})
            eventually(
                lambda: fleet.rollout(rollout_id).replica_states.get("rep-a", {}).get("phase") == "ready",
                timeout=30,
                what="rep-a to be warmed",
            )
            first = fleet.rollout(rollout_id).replica_states["rep-a"]["incarnation"]
            assert first
            fleet.replicas["rep-a"].kill()  # dies without a word: its row still says up
            fleet.start_replicas("rep-a")
            assert r1 not in fleet.replicas["rep-a"].resident(fleet.admin_key)
        finally:
            rep_b.resume()
        view = wait_done(api, fleet, "restarted", rollout_id)
    assert view["state"] == "serving", view
    again = fleet.rollout(rollout_id).replica_states["rep-a"]["incarnation"]
    assert again and again != first
    entry = fleet.replicas["rep-a"].resident(fleet.admin_key)[r1]
    assert entry["tier"] == "device" and entry["pinned"]
    assert fleet.replicas["rep-a"].chat(fleet.infer_key, "restarted").revision == r1
    assert fleet.policy(policy_id).serving_revision_id == r1
