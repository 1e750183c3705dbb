"""The Grafana dashboard names only metrics a running platform exports, and covers what operators watch."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.deploy._support import (
    DEPLOY,
    PROMETHEUS_SERIES,
    promql_metric_names,
    sample_names_from_exposition,
    sample_names_from_registry,
)

DASHBOARD = DEPLOY / "grafana" / "lorafleet.json"


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def _panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])  # collapsed rows keep their panels inside
    return out


def _queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    out = [(f"panel {p['title']!r}", t["expr"]) for p in _panels(dash) for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']!r}", query))
    return out


def test_the_checker_reads_metric_names_out_of_promql() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, policy) (rate(lorafleet_ttft_seconds_bucket'
            '{policy=~"$policy",first_request="true"}[$__rate_interval]))) '
            '/ on (policy) group_left sum(rate(lorafleet_generated_tokens_total[5m] offset 1h)) > 1e3 '
            'and up{job="lorafleet"} == bool 0')
    assert promql_metric_names(expr) == {"lorafleet_ttft_seconds_bucket", "lorafleet_generated_tokens_total",
                                         "up"}
    variable = "label_values(lorafleet_ttft_seconds_count, policy)"
    assert promql_metric_names(variable) == {"lorafleet_ttft_seconds_count"}


def test_exposition_announces_every_registered_family_even_without_samples(live_metrics: str) -> None:
    # the premise of the check below: an unobserved labelled family still has its TYPE line
    assert "# TYPE lorafleet_rollouts gauge" in live_metrics
    assert "# TYPE lorafleet_ttft_seconds histogram" in live_metrics
    assert "lorafleet_ttft_seconds_bucket{" not in live_metrics  # no policy observed in this process
    assert sample_names_from_exposition(live_metrics) >= sample_names_from_registry()


def test_every_dashboard_query_names_an_exported_metric(live_metrics: str) -> None:
    exported = sample_names_from_exposition(live_metrics) & sample_names_from_registry()
    queries = _queries(_dashboard())
    assert len(queries) > 30
    unknown = {(where, name) for where, expr in queries for name in promql_metric_names(expr)
               if name not in exported and name not in PROMETHEUS_SERIES}
    assert unknown == set()
    for where, expr in queries:
        assert promql_metric_names(expr), f"{where} names no metric: {expr}"


def test_the_check_catches_a_metric_that_is_not_exported(live_metrics: str) -> None:
    exported = sample_names_from_exposition(live_metrics) & sample_names_from_registry()
    renamed = "histogram_quantile(0.95, sum by (le) (rate(lorafleet_time_to_first_token_bucket[5m])))"
    assert promql_metric_names(renamed) - exported == {"lorafleet_time_to_first_token_bucket"}
    # a counter without its _total suffix is not what Prometheus stores either
    assert "lorafleet_generated_tokens" not in exported and "lorafleet_generated_tokens_total" in exported


@pytest.mark.parametrize(
    ("topic", "must_read"),
    [
        ("adapter load by stage and tier", {"lorafleet_adapter_load_seconds_bucket"}),
        ("user-visible adapter load", {"lorafleet_user_visible_adapter_load_seconds_bucket"}),
        ("TTFT", {"lorafleet_ttft_seconds_bucket"}),
        ("inter-token latency", {"lorafleet_inter_token_seconds_bucket"}),
        ("tokens/s", {"lorafleet_generated_tokens_total"}),
        ("batch size and adapters per batch",
         {"lorafleet_batch_size_bucket", "lorafleet_batch_distinct_adapters_sum"}),
        ("residency", {"lorafleet_resident_adapters", "lorafleet_resident_adapter_bytes"}),
        ("rollouts by state", {"lorafleet_rollouts"}),
        ("jobs and queue age", {"lorafleet_jobs", "lorafleet_job_queue_oldest_age_seconds"}),
        ("training", {"lorafleet_train_step_seconds_bucket", "lorafleet_train_reward_mean"}),
    ],
)
def test_dashboard_covers(topic: str, must_read: set[str]) -> None:
    read = set().union(*(promql_metric_names(e) for _, e in _queries(_dashboard())))
    assert must_read <= read, topic


def test_quantile_panels_cover_p50_p95_p99_by_stage_and_tier_and_first_request() -> None:
    exprs = [e for _, e in _queries(_dashboard())]
    load = [e for e in exprs if "lorafleet_adapter_load_seconds_bucket" in e and "stage, tier" in e]
    assert {e.split(",")[0] for e in load} >= {"histogram_quantile(0.5", "histogram_quantile(0.95",
                                                "histogram_quantile(0.99"}
    assert any("first_request" in e and "lorafleet_ttft_seconds_bucket" in e for e in exprs)


def test_dashboard_is_well_formed() -> None:
    dash = _dashboard()
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert dash["uid"] and dash["schemaVersion"] >= 36
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert refs and len(refs) == len(set(refs)), p["title"]
