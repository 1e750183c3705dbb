"""``lorafleet``: run the platform's roles and talk to a running control plane."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorafleet.platform.config import Settings, load_settings
from lorafleet.services.cli.client import DEFAULT_URL, ApiClient, resolve_key

app = typer.Typer(no_args_is_help=True, help="lorafleet: multi-tenant LoRA training and serving.")
keys_app = typer.Typer(no_args_is_help=True, help="Tenants and API keys (direct database access).")
files_app = typer.Typer(no_args_is_help=True, help="Datasets.")
jobs_app = typer.Typer(no_args_is_help=True, help="Fine-tuning jobs.")
app.add_typer(keys_app, name="keys")
app.add_typer(files_app, name="files")
app.add_typer(jobs_app, name="jobs")
models_app = typer.Typer(no_args_is_help=True, help="Base models.")
app.add_typer(models_app, name="models")
policies_app = typer.Typer(no_args_is_help=True, help="Policies: roll revisions out and back.")
app.add_typer(policies_app, name="policies")
console = Console()

ApiUrl = Annotated[str, typer.Option("--api-url", envvar="LORAFLEET_API_URL", help="Control-plane URL.")]
ApiKeyOpt = Annotated[str | None, typer.Option("--api-key", help="API key (else LORAFLEET_API_KEY or admin.key).")]


def _client(api_url: str, api_key: str | None) -> ApiClient:
    return ApiClient(api_url, resolve_key(api_key, load_settings().data_dir))


def _print_json(obj: Any) -> None:
    console.print_json(json.dumps(obj))


def _announce_key(settings: Settings, secret: str | None) -> None:
    if secret:
        console.print(f"[bold green]Created tenant 'default' with an admin API key (shown once):[/]\n{secret}\n"
                      f"It is also in {settings.admin_key_path} (mode 600).")


@app.command()
def migrate(downgrade_to: Annotated[str | None, typer.Option("--downgrade", help="Revision to go down to.")] = None
            ) -> None:
    """Apply (or revert) database migrations."""
    from lorafleet.platform.db import downgrade, upgrade

    settings = load_settings()
    if downgrade_to:
        downgrade(settings.resolved_database_url, downgrade_to)
    else:
        upgrade(settings.resolved_database_url)
    console.print("migrations applied")


@app.command()
def api(host: Annotated[str | None, typer.Option()] = None, port: Annotated[int | None, typer.Option()] = None) -> None:
    """Run the control-plane API alone."""
    import uvicorn

    from lorafleet.services.api import bootstrap, create_app

    settings = load_settings()
    _announce_key(settings, bootstrap(settings))
    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port,
                log_level=settings.log_level.lower())


@app.command()
def up(host: Annotated[str | None, typer.Option()] = None, port: Annotated[int | None, typer.Option()] = None) -> None:
    """Run the whole platform in one process on its embedded defaults (SQLite, local object store):
    the control plane, a trainer, a serving replica on the same port, and the rollout controller."""
    import uvicorn

    from lorafleet.platform.domain.enums import ReplicaRole
    from lorafleet.services.api import bootstrap, create_app
    from lorafleet.services.api.state import ApiState
    from lorafleet.services.cli._heartbeat import start_heartbeat
    from lorafleet.services.rollout import start_background as start_controller
    from lorafleet.services.serving.replica import build_serving
    from lorafleet.services.trainer.worker import TrainerWorker

    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    settings = load_settings(**overrides)
    secret = bootstrap(settings)
    ensure_tiny_moe(settings)
    _announce_key(settings, secret)
    if not secret:
        console.print(f"Admin API key: {settings.admin_key_path}")
    state = ApiState.create(settings)
    replica = build_serving(settings, sessions=state.sessions, store=state.store)
    trainer = TrainerWorker(settings, sessions=state.sessions, store=state.store, queue=state.queue)
    trainer_thread, trainer_stop = trainer.start_background()
    trainer_beats = start_heartbeat(state.sessions, replica_id=trainer.worker_id, role=ReplicaRole.TRAINER,
                                    alive=trainer_thread.is_alive, stop=trainer_stop,
                                    capacity={"max_concurrent_jobs": trainer.max_concurrent_jobs})
    controller_thread, controller_stop = start_controller(settings)
    try:
        uvicorn.run(create_app(settings, state=state, extra_routers=replica.routers), host=settings.host,
                    port=settings.port, log_level=settings.log_level.lower())
    finally:
        trainer_stop.set()
        controller_stop()
        trainer_thread.join(timeout=30)
        trainer_beats.join(timeout=10)
        controller_thread.join(timeout=30)
        state.close()


@app.command()
def serve() -> None:
    """Run one serving replica alone (run `lorafleet migrate` first; replicas never migrate)."""
    from lorafleet.services.serving.replica import run_serving

    run_serving(load_settings())


def ensure_tiny_moe(settings: Settings) -> None:
    """Build the built-in base when it is missing (cached under the model directory) and register it."""
    from lorafleet.platform.db import make_engine, make_sessionmaker, transaction
    from lorafleet.platform.modeling.tiny_moe import TINY_MOE_ID, build_tiny_moe
    from lorafleet.services.trainer.bases import register_base_model

    target = settings.resolved_model_dir / TINY_MOE_ID
    if not (target / "lorafleet.json").exists():
        console.print(f"building the built-in base model {TINY_MOE_ID} (once, about two minutes)...")
    path = build_tiny_moe(settings.resolved_model_dir)
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as session:
        register_base_model(session, path, model_id=TINY_MOE_ID)
    engine.dispose()


@models_app.command("build")
def models_build(name: Annotated[str, typer.Argument(help="Only tiny-moe is built in.")] = "tiny-moe",
                 force: Annotated[bool, typer.Option(help="Rebuild even when cached.")] = False) -> None:
    """Build (or reuse) the built-in base model and register it."""
    from lorafleet.platform.modeling.tiny_moe import TINY_MOE_ID, build_tiny_moe

    if name != TINY_MOE_ID:
        raise typer.BadParameter(f"only {TINY_MOE_ID} is built in; use `lorafleet models register DIR` for others")
    settings = load_settings()
    from lorafleet.platform.db import upgrade

    upgrade(settings.resolved_database_url)
    if force:
        build_tiny_moe(settings.resolved_model_dir, force=True)
    ensure_tiny_moe(settings)
    console.print(f"{TINY_MOE_ID} ready in {settings.resolved_model_dir / TINY_MOE_ID}")


@models_app.command("register")
def models_register(
    path: Path,
    model_id: Annotated[str | None, typer.Option("--id", help="Model id (default: the directory name).")] = None,
    max_lora_rank: Annotated[int, typer.Option()] = 64,
) -> None:
    """Register a local Hugging Face model directory (Qwen3-MoE, Mixtral, OLMoE, Qwen3, Llama) as a base."""
    from lorafleet.platform.db import make_engine, make_sessionmaker, transaction, upgrade
    from lorafleet.services.trainer.bases import register_base_model

    settings = load_settings()
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as session:
        row = register_base_model(session, path, model_id=model_id, max_lora_rank=max_lora_rank)
        console.print(f"registered {row.id}: {row.architecture}, fingerprint {row.fingerprint[:12]}…")
    engine.dispose()


@app.command()
def trainer(max_concurrent_jobs: Annotated[int, typer.Option()] = 4,
            probes: Annotated[bool, typer.Option(help="Serve /healthz, /readyz, /metrics on the port")] = True
            ) -> None:
    """Run a training worker alone: claims jobs from the queue until interrupted."""
    import signal

    from lorafleet.platform.domain.enums import ReplicaRole
    from lorafleet.services.cli._heartbeat import start_heartbeat
    from lorafleet.services.cli.probes import start_probe_server
    from lorafleet.services.trainer.worker import TrainerWorker

    settings = load_settings()
    if probes:
        start_probe_server(settings, role="trainer")
    worker = TrainerWorker(settings, max_concurrent_jobs=max_concurrent_jobs)
    thread, stop = worker.start_background()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    beats = start_heartbeat(worker.sessions, replica_id=worker.worker_id, role=ReplicaRole.TRAINER,
                            alive=thread.is_alive, stop=stop,
                            capacity={"max_concurrent_jobs": max_concurrent_jobs})
    while thread.is_alive():
        thread.join(timeout=1.0)  # a bounded join keeps the signal handlers running
    beats.join(timeout=10)
    if not stop.is_set():
        raise typer.Exit(1)  # the worker thread died: let the pod restart


@app.command("rollout-controller")
def rollout_controller() -> None:
    """Run the rollout controller alone (several may run; each rollout is driven by one at a time).
    /healthz, /readyz and /metrics are served on the port."""
    from lorafleet.services.cli.probes import start_probe_server
    from lorafleet.services.rollout import run_controller

    settings = load_settings()
    start_probe_server(settings, role="rollout-controller")
    run_controller(settings)


@policies_app.command("rollout")
def policies_rollout(
    policy: str,
    revision: Annotated[str, typer.Option(help="The revision to expose.")],
    replicas: Annotated[str | None, typer.Option(help="all, a count, or comma-separated replica ids")] = None,
    smoke_prompt: Annotated[str | None, typer.Option(help="A prompt each replica must answer first")] = None,
    expect: Annotated[str | None, typer.Option(help="Text the smoke answer must contain")] = None,
    wait: Annotated[bool, typer.Option(help="Follow the rollout until it ends")] = True,
    api_url: ApiUrl = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
) -> None:
    """Warm a revision on the serving replicas, then expose it."""
    from lorafleet.services.rollout import cli as rollout_cli

    client = _client(api_url, api_key)
    view = rollout_cli.start_rollout(client, policy=policy, revision=revision, replicas=replicas,
                                     smoke_prompt=smoke_prompt, expect=expect)
    if wait:
        view = rollout_cli.wait_rollout(client, policy=policy, rollout_id=view["id"],
                                        on_update=lambda v: console.print(f"{v['id']}: {v['state']}"))
    _print_json(view)
    if view["state"] in ("failed", "cancelled"):
        raise typer.Exit(1)


@policies_app.command("rollback")
def policies_rollback(policy: str, revision: Annotated[str | None, typer.Option()] = None,
                      api_url: ApiUrl = DEFAULT_URL, api_key: ApiKeyOpt = None) -> None:
    """Point the policy back at its previous (or a named) revision: no load, instant."""
    from lorafleet.services.rollout import cli as rollout_cli

    _print_json(rollout_cli.rollback(_client(api_url, api_key), policy=policy, revision=revision))


@policies_app.command("status")
def policies_status(policy: str, api_url: ApiUrl = DEFAULT_URL, api_key: ApiKeyOpt = None) -> None:
    """The policy's serving and previous revision and its latest rollouts."""
    from lorafleet.services.rollout import cli as rollout_cli

    _print_json(rollout_cli.status(_client(api_url, api_key), policy=policy))


