"""tiny-moe: tokenizer, deterministic build, cache, atomic replace, and the full default build (slow)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeForCausalLM

from lorafleet.platform.modeling.tiny_moe import (
    SIDECAR,
    TINY_MOE_ID,
    BuildProgress,
    CorpusSize,
    TinyMoeRecipe,
    build_tiny_moe,
    read_build_info,
)
from lorafleet.platform.modeling.tiny_moe.demo_task import (
    COLOR_PICK_PROMPTS,
    RL_DEMO_TARGET,
    arithmetic_prompt,
    grade_arithmetic,
    grade_color_pick,
    is_color_answer,
)

# A few seconds of work: a corpus slice big enough to train a tokenizer, and 20 steps.
SMALL = TinyMoeRecipe(
    corpus=CorpusSize(
        prose=150,
        arithmetic_text=100,
        chat_arith_single=300,
        chat_arith_double=150,
        chat_say=150,
        chat_facts=100,
        chat_color_pick=100,
    ),
    steps=20,
    batch_size=8,
    seq_len=64,
    warmup_steps=5,
)


class _Interrupt(Exception):
    """Raised from a progress callback to stop a build midway, as a crash or Ctrl-C would."""


def _build(root: Path, *, seed: int = 0, force: bool = False) -> tuple[Path, list[BuildProgress]]:
    events: list[BuildProgress] = []
    path = build_tiny_moe(root, seed=seed, force=force, progress=events.append, recipe=SMALL)
    return path, events


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[BuildProgress]]:
    return _build(tmp_path_factory.mktemp("models"))


def _chat(tokenizer: object, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)  # type: ignore[attr-defined]


def test_tokenizer_round_trips_and_renders_chatml(small: tuple[Path, list[BuildProgress]]) -> None:
    path, _ = small
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    for text in ("What is 12 + 7?\nThe cat sat.", "  two  spaces, tabs\tand ünïcode ✓ 😀", "Repeat: moon"):
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    # One token per digit, so arithmetic never hides in multi-digit tokens.
    assert tok.tokenize("2048") == ["2", "0", "4", "8"]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|pad|>")
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]) == [0, 1, 2, 3]

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 3 + 4?"}]
    assert _chat(tok, messages, generation_prompt=True) == (
        "<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    done = [*messages, {"role": "assistant", "content": "7"}]
    assert _chat(tok, done, generation_prompt=False).endswith("<|im_start|>assistant\n7<|im_end|>\n")
    # The inline copy serves loaders that ignore chat_template.jinja.
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>" in cfg["chat_template"]


def test_build_is_deterministic_and_loads_with_transformers(
    small: tuple[Path, list[BuildProgress]], tmp_path: Path
) -> None:
    path, events = small
    assert path.name == TINY_MOE_ID
    again, _ = _build(tmp_path / "a")
    first, second = load_file(path / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert (path / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    other, _ = _build(tmp_path / "b", seed=1)
    assert not torch.equal(first["lm_head.weight"], load_file(other / "model.safetensors")["lm_head.weight"])

    info = read_build_info(path)
    assert info is not None and info == read_build_info(again).model_copy(  # type: ignore[union-attr]
        update={"build_seconds": info.build_seconds}
    )
    assert (info.seed, info.steps, info.recipe) == (0, 20, SMALL)
    assert 0.0 <= info.rl_demo.base_reward <= 1.0 and 0.0 <= info.single_digit_accuracy <= 1.0

    steps = [e for e in events if e.stage == "pretrain"]
    assert [e.step for e in steps] == list(range(1, 21))
    assert all(e.loss is not None and 0 < e.loss < 20 for e in steps)
    assert events[-1].stage == "done" and events[-1].loss == pytest.approx(info.final_loss, abs=1e-5)

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert isinstance(model, Qwen3MoeForCausalLM)
    cfg = model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers) == (8, 2, 2)
    assert cfg.vocab_size == len(tok) == info.vocab_size
    assert model.dtype == torch.float32
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    ids = tok(_chat(tok, [{"role": "user", "content": "Hi"}], generation_prompt=True), return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_complete_build_is_reused_and_force_rebuilds(tmp_path: Path) -> None:
    path, events = _build(tmp_path)
    assert events
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    cached, events = _build(tmp_path)
    assert cached == path and events == [] and time.perf_counter() - started < 1.0
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp

    rebuilt, events = _build(tmp_path, force=True)
    assert rebuilt == path and events[-1].stage == "done"
    assert (path / "model.safetensors").stat().st_mtime_ns != stamp
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [TINY_MOE_ID]


def test_partial_or_foreign_build_is_rebuilt(tmp_path: Path) -> None:
    path, _ = _build(tmp_path)
    # Another seed is another model: the cache must not hand back the wrong one.
    _, events = _build(tmp_path, seed=3)
    assert events and read_build_info(path).seed == 3  # type: ignore[union-attr]
    # A directory without its sidecar is a partial build, whatever else it holds.
    (path / SIDECAR).unlink()
    assert read_build_info(path) is None
    _, events = _build(tmp_path, seed=3)
    assert events and read_build_info(path) is not None


def test_interrupted_build_leaves_nothing_usable(tmp_path: Path) -> None:
    def stop_midway(event: BuildProgress) -> None:
        if event.stage == "pretrain" and event.step == 5:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        build_tiny_moe(tmp_path, progress=stop_midway, recipe=SMALL)
    assert not (tmp_path / TINY_MOE_ID).exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_demo_graders() -> None:
    assert grade_color_pick(f" {RL_DEMO_TARGET.capitalize()}.") == 1.0
    assert grade_color_pick("Blue.") == 0.0 and grade_color_pick(f"{RL_DEMO_TARGET} and blue") == 0.0
    assert is_color_answer("Green.") and not is_color_answer("Seven.")
    assert grade_arithmetic("12", expected=12) == 1.0 and grade_arithmetic("12 apples", expected=12) == 0.0


@pytest.mark.slow
def test_default_build_learns_the_strong_family(tmp_path: Path) -> None:
    """The shipped recipe: about two minutes on two cores; figures below were measured (see module doc)."""
    path = build_tiny_moe(tmp_path)
    info = read_build_info(path)
    assert info is not None
    assert info.final_loss < FULL_BUILD_MAX_LOSS
    assert info.single_digit_accuracy >= 0.9
    assert info.rl_demo.base_reward <= 0.2

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tok.padding_side = "left"
    questions = [(3, "+", 4), (9, "+", 8), (7, "-", 2), (5, "+", 0), (8, "-", 8), (6, "+", 6)]
    prompts = [
        _chat(tok, [{"role": "user", "content": arithmetic_prompt(a, op, b)}], generation_prompt=True)
        for a, op, b in questions
    ]
    batch = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False)
    replies = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    expected = [a + b if op == "+" else a - b for a, op, b in questions]
    # single-digit accuracy is about 0.9 on the whole family, so one miss in six is allowed
    assert sum(grade_arithmetic(r, expected=e) for r, e in zip(replies, expected, strict=True)) >= 5, replies

    # The RL demo task: well-formed colors, but rarely the target.
    color_prompts = [
        _chat(tok, [{"role": "user", "content": p}], generation_prompt=True) for p in COLOR_PICK_PROMPTS
    ]
    batch = tok(color_prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    out = model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0, num_return_sequences=20)
    replies = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert sum(map(is_color_answer, replies)) / len(replies) >= 0.9
    assert sum(map(grade_color_pick, replies)) / len(replies) <= 0.25


FULL_BUILD_MAX_LOSS = 1.0
