"""Adapter revisions in the object store: layout, immutable publish, download, orphan sweep.

Layout, one prefix per revision::

    adapters/<tenant>/<policy>/<revision>/_upload.json         written first: claims the id, dates the upload
    adapters/<tenant>/<policy>/<revision>/adapter.safetensors  the tensors
    adapters/<tenant>/<policy>/<revision>/manifest.json        written last: the bundle is complete

Every object is written with ``if_absent``, so a revision, once claimed, never changes; a
second publish of the same id is refused (``revision_exists``) before it writes a byte.
Visibility is the database's job (commit-by-metadata): the caller commits the AdapterRevision
row only after :func:`publish_revision` returned, and :func:`sweep_orphans` deletes prefixes
that never got a row once they are older than a grace period.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ulid import ULID

from lorafleet.adapters_store.bundle.errors import RejectCode, reject
from lorafleet.adapters_store.bundle.manifest import MANIFEST_FILE, BundleManifest, utc_now
from lorafleet.adapters_store.bundle.verify import ExpectedBase, verify_bundle
from lorafleet.adapters_store.objectstore.base import ObjectInfo, ObjectStore
from lorafleet.platform.domain.errors import Conflict, IntegrityFailure, InvalidRequest, NotFound

ROOT = "adapters"
UPLOAD_MARKER = "_upload.json"


class UploadMarker(BaseModel):
    """The first object of a revision: claims its id and dates the upload for the sweeper."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    revision_id: str
    started_at: datetime
    writer: str = Field(max_length=300)
    """host:pid of the publisher, for an operator looking at an orphan."""


class RevisionRef(BaseModel):
    """Where a committed revision lives and how to check it: what a reader takes from the row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    revision_id: str
    uri: str
    """Object-store prefix of the revision (ends in "/")."""
    manifest_sha256: str
    """sha256 of manifest.json (the row's ``sha256``); the manifest pins every other file."""


class PublishedRevision(BaseModel):
    """What the caller needs to commit the AdapterRevision row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    revision_id: str
    tenant_id: str
    policy_id: str
    uri: str
    """Object-store prefix holding the revision (ends in "/")."""
    sha256: str
    """sha256 of manifest.json, which records every other file's sha256."""
    bytes: int
    """Every object of the revision: marker, tensors and manifest."""
    rank: int
    manifest: dict[str, Any]

    @property
    def ref(self) -> RevisionRef:
        return RevisionRef(revision_id=self.revision_id, uri=self.uri, manifest_sha256=self.sha256)


def revision_prefix(*, tenant_id: str, policy_id: str, revision_id: str) -> str:
    for what, value in (("tenant_id", tenant_id), ("policy_id", policy_id), ("revision_id", revision_id)):
        if not value or "/" in value or value in (".", ".."):
            raise InvalidRequest(f"{what} {value!r} cannot be an object-store path segment", param=what)
    return f"{ROOT}/{tenant_id}/{policy_id}/{revision_id}/"


def _put_new(store: ObjectStore, key: str, data: bytes | Path, *, revision_id: str) -> ObjectInfo:
    try:
        if isinstance(data, Path):
            return store.put_file(key, data, if_absent=True)
        return store.put_bytes(key, data, if_absent=True)
    except Conflict:
        raise Conflict(
            f"adapter revision {revision_id} already exists; revisions are immutable", code="revision_exists"
        ) from None


def publish_revision(
    store: ObjectStore, bundle_dir: Path, *, base: ExpectedBase | None = None
) -> PublishedRevision:
    """Upload the bundle at ``bundle_dir``: marker, then tensors, then the manifest, each if absent.

    The bundle is verified locally first (against ``base`` when given) and every upload's
    recorded checksum is compared with the manifest, so a published revision is one whose
    bytes were all checked. Only after this returns may the caller commit the revision row.
    """
    manifest = verify_bundle(bundle_dir, base=base)
    manifest_bytes = (bundle_dir / MANIFEST_FILE).read_bytes()
    rid = manifest.revision_id
    prefix = revision_prefix(tenant_id=manifest.tenant_id, policy_id=manifest.policy_id, revision_id=rid)
    marker = UploadMarker(
        revision_id=rid, started_at=utc_now(), writer=f"{socket.gethostname()}:{os.getpid()}"
    )
    stored = [_put_new(store, prefix + UPLOAD_MARKER, marker.model_dump_json().encode(), revision_id=rid)]
    for name, entry in manifest.files.items():
        info = _put_new(store, prefix + name, bundle_dir / name, revision_id=rid)
        if info.size != entry.bytes or (info.sha256 is not None and info.sha256 != entry.sha256):
            raise IntegrityFailure(
                f"{prefix}{name} was stored with another checksum", code="checksum_mismatch"
            )
        stored.append(info)
    stored.append(_put_new(store, prefix + MANIFEST_FILE, manifest_bytes, revision_id=rid))
    return PublishedRevision(
        revision_id=rid,
        tenant_id=manifest.tenant_id,
        policy_id=manifest.policy_id,
        uri=prefix,
        sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        bytes=sum(i.size for i in stored),
        rank=manifest.rank,
        manifest=manifest.model_dump(mode="json"),
    )


def fetch_manifest(store: ObjectStore, ref: RevisionRef) -> tuple[BundleManifest, bytes]:
    """The revision's manifest (parsed, and its exact bytes), checked against the row's sha256."""
    data = store.get_bytes(ref.uri + MANIFEST_FILE)
    if hashlib.sha256(data).hexdigest() != ref.manifest_sha256:
        raise reject(
            RejectCode.CHECKSUM_MISMATCH, f"manifest of revision {ref.revision_id} does not match its row"
        )
    manifest = BundleManifest.from_json_bytes(data)
    if manifest.revision_id != ref.revision_id:
        raise reject(
            RejectCode.MANIFEST_INVALID, f"manifest at {ref.uri} names revision {manifest.revision_id}"
        )
    return manifest, data


def download_revision(store: ObjectStore, ref: RevisionRef, dest_dir: Path) -> BundleManifest:
    """Download every file of the revision into ``dest_dir`` (created); the caller verifies the result."""
    manifest, data = fetch_manifest(store, ref)
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / MANIFEST_FILE).write_bytes(data)
    for name in manifest.files:
        store.download(ref.uri + name, dest_dir / name, verify=True)  # parallel ranged GETs on S3
    return manifest


