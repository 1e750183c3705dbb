"""lorafleet's adapter store: the packed bundle format, revisions in the object store, the disk cache.

    bundle/       FORMAT.md made code: manifest, pack/unpack, PEFT interchange, verification
    objectstore/  the ObjectStore protocol and its local-directory and S3 implementations
    revisions     object-store layout of revisions, immutable publish, download, orphan sweeper
    cache         the local byte-bounded, multi-process disk cache of verified bundles

Nothing imported here pulls in torch; the tensor-handling functions of ``bundle`` load it on use.
"""

from lorafleet.adapters_store.bundle import (
    BundleCorrupt,
    BundleInvalid,
    BundleManifest,
    BundleRejected,
    ExpectedBase,
    RejectCode,
    verify_bundle,
)
from lorafleet.adapters_store.cache import BundleCache, CachedBundle, CacheUsage
from lorafleet.adapters_store.revisions import (
    PublishedRevision,
    RevisionRef,
    SweepReport,
    download_revision,
    publish_revision,
    revision_prefix,
    sweep_orphans,
)

__all__ = [
    "BundleCache",
    "BundleCorrupt",
    "BundleInvalid",
    "BundleManifest",
    "BundleRejected",
    "CacheUsage",
    "CachedBundle",
    "ExpectedBase",
    "PublishedRevision",
    "RejectCode",
    "RevisionRef",
    "SweepReport",
    "download_revision",
    "publish_revision",
    "revision_prefix",
    "sweep_orphans",
    "verify_bundle",
]
