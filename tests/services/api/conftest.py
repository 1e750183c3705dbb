from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lorafleet.platform.config import Settings
from lorafleet.platform.db import make_engine, make_sessionmaker, models, transaction
from lorafleet.services.api import bootstrap, create_app

BASE_ID = "tiny-test-base"


@dataclass
class Platform:
    settings: Settings
    client: TestClient
    admin_key: str

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.admin_key}"}

    def new_tenant_key(self, name: str, scopes: str = "train,infer,read") -> str:
        r = self.client.post("/v1/admin/tenants", json={"name": name}, headers=self.headers())
        assert r.status_code == 201, r.text
        r = self.client.post("/v1/admin/keys", json={"tenant": name, "scopes": scopes.split(",")},
                             headers=self.headers())
        assert r.status_code == 201, r.text
        return str(r.json()["key"])

    def upload(self, rows: list[object] | bytes, key: str | None = None, name: str = "data.jsonl") -> dict:
        data = rows if isinstance(rows, bytes) else "\n".join(json.dumps(r) for r in rows).encode()
        r = self.client.post("/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"},
                             headers=self.headers(key))
        assert r.status_code == 201, r.text
        return dict(r.json())


def _register_base(settings: Settings) -> None:
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as session:
        session.add(models.BaseModelRow(id=BASE_ID, architecture="qwen3_moe", path="/nonexistent",
                                        fingerprint="0" * 64, max_lora_rank=8, is_moe=True, num_experts=8))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def make_platform(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Platform]]:
    clients: list[TestClient] = []

    def factory(**overrides: object) -> Platform:
        url = ""
        if request.param == "postgres":
            url = request.getfixturevalue("pg_fresh_url")
        settings = Settings(data_dir=tmp_path / "lf", database_url=url, **overrides)  # type: ignore[arg-type]
        secret = bootstrap(settings)
        assert secret is not None
        _register_base(settings)
        client = TestClient(create_app(settings))
        client.__enter__()
        clients.append(client)
        return Platform(settings=settings, client=client, admin_key=secret)

    yield factory
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def platform(make_platform: Callable[..., Platform]) -> Platform:
    return make_platform()


CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]}
    for i in range(5)
]
