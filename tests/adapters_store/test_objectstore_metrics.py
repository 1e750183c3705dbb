"""``lorafleet_object_store_errors_total{operation}`` counts real store failures (a stopped S3
endpoint, refused credentials, corrupted bytes, a local path that cannot be written), once per failed
operation, and never counts answers such as a missing key or an ``if_absent`` conflict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafleet.adapters_store.objectstore import LocalObjectStore
from lorafleet.platform import metrics as m
from lorafleet.platform.domain.errors import Conflict, IntegrityFailure, LorafleetError, NotFound, Unavailable
from tests.harness_s3 import S3Server, make_s3_store

OPERATIONS = ("put", "get", "head", "list", "delete", "ping")


def _errors() -> dict[str, float]:
    return {op: m.REGISTRY.get_sample_value("lorafleet_object_store_errors_total", {"operation": op}) or 0.0
            for op in OPERATIONS}


def _delta(before: dict[str, float]) -> dict[str, float]:
    return {op: n - before[op] for op, n in _errors().items() if n != before[op]}


def test_local_store_counts_corruption_and_io_failures_only(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    store = LocalObjectStore(root)
    store.put_bytes("a/kept", b"payload")
    before = _errors()
    with pytest.raises(NotFound):
        store.get_bytes("a/missing")
    assert not store.exists("a/missing")
    with pytest.raises(Conflict):
        store.put_bytes("a/kept", b"again", if_absent=True)
    assert _delta(before) == {}

    sidecar = json.loads((root / "a" / "kept~meta.json").read_text())
    (root / "a" / sidecar["data"]).write_bytes(b"tampered")
    with pytest.raises(IntegrityFailure):
        store.get_bytes("a/kept")
    (root / "blocker").write_bytes(b"a file where a key's directory must go")
    with pytest.raises(OSError):
        store.put_bytes("blocker/x", b"x")  # put_bytes calls put_stream: still one failed operation
    assert _delta(before) == {"get": 1, "put": 1}


@pytest.mark.integration
def test_s3_store_counts_a_stopped_endpoint_and_refused_credentials(s3_server: S3Server, s3_bucket: str) -> None:
    healthy = make_s3_store(s3_server, s3_bucket)
    before = _errors()
    assert not healthy.exists("never-written")
    with pytest.raises(NotFound):
        healthy.get_bytes("never-written")
    assert _delta(before) == {}

    # nothing listens on port 9: every call fails after its retries, and counts once
    stopped = make_s3_store(s3_server, s3_bucket, endpoint_url="http://127.0.0.1:9", max_attempts=2)
    with pytest.raises(Unavailable):
        stopped.put_bytes("k", b"v")
    with pytest.raises(Unavailable):
        stopped.get_bytes("k")
    with pytest.raises(Unavailable):
        list(stopped.list("prefix/"))
    with pytest.raises(Unavailable):
        stopped.ping()
    assert _delta(before) == {"put": 1, "get": 1, "list": 1, "ping": 1}

    before = _errors()
    wrong_secret = make_s3_store(s3_server, s3_bucket, secret_key="not-the-secret")
    with pytest.raises(LorafleetError) as info:
        wrong_secret.delete("k")
    assert info.value.code == "object_store_access_denied"
    assert _delta(before) == {"delete": 1}
