"""Prometheus scrape configs and alert rules, checked with promtool (Debian prometheus), the rules
unit-tested from sample series, and the Kubernetes relabeling run in a real Prometheus."""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import start_http_server

from lorafleet.platform import metrics as m
from tests.deploy._support import (
    DEPLOY,
    PROMETHEUS_SERIES,
    ROOT,
    promql_metric_names,
    sample_names_from_exposition,
    sample_names_from_registry,
    tool,
)

PROM = DEPLOY / "prometheus"
RULES = PROM / "rules" / "lorafleet.rules.yml"
RULE_TESTS = PROM / "tests" / "lorafleet.test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
ROLES = ("api", "trainer", "serving", "rollout-controller")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60, cwd=PROM)


def _alerts() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


def _without_kubernetes_sd(config: dict[str, Any], targets: list[dict[str, Any]]) -> dict[str, Any]:
    """The Kubernetes config with pod discovery replaced by static targets that carry the same
    ``__meta_kubernetes_*`` labels discovery would attach. Debian's Prometheus is built without
    Kubernetes discovery, so this is how its relabeling gets checked (and run) here."""
    config = yaml.safe_load(yaml.safe_dump(config))
    [job] = config["scrape_configs"]
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    job["static_configs"] = targets
    config["rule_files"] = [str(PROM / f) for f in config["rule_files"]]
    return config


def _pod(address: str, component: str, *, port_name: str = "http", phase: str = "Running") -> dict[str, Any]:
    return {"targets": [address], "labels": {
        "__meta_kubernetes_pod_label_app_kubernetes_io_name": "lorafleet",
        "__meta_kubernetes_pod_label_app_kubernetes_io_component": component,
        "__meta_kubernetes_pod_label_app_kubernetes_io_instance": "prod",
        "__meta_kubernetes_pod_container_port_name": port_name,
        "__meta_kubernetes_pod_phase": phase,
        "__meta_kubernetes_namespace": "lorafleet",
        "__meta_kubernetes_pod_name": f"prod-lorafleet-{component}-0",
    }}


# -- promtool ------------------------------------------------------------------------------------
def test_rules_pass_promtool_check() -> None:
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in out.stdout


def test_static_config_passes_promtool_check() -> None:
    out = _promtool("check", "config", "prometheus-static.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    config = yaml.safe_load((PROM / "prometheus-static.yml").read_text())
    components = {t["labels"]["component"] for t in config["scrape_configs"][0]["static_configs"]}
    assert components == set(ROLES)


def test_kubernetes_config_passes_promtool_check(tmp_path: Path) -> None:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(_without_kubernetes_sd(config, [_pod("10.0.0.1:8000", "api")])))
    out = _promtool("check", "config", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    keep = next(r for r in config["scrape_configs"][0]["relabel_configs"]
                if r.get("source_labels") == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
                and r.get("action") == "keep")
    assert set(keep["regex"].split("|")) == set(ROLES)


def test_rule_unit_tests_pass() -> None:
    out = _promtool("test", "rules", str(RULE_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_fires_in_a_unit_test_and_quiet_cases_exist() -> None:
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t.get("alert_rule_test", [])]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    assert fired == {a["alert"] for a in _alerts()}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert len(quiet) >= 5


def test_a_broken_rule_fails_the_unit_tests(tmp_path: Path) -> None:
    """The unit tests are not vacuous: raising one threshold makes its firing case fail."""
    broken = RULES.read_text().replace("lorafleet_cold_load_refusals_total[5m])) > 0.1",
                                       "lorafleet_cold_load_refusals_total[5m])) > 100")
    assert broken != RULES.read_text()
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "lorafleet.rules.yml").write_text(broken)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "t.yml").write_text(RULE_TESTS.read_text())
    out = subprocess.run([tool("promtool"), "test", "rules", "tests/t.yml"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode != 0 and "LorafleetColdLoadRefusals" in out.stdout + out.stderr


# -- the rules against what the code exports ---------------------------------------------------
def test_alert_expressions_name_exported_metrics(live_metrics: str) -> None:
    exported = sample_names_from_exposition(live_metrics) & sample_names_from_registry()
    for alert in _alerts():
        names = promql_metric_names(alert["expr"])
        assert names, alert["alert"]
        assert names - exported - PROMETHEUS_SERIES == set(), alert["alert"]


def test_user_visible_rule_names_a_real_bucket_bound(live_metrics: str) -> None:
    # the rule counts loads by subtracting the le="0.001" bucket: that bound must be exported as such
    assert 'lorafleet_user_visible_adapter_load_seconds_bucket{le="0.001"}' in live_metrics
    assert 0.001 in m.USER_VISIBLE_LOAD_SECONDS._upper_bounds


def test_every_alert_has_a_runbook_in_the_operations_doc() -> None:
    doc = OPERATIONS.read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", doc, flags=re.M)}
    for alert in _alerts():
        ann = alert["annotations"]
        assert ann["summary"] and ann["description"], alert["alert"]
        assert alert["labels"]["severity"] in {"warning", "critical"}
        path, anchor = ann["runbook_url"].split("#")
        assert path == "docs/operations.md" and anchor in anchors, alert["alert"]


# -- the Kubernetes relabeling in a running Prometheus ---------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def metrics_target() -> Iterator[str]:
    """The platform's real registry served on a free port, as a pod would serve it."""
    port = _free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=m.REGISTRY)
    yield f"127.0.0.1:{port}"
    server.shutdown()
    thread.join(timeout=5)


@pytest.mark.integration
def test_kubernetes_relabeling_keeps_and_labels_lorafleet_pods(tmp_path: Path, metrics_target: str) -> None:
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    targets = [
        _pod(metrics_target, "serving"),
        _pod("127.0.0.1:1", "postgres"),  # another app's pod in the namespace
        _pod("127.0.0.1:2", "api", port_name="grpc"),  # not the http port
        _pod("127.0.0.1:3", "trainer", phase="Succeeded"),  # a finished pod
    ]
    config = _without_kubernetes_sd(config, targets)
    config["global"]["scrape_interval"] = "1s"
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    web = f"127.0.0.1:{_free_port()}"
    log = tmp_path / "prometheus.log"
    argv = [tool("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'db'}",
            f"--web.listen-address={web}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                body = httpx.get(f"http://{web}/api/v1/query", params={"query": 'up{job="lorafleet"}'},
                                 timeout=1).json()
                if body["data"]["result"]:
                    break
            except (httpx.HTTPError, ValueError):  # not up yet, or answering "Service Unavailable" text
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not scrape: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        [series] = body["data"]["result"]
        assert series["value"][1] == "1"
        assert series["metric"] | {"instance": "-"} == {
            "__name__": "up", "job": "lorafleet", "component": "serving", "namespace": "lorafleet",
            "pod": "prod-lorafleet-serving-0", "release": "prod", "instance": "-"}
        targets_api = httpx.get(f"http://{web}/api/v1/targets", timeout=2).json()["data"]
        assert len(targets_api["activeTargets"]) == 1 and len(targets_api["droppedTargets"]) == 3
        # a lorafleet series keeps its own labels next to the target's
        query = {"query": "lorafleet_job_queue_oldest_age_seconds"}
        body = httpx.get(f"http://{web}/api/v1/query", params=query, timeout=2).json()
        assert body["data"]["result"][0]["metric"]["component"] == "serving"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
