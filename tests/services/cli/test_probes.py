from pathlib import Path

from fastapi.testclient import TestClient

from lorafleet.platform.config import Settings
from lorafleet.platform.db import upgrade
from lorafleet.services.cli.probes import probe_app


def test_probe_endpoints_for_roles_without_an_api(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    upgrade(settings.resolved_database_url)
    client = TestClient(probe_app(settings, role="trainer"))
    assert client.get("/healthz").json() == {"status": "ok", "role": "trainer"}
    assert client.get("/readyz").status_code == 200
    assert "lorafleet_train_step_seconds" in client.get("/metrics").text
    broken = TestClient(probe_app(Settings(data_dir=tmp_path, database_url="postgresql://nobody@127.0.0.1:1/x"),
                                  role="trainer"))
    r = broken.get("/readyz")
    assert r.status_code == 503 and r.json()["error"]["code"] == "database_unavailable"
