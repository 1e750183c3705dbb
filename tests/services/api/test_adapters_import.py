"""POST /v1/adapters/import: a PEFT adapter trained elsewhere becomes a verified revision."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from lorafleet.adapters_store.bundle.peft import engine_to_peft, peft_config
from lorafleet.platform.config import Settings
from lorafleet.platform.db import make_engine, make_sessionmaker, transaction
from lorafleet.platform.domain.lora import LoraConfig
from lorafleet.platform.modeling import export_adapter, new_adapter_params, read_spec
from lorafleet.services.api import bootstrap, create_app
from lorafleet.services.trainer.bases import register_base_model


def _peft_dir(tmp: Path, model_dir: Path, *, rank: int) -> Path:
    spec, _ = read_spec(model_dir)
    lora = LoraConfig(rank=rank)
    tensors = export_adapter(new_adapter_params(spec, lora, seed=1))
    for k in tensors:
        if k.endswith("lora_B"):
            tensors[k] = torch.randn_like(tensors[k])
    out = tmp / f"peft-r{rank}"
    out.mkdir()
    save_file(engine_to_peft(tensors), out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(peft_config(lora, base_model_name_or_path="tiny-moe")))
    return out


def test_import_peft_adapter(tmp_path: Path, tiny_moe_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "lf")
    key = bootstrap(settings)
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as s:
        register_base_model(s, tiny_moe_path, model_id="tiny-moe", max_lora_rank=4)
    engine.dispose()
    h = {"Authorization": f"Bearer {key}"}

    def post(d: Path, policy: str = "imported") -> object:
        return client.post("/v1/adapters/import", headers=h, data={"policy": policy, "model": "tiny-moe"}, files={
            "adapter_config": ("adapter_config.json", (d / "adapter_config.json").read_bytes()),
            "adapter_model": ("adapter_model.safetensors", (d / "adapter_model.safetensors").read_bytes())})

    with TestClient(create_app(settings)) as client:
        r = post(_peft_dir(tmp_path, tiny_moe_path, rank=2))
        assert r.status_code == 201, r.text
        rev = r.json()
        assert rev["rank"] == 2 and rev["serving"] and rev["policy"] == "imported"
        listed = client.get("/v1/policies/imported/revisions", headers=h).json()["data"]
        assert [x["id"] for x in listed] == [rev["id"]]

        too_big = post(_peft_dir(tmp_path, tiny_moe_path, rank=8), policy="too-big")
        assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "rank_exceeds_base_limit"
        assert client.get("/v1/policies/too-big", headers=h).status_code == 404  # nothing left behind
        bad = tmp_path / "bad"
        bad.mkdir()
        (bad / "adapter_config.json").write_text("{}")
        (bad / "adapter_model.safetensors").write_bytes(b"junk")
        r = post(bad, policy="junk")
        assert r.status_code == 400 and r.json()["error"]["code"].startswith("peft_")
        unknown = client.post("/v1/adapters/import", headers=h, data={"policy": "x", "model": "nope"}, files={
            "adapter_config": ("a", b"{}"), "adapter_model": ("b", b"")})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
