"""The shared LoRA layers: stacked-expert math, per-row mixed adapters, serving bank, PEFT
agreement, multi-adapter training gradients and initialisers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import torch.nn.functional as F
import transformers

from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.errors import InvalidRequest
from lorafleet.platform.domain.lora import ATTENTION_TARGETS, LoraConfig, parse_adapter_key
from lorafleet.platform.modeling import (
    AdapterParams,
    CausalLM,
    DeviceAdapterBank,
    LoraBatch,
    export_adapter,
    load_base_model,
    new_adapter_params,
    stack_adapters,
)
from lorafleet.platform.modeling.lora import AdapterBank, apply_expert_lora, plan_expert_lora
from lorafleet.platform.modeling.model import _Context
from tests.platform.modeling.test_model import save_tiny


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind in ("qwen3", "qwen3_moe", "qwen2_moe"):
        out[kind] = tmp_path_factory.mktemp(kind)
        save_tiny(kind, out[kind])
    return out


def trained_like(
    spec: ArchitectureSpec,
    *,
    rank: int,
    seed: int,
    alpha: float = 16.0,
    targets: tuple[str, ...] | None = None,
) -> AdapterParams:
    """An adapter whose B is non-zero too, as after some training."""
    cfg = LoraConfig(rank=rank, alpha=alpha, **({"targets": targets} if targets else {}))
    params = new_adapter_params(spec, cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for key, p in params.items():
            if key.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return params


def merged(path: Path, adapter: AdapterParams) -> CausalLM:
    """Reference: the base with ``W += scale * B @ A`` merged in, one expert at a time."""
    model, _, _ = load_base_model(path)
    scale = adapter.scaling
    with torch.no_grad():
        for key, a in adapter.items():
            if not key.endswith("lora_A"):
                continue
            layer, site, target, _ = parse_adapter_key(key)
            b = adapter[key.replace("lora_A", "lora_B")]
            weight = model.base_weight(layer=layer, site=site, target=target)
            if site == "experts":
                for e in range(weight.shape[0]):  # the naive per-expert loop this test checks against
                    weight[e] += scale * b[e] @ a[e]
            else:
                weight += scale * b @ a
    return model


def _ids(rows: int, seed: int = 3, length: int = 9) -> torch.Tensor:
    return torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(seed))


# qwen2_moe adds a shared expert (its own LoRA site) and a dense layer inside a MoE model.
@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe", "qwen2_moe"])
def test_lora_forward_equals_merged_weights(kind: str, dirs: dict[str, Path]) -> None:
    model, spec, _ = load_base_model(dirs[kind])
    adapter = trained_like(spec, rank=3, seed=1)
    ids = _ids(2)
    with torch.no_grad():
        got = model(ids, lora=LoraBatch(stack_adapters([adapter]), [0, 0]))
        expected = merged(dirs[kind], adapter)(ids)
        base = model(ids)
    assert (expected - base).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("skewed", [False, True])
def test_expert_lora_equals_per_expert_loop(skewed: bool) -> None:
    """The batched expert LoRA against a naive loop over experts and pairs. Skewed routing
    (almost every pair on one expert) switches the plan from the padded grouped layout to the
    per-pair gather; both must give the loop's answer."""
    g = torch.Generator().manual_seed(0)
    slots, experts, rank, fan_in, fan_out, pairs = 3, 5, 4, 12, 7, 100
    a = torch.randn(slots, experts, rank, fan_in, generator=g)
    b = torch.randn(slots, experts, fan_out, rank, generator=g)
    bank = AdapterBank({"layers.0.mlp.experts.up_proj": (a, b)}, torch.tensor([0.5, 2.0, 1.0]))
    ids = [-1, 0, 2, 1]
    lora = LoraBatch(bank, ids)
    x = torch.randn(pairs, fan_in, generator=g)
    y = torch.randn(pairs, fan_out, generator=g)
    rows = torch.randint(0, 4, (pairs,), generator=g)
    pair_experts = torch.randint(0, experts, (pairs,), generator=g)
    if skewed:
        rare = torch.arange(pairs) % 10 == 0
        pair_experts, rows = torch.where(rare, pair_experts, 3), torch.where(rare, rows, 1)
    plan = plan_expert_lora(lora, pair_rows=rows, pair_experts=pair_experts, num_experts=experts)
    assert plan is not None and (plan.grouped is None) == skewed
    got = apply_expert_lora(y, x, module="layers.0.mlp.experts.up_proj", lora=lora, plan=plan)
    expected = y.clone()
    for e in range(experts):
        for p in range(pairs):
            slot = ids[int(rows[p])]
            if int(pair_experts[p]) == e and slot >= 0:
                expected[p] += bank.scaling[slot] * (b[slot, e] @ (a[slot, e] @ x[p]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    base = rows == 0
    assert torch.equal(got[base], y[base])  # base pairs untouched, bit for bit
    only_base = LoraBatch(bank, [-1] * 4)
    assert plan_expert_lora(only_base, pair_rows=rows, pair_experts=pair_experts, num_experts=experts) is None


def test_expert_lora_in_place_rows() -> None:
    """A serving-layout bank (B stored as [.., R, out]) reads each pair's factor rows in place:
    same answer as the naive loop and the grouped layout, base pairs untouched bit for bit, and a
    pair's result bit-identical whether it is computed in a large batch or alone. Training (a
    gradient to the factors) and other layouts or dtypes keep the gather path."""
    g = torch.Generator().manual_seed(1)
    slots, experts, rank, fan_in, fan_out, pairs = 3, 5, 4, 12, 7, 100
    a = torch.randn(slots, experts, rank, fan_in, generator=g)
    b = torch.randn(slots, experts, rank, fan_out, generator=g).transpose(-1, -2)  # [S, E, out, R] view
    scaling = torch.tensor([0.5, 2.0, 1.0])
    module = "layers.0.mlp.experts.down_proj"
    bank = AdapterBank({module: (a, b)}, scaling)
    ids = [-1, 0, 2, 1]
    x = torch.randn(pairs, fan_in, generator=g)
    y = torch.randn(pairs, fan_out, generator=g)
    rows = torch.randint(0, 4, (pairs,), generator=g)
    pair_experts = torch.randint(0, experts, (pairs,), generator=g)

    def run(bank: AdapterBank, rows: torch.Tensor, pair_experts: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        lora = LoraBatch(bank, ids)
        plan = plan_expert_lora(lora, pair_rows=rows, pair_experts=pair_experts, num_experts=experts)
        assert plan is not None
        return plan, apply_expert_lora(y, x, module=module, lora=lora, plan=plan)

    plan, got = run(bank, rows, pair_experts, x, y)
    assert plan.rows is not None and plan.grouped is None
    expected = y.clone()
    for p in range(pairs):
        slot, e = ids[int(rows[p])], int(pair_experts[p])
        if slot >= 0:
            expected[p] += scaling[slot] * (b[slot, e] @ (a[slot, e] @ x[p]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    base = rows == 0
    assert torch.equal(got[base], y[base])
    # The same factors laid out [S, E, out, R] contiguous take the grouped gather path.
    gathered_plan, gathered = run(AdapterBank({module: (a, b.contiguous())}, scaling), rows, pair_experts, x, y)
    assert gathered_plan.rows is None and gathered_plan.grouped is not None
    torch.testing.assert_close(got, gathered, atol=1e-5, rtol=1e-5)
    # Each pair depends only on itself: row 2's pairs alone give the batch's exact bits.
    own = rows == 2
    _, alone = run(bank, rows[own], pair_experts[own], x[own], y[own])
    assert torch.equal(alone, got[own])
    # A gradient to the factors needs the gather path; without one the same bank reads in place.
    trainable = AdapterBank({module: (a.clone().requires_grad_(), b)}, scaling)
    assert run(trainable, rows, pair_experts, x, y)[0].rows is None
    with torch.no_grad():
        assert run(trainable, rows, pair_experts, x, y)[0].rows is not None
    assert run(AdapterBank({module: (a.bfloat16(), b.bfloat16())}, scaling), rows, pair_experts, x, y)[0].rows is None


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_mixed_adapters_per_row_equal_each_alone(kind: str, dirs: dict[str, Path]) -> None:
    model, spec, _ = load_base_model(dirs[kind])
    # Mixed ranks in one bank: adapter 1 has rank 4, adapter 0 rank 2 (zero-padded).
    bank = stack_adapters([trained_like(spec, rank=2, seed=1), trained_like(spec, rank=4, seed=2, alpha=4.0)])
    ids = _ids(3)
    with torch.no_grad():
        mixed = model(ids, lora=LoraBatch(bank, [-1, 0, 1]))
        plain = model(ids)
        alone = [model(ids[i : i + 1], lora=LoraBatch(bank, [slot])) for i, slot in ((1, 0), (2, 1))]
    torch.testing.assert_close(mixed[1:2], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2:3], alone[1], atol=1e-5, rtol=1e-5)
    assert (mixed[1] - mixed[2]).abs().max() > 1e-2
    if kind == "qwen3":
        # Same batch, same shapes: the base row must be the base model's exact bits.
        assert torch.equal(mixed[0], plain[0])
    else:
        # In a MoE the adapted rows route differently, so expert groups differ in size and BLAS
        # may sum in another order; the LoRA itself adds exactly nothing (checked per layer).
        torch.testing.assert_close(mixed[0], plain[0], atol=1e-5, rtol=1e-5)


def test_moe_block_base_rows_bit_identical(dirs: dict[str, Path]) -> None:
    model, spec, _ = load_base_model(dirs["qwen3_moe"])
    bank = stack_adapters([trained_like(spec, rank=2, seed=5)])
    x = torch.randn(3, 6, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    layer = model.layers[0]
    with torch.no_grad():
        cos = sin = torch.zeros(1)
        with_lora = layer.mlp(x, _Context(cos=cos, sin=sin, mask=None, lora=LoraBatch(bank, [0, -1, 0])))
        without = layer.mlp(x, _Context(cos=cos, sin=sin, mask=None, lora=None))
    assert torch.equal(with_lora[1], without[1])
    assert not torch.allclose(with_lora[0], without[0])


def test_device_bank_load_clear_and_mixed_ranks(dirs: dict[str, Path]) -> None:
    model, spec, _ = load_base_model(dirs["qwen3_moe"])
    small = trained_like(spec, rank=2, seed=11)
    big = trained_like(spec, rank=4, seed=12, alpha=8.0)
    attn_only = trained_like(spec, rank=1, seed=13, targets=ATTENTION_TARGETS)
    bank = DeviceAdapterBank(spec, capacity=3, max_rank=4)
    bank.load(0, export_adapter(big), scaling=big.scaling)
    bank.load(2, export_adapter(attn_only), scaling=attn_only.scaling)
    ids = _ids(3, seed=9)
    with torch.no_grad():
        out = model(ids, lora=LoraBatch(bank.bank, [2, 0, -1]))
        torch.testing.assert_close(out[1], merged(dirs["qwen3_moe"], big)(ids[1:2])[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(
            out[0], merged(dirs["qwen3_moe"], attn_only)(ids[:1])[0], atol=2e-5, rtol=1e-4
        )
        # A lower-rank adapter replacing a higher-rank one leaves no trace of the old tail.
        bank.load(0, export_adapter(small), scaling=small.scaling)
        torch.testing.assert_close(
            model(ids[1:2], lora=LoraBatch(bank.bank, [0]))[0],
            merged(dirs["qwen3_moe"], small)(ids[1:2])[0],
            atol=2e-5,
            rtol=1e-4,
        )
        bank.clear(0)
        assert torch.equal(model(ids[1:2], lora=LoraBatch(bank.bank, [0])), model(ids[1:2]))


def test_device_bank_refuses_bad_adapters(dirs: dict[str, Path]) -> None:
    _, spec, _ = load_base_model(dirs["qwen3"])
    bank = DeviceAdapterBank(spec, capacity=2, max_rank=2)
    good = export_adapter(trained_like(spec, rank=2, seed=1))
    cases = {
        "adapter_rank_too_large": export_adapter(trained_like(spec, rank=3, seed=1)),
        "adapter_shape_mismatch": {**good, "layers.0.self_attn.q_proj.lora_A": torch.zeros(2, 63)},
        "adapter_tensor_unknown": {**good, "layers.0.self_attn.qkv.lora_A": torch.zeros(2, 64)},
    }
    missing_pair = dict(good)
    del missing_pair["layers.1.mlp.up_proj.lora_B"]
    cases["adapter_shape_mismatch_pair"] = missing_pair
    bank.load(1, good, scaling=8.0)
    before = {m: (a.clone(), b.clone()) for m, (a, b) in bank.bank.items()}
    for code, tensors in cases.items():
        with pytest.raises(InvalidRequest) as info:
            bank.load(1, tensors, scaling=1.0)
        assert info.value.code == code.removesuffix("_pair")
    # A refused load changes nothing in the slot.
    for module, (a, b) in bank.bank.items():
        assert torch.equal(a, before[module][0]) and torch.equal(b, before[module][1])
    with pytest.raises(InvalidRequest):
        LoraBatch(bank.bank, [2])


def test_peft_agreement_dense_qwen3(dirs: dict[str, Path]) -> None:
    model, spec, _ = load_base_model(dirs["qwen3"])
    adapter = trained_like(spec, rank=4, seed=21, alpha=8.0)
    reference = transformers.AutoModelForCausalLM.from_pretrained(dirs["qwen3"], dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    wrapped = peft.get_peft_model(reference, peft.LoraConfig(r=4, lora_alpha=8.0, target_modules=targets))
    copied = 0
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if ".lora_" not in name:
                continue
            module = name.removeprefix("base_model.model.model.").split(".lora_")[0]
            factor = "lora_A" if ".lora_A." in name else "lora_B"
            param.copy_(adapter[f"{module}.{factor}"])
            copied += 1
    assert copied == len(adapter)
    ids = _ids(2, seed=4)
    with torch.no_grad():
        expected = wrapped.eval()(input_ids=ids).logits
        got = model(ids, lora=LoraBatch(stack_adapters([adapter]), [0, 0]))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def _clone(params: AdapterParams) -> AdapterParams:
    return AdapterParams(params.lora_config, {k: v.detach().clone() for k, v in params.items()})


def test_two_adapters_in_one_batch_get_their_own_gradients(dirs: dict[str, Path]) -> None:
    model, spec, _ = load_base_model(dirs["qwen3_moe"])
    first, second = trained_like(spec, rank=2, seed=31), trained_like(spec, rank=3, seed=32)
    ids = _ids(4, seed=6)
    mask = torch.ones_like(ids)
    mask[3, 6:] = 0

    def loss(params: list[AdapterParams], rows: list[int], slots: list[int]) -> torch.Tensor:
        logits = model(ids[rows], mask[rows], lora=LoraBatch(stack_adapters(params), slots))
        targets = ids[rows][:, 1:].masked_fill(mask[rows][:, 1:] == 0, -100)
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=-100
        )

    loss([first, second], [0, 1, 2, 3], [0, 1, 0, 1]).backward()
    alone_first, alone_second = _clone(first), _clone(second)
    loss([alone_first], [0, 2], [0, 0]).backward()
    loss([alone_second], [1, 3], [0, 0]).backward()
    for joint, alone in ((first, alone_first), (second, alone_second)):
        for key, param in joint.items():
            assert param.grad is not None and alone[key].grad is not None, key
            torch.testing.assert_close(param.grad, alone[key].grad, atol=1e-5, rtol=1e-4)
        assert any(p.grad.abs().max() > 0 for k, p in joint.items() if ".experts." in k and "lora_A" in k)
    assert list(model.parameters()) == []
    assert all(not buf.requires_grad and buf.grad is None for buf in model.buffers())


def test_olora_tail_init(dirs: dict[str, Path]) -> None:
    model, spec, _ = load_base_model(dirs["qwen3_moe"])
    cfg = LoraConfig(rank=3, init="olora_tail")
    params = new_adapter_params(spec, cfg, seed=0, base_model=model)
    assert {k: tuple(v.shape) for k, v in params.items()} == spec.lora_shapes(cfg)
    for key, a in params.items():
        if not key.endswith("lora_A"):
            assert not params[key].any()
            continue
        layer, site, target, _ = parse_adapter_key(key)
        weights = model.base_weight(layer=layer, site=site, target=target).numpy()
        for w, rows in zip(
            weights.reshape(-1, *weights.shape[-2:]), a.detach().reshape(-1, *a.shape[-2:]), strict=True
        ):
            np.testing.assert_allclose(rows @ rows.T, np.eye(3), atol=1e-5)
            _, _, vh = np.linalg.svd(w.astype(np.float64), full_matrices=False)
            overlap = np.abs(rows.numpy().astype(np.float64) @ vh[-3:].T)
            np.testing.assert_allclose(overlap, np.eye(3), atol=1e-4)
    ids = _ids(2)
    with torch.no_grad():
        assert torch.equal(model(ids, lora=LoraBatch(stack_adapters([params]), [0, 0])), model(ids))
    with pytest.raises(InvalidRequest):
        new_adapter_params(spec, cfg, seed=0)


def test_standard_init_seeded_and_export_copies(dirs: dict[str, Path]) -> None:
    _, spec, _ = load_base_model(dirs["qwen3"])
    cfg = LoraConfig(rank=2, alpha=4.0)
    one, same, other = (new_adapter_params(spec, cfg, seed=s) for s in (5, 5, 6))
    assert {k: tuple(v.shape) for k, v in one.items()} == spec.lora_shapes(cfg)
    key = "layers.0.mlp.down_proj.lora_A"
    assert torch.equal(one[key], same[key]) and not torch.equal(one[key], other[key])
    assert one[key].abs().max() <= 1 / spec.intermediate_size**0.5
    assert not one["layers.0.mlp.down_proj.lora_B"].any()
    assert all(p.requires_grad for _, p in one.items())
    exported = export_adapter(one, dtype=torch.bfloat16)
    assert exported[key].dtype == torch.bfloat16 and not exported[key].requires_grad
    assert all(t.is_contiguous() for t in exported.values())
    plain = export_adapter(one)
    with torch.no_grad():
        one[key].add_(1.0)
    assert not torch.equal(plain[key], one[key])