@keys_app.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="Tenant name; created when missing.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: admin,train,infer,read.")],
    name: Annotated[str, typer.Option()] = "",
) -> None:
    """Create an API key (and its tenant when new). The key is printed once."""
    from sqlalchemy import select

    from lorafleet.platform.auth import create_api_key, create_tenant, parse_scopes
    from lorafleet.platform.db import make_engine, make_sessionmaker, models, transaction, upgrade

    settings = load_settings()
    upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    with transaction(make_sessionmaker(engine)) as session:
        row = session.scalars(select(models.Tenant).where(models.Tenant.name == tenant)).first()
        row = row or create_tenant(session, tenant)
        key, secret = create_api_key(session, tenant_id=row.id, scopes=parse_scopes(scopes), name=name)
    engine.dispose()
    console.print(f"key {key.id} for tenant {tenant} with scopes {','.join(key.scopes)}:")
    print(secret)


@files_app.command("upload")
def files_upload(path: Path, api_url: ApiUrl = DEFAULT_URL, api_key: ApiKeyOpt = None) -> None:
    """Upload and validate a JSONL dataset."""
    with path.open("rb") as f:
        result = _client(api_url, api_key).request("POST", "/v1/files", files={"file": (path.name, f)},
                                                   data={"purpose": "fine-tune"})
    _print_json(result)
    if result["status"] != "validated":
        raise typer.Exit(1)


