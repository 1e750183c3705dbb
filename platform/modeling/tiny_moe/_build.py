"""Build, cache and describe the tiny-moe model directory."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, ValidationError
from transformers import GenerationConfig

from lorafleet.platform.modeling.tiny_moe._corpus import ENDOFTEXT, IM_END, PAD, generate_corpus
from lorafleet.platform.modeling.tiny_moe._pretrain import make_config, pack_corpus, pretrain
from lorafleet.platform.modeling.tiny_moe._probe import color_pick_reward, single_digit_accuracy
from lorafleet.platform.modeling.tiny_moe._recipe import TinyMoeRecipe
from lorafleet.platform.modeling.tiny_moe._tokenizer import CHAT_TEMPLATE, save_tokenizer, train_tokenizer
from lorafleet.platform.modeling.tiny_moe.demo_task import (
    COLOR_PICK_PROMPTS,
    RL_DEMO_DESCRIPTION,
    RL_DEMO_TARGET,
)

TINY_MOE_ID = "tiny-moe"
BUILDER_VERSION = 2
"""Bump when the same seed and recipe would build different weights; cached builds then rebuild."""
SIDECAR = "lorafleet.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", SIDECAR)


@dataclass(frozen=True)
class BuildProgress:
    """One report from a build: a stage change, or one pretraining step with its loss."""

    stage: Literal["corpus", "tokenizer", "pretrain", "evaluate", "done"]
    step: int = 0
    total_steps: int = 0
    loss: float | None = None


class RlDemoInfo(BaseModel):
    """The task the RL demo should train on, and how well the base already does it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Literal["color_pick"] = "color_pick"
    description: str
    prompts: tuple[str, ...]
    target: str
    base_reward: float
    """Mean over the prompts of P(reply == target) under temperature-1 sampling, teacher-forced."""


