"""Every resource: a second tenant's key gets 404 on the first tenant's ids and sees none in lists."""

from __future__ import annotations

from lorafleet.platform.db import make_engine, make_sessionmaker, models, transaction
from lorafleet.platform.domain.ids import new_id, new_ulid
from tests.services.api.conftest import BASE_ID, CHAT_ROWS, Platform


def _seed_policy(platform: Platform, tenant_name: str, job_id: str) -> tuple[str, str]:
    from sqlalchemy import select

    engine = make_engine(platform.settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as s:
        tid = s.scalars(select(models.Tenant.id).where(models.Tenant.name == tenant_name)).one()
        policy = models.Policy(id=new_id("policy"), tenant_id=tid, name="secret-policy", base_model_id=BASE_ID)
        s.add(policy)
        s.flush()
        rev = models.AdapterRevision(id=new_ulid(), tenant_id=tid, policy_id=policy.id, base_model_id=BASE_ID,
                                     job_id=job_id, uri="adapters/x", sha256="0" * 64, bytes=1, rank=1, manifest={})
        s.add(rev)
        policy.serving_revision_id = rev.id
        s.add(models.Checkpoint(id=new_id("checkpoint"), job_id=job_id, tenant_id=tid, step=1, object_key="k",
                                sha256="0" * 64))
    engine.dispose()
    return policy.name, rev.id


def test_second_tenant_sees_nothing_of_the_first(platform: Platform) -> None:
    a = platform.new_tenant_key("tenant-a", scopes="train,infer,read,admin")
    b = platform.new_tenant_key("tenant-b", scopes="train,infer,read,admin")
    c = platform.client
    f = platform.upload(CHAT_ROWS, key=a)
    job = c.post("/v1/fine_tuning/jobs", headers=platform.headers(a), json={
        "model": BASE_ID, "training_file": f["id"], "policy": "p", "method": {"type": "supervised"}}).json()
    policy, revision = _seed_policy(platform, "tenant-a", job["id"])
    a_key_id = c.get("/v1/admin/keys", headers=platform.headers(a)).json()["data"][0]["id"]

    hb = platform.headers(b)
    for method, path in [
        ("GET", f"/v1/files/{f['id']}"),
        ("DELETE", f"/v1/files/{f['id']}"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}"),
        ("POST", f"/v1/fine_tuning/jobs/{job['id']}/cancel"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/events"),
        ("GET", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"),
        ("GET", f"/v1/policies/{policy}"),
        ("GET", f"/v1/policies/{policy}/revisions"),
        ("DELETE", f"/v1/admin/keys/{a_key_id}"),
    ]:
        r = c.request(method, path, headers=hb)
        assert r.status_code == 404, (method, path, r.status_code)
        assert r.json()["error"]["code"].endswith("not_found")
    # a job naming another tenant's file: the file does not exist for b
    r = c.post("/v1/fine_tuning/jobs", headers=hb, json={
        "model": BASE_ID, "training_file": f["id"], "policy": "p", "method": {"type": "supervised"}})
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
    for path in ["/v1/files", "/v1/fine_tuning/jobs", "/v1/policies"]:
        assert c.get(path, headers=hb).json()["data"] == [], path
    model_ids = {m["id"] for m in c.get("/v1/models", headers=hb).json()["data"]}
    assert model_ids == {BASE_ID}
    assert {k["tenant"] for k in c.get("/v1/admin/keys", headers=hb).json()["data"]} == {"tenant-b"}

    # and tenant a still sees all of it, unharmed
    ha = platform.headers(a)
    assert c.get(f"/v1/files/{f['id']}", headers=ha).status_code == 200
    assert c.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=ha).json()["status"] == "queued"
    revs = c.get(f"/v1/policies/{policy}/revisions", headers=ha).json()["data"]
    assert [r["id"] for r in revs] == [revision] and revs[0]["serving"]
    assert {m["id"] for m in c.get("/v1/models", headers=ha).json()["data"]} == {BASE_ID, policy}
