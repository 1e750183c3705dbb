"""The last hour of p95 adapter-load time and TTFT, for the built-in ops page (``/ui``).

The embedded mode has no Prometheus, so the process keeps the history itself: every
``interval_seconds`` it snapshots the cumulative bucket counts of the histograms it watches in
:data:`lorafleet.platform.metrics.REGISTRY`, and each point is the quantile of the increase over
the last ``rate_window_seconds``: what ``histogram_quantile(0.95, sum by (le) (rate(x_bucket[1m])))``
answers in Prometheus. When a Prometheus is configured, the same PromQL is sent to it instead:
in a split deployment the API process observes no serving histograms of its own.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import httpx
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict

from lorafleet.platform.metrics import REGISTRY

Source = Literal["process", "prometheus"]


@dataclass(frozen=True)
class SeriesSpec:
    """One chart line: a quantile of one histogram family, aggregated over the label sets that match."""

    key: str
    title: str
    family: str
    """Histogram family name without the ``_bucket`` suffix."""
    match: tuple[tuple[str, str], ...] = ()
    """Label equalities a label set must have to count; the rest are summed together."""
    quantile: float = 0.95

    def promql(self, rate_window: str) -> str:
        selector = ",".join(f'{k}="{v}"' for k, v in self.match)
        return (f"histogram_quantile({self.quantile}, sum by (le) "
                f"(rate({self.family}_bucket{{{selector}}}[{rate_window}])))")


DEFAULT_SERIES: tuple[SeriesSpec, ...] = (
    SeriesSpec("adapter_load_fetch", "adapter load p95: fetch", "lorafleet_adapter_load_seconds",
               (("stage", "fetch"),)),
    SeriesSpec("adapter_load_read", "adapter load p95: read", "lorafleet_adapter_load_seconds",
               (("stage", "read"),)),
    SeriesSpec("adapter_load_install", "adapter load p95: install", "lorafleet_adapter_load_seconds",
               (("stage", "install"),)),
    SeriesSpec("ttft", "TTFT p95: all requests", "lorafleet_ttft_seconds"),
    SeriesSpec("ttft_first", "TTFT p95: first request to a new revision", "lorafleet_ttft_seconds",
               (("first_request", "true"),)),
)


class SeriesHistory(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str
    title: str
    unit: Literal["seconds"] = "seconds"
    points: list[tuple[float, float | None]]
    """(unix time, value); None where nothing was observed in the rate window."""


class HistorySnapshot(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: Source
    window_seconds: float
    step_seconds: float
    series: list[SeriesHistory]
    error: str | None = None
    """Why the points are missing (Prometheus unreachable), shown on the page instead of a chart."""


class MetricsHistory(Protocol):
    source: Source

    def snapshot(self) -> HistorySnapshot: ...


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' interpolation over cumulative bucket counts keyed by upper bound (``+Inf`` included).

    Returns None when the buckets hold no observation (no data is not the same as zero)."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile {q} is outside [0, 1]")
    bounds = sorted(buckets)
    if not bounds or not math.isinf(bounds[-1]):
        raise ValueError("the buckets need a +Inf bucket")
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for i, bound in enumerate(bounds):
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                # like Prometheus: the +Inf bucket has no width, answer the highest finite bound
                return bounds[-2] if len(bounds) > 1 else None
            if i == 0 and bound <= 0:
                return bound
            lower = prev_bound if i > 0 else 0.0
            in_bucket = count - prev_count
            if in_bucket <= 0:
                return bound
            return lower + (bound - lower) * (rank - prev_count) / in_bucket
        prev_bound, prev_count = bound, count
    return bounds[-2] if len(bounds) > 1 else None


def read_buckets(registry: CollectorRegistry, spec: SeriesSpec) -> dict[float, float]:
    """Cumulative counts by upper bound, summed over the label sets that match ``spec``."""
    sample_name = f"{spec.family}_bucket"
    wanted = dict(spec.match)
    out: dict[float, float] = {}
    for family in registry.collect():
        if family.name != spec.family:
            continue
        for sample in family.samples:
            if sample.name != sample_name:
                continue
            if any(sample.labels.get(k) != v for k, v in wanted.items()):
                continue
            le = float(sample.labels["le"])
            out[le] = out.get(le, 0.0) + sample.value
    return out


@dataclass(frozen=True)
class _Snapshot:
    t: float
    counts: dict[str, dict[float, float]]
    """Cumulative bucket counts per series key."""


class ProcessHistory:
    """Samples this process's own histograms on a background thread."""

    source: Source = "process"

    def __init__(self, *, registry: CollectorRegistry = REGISTRY,
                 series: Sequence[SeriesSpec] = DEFAULT_SERIES,
                 interval_seconds: float = 15.0, window_seconds: float = 3600.0,
                 rate_window_seconds: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        if interval_seconds <= 0 or window_seconds <= 0 or rate_window_seconds <= 0:
            raise ValueError("intervals and windows must be positive")
        self.registry = registry
        self.series = tuple(series)
        self.interval_seconds = interval_seconds
        self.window_seconds = window_seconds
        self.rate_window_seconds = rate_window_seconds
        self._clock = clock
        self._lock = threading.Lock()
        keep = math.ceil(rate_window_seconds / interval_seconds) + 2
        self._snapshots: deque[_Snapshot] = deque(maxlen=keep)
        self._points: dict[str, deque[tuple[float, float | None]]] = {
            s.key: deque(maxlen=math.ceil(window_seconds / interval_seconds) + 1) for s in self.series
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one snapshot and append one point per series (the thread calls this every interval)."""
        now = self._clock()
        counts = {s.key: read_buckets(self.registry, s) for s in self.series}
        with self._lock:
            base = self._baseline(now)
            self._snapshots.append(_Snapshot(now, counts))
            if base is None:
                return  # the first snapshot is the baseline: it has no increase of its own
            for spec in self.series:
                cur, old = counts[spec.key], base.counts.get(spec.key, {})
                delta = {le: cur[le] - old.get(le, 0.0) for le in cur}
                value = histogram_quantile(spec.quantile, delta) if delta else None
                self._points[spec.key].append((now, value))

    def _baseline(self, now: float) -> _Snapshot | None:
        """The newest snapshot at least a rate window old, else the oldest one there is."""
        chosen: _Snapshot | None = None
        for snap in self._snapshots:
            if snap.t <= now - self.rate_window_seconds:
                chosen = snap
        return chosen or (self._snapshots[0] if self._snapshots else None)

    def snapshot(self) -> HistorySnapshot:
        cutoff = self._clock() - self.window_seconds
        with self._lock:
            series = [SeriesHistory(key=s.key, title=s.title,
                                    points=[p for p in self._points[s.key] if p[0] >= cutoff])
                      for s in self.series]
        return HistorySnapshot(source="process", window_seconds=self.window_seconds,
                               step_seconds=self.interval_seconds, series=series)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="metrics-history", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            self.sample()


class PrometheusHistory:
    """Reads the same series from a Prometheus server with ``query_range``."""

    source: Source = "prometheus"

    def __init__(self, base_url: str, *, series: Sequence[SeriesSpec] = DEFAULT_SERIES,
                 window_seconds: float = 3600.0, step_seconds: float = 30.0, rate_window: str = "1m",
                 timeout_seconds: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self.base_url = base_url.rstrip("/")
        self.series = tuple(series)
        self.window_seconds = window_seconds
        self.step_seconds = step_seconds
        self.rate_window = rate_window
        self.timeout_seconds = timeout_seconds
        self._clock = clock

    def snapshot(self) -> HistorySnapshot:
        end = self._clock()
        params = {"start": f"{end - self.window_seconds:.3f}", "end": f"{end:.3f}",
                  "step": f"{self.step_seconds}"}
        out: list[SeriesHistory] = []
        try:
            with httpx.Client(base_url=self.base_url, timeout=self.timeout_seconds) as client:
                for spec in self.series:
                    query = {"query": spec.promql(self.rate_window)}
                    r = client.get("/api/v1/query_range", params=params | query)
                    r.raise_for_status()
                    out.append(SeriesHistory(key=spec.key, title=spec.title, points=_matrix_points(r.json())))
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            # the page shows why the charts are empty; the rest of the page still works
            empty = [SeriesHistory(key=s.key, title=s.title, points=[]) for s in self.series]
            return HistorySnapshot(source="prometheus", window_seconds=self.window_seconds,
                                   step_seconds=self.step_seconds, error=f"Prometheus query failed: {exc}",
                                   series=empty)
        return HistorySnapshot(source="prometheus", window_seconds=self.window_seconds,
                               step_seconds=self.step_seconds, series=out)


def _matrix_points(body: dict[str, object]) -> list[tuple[float, float | None]]:
    if body.get("status") != "success":
        raise ValueError(f"Prometheus answered {body.get('status')}: {body.get('error')}")
    data = body["data"]
    if not isinstance(data, dict) or data.get("resultType") != "matrix":
        raise ValueError("Prometheus answered no matrix")
    result = data["result"]
    if not result:
        return []
    points: list[tuple[float, float | None]] = []
    for t, v in result[0]["values"]:
        value = float(v)
        points.append((float(t), None if math.isnan(value) else value))
    return points


_shared_lock = threading.Lock()
_shared: ProcessHistory | None = None
_shared_users = 0


def acquire_process_history(*, interval_seconds: float = 15.0) -> ProcessHistory:
    """The one sampler of this process (the registry is process-wide, so is its history); started
    on first use and stopped when the last user calls :func:`release_process_history`."""
    global _shared, _shared_users
    with _shared_lock:
        if _shared is None:
            _shared = ProcessHistory(interval_seconds=interval_seconds)
        _shared_users += 1
        _shared.start()
        return _shared


def release_process_history() -> None:
    global _shared, _shared_users
    with _shared_lock:
        _shared_users = max(0, _shared_users - 1)
        if _shared_users == 0 and _shared is not None:
            _shared.stop()
            _shared = None