@jobs_app.command("create")
def jobs_create(
    model: Annotated[str, typer.Option()],
    training_file: Annotated[str, typer.Option("--training-file")],
    policy: Annotated[str, typer.Option()],
    method: Annotated[str, typer.Option(help="supervised, dpo or reinforcement")] = "supervised",
    hyperparameters: Annotated[str, typer.Option(help="JSON object")] = "{}",
    grader: Annotated[str | None, typer.Option(help="JSON grader for reinforcement")] = None,
    rank: Annotated[int, typer.Option()] = 1,
    seed: Annotated[int | None, typer.Option()] = None,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    api_url: ApiUrl = DEFAULT_URL,
    api_key: ApiKeyOpt = None,
) -> None:
    """Create a fine-tuning job."""
    method_body: dict[str, Any] = {"type": method, "hyperparameters": json.loads(hyperparameters)}
    if grader:
        method_body["grader"] = json.loads(grader)
    body = {"model": model, "training_file": training_file, "policy": policy, "method": method_body,
            "lora": {"rank": rank}, "seed": seed, "idempotency_key": idempotency_key}
    _print_json(_client(api_url, api_key).request("POST", "/v1/fine_tuning/jobs", json=body))


@jobs_app.command("list")
def jobs_list(status: Annotated[str | None, typer.Option()] = None, api_url: ApiUrl = DEFAULT_URL,
              api_key: ApiKeyOpt = None) -> None:
    params = {"status": status} if status else {}
    page = _client(api_url, api_key).request("GET", "/v1/fine_tuning/jobs", params=params)
    table = Table("id", "status", "method", "policy", "model", "step")
    for job in page["data"]:
        prog = job["progress"]
        table.add_row(job["id"], job["status"], job["method"]["type"], job["policy"], job["model"],
                      f"{prog.get('step', 0)}/{prog.get('total_steps', '?')}")
    console.print(table)


