"""Rollout under load: two-stage rollout (warm on every replica, then flip) against lazy
load-on-first-request, while steady traffic runs over warm policies.

Starts a small real platform on 127.0.0.1: a fresh PostgreSQL database, a local object store,
and, each as a process of its own, the control-plane API (``lorafleet api``), a rollout
controller (``lorafleet rollout-controller``) and two serving replicas (``lorafleet serve``) over
tiny-moe (``make test-model``). ``--warm``
policies are rolled out and pinned on both replicas; ``--clients`` closed-loop clients (or, with
``--rate``, open-loop Poisson traffic) stream chat completions to them (random policy, random
replica) for the whole run. Then:

- warm-up: ``--warmup`` revisions exposed in each mode, not measured (first calls of every path);
- baseline: ``--baseline-seconds`` of that traffic alone;
- for each N in ``--n`` and each mode, N new revisions (each a new policy's first revision) are
  published one every ``--interval`` seconds, and each is exposed:
  two-stage: ``POST /v1/policies/{name}/rollouts``; when the rollout is ``serving``, the
             first request is sent;
  lazy:      the pointer is flipped in the database at once and the first request is sent,
             which loads the revision on the replica it reaches (under admission control).

Per request the replica reports how long it waited for its own adapter to load
(``X-Lorafleet-Adapter-Wait-Seconds``); TTFT is measured by the client, to the first SSE event
(the replica starts the response only once the first token exists). Prints user-visible adapter
load and first-request TTFT (p50/p95/p99) for the new revisions, background TTFT by phase, and
the ratios against the targets: two-stage user-visible load p95 and p99 exactly 0; first-request
TTFT p95 at least 3x lower than lazy; background TTFT p95 at most 10% above the baseline.

The fleet runs as deployed: pointer flips are announced on Redis pub/sub (a prefix of its own
per run), replicas keep the default pointer TTL (1 s) and key cache, and heartbeat at the
default period. A new policy's first request finds no cached pointer, so pointer propagation
does not enter the figures; the lazy mode announces its flips too. The admission queue is set
large (``--queue``) so lazy first requests wait instead of being refused (refusals are counted
anyway).

Usage: python loadtests/rollout_under_load.py [--n 20] [--n 20,100] [--clients 3] [--warm 6]
"""

from __future__ import annotations

import argparse
import bisect
import functools
import multiprocessing
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import select  # noqa: E402

from loadtests._load_clients import client_loop, first_loop, open_loop  # noqa: E402
from lorafleet.platform.db import models, transaction  # noqa: E402
from lorafleet.platform.domain.ids import new_id, new_ulid  # noqa: E402
from lorafleet.platform.events import POLICY_POINTER_CHANGED, Event, EventBus, PolicyPointerChanged  # noqa: E402
from lorafleet.platform.events.redis_bus import RedisBus  # noqa: E402
from lorafleet.platform.rollouts.requests import flip_pointer  # noqa: E402
from lorafleet.services.serving.replica import ServingOptions  # noqa: E402
from tests.services.rollout._fleet import (  # noqa: E402  (after the path fix)
    BASE_ID,
    Fleet,
    build_fleet,
    free_port,
    fresh_database,
    random_moe_base,
    with_chat_template,
)

REPLICAS = ("rep-a", "rep-b")


