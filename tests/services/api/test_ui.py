"""The built-in ops page: its JSON (tenant scoping, admin-only replica details) through the API,
and the page itself in a real headless Chromium against a real uvicorn server."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Histogram

from lorafleet.platform import metrics as m
from lorafleet.platform.config import Settings
from lorafleet.platform.db import make_engine, make_sessionmaker, models, transaction
from lorafleet.platform.domain.ids import new_id, new_ulid
from lorafleet.platform.metrics.history import ProcessHistory
from lorafleet.services.api import bootstrap, create_app
from tests.services.api.conftest import BASE_ID, CHAT_ROWS, Platform, _register_base

ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _job(client: httpx.Client | TestClient, key: str, policy: str) -> str:
    """Upload a dataset and create a job through the API."""
    headers = {"Authorization": f"Bearer {key}"}
    data = "\n".join(json.dumps(r) for r in CHAT_ROWS).encode()
    r = client.post("/v1/files", files={"file": ("chat.jsonl", data)}, data={"purpose": "fine-tune"},
                    headers=headers)
    assert r.status_code == 201, r.text
    r = client.post("/v1/fine_tuning/jobs", headers=headers,
                    json={"model": BASE_ID, "training_file": r.json()["id"], "policy": policy,
                          "method": {"type": "supervised"}})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _seed_fleet(settings: Settings, tenant_name: str, policy: str) -> tuple[str, str]:
    """A policy mid-rollout for ``tenant_name`` and a serving replica holding its revision.

    The rollout API and serving agents write these rows in a running platform; here they are
    written directly so the page has every kind of object to show. Returns (revision, replica)."""
    revision, replica = new_ulid(), new_id("replica")
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as session:
        tenant = session.query(models.Tenant).filter_by(name=tenant_name).one()
        pol = session.query(models.Policy).filter_by(tenant_id=tenant.id, name=policy).one_or_none()
        if pol is None:
            pol = models.Policy(id=new_id("policy"), tenant_id=tenant.id, name=policy, base_model_id=BASE_ID)
            session.add(pol)
            session.flush()
        session.add(models.Rollout(id=new_id("rollout"), tenant_id=tenant.id, policy_id=pol.id,
                                   revision_id=revision, state="warming", targets={"replicas": [replica]}))
        now = models.utcnow()
        session.add(models.Replica(
            id=replica, role="serving", base_model_id=BASE_ID, address="http://10.0.0.7:8000",
            resident={"tiers": {"device": [{"revision_id": revision, "bytes": 196608, "pinned": True,
                                            "in_flight": 0, "from_a_newer_agent": 1}],
                                "host": [{"revision_id": revision, "bytes": 196608, "pinned": False}],
                                "disk": []}},
            state="up", heartbeat_at=now - timedelta(seconds=2)))
        session.add(models.Replica(id=new_id("replica"), role="trainer", base_model_id=BASE_ID, state="up",
                                   heartbeat_at=now - timedelta(minutes=5), resident={}))
    engine.dispose()
    return revision, replica


# -- the JSON --------------------------------------------------------------------------------------
def test_summary_needs_a_key(platform: Platform) -> None:
    r = platform.client.get("/v1/ops/summary")
    assert r.status_code == 401
    r = platform.client.get("/v1/ops/summary", headers={"Authorization": "Bearer lf_not_a_real_key"})
    assert r.status_code == 401


def test_summary_is_tenant_scoped_and_replicas_are_for_the_platform_admin(platform: Platform) -> None:
    acme = platform.new_tenant_key("acme", scopes="read,train")
    acme_job = _job(platform.client, acme, "support-bot")
    admin_job = _job(platform.client, platform.admin_key, "house-policy")
    revision, replica = _seed_fleet(platform.settings, "acme", "support-bot")

    mine = platform.client.get("/v1/ops/summary", headers=platform.headers(acme)).json()
    assert [j["id"] for j in mine["jobs"]] == [acme_job]
    assert mine["jobs"][0]["status"] == "queued" and mine["job_counts"]["queued"] == 1
    assert mine["tenant"] == "acme" and mine["platform_admin"] is False
    [pol] = mine["policies"]
    assert pol["name"] == "support-bot" and pol["rollout"]["state"] == "warming"
    assert pol["rollout"]["revision"] == revision
    assert mine["replicas"] is None
    assert {(c["role"], c["state"], c["count"]) for c in mine["replica_counts"]} == {
        ("serving", "up", 1), ("trainer", "stale", 1)}

    admin = platform.client.get("/v1/ops/summary", headers=platform.headers()).json()
    assert [j["id"] for j in admin["jobs"]] == [admin_job]  # tenant-scoped for the admin too
    assert admin["policies"] == []  # acme's policy is not the default tenant's
    by_id = {r["id"]: r for r in admin["replicas"]}
    assert by_id[replica]["resident"]["device"] == [
        {"revision_id": revision, "bytes": 196608, "pinned": True}]
    assert by_id[replica]["stale"] is False
    assert [r["stale"] for r in admin["replicas"] if r["role"] == "trainer"] == [True]


def test_page_is_self_contained_under_a_strict_csp(platform: Platform) -> None:
    r = platform.client.get("/ui")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in r.text and f'<style nonce="{nonce}">' in r.text
    assert "__JS__" not in r.text and "__CSS__" not in r.text
    for external in ("http://", "https://", "//cdn", "@import", "url("):
        # the only absolute URL allowed is the SVG namespace, which is a name, not a request
        hits = [line for line in r.text.splitlines()
                if external in line and "www.w3.org/2000/svg" not in line]
        assert hits == [], hits
    assert platform.client.get("/ui").headers["content-security-policy"] != csp  # a fresh nonce each time


# -- the page in a browser -------------------------------------------------------------------------
@dataclass
class LiveServer:
    url: str
    settings: Settings
    admin_key: str
    app: object


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path / "lf")
    secret = bootstrap(settings)
    assert secret is not None
    _register_base(settings)
    app = create_app(settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-ui-test",
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}", settings=settings, admin_key=secret, app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _synthetic_hour(now: float) -> ProcessHistory:
    """A history filled by the real sampler from real histograms over a simulated hour, so the
    charts have lines to draw (the live server has served no generation to measure)."""
    registry = CollectorRegistry()
    load = Histogram("lorafleet_adapter_load_seconds", "", ["stage", "tier"], registry=registry,
                     buckets=m.ADAPTER_LOAD_SECONDS._upper_bounds[:-1])
    ttft = Histogram("lorafleet_ttft_seconds", "", ["policy", "first_request"], registry=registry,
                     buckets=m.TTFT_SECONDS._upper_bounds[:-1])
    clock = [now - 3600.0]
    history = ProcessHistory(registry=registry, interval_seconds=60, clock=lambda: clock[0])
    history.sample()
    for minute in range(60):
        wave = 1 + 0.5 * ((minute % 20) / 20)
        for _ in range(20):
            load.labels("fetch", "disk").observe(0.04 * wave)
            load.labels("read", "host").observe(0.012 * wave)
            load.labels("install", "host").observe(0.003 * wave)
            ttft.labels("support-bot", "false").observe(0.08 * wave)
        if minute % 15 == 3:
            ttft.labels("support-bot", "true").observe(0.3 * wave)
        clock[0] += 60
        history.sample()
    return history


def _browser():  # type: ignore[no-untyped-def]
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run scripts/install-test-tools.sh")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-test-tools.sh (Debian chromium)")
    return sync_playwright()


@pytest.mark.browser
def test_ops_page_in_headless_chromium(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url, timeout=30) as api:
        admin_h = {"Authorization": f"Bearer {live_server.admin_key}"}
        assert api.post("/v1/admin/tenants", json={"name": "acme"}, headers=admin_h).status_code == 201
        r = api.post("/v1/admin/keys", json={"tenant": "acme", "scopes": ["read", "train"]}, headers=admin_h)
        acme_key = r.json()["key"]
        acme_job = _job(api, acme_key, "support-bot")
        admin_job = _job(api, live_server.admin_key, "house-policy")
    revision, replica = _seed_fleet(live_server.settings, "acme", "support-bot")
    _seed_fleet(live_server.settings, "default", "house-policy")
    live_server.app.state.ops_history = _synthetic_hour(time.time())  # type: ignore[attr-defined]

    requests: list[str] = []
    problems: list[str] = []
    with _browser() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 900})
            page.on("request", lambda req: requests.append(req.url))
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.goto(f"{live_server.url}/ui")
            page.wait_for_selector("#login:not([hidden])")

            page.fill("#key", "lf_wrong")
            page.click("#login-form button")
            # a selector, not wait_for_function: the page's CSP forbids the eval that one would need
            page.wait_for_selector("#login-error:not(:empty)")
            assert page.is_visible("#login") and not page.is_visible("#dash")
            problems.clear()  # the refused key logs its 401 on the console, as it should

            # a tenant's read key: its job and its policy mid-rollout, no replica details
            page.fill("#key", acme_key)
            page.click("#login-form button")
            page.wait_for_selector(f'tr[data-job="{acme_job}"]')
            assert page.locator(f'tr[data-job="{admin_job}"]').count() == 0
            row = page.locator('tr[data-policy="support-bot"]')
            assert "warming" in row.inner_text() and revision in row.inner_text()
            assert "platform admin only" in page.inner_text("#replica-note")
            assert page.locator(f'tr[data-replica="{replica}"]').count() == 0
            assert "step" in page.locator(f'tr[data-job="{acme_job}"]').inner_text() or \
                "not started" in page.locator(f'tr[data-job="{acme_job}"]').inner_text()
            # the key lives in sessionStorage, not in the URL
            assert acme_key not in page.url
            assert page.evaluate("sessionStorage.getItem('lorafleet.apiKey')") == acme_key

            # the platform admin: replicas with their resident adapters, and the charts
            page.click("#signout")
            page.wait_for_selector("#login:not([hidden])")
            page.fill("#key", live_server.admin_key)
            page.click("#login-form button")
            page.wait_for_selector(f'tr[data-job="{admin_job}"]')
            page.wait_for_selector(f'tr[data-replica="{replica}"]')
            assert revision in page.locator(f'tr[data-replica="{replica}"]').inner_text()
            assert page.locator("#chart-load svg path").count() == 3
            assert page.locator("#chart-ttft svg path").count() == 2
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "ui.png"), full_page=True)
        finally:
            browser.close()

    assert problems == []
    outside = [u for u in requests if not u.startswith(live_server.url) and not u.startswith("data:")]
    assert outside == [], f"the page reached outside its own server: {outside}"
    assert (ARTIFACTS / "ui.png").stat().st_size > 10_000
