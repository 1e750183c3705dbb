"""Object stores: one ``ObjectStore`` protocol, a local-directory and an S3 implementation.

``make_object_store(settings)`` picks one by ``settings.object_store``. boto3 is imported
only when the S3 store is used, so the embedded mode never pays for it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lorafleet.adapters_store.objectstore.base import ObjectInfo, ObjectStore
from lorafleet.adapters_store.objectstore.local import LocalObjectStore
from lorafleet.platform.config.settings import Settings
from lorafleet.platform.domain.errors import InvalidRequest

if TYPE_CHECKING:
    from lorafleet.adapters_store.objectstore.s3 import S3ObjectStore

__all__ = ["LocalObjectStore", "ObjectInfo", "ObjectStore", "S3ObjectStore", "make_object_store"]


def _local(settings: Settings) -> ObjectStore:
    return LocalObjectStore(settings.resolved_object_store_dir)


def _s3(settings: Settings) -> ObjectStore:
    from lorafleet.adapters_store.objectstore.s3 import S3ObjectStore

    return S3ObjectStore(
        bucket=settings.s3_bucket,
        endpoint_url=settings.s3_endpoint_url,
        region=settings.s3_region,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value(),
        multipart_threshold_bytes=settings.s3_multipart_threshold_bytes,
        max_concurrency=settings.s3_max_concurrency,
    )


OBJECT_STORES: dict[str, Callable[[Settings], ObjectStore]] = {"local": _local, "s3": _s3}
"""The registry: ``settings.object_store`` names one of these."""


def make_object_store(settings: Settings) -> ObjectStore:
    try:
        factory = OBJECT_STORES[settings.object_store]
    except KeyError:
        known = sorted(OBJECT_STORES)
        raise InvalidRequest(f"unknown object store {settings.object_store!r}; known: {known}",
                             code="invalid_settings", param="object_store") from None
    return factory(settings)


def __getattr__(name: str) -> Any:
    if name == "S3ObjectStore":
        from lorafleet.adapters_store.objectstore.s3 import S3ObjectStore

        return S3ObjectStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
