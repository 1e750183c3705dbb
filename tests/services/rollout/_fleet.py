"""A small real fleet for the controller tests: PostgreSQL, a local object store, a control-plane
app, and serving replicas as separate processes (``lorafleet serve``'s ``run_serving``) over a
small MoE base, each registering and heartbeating itself like in production.

Replica processes can be paused (SIGSTOP: it stops heartbeating and answering, as a hung
machine does), resumed, and killed. Controllers run in-process (``start_background``) or as a
process of their own (``run_controller``), so a test can kill one outright.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import torch
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from lorafleet.adapters_store import publish_revision
from lorafleet.adapters_store.bundle import BundleMeta, write_bundle
from lorafleet.adapters_store.objectstore import LocalObjectStore
from lorafleet.platform.auth import create_api_key, create_tenant
from lorafleet.platform.config import Settings
from lorafleet.platform.db import make_engine, make_sessionmaker, models, transaction
from lorafleet.platform.domain.architecture import ArchitectureSpec
from lorafleet.platform.domain.enums import Scope
from lorafleet.platform.domain.ids import new_id
from lorafleet.platform.domain.lora import LoraConfig
from tests.conftest import PG_ADMIN_URL

BASE_ID = "tiny-moe"
REPO = Path(__file__).resolve().parents[3]

CHATML = (
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


@contextmanager
def fresh_database() -> Iterator[str]:
    name = f"lorafleet_ro_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def random_moe_base(directory: Path) -> Path:
    """A random 2-layer Qwen3-MoE with a small BPE tokenizer and a chat template, in seconds.

    For quick local runs only (``LORAFLEET_TEST_ROLLOUT_BASE=random``): the controller's
    behaviour does not depend on the base's weights, and tiny-moe's first build takes minutes.
    """
    import transformers
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        [f"user {i} says hello to assistant {i * 3}" for i in range(200)], trainer=trainer
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(directory))
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        intermediate_size=128,
        vocab_size=len(fast),
        norm_topk_prob=True,
        max_position_embeddings=256,
    )
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(directory)
    return directory


def with_chat_template(base_dir: Path, work: Path) -> Path:
    """The base directory itself when its tokenizer has a chat template (tiny-moe has one); else a
    copy given a ChatML template, since the smoke check is a chat completion."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(base_dir))
    if getattr(tokenizer, "chat_template", None):
        return base_dir
    copy = work / "base-with-template"
    shutil.copytree(base_dir, copy)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(str(copy))
    return copy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def eventually(check: Callable[[], Any], *, timeout: float, what: str, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


@dataclass
class Answer:
    status: int
    revision: str | None
    text: str
    started: float
    ended: float
    """time.time() around the request."""


@dataclass
class ReplicaProc:
    id: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process would hold SIGTERM forever
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def chat(self, key: str, model: str, prompt: str = "hello", max_tokens: int = 2) -> Answer:
        t0 = time.time()
        r = httpx.post(
            f"{self.url}/v1/chat/completions",
            timeout=60,
            headers={"Authorization": f"Bearer {key}"},
            json={
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )
        text = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text
        return Answer(r.status_code, r.headers.get("X-Lorafleet-Revision"), text, t0, time.time())

    def resident(self, admin_key: str) -> dict[str, dict[str, Any]]:
        r = httpx.get(
            f"{self.url}/internal/adapters", timeout=30, headers={"Authorization": f"Bearer {admin_key}"}
        )
        r.raise_for_status()
        return {e["revision_id"]: e for e in r.json()["data"]}

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples called ``name`` whose labels include ``labels``."""
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


@dataclass
class Fleet:
    settings: Settings
    sessions: sessionmaker[Session]
    admin_key: str
    tenant_id: str
    train_key: str
    infer_key: str
    store: LocalObjectStore
    spec: ArchitectureSpec
    fingerprint: str
    work: Path
    replicas: dict[str, ReplicaProc] = field(default_factory=dict)
    _seed: int = 0

    # -- replicas -------------------------------------------------------------------------------
    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORAFLEET_")}
        env.update(
            {
                "LORAFLEET_DATABASE_URL": self.settings.database_url,
                "LORAFLEET_OBJECT_STORE_DIR": str(self.settings.resolved_object_store_dir),
                "LORAFLEET_HOST": "127.0.0.1",
                "LORAFLEET_LOG_LEVEL": "WARNING",
                "PYTHONPATH": str(REPO),
                "OMP_NUM_THREADS": "1",
            }
        )
        env.update(extra)
        return env

    def start_replicas(self, *ids: str, **extra_env: str) -> None:
        """Start ``lorafleet serve`` processes; ``extra_env`` adds or overrides ``LORAFLEET_*`` settings."""
        procs = {}
        for rid in ids:
            port = free_port()
            log = self.work / f"{rid}.log"
            env = self.env(
                LORAFLEET_DATA_DIR=str(self.work / rid),
                LORAFLEET_PORT=str(port),
                LORAFLEET_SERVING_BASE_MODEL=BASE_ID,
                LORAFLEET_SERVING_REPLICA_ID=rid,
                LORAFLEET_SERVING_HEARTBEAT_SECONDS="0.3",
                LORAFLEET_SERVING_RESOLVE_TTL_SECONDS="0",
                LORAFLEET_MAX_DEVICE_ADAPTERS="16",
                LORAFLEET_SERVING_MAX_LORA_RANK="8",
            ) | extra_env
            code = (
                "from lorafleet.platform.config import load_settings\n"
                "from lorafleet.services.serving.replica import run_serving\n"
                "run_serving(load_settings())\n"
            )
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-c", code], env=env, cwd=self.work, stdout=out, stderr=subprocess.STDOUT
                )
            procs[rid] = ReplicaProc(rid, f"http://127.0.0.1:{port}", proc, log)
        for rid, rp in procs.items():

            def up(rp: ReplicaProc = rp) -> bool:
                if not rp.alive():
                    raise AssertionError(f"replica {rp.id} exited:\n{rp.log.read_text()[-3000:]}")
                try:
                    return httpx.get(f"{rp.url}/healthz", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False

            eventually(up, timeout=120, what=f"replica {rid} to serve", every=0.2)
            self.replicas[rid] = rp

    def stop(self) -> None:
        for rp in self.replicas.values():
            rp.stop()

    # -- data -----------------------------------------------------------------------------------
    def new_policy(self, name: str) -> tuple[str, str]:
        """A policy of tenant acme with one published revision, serving. Returns (policy id, revision)."""
        policy_id = new_id("policy")
        with transaction(self.sessions) as s:
            s.add(models.Policy(id=policy_id, tenant_id=self.tenant_id, name=name, base_model_id=BASE_ID))
        rev = self.publish(policy_id)
        with transaction(self.sessions) as s:
            row = s.get(models.Policy, policy_id)
            assert row is not None
            row.serving_revision_id = rev
        return policy_id, rev

    def publish(self, policy_id: str, *, rank: int = 4) -> str:
        """Write and publish a trained-looking adapter bundle; commit its revision row."""
        self._seed += 1
        lora = LoraConfig(rank=rank, alpha=2.0 * rank)
        gen = torch.Generator().manual_seed(self._seed)
        tensors = {}
        for key, shape in self.spec.lora_shapes(lora).items():
            scale = shape[-1] ** -0.5 if key.endswith("lora_A") else 0.5 / lora.scaling
            tensors[key] = torch.randn(shape, generator=gen) * scale
        meta = BundleMeta(
            tenant_id=self.tenant_id,
            policy_id=policy_id,
            base_model_id=BASE_ID,
            base_fingerprint=self.fingerprint,
        )
        bundle = self.work / "bundles" / meta.revision_id
        write_bundle(bundle, tensors, meta=meta, lora=lora)
        published = publish_revision(self.store, bundle)
        with transaction(self.sessions) as s:
            s.add(
                models.AdapterRevision(
                    id=published.revision_id,
                    tenant_id=self.tenant_id,
                    policy_id=policy_id,
                    base_model_id=BASE_ID,
                    uri=published.uri,
                    sha256=published.sha256,
                    bytes=published.bytes,
                    rank=rank,
                    manifest=published.manifest,
                )
            )
        return published.revision_id

    def corrupt(self, revision_id: str) -> None:
        """Flip bytes in the stored tensor file of a published revision (bit rot in the object store)."""
        with self.sessions() as s:
            row = s.get(models.AdapterRevision, revision_id)
            assert row is not None
            uri = row.uri
        files = list((self.store.root / uri).glob("adapter.safetensors~*.data"))
        assert files, f"no stored tensor file under {uri}"
        for f in files:
            data = bytearray(f.read_bytes())
            for i in range(len(data) // 2, len(data) // 2 + 64):
                data[i] ^= 0xFF
            os.chmod(f, 0o644)
            f.write_bytes(bytes(data))

    def policy(self, policy_id: str) -> models.Policy:
        with self.sessions() as s:
            row = s.get(models.Policy, policy_id)
            assert row is not None
            return row

    def rollout(self, rollout_id: str) -> models.Rollout:
        with self.sessions() as s:
            row = s.get(models.Rollout, rollout_id)
            assert row is not None
            return row

    def flips(self, policy_id: str) -> list[models.AuditLog]:
        with self.sessions() as s:
            return list(
                s.scalars(
                    select(models.AuditLog)
                    .where(
                        models.AuditLog.action == "policy.pointer_flip",
                        models.AuditLog.object_id == policy_id,
                    )
                    .order_by(models.AuditLog.seq)
                )
            )


def build_fleet(url: str, work: Path, base_dir: Path) -> Fleet:
    from lorafleet.services.api import bootstrap
    from lorafleet.services.trainer.bases import register_base_model

    settings = Settings(data_dir=work / "control", database_url=url, object_store_dir=work / "objects")
    admin_key = bootstrap(settings)
    assert admin_key is not None
    sessions = make_sessionmaker(make_engine(url))
    with transaction(sessions) as s:
        base = register_base_model(s, base_dir, model_id=BASE_ID, max_lora_rank=16)
        spec = ArchitectureSpec.model_validate(base.config["spec"])
        fp = base.fingerprint
        tenant = create_tenant(s, "acme")
        _, train_key = create_api_key(s, tenant_id=tenant.id, scopes=[Scope.TRAIN])
        _, infer_key = create_api_key(s, tenant_id=tenant.id, scopes=[Scope.INFER])
        tenant_id = tenant.id
    return Fleet(
        settings=settings,
        sessions=sessions,
        admin_key=admin_key,
        tenant_id=tenant_id,
        train_key=train_key,
        infer_key=infer_key,
        store=LocalObjectStore(settings.resolved_object_store_dir),
        spec=spec,
        fingerprint=fp,
        work=work,
    )
