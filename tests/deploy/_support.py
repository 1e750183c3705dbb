"""Helpers of the deploy tests: the tools they drive, a live platform's metric names, and the
metric names a PromQL expression reads."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
INSTALL_HINT = "run `bash scripts/install-test-tools.sh` (Debian prometheus and chromium, PyPI tools)"

# Series Prometheus makes itself rather than scraping them from lorafleet.
PROMETHEUS_SERIES = frozenset({"up"})

_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
                       "unless", "offset", "atan2", "inf", "nan", "start", "end"})


def tool(name: str) -> str:
    """The path of a command-line tool; a missing one fails the test (it is part of the suite)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: {INSTALL_HINT}")
    return path


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels and durations excluded).

    Grafana variables are blanked first; ``label_values(metric, label)`` names its metric."""
    names = set(re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,", expr))
    text = re.sub(r"label_values\([^)]*\)", " ", expr)
    text = re.sub(r"\$\{?\w+\}?", "5m", text)
    text = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word in _KEYWORDS:
            continue
        names.add(word)
    return names


def sample_names_from_exposition(text: str) -> set[str]:
    """Every sample name a family announced with ``# TYPE`` may carry, samples present or not
    (prometheus_client writes HELP and TYPE for every registered family, even an empty labelled one)."""
    names: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split(maxsplit=3)
        names |= _suffixes(name, kind)
    return names


def sample_names_from_registry() -> set[str]:
    from lorafleet.platform import metrics as m

    names: set[str] = set()
    for family in m.REGISTRY.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        names |= _suffixes(name, family.type)
    return names


def _suffixes(name: str, kind: str) -> set[str]:
    if kind == "histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if kind == "summary":
        return {name, f"{name}_sum", f"{name}_count"}
    return {name}


def live_metrics_text(tmp_root: Path) -> str:
    """``/metrics`` of a real control plane (create_app over a migrated SQLite database)."""
    from fastapi.testclient import TestClient

    from lorafleet.platform.config import Settings
    from lorafleet.services.api import bootstrap, create_app

    settings = Settings(data_dir=tmp_root / "lf")
    bootstrap(settings)
    with TestClient(create_app(settings)) as client:
        r = client.get("/metrics")
        if r.status_code != 200:
            pytest.fail(f"/metrics answered {r.status_code}: {r.text[:500]}")
        return r.text