@dataclass
class Sample:
    phase: str
    kind: str
    """``background`` or ``first``."""
    status: int
    ttft: float | None
    wait: float | None
    """The replica's X-Lorafleet-Adapter-Wait-Seconds."""
    revision: str | None


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(-(-q * len(ordered) // 100)) - 1))
    return ordered[k]


class Traffic:
    """Background clients over the warm policies (closed or open loop), each a process of its own
    so that the latency they measure is not inflated by this process's interpreter (watcher,
    probes); each sample is labelled with the phase that was current when its request started."""

    def __init__(
        self, fleet: Fleet, policies: list[str], *, clients: int, max_tokens: int, rate: float | None = None
    ) -> None:
        """``rate``: open loop, that many requests per second in all (Poisson arrivals, split over
        ``clients`` processes); None: ``clients`` closed-loop clients (each sends its next request
        when the last one ended: they keep the replicas saturated)."""
        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self._out: Any = ctx.Queue()
        urls = [rp.url for rp in fleet.replicas.values()]
        common = (urls, fleet.infer_key, policies, max_tokens)
        self._procs = [
            ctx.Process(
                target=open_loop if rate else client_loop,
                args=(i, *common, *((rate / clients,) if rate else ()), self._stop, self._out),
                daemon=True,
            )
            for i in range(clients)
        ]
        self._phases: list[tuple[float, str]] = [(0.0, "warmup")]
        self.samples: list[Sample] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    @property
    def phase(self) -> str:
        return self._phases[-1][1]

    @phase.setter
    def phase(self, name: str) -> None:
        self._phases.append((time.time(), name))
        print(f"phase: {name} ({time.strftime('%H:%M:%S')})", flush=True)  # progress, for a long run

    def start(self) -> None:
        """Start the clients and return once each has started (a spawned process imports this
        module first, torch included: that takes a while, and must not eat into a phase)."""
        for p in self._procs:
            p.start()
        _wait_ready(self._out, len(self._procs), self._procs)

    def stop(self) -> None:
        self._stop.set()
        raw = []
        deadline = time.monotonic() + 120
        while any(p.is_alive() for p in self._procs) and time.monotonic() < deadline:
            try:
                raw.append(self._out.get(timeout=0.5))
            except queue.Empty:
                pass
        while True:
            try:
                raw.append(self._out.get(timeout=0.5))
            except queue.Empty:
                break
        for p in self._procs:
            p.join(timeout=10)
        starts = [t for t, _ in self._phases]
        for started, status, ttft, wait, rev in raw:
            phase = self._phases[max(0, bisect.bisect_right(starts, started) - 1)][1]
            self.samples.append(Sample(phase, "background", status, ttft, wait, rev))


def _wait_ready(out: Any, count: int, procs: list[Any], timeout: float = 300.0) -> None:
    """Each load process puts None on ``out`` once it is ready to send."""
    deadline = time.monotonic() + timeout
    ready = 0
    while ready < count:
        if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
            raise SystemExit("the load processes did not start")
        try:
            if out.get(timeout=1.0) is None:
                ready += 1
        except queue.Empty:
            pass


class FirstSenders:
    """Processes that send each new revision's first request when told to: like the background
    clients, they measure TTFT outside this process, whose interpreter is busy publishing
    rollouts and watching pointers (a thread of it would add its own waits to the figure)."""

    def __init__(self, fleet: Fleet, *, processes: int, max_tokens: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._tasks: Any = ctx.Queue()
        self._out: Any = ctx.Queue()
        self._procs = [
            ctx.Process(target=first_loop, args=(fleet.infer_key, max_tokens, self._tasks, self._out), daemon=True)
            for _ in range(processes)
        ]
        for p in self._procs:
            p.start()
        _wait_ready(self._out, processes, self._procs)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid is not None]

    def send(self, url: str, name: str, revision: str) -> None:
        self._tasks.put((url, name, revision))

    def collect(self, count: int, timeout: float = 300.0) -> list[tuple[Any, ...]]:
        results: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + timeout
        while len(results) < count and time.monotonic() < deadline:
            try:
                results.append(self._out.get(timeout=1.0))
            except queue.Empty:
                pass
        return results

    def stop(self) -> None:
        for _ in self._procs:
            self._tasks.put(None)
        for p in self._procs:
            p.join(timeout=30)


@contextmanager
def platform_processes(
    fleet: Fleet, *, max_concurrent: int, nice: int = 0, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[str, dict[str, int]]]:
    """The control-plane API and the rollout controller, each a process of its own (as deployed),
    so that neither shares this process's interpreter with the clients that measure latency.

    ``nice``: their CPU priority below the replicas'. Deployed, they run on other nodes than the
    serving replicas; on one small machine a lower priority is the nearest stand-in, so that the
    figures show what a rollout costs the replicas, not what the controller's own CPU costs them."""
    api_port, probe_port = free_port(), free_port()
    control = dict(LORAFLEET_DATA_DIR=str(fleet.settings.data_dir), LORAFLEET_LOG_LEVEL="WARNING") | (extra_env or {})
    procs = {
        "api": fleet.env(**control, LORAFLEET_PORT=str(api_port)),
        "rollout-controller": fleet.env(
            **control,
            LORAFLEET_PORT=str(probe_port),
            LORAFLEET_ROLLOUT_ADMIN_KEY=fleet.admin_key,
            LORAFLEET_ROLLOUT_POLL_SECONDS="0.5",
            LORAFLEET_ROLLOUT_LEASE_SECONDS="10",
            LORAFLEET_ROLLOUT_RECONCILE_SECONDS="30",
            LORAFLEET_ROLLOUT_KEEP_WARM_SECONDS="3600",
            LORAFLEET_ROLLOUT_MAX_CONCURRENT=str(max_concurrent),
            LORAFLEET_ROLLOUT_TIMEOUT_SECONDS="300",
        ),
    }
    running: list[subprocess.Popen[bytes]] = []
    try:
        for command, env in procs.items():
            log = (fleet.work / f"{command}.log").open("wb")
            code = f"from lorafleet.services.cli.main import app; app([{command!r}])"
            running.append(
                subprocess.Popen(
                    ["nice", "-n", str(nice), sys.executable, "-c", code],
                    env=env,
                    cwd=fleet.work,
                    stdout=log,
                    stderr=log,
                )
            )
        for port, proc in ((api_port, running[0]), (probe_port, running[1])):
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"a platform process exited; see the logs in {fleet.work}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"a platform process did not start; see the logs in {fleet.work}")
                time.sleep(0.2)
        yield f"http://127.0.0.1:{api_port}", {"api": running[0].pid, "controller": running[1].pid}
    finally:
        for proc in running:
            proc.terminate()
        for proc in running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


class CpuMeter:
    """CPU seconds used by each part of the run (the diagnostic's account of where a phase's CPU
    went): each replica, the API, the controller, PostgreSQL and Redis (every process of theirs on
    the machine), the load processes and this process."""

    def __init__(self, parts: dict[str, list[int]]) -> None:
        self._parts = parts

    SERVERS = {"postgres": "postgres", "redis-server": "redis"}
    """Process name -> part, for the servers whose processes come and go (PostgreSQL backends)."""

    def snapshot(self) -> dict[str, float]:
        pids = {part: list(ids) for part, ids in self._parts.items()} | {part: [] for part in self.SERVERS.values()}
        for proc in psutil.process_iter(["name"]):
            if (part := self.SERVERS.get(proc.info["name"])) is not None:
                pids[part].append(proc.pid)
        totals = {}
        for part, ids in pids.items():
            total = 0.0
            for pid in ids:
                try:
                    t = psutil.Process(pid).cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass  # ended (a PostgreSQL backend that closed)
            totals[part] = total
        return totals


def new_empty_policy(fleet: Fleet, name: str) -> str:
    policy_id = new_id("policy")
    with transaction(fleet.sessions) as s:
        s.add(models.Policy(id=policy_id, tenant_id=fleet.tenant_id, name=name, base_model_id=BASE_ID))
    return policy_id


def start_two_stage(client: httpx.Client, api: str, fleet: Fleet, name: str, revision: str) -> str | None:
    """POST the rollout; None when accepted, else why not."""
    headers = {"Authorization": f"Bearer {fleet.train_key}"}
    r = client.post(f"{api}/v1/policies/{name}/rollouts", json={"revision": revision}, headers=headers, timeout=30)
    return None if r.status_code == 201 else f"rollout refused {r.status_code}: {r.text[:200]}"


def flip_lazy(fleet: Fleet, bus: EventBus, policy_id: str, revision: str) -> None:
    """Load-on-first-request: the pointer moves at once (and is announced); nobody warms anything."""
    with transaction(fleet.sessions) as s:
        row = s.scalars(select(models.Policy).where(models.Policy.id == policy_id).with_for_update()).one()
        old = flip_pointer(row, revision)  # the platform's own flip, as a rollback makes it
        name = row.name
    event = PolicyPointerChanged(
        tenant_id=fleet.tenant_id,
        policy_id=policy_id,
        policy=name,
        revision_id=revision,
        previous_revision_id=old,
        reason="rollout",
    )
    bus.publish(POLICY_POINTER_CHANGED, event.model_dump(mode="json"))


def serving_pointers(fleet: Fleet, policy_ids: list[str]) -> dict[str, str | None]:
    with fleet.sessions() as s:
        rows = s.scalars(select(models.Policy).where(models.Policy.id.in_(policy_ids)))
        return {r.id: r.serving_revision_id for r in rows}


def run_mode(
    *,
    mode: str,
    n: int,
    fleet: Fleet,
    bus: EventBus,
    api: str,
    traffic: Traffic,
    senders: FirstSenders,
    interval: float,
    phase: str | None = None,
    at_start: Callable[[], None] = lambda: None,
) -> tuple[list[Sample], list[str], float]:
    """Expose N published revisions, one every ``interval``, and have a sender process send each
    one's first request as soon as its pointer names it (on the pointer's announcement on Redis, as a replica learns it;
    a database poll every second repairs a missed one, so the measurement adds almost no load).
    The revisions are written and published to the object store before the phase starts: that is
    the trainer's work, in another process in production, and here it would take this process's
    interpreter from the clients that measure.
    Returns (first-request samples, failures, phase seconds)."""
    phase = phase or f"{mode} N={n}"
    revisions = []
    for i in range(n):
        name = f"{phase.replace(' ', '-').replace('=', '')}-{i}"
        policy_id = new_empty_policy(fleet, name)
        revisions.append((name, policy_id, fleet.publish(policy_id)))
    time.sleep(1.0)
    traffic.phase = phase
    at_start()  # the phase's own interval starts here (CPU accounting), after the publishing
    started = time.perf_counter()
    firsts: list[Sample] = []
    failures: list[str] = []
    urls = [rp.url for rp in fleet.replicas.values()]
    pending: dict[str, tuple[int, str, str]] = {}
    """policy id → (index, name, revision) until its first request is sent."""
    lock = threading.Lock()
    published = threading.Event()

    sent = 0
    warming: list[threading.Thread] = []
    admin = {"Authorization": f"Bearer {fleet.admin_key}"}

    def warm_then_flip(policy_id: str, revision: str) -> None:
        """The diagnostic mode: what the controller does, without the controller (the warms from
        here, both replicas at once, then the flip and its announcement)."""

        ok = [True] * len(urls)

        def warm(i: int, url: str) -> None:
            body = {"revision_id": revision, "tier": "device", "pin": True}
            try:
                warm_client.post(
                    f"{url}/internal/adapters/warm", json=body, headers=admin, timeout=300
                ).raise_for_status()
            except httpx.HTTPError as exc:
                ok[i] = False
                failures.append(f"warm of {revision} on {url}: {exc!r}")

        threads = [threading.Thread(target=warm, args=(i, url)) for i, url in enumerate(urls)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if all(ok):
            flip_lazy(fleet, bus, policy_id, revision)
        else:
            with lock:
                pending.pop(policy_id, None)

    # Warms wait in the replicas' admission queues (paced, one at a time): no pool limit for them.
    unbounded = httpx.Limits(max_connections=None, max_keepalive_connections=2 * len(urls))
    with httpx.Client() as client, httpx.Client(limits=unbounded) as warm_client:

        def send_flipped(pointers: dict[str, str | None]) -> None:
            nonlocal sent
            with lock:
                for pid, (i, name, revision) in list(pending.items()):
                    if pointers.get(pid) == revision:
                        del pending[pid]
                        senders.send(urls[i % len(urls)], name, revision)
                        sent += 1

        def on_flip(event: Event) -> None:
            change = PolicyPointerChanged.model_validate(event.payload)
            send_flipped({change.policy_id: change.revision_id})

        def watch() -> None:
            """The announcements send first requests at once; a slow database poll catches a
            missed one (events are at most once)."""
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with lock:
                    ids = list(pending)
                if not ids and published.is_set():
                    return
                if ids:
                    send_flipped(serving_pointers(fleet, ids))
                time.sleep(1.0)
            failures.extend(f"{name}: never served" for _, name, _ in pending.values())

        subscription = bus.subscribe(POLICY_POINTER_CHANGED, on_flip)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        for i, (name, policy_id, revision) in enumerate(revisions):
            t0 = time.perf_counter()
            with lock:
                pending[policy_id] = (i, name, revision)
            if mode == "two-stage":
                refused = start_two_stage(client, api, fleet, name, revision)
                if refused is not None:
                    with lock:
                        del pending[policy_id]
                    failures.append(f"{name}: {refused}")
            elif mode == "warm-flip":
                warming.append(threading.Thread(target=warm_then_flip, args=(policy_id, revision), daemon=True))
                warming[-1].start()
            else:
                flip_lazy(fleet, bus, policy_id, revision)
            time.sleep(max(0.0, interval - (time.perf_counter() - t0)))
        for thread in warming:
            thread.join()
        published.set()
        watcher.join()
        subscription.close()
        for name, revision, status, ttft, wait, rev in senders.collect(sent):
            firsts.append(Sample(phase, "first", status, ttft, wait, rev))
            if status == 200 and rev != revision:
                failures.append(f"{name}: answered by {rev}, not {revision}")
    return firsts, failures, time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="20", help="comma-separated revision counts, e.g. 20,100 (default 20)")
    ap.add_argument("--warm", type=int, default=6, help="warm policies carrying the background traffic")
    ap.add_argument("--clients", type=int, default=3, help="background client processes")
    ap.add_argument(
        "--rate",
        type=float,
        default=None,
        help="open-loop background traffic: requests per second in all, Poisson arrivals "
        "(default: closed loop, each client sends its next request when its last one ended)",
    )
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--first-senders", type=int, default=6, help="processes sending the first requests")
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between two published revisions")
    ap.add_argument("--baseline-seconds", type=float, default=20.0)
    ap.add_argument(
        "--warmup", type=int, default=4, help="revisions exposed in each mode before the baseline, not measured"
    )
    ap.add_argument(
        "--step-budget",
        type=float,
        default=None,
        help="replicas pace warms to keep the recent inter-token latency within this (seconds; default: no pacing)",
    )
    ap.add_argument("--queue", type=int, default=512, help="replica admission queue (cold loads waiting)")
    ap.add_argument(
        "--control-plane-nice",
        type=int,
        default=10,
        help="CPU priority of the API and controller below the replicas (deployed, they run on other nodes)",
    )
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="also run warm-flip: this process warms both replicas and flips, without controller or API",
    )
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for the pointer events")
    ap.add_argument(
        "--base", default=str(REPO / ".lorafleet" / "test-models" / "tiny-moe"), help="base dir or 'random'"
    )
    args = ap.parse_args()
    ns = [int(x) for x in args.n.split(",") if x]

    work = Path(tempfile.mkdtemp(prefix="lf-rollout-load-"))
    if args.base == "random":
        base_dir = random_moe_base(work / "random-base")
    else:
        if not (Path(args.base) / "config.json").exists():
            raise SystemExit(f"no base at {args.base}: run `make test-model` or pass --base random")
        base_dir = with_chat_template(Path(args.base), work)
    slots = args.warm + 2 * (sum(ns) + len(modes(args)) * args.warmup) + 4  # every exposed revision stays pinned
    # Events on Redis, as deployed; a prefix of this run's own keeps other users of the server apart.
    events = {
        "LORAFLEET_QUEUE_BACKEND": "redis",
        "LORAFLEET_REDIS_URL": args.redis_url,
        "LORAFLEET_REDIS_PREFIX": f"lf-bench-{new_ulid()}",
    }
    bus = RedisBus.from_url(events["LORAFLEET_REDIS_URL"], events["LORAFLEET_REDIS_PREFIX"])
    with fresh_database() as url:
        fleet = build_fleet(url, work, base_dir)
        try:
            fleet.start_replicas(
                *REPLICAS,
                **events,
                LORAFLEET_MAX_DEVICE_ADAPTERS=str(slots),
                LORAFLEET_SERVING_MAX_COLD_LOAD_QUEUE=str(args.queue),
                LORAFLEET_SERVING_RESOLVE_TTL_SECONDS=str(ServingOptions().serving_resolve_ttl_seconds),
                LORAFLEET_SERVING_HEARTBEAT_SECONDS=str(ServingOptions().serving_heartbeat_seconds),
                **(
                    {"LORAFLEET_SERVING_STEP_LATENCY_BUDGET_SECONDS": str(args.step_budget)} if args.step_budget else {}
                ),
            )
            with platform_processes(fleet, max_concurrent=max(ns), nice=args.control_plane_nice, extra_env=events) as (
                api,
                control_pids,
            ):
                report(run_all(args, ns, fleet, bus, api, control_pids), ns, args)
        finally:
            fleet.stop()
            fleet.sessions.kw["bind"].dispose()
            bus.close()


def modes(args: argparse.Namespace) -> tuple[str, ...]:
    return ("two-stage", "lazy", "warm-flip") if args.diagnose else ("two-stage", "lazy")


def run_all(
    args: argparse.Namespace, ns: list[int], fleet: Fleet, bus: EventBus, api: str, control_pids: dict[str, int]
) -> dict[str, object]:
    warm_policies = []
    admin = {"Authorization": f"Bearer {fleet.admin_key}"}
    for i in range(args.warm):
        name = f"warm-{i}"
        _, rev = fleet.new_policy(name)
        for rp in fleet.replicas.values():
            r = httpx.post(
                f"{rp.url}/internal/adapters/warm",
                json={"revision_id": rev, "tier": "device", "pin": True},
                headers=admin,
                timeout=60,
            )
            r.raise_for_status()
        warm_policies.append(name)
    traffic = Traffic(fleet, warm_policies, clients=args.clients, max_tokens=args.max_tokens, rate=args.rate)
    senders = FirstSenders(fleet, processes=args.first_senders, max_tokens=args.max_tokens)
    traffic.start()
    meter = CpuMeter(
        {rid: [rp.proc.pid] for rid, rp in fleet.replicas.items()}
        | {part: [pid] for part, pid in control_pids.items()}
        | {"load": traffic.pids + senders.pids, "bench": [os.getpid()]}
    )
    time.sleep(3.0)
    # Every path a measured phase takes runs once first, outside the figures: the API's and the
    # controller's first rollouts, a replica's first flips and first requests to new policies
    # (first calls compile statements and validators, import lazily, open connections).
    expose = functools.partial(
        run_mode, fleet=fleet, bus=bus, api=api, traffic=traffic, senders=senders, interval=args.interval
    )
    for mode in modes(args):
        expose(mode=mode, n=args.warmup, phase=f"warmup {mode}")
    traffic.phase = "warmup"
    time.sleep(2.0)
    traffic.phase = "baseline"
    cpu_start = meter.snapshot()
    time.sleep(args.baseline_seconds)
    cpu: dict[str, dict[str, float]] = {"baseline": _cpu_rate(cpu_start, meter.snapshot(), args.baseline_seconds)}
    out: dict[str, object] = {"traffic": traffic, "runs": {}, "cpu": cpu}
    runs: dict[tuple[str, int], tuple[list[Sample], list[str], float]] = {}
    server: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}
    for n in ns:
        for mode in modes(args):
            before = server_ttft(fleet)
            start: list[tuple[dict[str, float], float]] = []
            runs[(mode, n)] = expose(mode=mode, n=n, at_start=functools.partial(_mark, meter, start))
            cpu[f"{mode} N={n}"] = _cpu_rate(start[0][0], meter.snapshot(), time.perf_counter() - start[0][1])
            after = server_ttft(fleet)
            server[(mode, n)] = {k: (after[k][0] - before[k][0], after[k][1] - before[k][1]) for k in after}
            traffic.phase = "between"
            time.sleep(2.0)
    traffic.stop()
    senders.stop()
    out["runs"] = runs
    out["server"] = server
    return out


