"""Revisions in the object store: immutable publish, download, orphan sweep — on the local store
and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lorafleet.adapters_store.bundle import MANIFEST_FILE, TENSOR_FILE, BundleRejected, verify_bundle
from lorafleet.adapters_store.objectstore import LocalObjectStore, ObjectStore
from lorafleet.adapters_store.revisions import (
    UPLOAD_MARKER,
    PublishedRevision,
    RevisionRef,
    download_revision,
    fetch_manifest,
    publish_revision,
    revision_prefix,
    sweep_orphans,
)
from lorafleet.platform.domain.errors import Conflict
from lorafleet.platform.domain.ids import new_ulid
from tests.adapters_store._bundle_support import TINY_MOE_HF, base_of, make_bundle

BASE = base_of(TINY_MOE_HF)
LATER = timedelta(hours=2)
GRACE = timedelta(hours=1)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "objects")
    else:
        yield request.getfixturevalue("s3_store")


def _keys(store: ObjectStore, prefix: str = "") -> list[str]:
    return sorted(info.key for info in store.list(prefix))


def test_publish_stores_marker_tensors_manifest_and_returns_the_row(
    store: ObjectStore, tmp_path: Path
) -> None:
    manifest, _ = make_bundle(tmp_path / "b")
    published = publish_revision(store, tmp_path / "b", base=BASE)
    prefix = f"adapters/ten-a/pol-a/{manifest.revision_id}/"
    assert (
        published.uri
        == prefix
        == revision_prefix(tenant_id="ten-a", policy_id="pol-a", revision_id=manifest.revision_id)
    )
    assert set(_keys(store, prefix)) == {prefix + UPLOAD_MARKER, prefix + TENSOR_FILE, prefix + MANIFEST_FILE}
    manifest_bytes = (tmp_path / "b" / MANIFEST_FILE).read_bytes()
    assert published.sha256 == hashlib.sha256(manifest_bytes).hexdigest()
    assert published.bytes == sum(i.size for i in store.list(prefix))
    assert published.manifest == manifest.model_dump(mode="json") and published.rank == 2
    assert store.get_bytes(prefix + TENSOR_FILE) == (tmp_path / "b" / TENSOR_FILE).read_bytes()


def test_download_gives_a_bundle_that_verifies(store: ObjectStore, tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    published = publish_revision(store, tmp_path / "b")
    manifest = download_revision(store, published.ref, tmp_path / "copy")
    assert verify_bundle(tmp_path / "copy", base=BASE, manifest_sha256=published.sha256) == manifest
    assert (tmp_path / "copy" / TENSOR_FILE).read_bytes() == (tmp_path / "b" / TENSOR_FILE).read_bytes()


def test_a_revision_can_never_be_written_twice(store: ObjectStore, tmp_path: Path) -> None:
    rid = new_ulid()
    make_bundle(tmp_path / "first", revision_id=rid, seed=1)
    make_bundle(tmp_path / "second", revision_id=rid, seed=2)  # same id, different tensors
    first = publish_revision(store, tmp_path / "first")
    for attempt in ("first", "second"):
        with pytest.raises(Conflict) as caught:
            publish_revision(store, tmp_path / attempt)
        assert caught.value.code == "revision_exists"
    assert store.get_bytes(first.uri + TENSOR_FILE) == (tmp_path / "first" / TENSOR_FILE).read_bytes()
    assert fetch_manifest(store, first.ref)[0].model_dump(mode="json") == first.manifest


def test_concurrent_publishers_of_one_revision_one_wins(store: ObjectStore, tmp_path: Path) -> None:
    rid = new_ulid()
    for i in range(4):
        make_bundle(tmp_path / f"b{i}", revision_id=rid, seed=i)
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def publish(i: int) -> None:
        barrier.wait()
        try:
            publish_revision(store, tmp_path / f"b{i}")
            outcomes.append(f"ok{i}")
        except Conflict as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("ok")]
    assert len(winners) == 1 and outcomes.count("revision_exists") == 3
    stored = store.get_bytes(f"adapters/ten-a/pol-a/{rid}/{TENSOR_FILE}")
    assert stored == (tmp_path / f"b{winners[0][2:]}" / TENSOR_FILE).read_bytes()


def test_fetch_refuses_a_manifest_that_does_not_match_the_row(store: ObjectStore, tmp_path: Path) -> None:
    make_bundle(tmp_path / "b")
    published = publish_revision(store, tmp_path / "b")
    wrong = RevisionRef(revision_id=published.revision_id, uri=published.uri, manifest_sha256="0" * 64)
    with pytest.raises(BundleRejected) as caught:
        download_revision(store, wrong, tmp_path / "copy")
    assert caught.value.code == "checksum_mismatch"


def test_sweeper_removes_only_old_uncommitted_revisions(store: ObjectStore, tmp_path: Path) -> None:
    def publish(name: str) -> PublishedRevision:
        make_bundle(tmp_path / name)
        return publish_revision(store, tmp_path / name)

    committed, orphan, young = publish("committed"), publish("orphan"), publish("young")
    # A crashed writer: marker and tensors, no manifest.
    crashed = publish("crashed")
    store.delete(crashed.uri + MANIFEST_FILE)
    # An interrupted sweep: tensors left, marker gone; dated by the time in its ULID.
    halfswept = publish("half")
    store.delete(halfswept.uri + UPLOAD_MARKER)
    store.delete(halfswept.uri + MANIFEST_FILE)
    # Not lorafleet's: no marker and an id that is not a ULID — undatable, so left alone.
    store.put_bytes("adapters/ten-a/pol-a/hand-made/adapter.safetensors", b"x")
    store.put_bytes("datasets/keep-me.jsonl", b"{}")
    committed_ids = {committed.revision_id}

    report = sweep_orphans(store, is_committed=committed_ids.__contains__, older_than=GRACE)
    assert report.deleted == [] and report.kept_committed == 1
    assert report.kept_young == 4 and report.kept_undatable == 1

    doomed_bytes = sum(i.size for r in (orphan, crashed, halfswept) for i in store.list(r.uri))
    # Two hours later; "young" is committed only now, the rest never were.
    committed_ids.add(young.revision_id)
    report = sweep_orphans(
        store, is_committed=committed_ids.__contains__, older_than=GRACE, now=datetime.now(UTC) + LATER
    )
    assert sorted(report.deleted) == sorted([orphan.uri, crashed.uri, halfswept.uri])
    assert report.kept_committed == 2
    assert report.bytes_freed == doomed_bytes
    remaining = _keys(store)
    for gone in (orphan, crashed, halfswept):
        assert not [k for k in remaining if k.startswith(gone.uri)]
    for kept in (committed, young):
        assert set(_keys(store, kept.uri)) == {
            kept.uri + UPLOAD_MARKER,
            kept.uri + TENSOR_FILE,
            kept.uri + MANIFEST_FILE,
        }
    assert "adapters/ten-a/pol-a/hand-made/adapter.safetensors" in remaining
    assert "datasets/keep-me.jsonl" in remaining
