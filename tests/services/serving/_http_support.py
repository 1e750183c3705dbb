"""Support for the serving HTTP tests (OpenAI API, agent): a seeded database and a live server.

- :func:`fresh_database`: a PostgreSQL database of its own, migrated;
- :func:`seed`: tenants, keys, the base row, policies and revision rows for the conftest's
  published adapters;
- :class:`LiveServer`: a real uvicorn server on a free 127.0.0.1 port in a background thread.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import uvicorn
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.adapters_store import BundleCache
from lorafleet.platform.auth import create_api_key, create_tenant, ensure_default_tenant
from lorafleet.platform.db import make_engine, make_sessionmaker, models, transaction, upgrade
from lorafleet.platform.domain.enums import Scope
from lorafleet.services.serving.engine.torch_engine import TorchEngine
from tests.conftest import PG_ADMIN_URL
from tests.services.serving.conftest import BASE_MODEL_ID, TENANT, PublishedAdapter, ServingBase


@contextmanager
def fresh_database() -> Iterator[str]:
    name = f"lorafleet_srv_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Seeded:
    sessions: sessionmaker[Session]
    admin_key: str
    """Admin of tenant ``default``: the platform operator."""
    tenant_admin_key: str
    """Admin of the serving tenant only."""
    infer_key: str
    read_key: str
    other_key: str
    """An infer key of another tenant, which owns policy ``secret``."""
    policies: dict[str, list[PublishedAdapter]] = field(default_factory=dict)
    """Policy name → its revisions; the first is the serving one."""

    def set_serving(self, policy: str, revision_id: str | None) -> None:
        with transaction(self.sessions) as s:
            row = s.query(models.Policy).filter_by(tenant_id=TENANT, name=policy).one()
            row.previous_revision_id, row.serving_revision_id = row.serving_revision_id, revision_id


def seed(url: str, base: ServingBase, policies: dict[str, list[PublishedAdapter]]) -> Seeded:
    """Rows for ``policies`` (name → revisions of it, all published under policy id ``policy_id``)."""
    sessions = make_sessionmaker(make_engine(url))
    with transaction(sessions) as s:
        _, admin = ensure_default_tenant(s)
        s.add(models.Tenant(id=TENANT, name="acme"))
        s.add(
            models.BaseModelRow(
                id=BASE_MODEL_ID,
                architecture=base.spec.model_type,
                path=str(base.path),
                fingerprint=base.expected.fingerprint,
                max_lora_rank=base.expected.max_lora_rank,
                is_moe=base.spec.is_moe,
                num_experts=base.spec.num_experts,
                config={"spec": base.spec.model_dump(mode="json")},
            )
        )
        s.flush()
        keys = {
            scopes: create_api_key(s, tenant_id=TENANT, scopes=[Scope(x) for x in scopes.split(",")])[1]
            for scopes in ("infer", "read", "admin")
        }
        other = create_tenant(s, "other")
        _, other_key = create_api_key(s, tenant_id=other.id, scopes=[Scope.INFER])
        s.add(models.Policy(id="pol-secret", tenant_id=other.id, name="secret", base_model_id=BASE_MODEL_ID))
        for name, revisions in policies.items():
            policy_id = _policy_id(name, revisions)
            s.add(
                models.Policy(
                    id=policy_id,
                    tenant_id=TENANT,
                    name=name,
                    base_model_id=BASE_MODEL_ID,
                    serving_revision_id=revisions[0].handle.revision_id if revisions else None,
                )
            )
            s.flush()
            for rev in revisions:
                ref = rev.handle.ref
                s.add(
                    models.AdapterRevision(
                        id=ref.revision_id,
                        tenant_id=TENANT,
                        policy_id=policy_id,
                        base_model_id=BASE_MODEL_ID,
                        uri=ref.uri,
                        sha256=ref.manifest_sha256,
                        bytes=rev.nbytes,
                        rank=rev.lora.rank,
                        manifest={},
                    )
                )
    if admin is None:
        raise AssertionError("the database was not fresh")
    return Seeded(
        sessions=sessions,
        admin_key=admin,
        tenant_admin_key=keys["admin"],
        infer_key=keys["infer"],
        read_key=keys["read"],
        other_key=other_key,
        policies=policies,
    )


def _policy_id(name: str, revisions: list[PublishedAdapter]) -> str:
    # conftest publishes revision bundles under policy id == the handle's ``policy`` field
    if not revisions:
        return f"pol-{name}"
    ids = {r.handle.policy for r in revisions}
    if len(ids) != 1:
        raise AssertionError(f"revisions of one policy were published under {ids}")
    return str(ids.pop())


CHATML = (
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def with_chat_template(tokenizer: Any) -> Any:
    """The base's tokenizer, or a copy given a ChatML template when it has none (the conftest's
    temporary random base has none; tiny-moe has one). The shared fixture is never modified."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer
    copy = deepcopy(tokenizer)
    copy.chat_template = CHATML
    return copy


def torch_engine(base: ServingBase, store: Any, cache_dir: Path, **overrides: Any) -> TorchEngine:
    """A TorchEngine like the conftest's ``make_engine`` (not started), for module-scoped fixtures."""
    cache = BundleCache(cache_dir, max_bytes=64 << 20, store=store, base=base.expected)
    kwargs: dict[str, Any] = {
        "base_model_id": BASE_MODEL_ID,
        "expected_base": base.expected,
        "bundle_cache": cache,
        "max_batch_rows": 16,
        "max_context": 256,
        "max_device_adapters": 4,
        "max_host_adapter_bytes": 256 << 20,
        "max_lora_rank": 8,
        "adapter_wait_seconds": 10.0,
    }
    return TorchEngine(base.model, base.spec, with_chat_template(base.tokenizer), **(kwargs | overrides))


class LiveServer:
    """``app`` served by uvicorn on 127.0.0.1 (a free port) in a daemon thread, lifespan included."""

    def __init__(self, app: Any) -> None:
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, name="uvicorn-test", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("the test server did not start")
            time.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
