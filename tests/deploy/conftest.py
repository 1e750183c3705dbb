from __future__ import annotations

import pytest

from tests.deploy._support import live_metrics_text


@pytest.fixture(scope="session")
def live_metrics(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The Prometheus text of a running control plane, scraped once per session."""
    return live_metrics_text(tmp_path_factory.mktemp("live-metrics"))
