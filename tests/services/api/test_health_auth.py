from __future__ import annotations

import stat

from lorafleet.services.api import bootstrap
from tests.services.api.conftest import Platform


def test_healthz_and_readyz(platform: Platform) -> None:
    assert platform.client.get("/healthz").json() == {"status": "ok"}
    ready = platform.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "object_store": "ok"}


def test_admin_key_written_once_with_mode_600(platform: Platform) -> None:
    path = platform.settings.admin_key_path
    assert path.read_text().strip() == platform.admin_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert bootstrap(platform.settings) is None  # second start creates nothing and shows nothing
    assert path.read_text().strip() == platform.admin_key


def test_missing_bad_and_revoked_keys(platform: Platform) -> None:
    r = platform.client.get("/v1/files")
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    r = platform.client.get("/v1/files", headers={"Authorization": "Bearer lf_nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    created = platform.client.post("/v1/admin/keys", json={"scopes": ["read"]}, headers=platform.headers()).json()
    assert platform.client.get("/v1/files", headers=platform.headers(created["key"])).status_code == 200
    assert platform.client.delete(f"/v1/admin/keys/{created['id']}", headers=platform.headers()).status_code == 200
    r = platform.client.get("/v1/files", headers=platform.headers(created["key"]))
    assert r.status_code == 401


def test_keys_are_stored_hashed(platform: Platform) -> None:
    from sqlalchemy import select

    from lorafleet.platform.db import make_engine, models

    engine = make_engine(platform.settings.resolved_database_url)
    with engine.connect() as conn:
        hashes = [row.key_hash for row in conn.execute(select(models.ApiKey.key_hash))]
    engine.dispose()
    assert hashes and platform.admin_key not in hashes
    assert all(len(h) == 64 for h in hashes)


def test_scopes_are_enforced(platform: Platform) -> None:
    read_key = platform.new_tenant_key("reader", scopes="read")
    r = platform.client.post("/v1/files", files={"file": ("a.jsonl", b'{"prompt":"a","completion":"b"}')},
                             headers=platform.headers(read_key))
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    r = platform.client.post("/v1/admin/keys", json={"scopes": ["admin"]}, headers=platform.headers(read_key))
    assert r.status_code == 403


def test_only_platform_admin_creates_tenants(platform: Platform) -> None:
    tenant_admin = platform.new_tenant_key("acme", scopes="admin")
    r = platform.client.post("/v1/admin/tenants", json={"name": "other"}, headers=platform.headers(tenant_admin))
    assert r.status_code == 403 and r.json()["error"]["code"] == "platform_admin_required"
    # a tenant admin can mint keys for its own tenant only
    own = platform.client.post("/v1/admin/keys", json={"scopes": ["train"]}, headers=platform.headers(tenant_admin))
    assert own.status_code == 201 and own.json()["tenant"] == "acme"
    r = platform.client.post("/v1/admin/keys", json={"tenant": "default", "scopes": ["admin"]},
                             headers=platform.headers(tenant_admin))
    assert r.status_code == 403
    dup = platform.client.post("/v1/admin/tenants", json={"name": "acme"}, headers=platform.headers())
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "tenant_exists"


def test_openapi_and_metrics_published(platform: Platform) -> None:
    spec = platform.client.get("/openapi.json").json()
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{job_id}/cancel", "/v1/policies/{name}",
                 "/v1/models", "/readyz"):
        assert path in spec["paths"]
    platform.client.get("/v1/files", headers=platform.headers())
    text = platform.client.get("/metrics").text
    assert 'lorafleet_http_requests_total{method="GET",route="/v1/files",status="200"}' in text
    assert 'lorafleet_jobs{state="queued"}' in text
    assert 'lorafleet_queue_depth{queue="jobs"}' in text


def test_unknown_route_has_error_body(platform: Platform) -> None:
    r = platform.client.get("/v1/nothing-here", headers=platform.headers())
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
