from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.services.api.conftest import CHAT_ROWS, Platform


def _objects(platform: Platform) -> list[str]:
    from lorafleet.adapters_store.objectstore import make_object_store

    return sorted(info.key for info in make_object_store(platform.settings).list("files/"))


@pytest.mark.parametrize(
    ("rows", "kind"),
    [
        (CHAT_ROWS, "sft_chat"),
        ([{"prompt": "a", "completion": "b"}], "sft_prompt"),
        ([{"prompt": "a", "chosen": "b", "rejected": "c"}], "dpo"),
        ([{"prompt": "What is 2+2?", "answer": "4"}], "rl"),
    ],
)
def test_valid_files_of_each_kind(platform: Platform, rows: list[object], kind: str) -> None:
    f = platform.upload(rows)
    assert f["status"] == "validated" and f["kind"] == kind and f["line_count"] == len(rows)
    assert f["id"].startswith("file-") and f["errors"] == []
    got = platform.client.get(f"/v1/files/{f['id']}", headers=platform.headers()).json()
    assert got == f
    assert _objects(platform) == [f"files/{_tenant(platform)}/{f['id']}.jsonl"]


def _tenant(platform: Platform) -> str:
    from sqlalchemy import select

    from lorafleet.platform.db import make_engine, models

    engine = make_engine(platform.settings.resolved_database_url)
    with engine.connect() as conn:
        tid = conn.execute(select(models.Tenant.id).where(models.Tenant.name == "default")).scalar_one()
    engine.dispose()
    return str(tid)


@pytest.mark.parametrize(
    ("data", "errors"),
    [
        (b"", [(0, "empty_file")]),
        (b"\n\n", [(0, "empty_file")]),
        (b'{"prompt":"a","completion":"b"}\n{not json\n', [(2, "invalid_json")]),
        (b'{"messages":[{"role":"wizard","content":"x"},{"role":"assistant","content":"y"}]}', [(1, "invalid_role")]),
        (b'{"messages":[{"role":"user","content":"x"}]}', [(1, "missing_assistant")]),
        (b'[1,2]', [(1, "not_an_object")]),
        (b'{"text":"x"}', [(1, "unknown_row_format")]),
        (b'{"prompt":"a","completion":"b"}\n{"prompt":"a","chosen":"b","rejected":"c"}', [(2, "mixed_row_formats")]),
        (b'{"prompt":"a","completion":"b","extra":1}', [(1, "unknown_field")]),
        (b'\xff\xfe', [(0, "invalid_encoding")]),
    ],
)
def test_bad_files_are_reported_with_line_numbers_and_not_stored(platform: Platform, data: bytes,
                                                                 errors: list[tuple[int, str]]) -> None:
    f = platform.upload(data)
    assert f["status"] == "error"
    assert [(e["line"], e["code"]) for e in f["errors"]] == errors
    assert _objects(platform) == []
    # an error file cannot be trained on
    r = platform.client.post("/v1/fine_tuning/jobs", headers=platform.headers(), json={
        "model": "tiny-test-base", "training_file": f["id"], "policy": "p", "method": {"type": "supervised"}})
    assert r.status_code == 400 and r.json()["error"]["code"] == "file_not_validated"


def test_oversized_upload_is_refused_and_nothing_written(make_platform: Callable[..., Platform]) -> None:
    platform = make_platform(max_upload_bytes=1000)
    big = ("\n".join(['{"prompt":"%s","completion":"b"}' % ("x" * 50)] * 40)).encode()
    r = platform.client.post("/v1/files", files={"file": ("big.jsonl", big)}, headers=platform.headers())
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    assert platform.client.get("/v1/files", headers=platform.headers()).json()["data"] == []
    assert _objects(platform) == []


def test_list_paginates_and_delete_removes_bytes(platform: Platform) -> None:
    ids = [platform.upload(CHAT_ROWS)["id"] for _ in range(3)]
    page1 = platform.client.get("/v1/files?limit=2", headers=platform.headers()).json()
    assert [f["id"] for f in page1["data"]] == ids[::-1][:2] and page1["has_more"]
    page2 = platform.client.get(f"/v1/files?limit=2&after={page1['last_id']}", headers=platform.headers()).json()
    assert [f["id"] for f in page2["data"]] == [ids[0]] and not page2["has_more"]
    r = platform.client.delete(f"/v1/files/{ids[0]}", headers=platform.headers())
    assert r.status_code == 200 and r.json() == {"id": ids[0], "object": "file", "deleted": True}
    assert platform.client.get(f"/v1/files/{ids[0]}", headers=platform.headers()).status_code == 404
    assert len(_objects(platform)) == 2


def test_file_used_by_active_job_cannot_be_deleted(platform: Platform) -> None:
    f = platform.upload(CHAT_ROWS)
    job = platform.client.post("/v1/fine_tuning/jobs", headers=platform.headers(), json={
        "model": "tiny-test-base", "training_file": f["id"], "policy": "p", "method": {"type": "supervised"}})
    assert job.status_code == 201
    r = platform.client.delete(f"/v1/files/{f['id']}", headers=platform.headers())
    assert r.status_code == 409 and r.json()["error"]["code"] == "file_in_use"
    platform.client.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel", headers=platform.headers())
    assert platform.client.delete(f"/v1/files/{f['id']}", headers=platform.headers()).status_code == 200
    # the finished job still reads back
    got = platform.client.get(f"/v1/fine_tuning/jobs/{job.json()['id']}", headers=platform.headers())
    assert got.status_code == 200


def test_wrong_purpose(platform: Platform) -> None:
    r = platform.client.post("/v1/files", files={"file": ("a.jsonl", b'{"prompt":"a","completion":"b"}')},
                             data={"purpose": "assistants"}, headers=platform.headers())
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_purpose"