class TinyMoeBuildInfo(BaseModel):
    """The ``lorafleet.json`` sidecar; written last, so its presence marks a complete build."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_id: str
    builder_version: int
    seed: int
    recipe: TinyMoeRecipe
    steps: int
    final_loss: float
    """Mean language-model loss (nats/token) over the last tenth of the pretraining steps."""
    corpus_sha256: str
    corpus_documents: int
    corpus_tokens: int
    vocab_size: int
    build_seconds: float
    torch_version: str
    transformers_version: str
    single_digit_accuracy: float
    """Greedy exact-match accuracy over every "What is a + b?" / "What is a - b?" with a, b < 10."""
    rl_demo: RlDemoInfo


def read_build_info(model_dir: Path) -> TinyMoeBuildInfo | None:
    """The sidecar of a complete build in ``model_dir``, or None when there is none (or a partial one)."""
    if not all((model_dir / name).is_file() for name in _REQUIRED_FILES):
        return None
    try:
        return TinyMoeBuildInfo.model_validate_json((model_dir / SIDECAR).read_bytes())
    except ValidationError:
        return None


def build_tiny_moe(
    model_dir: Path,
    *,
    seed: int = 0,
    force: bool = False,
    progress: Callable[[BuildProgress], None] | None = None,
    recipe: TinyMoeRecipe | None = None,
) -> Path:
    """Build tiny-moe under the models directory ``model_dir``; return ``model_dir / "tiny-moe"``.

    The returned path is an ordinary Hugging Face model directory. A complete build of the same
    seed, recipe and builder version already there is returned as is unless ``force``. Concurrent
    callers serialise on a lock file beside it; the build happens in a temporary sibling that is
    renamed into place only when complete, so a crash never leaves a directory that looks usable.
    """
    recipe = recipe or TinyMoeRecipe()
    model_dir = Path(model_dir) / TINY_MOE_ID
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(model_dir.parent / f".{model_dir.name}.lock")):
        cached = read_build_info(model_dir)
        if (
            not force
            and cached is not None
            and (cached.builder_version, cached.seed, cached.recipe) == (BUILDER_VERSION, seed, recipe)
        ):
            return model_dir
        # Under the lock, any leftover sibling is from a build that died: nobody else writes there.
        for stale in model_dir.parent.glob(f".{model_dir.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.building-", dir=model_dir.parent))
        try:
            with _single_thread():
                _build_into(work, seed=seed, recipe=recipe, progress=progress)
            _replace_dir(work, model_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return model_dir


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for the build, then restore the caller's setting.

    Two reasons, both measured: the reduction order of a matmul depends on the thread count, so
    only a fixed count makes the weights a function of seed and recipe alone; and at these tensor
    sizes a second thread gains little on an idle machine while on a busy two-core one every op
    waits at a barrier for a descheduled thread (a step took 1.29 s on two threads, 0.14 s on one).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _replace_dir(new: Path, target: Path) -> None:
    # A directory cannot be renamed over a non-empty one; move the old one aside first. Between the
    # two renames the target is briefly absent, which readers see as "not built yet", never as torn.
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.building-old-{time.monotonic_ns()}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build_into(
    out: Path, *, seed: int, recipe: TinyMoeRecipe, progress: Callable[[BuildProgress], None] | None
) -> None:
    def report(event: BuildProgress) -> None:
        if progress is not None:
            progress(event)

    started = time.perf_counter()
    docs = generate_corpus(seed=seed, mix=recipe.corpus)
    corpus_sha = hashlib.sha256(ENDOFTEXT.join(docs).encode("utf-8")).hexdigest()
    report(BuildProgress(stage="corpus"))

    tok = train_tokenizer(docs, vocab_size=recipe.vocab_size)
    fast = save_tokenizer(tok, out)
    _portable_tokenizer_config(out)
    eot, im_end, pad = tok.token_to_id(ENDOFTEXT), tok.token_to_id(IM_END), tok.token_to_id(PAD)
    stream, trained = pack_corpus(tok, docs)  # [corpus_tokens] ids, [corpus_tokens] in-loss flags
    report(BuildProgress(stage="tokenizer"))

    config = make_config(recipe, vocab_size=tok.get_vocab_size(), eos_ids=[im_end, eot], pad_id=pad)

    def on_step(step: int, loss: float) -> None:
        report(BuildProgress(stage="pretrain", step=step, total_steps=recipe.steps, loss=loss))

    model, final_loss = pretrain(
        recipe=recipe, config=config, stream=stream, trained=trained, seed=seed, on_step=on_step
    )

    report(BuildProgress(stage="evaluate"))
    accuracy = single_digit_accuracy(model, fast)
    base_reward = color_pick_reward(model, fast, target=RL_DEMO_TARGET)

    model.generation_config = GenerationConfig(eos_token_id=[im_end, eot], pad_token_id=pad)
    model.save_pretrained(str(out))
    info = TinyMoeBuildInfo(
        model_id=TINY_MOE_ID,
        builder_version=BUILDER_VERSION,
        seed=seed,
        recipe=recipe,
        steps=recipe.steps,
        final_loss=round(final_loss, 6),
        corpus_sha256=corpus_sha,
        corpus_documents=len(docs),
        corpus_tokens=int(stream.numel()),
        vocab_size=tok.get_vocab_size(),
        build_seconds=round(time.perf_counter() - started, 3),
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        single_digit_accuracy=round(accuracy, 6),
        rl_demo=RlDemoInfo(
            description=RL_DEMO_DESCRIPTION,
            prompts=COLOR_PICK_PROMPTS,
            target=RL_DEMO_TARGET,
            base_reward=round(base_reward, 6),
        ),
    )
    (out / SIDECAR).write_text(info.model_dump_json(indent=2) + "\n", encoding="utf-8")
    report(BuildProgress(stage="done", step=recipe.steps, total_steps=recipe.steps, loss=final_loss))


def _portable_tokenizer_config(out: Path) -> None:
    """Name the generic fast-tokenizer class and inline the chat template.

    transformers 5 writes its own backend class name and keeps the template in a separate
    ``chat_template.jinja``; loaders built on older transformers (vLLM images among them) know
    neither, and both spellings load the same tokenizer here.
    """
    path = out / "tokenizer_config.json"
    cfg = json.loads(path.read_text("utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # the class name, not v5's alias of it
    cfg["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
