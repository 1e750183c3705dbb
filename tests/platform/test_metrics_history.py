"""The ops page's metrics history: Prometheus' quantile interpolation, the in-process sampler over
a simulated clock, and the Prometheus-backed reader against a real Prometheus server."""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram, start_http_server

from lorafleet.platform import metrics as m
from lorafleet.platform.metrics.history import (
    DEFAULT_SERIES,
    ProcessHistory,
    PrometheusHistory,
    SeriesSpec,
    histogram_quantile,
)

INF = math.inf
LOAD_BUCKETS = (0.0, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.95, {0.1: 0, INF: 0}, None),  # nothing observed is no data, not zero
        (0.5, {0.1: 10, INF: 10}, 0.05),  # the first bucket starts at 0
        (0.5, {0.1: 0, 0.5: 10, INF: 10}, 0.3),  # linear inside (0.1, 0.5]
        (0.95, {0.25: 0, 0.5: 20, INF: 20}, 0.25 + 0.25 * 0.95),
        (0.95, {0.1: 1, 0.5: 1, INF: 10}, 0.5),  # in the +Inf bucket: the highest finite bound
        (0.95, {0.0: 10, 0.001: 10, INF: 10}, 0.0),  # a zero-width first bucket (loads that waited 0)
        (0.5, {0.1: 4, 0.2: 4, 0.4: 8, INF: 8}, 0.1),  # rank equal to a count: the first bucket reaching it
    ],
)
def test_histogram_quantile_matches_prometheus(q: float, buckets: dict[float, float],
                                               expected: float | None) -> None:
    got = histogram_quantile(q, buckets)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_histogram_quantile_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="Inf"):
        histogram_quantile(0.5, {0.1: 1})
    with pytest.raises(ValueError, match="outside"):
        histogram_quantile(1.5, {INF: 1})


def test_default_series_name_real_histograms_and_labels() -> None:
    families = {f.name: f for f in m.REGISTRY.collect()}
    collectors = {"lorafleet_adapter_load_seconds": m.ADAPTER_LOAD_SECONDS,
                  "lorafleet_ttft_seconds": m.TTFT_SECONDS}
    for spec in DEFAULT_SERIES:
        assert families[spec.family].type == "histogram", spec
        labelnames = collectors[spec.family]._labelnames
        assert all(k in labelnames for k, _ in spec.match), spec


def _load_histogram(registry: CollectorRegistry) -> Histogram:
    return Histogram("lorafleet_adapter_load_seconds", "load", ["stage", "tier"], buckets=LOAD_BUCKETS,
                     registry=registry)


def test_process_history_is_a_trailing_window_quantile() -> None:
    registry = CollectorRegistry()
    load = _load_histogram(registry)
    clock = [1_000_000.0]
    spec = SeriesSpec("fetch", "fetch p95", "lorafleet_adapter_load_seconds", (("stage", "fetch"),))
    history = ProcessHistory(registry=registry, series=[spec], interval_seconds=15, window_seconds=300,
                             rate_window_seconds=60, clock=lambda: clock[0])
    history.sample()  # the baseline
    for _ in range(19):
        load.labels("fetch", "disk").observe(0.3)
    load.labels("fetch", "disk").observe(7.0)
    load.labels("install", "host").observe(20.0)  # another stage: not in this series
    clock[0] += 15
    history.sample()
    [(t, v)] = history.snapshot().series[0].points
    assert t == clock[0]
    assert v == pytest.approx(0.25 + 0.25 * (0.95 * 20) / 19)

    # nothing new: the observations stay in the trailing minute, then age out
    for _ in range(4):
        clock[0] += 15
        history.sample()
    points = history.snapshot().series[0].points
    assert [p[1] is not None for p in points] == [True, True, True, True, False]

    # the window keeps 300 s of points
    for _ in range(30):
        clock[0] += 15
        history.sample()
    points = history.snapshot().series[0].points
    assert len(points) == 21 and points[0][0] == clock[0] - 300


def test_process_history_samples_on_its_thread() -> None:
    registry = CollectorRegistry()
    load = _load_histogram(registry)
    history = ProcessHistory(registry=registry, series=DEFAULT_SERIES[:1], interval_seconds=0.05)
    history.start()
    try:
        load.labels("fetch", "s3").observe(0.02)
        deadline = time.monotonic() + 5
        while not any(v is not None for _, v in history.snapshot().series[0].points):
            assert time.monotonic() < deadline, "the sampler thread took no sample"
            time.sleep(0.05)
    finally:
        history.stop()


def test_prometheus_history_reports_an_unreachable_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    snap = PrometheusHistory(f"http://127.0.0.1:{port}", timeout_seconds=1).snapshot()
    assert snap.source == "prometheus" and snap.error and "Prometheus query failed" in snap.error
    assert [s.points for s in snap.series] == [[]] * len(DEFAULT_SERIES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prometheus_scraping(tmp_path: Path) -> Iterator[tuple[str, Histogram, CollectorRegistry]]:
    """A real Prometheus (Debian package) scraping a private registry every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus binary is missing: run scripts/install-test-tools.sh")
    registry = CollectorRegistry()
    load = _load_histogram(registry)
    target_port = _free_port()
    server, thread = start_http_server(target_port, addr="127.0.0.1", registry=registry)
    web_port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n"
                      f"scrape_configs:\n  - job_name: t\n"
                      f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{web_port}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
    url = f"http://127.0.0.1:{web_port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not start: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield url, load, registry
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        server.shutdown()
        thread.join(timeout=5)


@pytest.mark.integration
def test_prometheus_history_answers_what_the_process_history_answers(
    prometheus_scraping: tuple[str, Histogram, CollectorRegistry],
) -> None:
    url, load, registry = prometheus_scraping
    child = load.labels("fetch", "s3")  # exported at zero first: Prometheus' rate() ignores a series' birth
    def scraped_samples() -> int:
        r = httpx.get(f"{url}/api/v1/query", params={"query": "count_over_time(up[1m])"}, timeout=2).json()
        return int(float(r["data"]["result"][0]["value"][1])) if r["data"]["result"] else 0

    deadline = time.monotonic() + 20
    while scraped_samples() < 1:
        assert time.monotonic() < deadline, "prometheus never scraped the target"
        time.sleep(0.2)
    spec = SeriesSpec("fetch", "fetch p95", "lorafleet_adapter_load_seconds", (("stage", "fetch"),))
    local = ProcessHistory(registry=registry, series=[spec], interval_seconds=1)
    local.sample()
    for _ in range(20):
        child.observe(0.3)
    local.sample()
    expected = local.snapshot().series[0].points[-1][1]
    assert expected == pytest.approx(0.4875)

    remote = PrometheusHistory(url, series=[spec], window_seconds=60, step_seconds=1)
    deadline = time.monotonic() + 20
    while True:
        snap = remote.snapshot()
        assert snap.error is None, snap.error
        values = [v for _, v in snap.series[0].points if v is not None]
        if values:
            break
        assert time.monotonic() < deadline, "prometheus never saw the observations"
        time.sleep(0.5)
    assert values[-1] == pytest.approx(expected)
