"""Importing adapters trained elsewhere: a PEFT LoRA directory becomes a revision of a policy."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile

from lorafleet.platform.db import TenantScope, models
from lorafleet.platform.db.policies import add_revision, get_or_create_policy
from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.errors import Conflict, NotFound, PayloadTooLarge
from lorafleet.platform.domain.ids import new_id, new_ulid
from lorafleet.services.api.deps import StateDep, TrainPrincipal
from lorafleet.services.api.routes.jobs import POLICY_NAME
from lorafleet.services.api.routes.policies import RevisionPublic, revision_public

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


def _save(upload: UploadFile, path: Path, limit: int) -> None:
    with path.open("wb") as out:
        shutil.copyfileobj(upload.file, out, length=1 << 20)
    if path.stat().st_size > limit:
        raise PayloadTooLarge(f"{upload.filename} is larger than the {limit}-byte upload limit",
                              code="file_too_large")


@router.post("/import", status_code=201)
def import_adapter(
    state: StateDep,
    principal: TrainPrincipal,
    adapter_config: Annotated[UploadFile, File(description="PEFT adapter_config.json")],
    adapter_model: Annotated[UploadFile, File(description="PEFT adapter_model.safetensors")],
    policy: Annotated[str, Form(pattern=POLICY_NAME)],
    model: Annotated[str, Form(description="The registered base model the adapter was trained on")],
) -> RevisionPublic:
    """Validate a PEFT LoRA adapter against the base's shapes and rank limit, store it as a packed
    revision and commit it under ``policy`` (created when new). Refused adapters leave nothing."""
    from lorafleet.adapters_store import ExpectedBase, publish_revision
    from lorafleet.adapters_store.bundle.pack import BundleMeta
    from lorafleet.adapters_store.bundle.peft import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, import_peft

    with state.tx() as session:
        base = session.get(models.BaseModelRow, model)
        if base is None:
            raise NotFound(f"no base model {model!r}", code="model_not_found", param="model")
        expected = ExpectedBase(spec=ArchitectureSpec.model_validate(base.config["spec"]),
                                fingerprint=base.fingerprint, max_lora_rank=base.max_lora_rank)
        existing = session.scalars(TenantScope(session, principal.tenant_id).select(models.Policy)
                                   .where(models.Policy.name == policy)).first()
        if existing is not None and existing.base_model_id != model:
            raise Conflict(f"policy {policy!r} is over base {existing.base_model_id}, not {model}",
                           code="policy_base_mismatch", param="policy")
        # the bundle's object-store path names the policy id; a new policy's row is written only
        # with its first revision, so a refused import leaves no empty policy behind
        policy_id = existing.id if existing is not None else new_id("policy")
    revision_id = new_ulid()
    with tempfile.TemporaryDirectory(prefix="lorafleet-import-") as tmp:
        peft_dir = Path(tmp) / "peft"
        peft_dir.mkdir()
        _save(adapter_config, peft_dir / PEFT_CONFIG_FILE, state.settings.max_upload_bytes)
        _save(adapter_model, peft_dir / PEFT_WEIGHTS_FILE, state.settings.max_upload_bytes)
        meta = BundleMeta(revision_id=revision_id, tenant_id=principal.tenant_id, policy_id=policy_id,
                          base_model_id=model, base_fingerprint=expected.fingerprint)
        import_peft(peft_dir, Path(tmp) / "bundle", base=expected, meta=meta)
        published = publish_revision(state.store, Path(tmp) / "bundle", base=expected)
    with state.tx() as session:
        policy_row = get_or_create_policy(session, tenant_id=principal.tenant_id, name=policy, base_model_id=model,
                                          new_policy_id=policy_id)
        revision = add_revision(session, policy_row, revision_id=revision_id, uri=published.uri,
                                sha256=published.sha256, size=published.bytes, rank=published.rank,
                                manifest=published.manifest)
        state.audit(session, tenant_id=principal.tenant_id, actor=principal.key_id, action="adapter.import",
                    object_type="adapter_revision", object_id=revision_id)
        session.flush()
        return revision_public(revision, policy_row)


