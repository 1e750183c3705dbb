"""The pure rollout rules: target selection and the per-step decision, table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from lorafleet.platform.domain.errors import InvalidRequest, Unavailable
from lorafleet.platform.rollouts.schemas import ReplicaCount, ReplicaPhase, ReplicaProgress, RolloutPlan
from lorafleet.services.rollout.planner import ReplicaView, Verdict, decide, plan_targets

BASE = "tiny-moe"
REV = "01newrev"


def rv(
    rid: str,
    *,
    age: float = 1.0,
    base: str = BASE,
    role: str = "serving",
    state: str = "up",
    holds: tuple[str, ...] = (),
) -> ReplicaView:
    return ReplicaView(
        id=rid,
        role=role,
        base_model_id=base,
        state=state,
        heartbeat_age_seconds=age,
        device_revisions=frozenset(holds),
    )


FLEET = [
    rv("r1"),
    rv("r2", holds=("x", "y")),
    rv("r3", holds=(REV,)),
    rv("stale", age=60.0),
    rv("down", state="down"),
    rv("other-base", base="llama"),
    rv("trainer", role="trainer"),
]


@pytest.mark.parametrize(
    ("spec", "replicas", "expected"),
    [
        pytest.param(
            "all", FLEET, {"replicas": ["r1", "r2", "r3"], "spares": [], "required": 3}, id="all-live"
        ),
        pytest.param(
            ReplicaCount(count=1),
            FLEET,
            {"replicas": ["r3"], "spares": ["r1", "r2"], "required": 1},
            id="count-prefers-holder-then-least-loaded",
        ),
        pytest.param(
            ReplicaCount(count=2),
            FLEET,
            {"replicas": ["r3", "r1"], "spares": ["r2"], "required": 2},
            id="count-2",
        ),
        pytest.param(
            ["r2", "r1", "r2"],
            FLEET,
            {"replicas": ["r2", "r1"], "spares": [], "required": 2},
            id="ids-deduplicated-in-order",
        ),
    ],
)
def test_plan_targets(spec: Any, replicas: list[ReplicaView], expected: dict[str, Any]) -> None:
    plan = plan_targets(spec, replicas, base_model_id=BASE, revision_id=REV, heartbeat_timeout=10.0)
    assert {"replicas": plan.replicas, "spares": plan.spares, "required": plan.required} == expected


@pytest.mark.parametrize(
    ("spec", "replicas", "error", "code"),
    [
        pytest.param(
            "all",
            [rv("stale", age=60.0), rv("down", state="down")],
            Unavailable,
            "no_serving_replicas",
            id="all-none-live",
        ),
        pytest.param("all", [], Unavailable, "no_serving_replicas", id="all-empty"),
        pytest.param(ReplicaCount(count=4), FLEET, Unavailable, "not_enough_replicas", id="count-too-many"),
        pytest.param(["r1", "stale"], FLEET, Unavailable, "replica_unavailable", id="ids-one-stale"),
        pytest.param(["r1", "nope"], FLEET, InvalidRequest, "unknown_replica", id="ids-unknown"),
        pytest.param(["other-base"], FLEET, InvalidRequest, "unknown_replica", id="ids-wrong-base"),
        pytest.param(["trainer"], FLEET, InvalidRequest, "unknown_replica", id="ids-trainer"),
    ],
)
def test_plan_targets_refusals(
    spec: Any, replicas: list[ReplicaView], error: type[Exception], code: str
) -> None:
    with pytest.raises(error) as exc:
        plan_targets(spec, replicas, base_model_id=BASE, revision_id=REV, heartbeat_timeout=10.0)
    assert exc.value.code == code  # type: ignore[attr-defined]


P = ReplicaPhase


def states(**phases: ReplicaPhase) -> dict[str, ReplicaProgress]:
    out = {}
    for rid, phase in phases.items():
        err = {"code": f"{rid}_broke", "message": "boom"} if phase.bad else None
        out[rid] = ReplicaProgress(phase=phase, error=err)
    return out


ALL3 = RolloutPlan(spec="all", replicas=["a", "b", "c"], required=3)
COUNT2 = RolloutPlan(spec=ReplicaCount(count=2), replicas=["a", "b"], spares=["c", "d"], required=2)


@pytest.mark.parametrize(
    ("plan", "phases", "now", "verdict", "activate", "error_code"),
    [
        pytest.param(
            ALL3, states(a=P.READY, b=P.READY, c=P.READY), 0, Verdict.FLIP, (), None, id="all-ready"
        ),
        pytest.param(
            ALL3, states(a=P.READY, b=P.LOADING, c=P.SMOKE), 0, Verdict.WAIT, (), None, id="all-working"
        ),
        pytest.param(
            ALL3,
            states(a=P.READY, b=P.FAILED, c=P.LOADING),
            0,
            Verdict.FAIL,
            (),
            "b_broke",
            id="all-one-failed-fails-at-once",
        ),
        pytest.param(
            ALL3, states(a=P.READY, b=P.READY, c=P.LOST), 0, Verdict.FAIL, (), "c_broke", id="all-one-lost"
        ),
        pytest.param(
            ALL3,
            states(a=P.READY, b=P.READY, c=P.LOADING),
            100,
            Verdict.FAIL,
            (),
            "rollout_timeout",
            id="deadline",
        ),
        pytest.param(
            ALL3,
            states(a=P.READY, b=P.READY, c=P.READY),
            100,
            Verdict.FLIP,
            (),
            None,
            id="ready-beats-deadline",
        ),
        pytest.param(ALL3, {}, 0, Verdict.WAIT, (), None, id="no-progress-yet"),
        pytest.param(
            COUNT2, states(a=P.READY, b=P.FAILED), 0, Verdict.WAIT, ("c",), None, id="count-replaces-failed"
        ),
        pytest.param(
            COUNT2, states(a=P.FAILED, b=P.LOST), 0, Verdict.WAIT, ("c", "d"), None, id="count-replaces-two"
        ),
        pytest.param(
            COUNT2, states(a=P.READY, b=P.LOADING), 0, Verdict.WAIT, (), None, id="count-no-spare-needed"
        ),
        pytest.param(
            RolloutPlan(spec=ReplicaCount(count=2), replicas=["a", "b", "c"], spares=[], required=2),
            states(a=P.FAILED, b=P.FAILED, c=P.READY),
            0,
            Verdict.FAIL,
            (),
            "a_broke",
            id="count-out-of-spares",
        ),
        pytest.param(
            RolloutPlan(spec=ReplicaCount(count=2), replicas=["a", "b", "c"], spares=[], required=2),
            states(a=P.FAILED, b=P.READY, c=P.READY),
            0,
            Verdict.FLIP,
            (),
            None,
            id="count-enough-despite-one",
        ),
    ],
)
def test_decide(
    plan: RolloutPlan,
    phases: dict[str, ReplicaProgress],
    now: float,
    verdict: Verdict,
    activate: tuple[str, ...],
    error_code: str | None,
) -> None:
    decision = decide(plan, phases, now=now, deadline=50)
    assert decision.verdict == verdict
    assert decision.activate == activate
    assert (decision.error or {}).get("code") == error_code
    if verdict == Verdict.FAIL and error_code != "rollout_timeout":
        assert decision.error is not None and decision.error["replica"] in plan.replicas