@dataclass
class SweepReport:
    deleted: list[str] = field(default_factory=list)
    """Revision prefixes removed."""
    kept_committed: int = 0
    kept_young: int = 0
    """Uncommitted prefixes still inside the grace period (possibly an upload in progress)."""
    kept_undatable: int = 0
    """Prefixes with no marker and an id that is not a ULID: not lorafleet's, left for an operator."""
    bytes_freed: int = 0


def _started_at(store: ObjectStore, prefix: str, keys: set[str], revision_id: str) -> datetime | None:
    """When the upload began: its marker, else the time in the revision's ULID, else unknown."""
    if prefix + UPLOAD_MARKER in keys:
        try:
            return UploadMarker.model_validate_json(store.get_bytes(prefix + UPLOAD_MARKER)).started_at
        except (ValidationError, NotFound, IntegrityFailure):
            pass  # an unreadable marker falls back to the id's own timestamp
    try:
        return ULID.from_str(revision_id.upper()).datetime
    except ValueError:
        return None


def sweep_orphans(
    store: ObjectStore,
    *,
    is_committed: Callable[[str], bool],
    older_than: timedelta,
    now: datetime | None = None,
) -> SweepReport:
    """Delete revision prefixes that have no committed row and began more than ``older_than`` ago.

    ``older_than`` must exceed the longest publish plus the time to commit its row: the check
    and the delete are not atomic with a writer's commit. A prefix with tensors but no
    manifest (a crashed writer) is dated by its marker. Objects are deleted manifest first and
    marker last, so a sweep interrupted midway leaves a prefix the next sweep still dates.
    A prefix whose age cannot be told at all (no marker, an id that is not a ULID) was not
    written by lorafleet and is left alone.
    """
    now = now or datetime.now(UTC)
    groups: dict[str, dict[str, int]] = defaultdict(dict)
    for info in store.list(ROOT + "/"):
        parts = info.key.split("/")
        if len(parts) >= 5:
            groups["/".join(parts[:4]) + "/"][info.key] = info.size
    report = SweepReport()
    for prefix, sizes in sorted(groups.items()):
        revision_id = prefix.rstrip("/").rsplit("/", 1)[1]
        if is_committed(revision_id):
            report.kept_committed += 1
            continue
        started = _started_at(store, prefix, set(sizes), revision_id)
        if started is None:
            report.kept_undatable += 1
            continue
        if now - started < older_than:
            report.kept_young += 1
            continue
        marker, manifest = prefix + UPLOAD_MARKER, prefix + MANIFEST_FILE
        order = sorted(sizes, key=lambda k: (k != manifest, k == marker, k))
        for key in order:
            store.delete(key)
        report.deleted.append(prefix)
        report.bytes_freed += sum(sizes.values())
    return report
