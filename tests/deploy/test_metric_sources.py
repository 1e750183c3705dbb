"""Every metric the operators' tools read (the alert rules, the chart's copy of them, the Grafana
dashboard, the serving HPA) is exported by a live platform's /metrics and written by running code,
so an alert cannot rot into one that never fires: a family that is only declared in
platform/metrics still shows up on /metrics with no samples, which is exactly the failure this catches."""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from lorafleet.platform import metrics as m
from tests.deploy._support import (
    DEPLOY,
    PROMETHEUS_SERIES,
    ROOT,
    promql_metric_names,
    sample_names_from_exposition,
    sample_names_from_registry,
)

RULE_FILES = (DEPLOY / "prometheus" / "rules" / "lorafleet.rules.yml", ROOT / "helm" / "lorafleet" / "files" /
              "lorafleet.rules.yml")
DASHBOARD = DEPLOY / "grafana" / "lorafleet.json"
CODE_DIRS = ("platform", "adapters_store", "services")
DEFINITIONS = ROOT / "platform" / "metrics" / "__init__.py"
_WRITE = r"\s*\.\s*(?:labels|set|inc|dec|observe|clear|set_function|time)\s*\("


def _rule_exprs() -> dict[str, str]:
    out: dict[str, str] = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out[f"{path.relative_to(ROOT)}: {rule.get('alert') or rule.get('record')}"] = rule["expr"]
    return out


def _dashboard_exprs() -> dict[str, str]:
    def walk(node: Any) -> list[str]:
        if isinstance(node, dict):
            found = [node["expr"]] if isinstance(node.get("expr"), str) else []
            return found + [e for v in node.values() for e in walk(v)]
        if isinstance(node, list):
            return [e for v in node for e in walk(v)]
        return []

    return {f"dashboard query {i}": e for i, e in enumerate(walk(json.loads(DASHBOARD.read_text())))}


def _names(exprs: dict[str, str]) -> dict[str, set[str]]:
    """Sample name to the places that read it (Prometheus' own series left out)."""
    out: dict[str, set[str]] = {}
    for where, expr in exprs.items():
        for name in promql_metric_names(expr) - PROMETHEUS_SERIES:
            out.setdefault(name, set()).add(where)
    return out


def _family_attributes() -> dict[str, str]:
    """Every sample name a family may carry, to the name of its object in platform/metrics."""
    by_family = {obj._name: attr for attr, obj in vars(m).items() if isinstance(obj, MetricWrapperBase)}
    out: dict[str, str] = {}
    for family in m.REGISTRY.collect():
        base = family.name + "_total" if family.type == "counter" else family.name
        for sample in {base, f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}:
            out.setdefault(sample, by_family[family.name])
    return out


@cache
def _sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for d in CODE_DIRS for p in (ROOT / d).rglob("*.py")
            if p != DEFINITIONS}


def _writers(attribute: str) -> list[str]:
    """The source files that set, increment or observe the metric object ``attribute``."""
    pattern = re.compile(rf"\b{re.escape(attribute)}{_WRITE}")
    return sorted(path for path, text in _sources().items() if pattern.search(text))


def test_alert_rules_and_dashboard_read_only_exported_metrics(live_metrics: str) -> None:
    exported = sample_names_from_exposition(live_metrics) & sample_names_from_registry()
    read = _names(_rule_exprs() | _dashboard_exprs())
    assert len(read) > 20
    assert {name: sorted(where) for name, where in read.items() if name not in exported} == {}


def test_every_metric_an_alert_or_panel_reads_is_written_by_running_code() -> None:
    attributes = _family_attributes()
    read = _names(_rule_exprs() | _dashboard_exprs())
    unwritten = {name: sorted(where) for name, where in read.items() if not _writers(attributes[name])}
    assert unwritten == {}


def test_the_fleet_alert_metrics_have_their_writers() -> None:
    # the alerts that once had no writer at all (LorafleetReplicaHeartbeatLost, RolloutStuckWarming, ObjectStoreErrors)
    attributes = _family_attributes()
    expected = {
        "lorafleet_replica_heartbeat_age_seconds": "platform/metrics/fleet.py",
        "lorafleet_rollout_oldest_age_seconds": "platform/metrics/fleet.py",
        "lorafleet_job_queue_oldest_age_seconds": "platform/metrics/fleet.py",
        "lorafleet_object_store_errors_total": "adapters_store/objectstore/_metrics.py",
    }
    for name, writer in expected.items():
        assert writer in _writers(attributes[name]), name
    alert_names = set(_names(_rule_exprs()))
    assert set(expected) <= alert_names


def test_the_writer_check_catches_a_declared_but_unwritten_metric() -> None:
    assert _writers("LORAFLEET_NOT_A_METRIC") == []
    assert _writers("OBJECT_STORE_ERRORS") == ["adapters_store/objectstore/_metrics.py"]
    # reading a metric is not writing it
    assert not re.search(rf"\bREGISTRY{_WRITE}", "families = m.REGISTRY.collect()")


def test_the_serving_hpa_metric_is_written_by_running_code() -> None:
    values = yaml.safe_load((ROOT / "helm" / "lorafleet" / "values.yaml").read_text())
    name = values["serving"]["autoscaling"]["queueDepth"]["metricName"]
    assert _writers(_family_attributes()[name])
