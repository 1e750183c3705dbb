from __future__ import annotations

import hashlib
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, Request, UploadFile
from pydantic import BaseModel

from lorafleet.platform.db import TenantScope, models
from lorafleet.platform.domain.datasets import validate_jsonl
from lorafleet.platform.domain.enums import FileStatus, JobStatus
from lorafleet.platform.domain.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge
from lorafleet.platform.domain.ids import new_id
from lorafleet.services.api.deps import ReadPrincipal, StateDep, TrainPrincipal
from lorafleet.services.api.routes.common import ListPage, unix

router = APIRouter(prefix="/v1/files", tags=["files"])

CHUNK = 1024 * 1024


class FileError(BaseModel):
    line: int
    code: str
    message: str


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: FileStatus
    kind: str | None
    line_count: int
    sha256: str
    errors: list[FileError]

    @classmethod
    def of(cls, row: models.FileRow) -> FilePublic:
        return cls(id=row.id, bytes=row.bytes, created_at=unix(row.created_at) or 0, filename=row.filename,
                   purpose=row.purpose, status=FileStatus(row.status), kind=row.kind, line_count=row.line_count,
                   sha256=row.sha256, errors=[FileError(**e) for e in row.errors])


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


async def _read_bounded(upload: UploadFile, limit: int) -> bytes:
    buf = bytearray()
    while chunk := await upload.read(CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(f"the file is larger than the {limit}-byte upload limit",
                                  code="file_too_large", param="file")
    return bytes(buf)


@router.post("", status_code=201)
async def upload_file(
    request: Request,
    state: StateDep,
    principal: TrainPrincipal,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()] = "fine-tune",
) -> FilePublic:
    """Upload a JSONL dataset. It is validated now; the answer says ``validated`` or ``error``
    with the offending line numbers. Only validated files are stored and usable by jobs."""
    limit = state.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise PayloadTooLarge(f"the upload is larger than the {limit}-byte limit", code="file_too_large",
                              param="file")
    if purpose != "fine-tune":
        raise InvalidRequest("purpose must be 'fine-tune'", code="invalid_purpose", param="purpose")
    data = await _read_bounded(file, limit)
    report = validate_jsonl(data)
    file_id = new_id("file")
    object_key = None
    if report.ok:
        object_key = f"files/{principal.tenant_id}/{file_id}.jsonl"
        state.store.put_bytes(object_key, data, if_absent=True)
    row = models.FileRow(
        id=file_id, filename=(file.filename or "upload.jsonl")[:255], purpose=purpose, bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        status=FileStatus.VALIDATED if report.ok else FileStatus.ERROR,
        kind=report.kind.value if report.kind else None, line_count=report.rows,
        errors=[e.to_dict() for e in report.errors], object_key=object_key,
    )
    with state.tx() as session:
        TenantScope(session, principal.tenant_id).add(row)
        state.audit(session, tenant_id=principal.tenant_id, actor=principal.key_id, action="file.upload",
                    object_type="file", object_id=file_id, data={"status": row.status, "bytes": row.bytes})
    return FilePublic.of(row)


@router.get("")
def list_files(
    state: StateDep,
    principal: ReadPrincipal,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ListPage[FilePublic]:
    with state.tx() as session:
        scope = TenantScope(session, principal.tenant_id)
        stmt = (scope.select(models.FileRow).where(models.FileRow.status != FileStatus.DELETED)
                .order_by(models.FileRow.id.desc()).limit(limit + 1))
        if after:
            stmt = stmt.where(models.FileRow.id < after)
        rows = list(session.scalars(stmt))
    page = [FilePublic.of(r) for r in rows[:limit]]
    return ListPage(data=page, has_more=len(rows) > limit, last_id=page[-1].id if page else None)


def _live(scope: TenantScope, file_id: str, *, for_update: bool = False) -> models.FileRow:
    row = scope.get(models.FileRow, file_id, for_update=for_update)
    if row.status == FileStatus.DELETED:
        raise NotFound(f"no file with id {file_id!r}")
    return row


@router.get("/{file_id}")
def get_file(file_id: str, state: StateDep, principal: ReadPrincipal) -> FilePublic:
    with state.tx() as session:
        return FilePublic.of(_live(TenantScope(session, principal.tenant_id), file_id))


@router.delete("/{file_id}")
def delete_file(file_id: str, state: StateDep, principal: TrainPrincipal) -> FileDeleted:
    """Delete a file and its bytes. A file used by a queued or running job answers 409; a file
    that finished jobs refer to keeps a row marked deleted so those jobs stay readable."""
    with state.tx() as session:
        scope = TenantScope(session, principal.tenant_id)
        row = _live(scope, file_id, for_update=True)
        uses = scope.select(models.Job).where(
            (models.Job.training_file_id == file_id) | (models.Job.validation_file_id == file_id)
        )
        active = session.scalars(
            uses.where(models.Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING])).limit(1)
        ).first()
        if active is not None:
            raise Conflict(f"file {file_id} is used by active job {active.id}", code="file_in_use")
        object_key = row.object_key
        if session.scalars(uses.limit(1)).first() is None:
            session.delete(row)
        else:
            row.status, row.object_key = FileStatus.DELETED, None
        state.audit(session, tenant_id=principal.tenant_id, actor=principal.key_id, action="file.delete",
                    object_type="file", object_id=file_id)
    if object_key:
        state.store.delete(object_key)
    return FileDeleted(id=file_id)