def _mark(meter: CpuMeter, into: list[tuple[dict[str, float], float]]) -> None:
    into.append((meter.snapshot(), time.perf_counter()))


def _cpu_rate(start: dict[str, float], end: dict[str, float], seconds: float) -> dict[str, float]:
    """Cores used by each part over a phase (CPU seconds / wall seconds)."""
    return {part: (end[part] - start.get(part, 0.0)) / seconds for part in end}


def server_ttft(fleet: Fleet) -> dict[str, tuple[float, float]]:
    """(sum, count) of the replicas' own TTFT histogram (from the request's arrival at the engine
    to its first token), by ``first_request`` label, summed over replicas and policies; one
    scrape of each replica."""
    totals = {label: [0.0, 0.0] for label in ("true", "false")}
    for rp in fleet.replicas.values():
        text = httpx.get(f"{rp.url}/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                label = sample.labels.get("first_request")
                if label in totals and sample.name == "lorafleet_ttft_seconds_sum":
                    totals[label][0] += sample.value
                elif label in totals and sample.name == "lorafleet_ttft_seconds_count":
                    totals[label][1] += sample.value
    return {label: (total[0], total[1]) for label, total in totals.items()}


def report(results: dict[str, object], ns: list[int], args: argparse.Namespace) -> None:
    traffic: Traffic = results["traffic"]  # type: ignore[assignment]
    runs: dict[tuple[str, int], tuple[list[Sample], list[str], float]] = results["runs"]  # type: ignore[assignment]

    def bg(phase: str) -> list[Sample]:
        return [s for s in traffic.samples if s.phase == phase]

    def ttfts(samples: list[Sample]) -> list[float]:
        return [s.ttft for s in samples if s.status == 200 and s.ttft is not None]

    def waits(samples: list[Sample]) -> list[float]:
        return [s.wait for s in samples if s.status == 200 and s.wait is not None]

    def three(values: list[float], unit: float = 1000.0) -> str:
        return " / ".join(f"{pct(values, q) * unit:.1f}" for q in (50, 95, 99))

    base = bg("baseline")
    base_p95 = pct(ttfts(base), 95)
    print(
        f"\nrollout under load: 2 replicas (tiny-moe), {args.warm} warm policies, "
        + (
            f"open-loop traffic at {args.rate:g} requests/s ({args.clients} processes), "
            if args.rate
            else f"{args.clients} closed-loop clients, "
        )
        + f"max_tokens {args.max_tokens}, one revision published every {args.interval}s; API and controller at "
        f"nice {args.control_plane_nice}"
    )
    print(
        f"baseline (no rollout): {len(ttfts(base))} requests ({len(ttfts(base)) / args.baseline_seconds:.1f}/s), "
        f"background TTFT p50/p95/p99 ms {three(ttfts(base))}; "
        f"errors {sum(s.status != 200 for s in base)}"
    )
    for n in ns:
        print(f"\n== N = {n} new revisions ==")
        for mode in modes(args):
            firsts, failures, seconds = runs[(mode, n)]
            back = bg(f"{mode} N={n}")
            print(
                f"[{mode}] {seconds:.1f}s; first requests {len(firsts)} "
                f"({sum(s.status == 503 for s in firsts)} refused 503, "
                f"{sum(s.status not in (200, 503) for s in firsts)} other errors); failures {len(failures)}"
                + (f" e.g. {failures[:2]}" if failures else "")
            )
            print(
                f"  user-visible adapter load, first requests to new revisions, p50/p95/p99 ms: {three(waits(firsts))}"
            )
            print(
                "  user-visible adapter load, all requests in the phase,        p50/p95/p99 ms: "
                f"{three(waits(firsts + back))}"
            )
            print(
                f"  first-request TTFT (new revisions)                           p50/p95/p99 ms: {three(ttfts(firsts))}"
            )
            print(
                f"  background TTFT ({len(ttfts(back))} requests, {sum(s.status != 200 for s in back)} errors)"
                f"             p50/p95/p99 ms: {three(ttfts(back))}"
            )
        two_f, lazy_f = runs[("two-stage", n)][0], runs[("lazy", n)][0]
        two_w = waits(two_f + bg(f"two-stage N={n}"))
        up95, up99 = pct(two_w, 95), pct(two_w, 99)
        ratio = pct(ttfts(lazy_f), 95) / pct(ttfts(two_f), 95)
        bg_ratio = pct(ttfts(bg(f"two-stage N={n}")), 95) / base_p95
        bg_lazy = pct(ttfts(bg(f"lazy N={n}")), 95) / base_p95
        if args.diagnose:
            server: dict[tuple[str, int], dict[str, tuple[float, float]]] = results["server"]  # type: ignore[assignment]
            for mode in modes(args):
                means = {k: (v[0] / v[1] * 1000 if v[1] else float("nan")) for k, v in server[(mode, n)].items()}
                print(
                    f"  diagnostic: [{mode}] mean TTFT inside the replicas (engine arrival to first token): "
                    f"first requests {means['true']:.1f} ms, others {means['false']:.1f} ms"
                )
            cpu: dict[str, dict[str, float]] = results["cpu"]  # type: ignore[assignment]
            for phase in ("baseline", *(f"{mode} N={n}" for mode in modes(args))):
                used = cpu[phase]
                print(
                    f"  diagnostic: cores used in {phase}: total {sum(used.values()):.2f}: "
                    + ", ".join(f"{part} {v:.2f}" for part, v in used.items())
                )
            print(
                "  diagnostic: background TTFT p95 warm-flip (the same warms and flips, no controller or API) "
                f"/ no rollout = {pct(ttfts(bg(f'warm-flip N={n}')), 95) / base_p95:.3f}"
            )
        lazy_waits = waits(lazy_f)
        if lazy_waits:
            bound = (pct(ttfts(base), 95) + pct(lazy_waits, 95)) / pct(ttfts(base), 95)
            print(
                f"  context: a cold load here costs p95 {pct(lazy_waits, 95) * 1000:.1f} ms against a baseline "
                f"TTFT p95 of "
                f"{base_p95 * 1000:.1f} ms, so skipping it can cut first-request TTFT p95 by about {bound:.2f}x at most"
            )
        print("  targets:")
        print(
            f"    two-stage user-visible load p95 = {up95 * 1000:.3f} ms, p99 = {up99 * 1000:.3f} ms, "
            f"max = {max(two_w) * 1000 if two_w else float('nan'):.3f} ms "
            f"(target exactly 0: {'met' if two_w and max(two_w) == 0.0 else 'NOT met'})"
        )
        print(
            f"    first-request TTFT p95 lazy / two-stage = {ratio:.2f}x "
            f"(target >= 3x: {'met' if ratio >= 3 else 'NOT met'})"
        )
        print(
            f"    background TTFT p95 two-stage / no rollout = {bg_ratio:.3f} "
            f"(target <= 1.10: {'met' if bg_ratio <= 1.10 else 'NOT met'}); lazy / no rollout = {bg_lazy:.3f}"
        )


if __name__ == "__main__":
    main()
