"""Loading Hugging Face model directories (both expert layouts, shards) and fingerprinting them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from lorafleet.platform.domain.errors import InvalidRequest
from lorafleet.platform.modeling import fingerprint, load_base_model
from tests.platform.modeling.test_model import save_tiny


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A per-expert (save_pretrained) qwen3_moe directory and the model's in-memory (fused) state."""
    directory = tmp_path_factory.mktemp("qwen3_moe")
    model = save_tiny("qwen3_moe", directory)
    return directory, {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _write_sharded(directory: Path, config_from: Path, state: dict[str, torch.Tensor]) -> None:
    """Write ``state`` as two safetensors shards with an index, like large checkpoints are."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(config_from / "config.json", directory / "config.json")
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(directory / file))
        weight_map.update(dict.fromkeys(keys, file))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


def test_fused_sharded_layout_loads_the_same_model(
    moe: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    directory, state = moe
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)  # transformers 5's fused form
    _write_sharded(tmp_path / "fused", directory, state)
    per_expert, _, _ = load_base_model(directory)
    fused, _, _ = load_base_model(tmp_path / "fused")
    ours, theirs = per_expert.state_dict(), fused.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_incomplete_or_foreign_weights_are_refused(
    moe: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    directory, state = moe
    broken = {
        "missing": {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_norm.weight"},
        "foreign": {**state, "model.layers.0.mlp.experts.extra": torch.zeros(3)},
        "shape": {**state, "model.norm.weight": torch.ones(63)},
    }
    for name, tensors in broken.items():
        _write_sharded(tmp_path / name, directory, tensors)
        with pytest.raises(InvalidRequest) as info:
            load_base_model(tmp_path / name)
        assert info.value.code == "base_model_unreadable", name


def test_unsupported_configs_are_refused(moe: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    directory, _ = moe
    config = json.loads((directory / "config.json").read_text())
    for change in (
        {"model_type": "gpt2"},
        {"hidden_act": "gelu"},
        {"rope_parameters": {"rope_type": "yarn"}},
    ):
        target = tmp_path / str(len(list(tmp_path.iterdir())))
        target.mkdir()
        (target / "config.json").write_text(json.dumps({**config, **change}))
        shutil.copy(directory / "model.safetensors", target / "model.safetensors")
        with pytest.raises(InvalidRequest) as info:
            load_base_model(target)
        assert info.value.code == "unsupported_architecture", change


def test_dtype_and_tokenizer(moe: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    directory, _ = moe
    target = tmp_path / "with_tokenizer"
    shutil.copytree(directory, target)
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(target / "tokenizer.json"))
    model, _, loaded = load_base_model(target, dtype=torch.bfloat16)
    assert loaded is not None and loaded("hello world")["input_ids"] == [1, 2]
    assert all(
        buf.dtype == torch.bfloat16 for buf in model.buffers() if buf.is_floating_point() and buf.dim() > 1
    )
    reference, _, _ = load_base_model(directory)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), reference(ids), atol=0.1, rtol=0.05)


def test_fingerprint_stable_cached_and_content_sensitive(
    moe: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    source, _ = moe
    directory = tmp_path / "model"
    shutil.copytree(source, directory)
    first = fingerprint(directory)
    assert len(first) == 64 and int(first, 16) >= 0
    sidecar = directory / ".lorafleet-fingerprint.json"
    sidecar.unlink()
    assert fingerprint(directory) == first  # recomputed from the bytes: stable
    # The sidecar is what a second call uses while sizes and mtimes are unchanged ...
    cached = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**cached, "sha256": "0" * 64}))
    assert fingerprint(directory) == "0" * 64
    # ... and a changed byte (same size, new mtime) invalidates it.
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    changed = fingerprint(directory)
    assert changed not in (first, "0" * 64)
    assert fingerprint(source) == first  # the untouched original still has the first digest