@jobs_app.command("get")
def jobs_get(job_id: str, api_url: ApiUrl = DEFAULT_URL, api_key: ApiKeyOpt = None) -> None:
    _print_json(_client(api_url, api_key).request("GET", f"/v1/fine_tuning/jobs/{job_id}"))


@jobs_app.command("watch")
def jobs_watch(job_id: str, api_url: ApiUrl = DEFAULT_URL, api_key: ApiKeyOpt = None,
               interval: Annotated[float, typer.Option()] = 1.0) -> None:
    """Follow a job: a progress bar and its events until it finishes."""
    client = _client(api_url, api_key)
    after: str | None = None
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("{task.fields[metrics]}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(job_id, total=None, metrics="")
        while True:
            job = client.request("GET", f"/v1/fine_tuning/jobs/{job_id}")
            params = {"after": after} if after else {}
            events = client.request("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params=params)
            for event in events["data"]:
                if event["type"] != "metrics":
                    progress.console.print(f"[dim]{event['level']}[/] {event['message']}")
                after = event["id"]
            prog = job["progress"]
            metrics = " ".join(f"{k}={v:.4g}" for k, v in prog.items()
                               if isinstance(v, float) and k not in ("step", "total_steps"))
            progress.update(task, total=prog.get("total_steps"), completed=prog.get("step", 0),
                            description=f"{job_id} {job['status']}", metrics=metrics)
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(interval)
    console.print(f"job {job_id} {job['status']}" + (f": {job['error']['message']}" if job.get("error") else ""))
    if job["status"] != "succeeded":
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
