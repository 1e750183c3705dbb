"""Every Prometheus metric lorafleet exports, defined once (prefix ``lorafleet_``).

Label values with unbounded cardinality (policy names) go through :func:`policy_label`, which
keeps the first ``MAX_POLICY_LABELS`` policies seen and folds the rest into ``other``.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
MAX_POLICY_LABELS = 50

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LOAD = (0.0, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# control plane
HTTP_REQUESTS = Counter("lorafleet_http_requests", "HTTP requests by route and status",
                        ["method", "route", "status"], registry=REGISTRY)
HTTP_LATENCY = Histogram("lorafleet_http_request_seconds", "HTTP request latency by route",
                         ["method", "route"], buckets=_LATENCY, registry=REGISTRY)
JOBS = Gauge("lorafleet_jobs", "Jobs by state", ["state"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("lorafleet_queue_depth", "Messages waiting or leased per queue", ["queue"], registry=REGISTRY)
QUEUE_OLDEST_AGE = Gauge("lorafleet_job_queue_oldest_age_seconds", "Age of the oldest queued job",
                         registry=REGISTRY)

# training
TRAIN_STEP_SECONDS = Histogram("lorafleet_train_step_seconds", "Seconds per optimizer step", ["method"],
                               buckets=_LATENCY, registry=REGISTRY)
TRAIN_TOKENS = Counter("lorafleet_train_tokens", "Tokens processed by training", ["method"], registry=REGISTRY)
TRAIN_ACTIVE_JOBS = Gauge("lorafleet_train_active_jobs", "Jobs a trainer is running now", registry=REGISTRY)
TRAIN_REWARD = Gauge("lorafleet_train_reward_mean", "Mean reward of the last RL step", ["job"], registry=REGISTRY)
HANDOFF_SECONDS = Histogram("lorafleet_handoff_seconds", "Last optimizer step to revision committed",
                            buckets=_LATENCY, registry=REGISTRY)

# adapters and serving
ADAPTER_LOAD_SECONDS = Histogram("lorafleet_adapter_load_seconds", "Adapter load time by stage and tier",
                                 ["stage", "tier"], buckets=_LOAD, registry=REGISTRY)
USER_VISIBLE_LOAD_SECONDS = Histogram("lorafleet_user_visible_adapter_load_seconds",
                                      "Time a user request waited for its own adapter to load",
                                      buckets=_LOAD, registry=REGISTRY)
TTFT_SECONDS = Histogram("lorafleet_ttft_seconds", "Time to first token", ["policy", "first_request"],
                         buckets=_LATENCY, registry=REGISTRY)
ITL_SECONDS = Histogram("lorafleet_inter_token_seconds", "Inter-token latency", ["policy"],
                        buckets=_LATENCY, registry=REGISTRY)
GEN_REQUESTS = Counter("lorafleet_generation_requests", "Generation requests by outcome", ["outcome"],
                       registry=REGISTRY)
GEN_TOKENS = Counter("lorafleet_generated_tokens", "Generated tokens", registry=REGISTRY)
PROMPT_TOKENS = Counter("lorafleet_prompt_tokens", "Prompt tokens", registry=REGISTRY)
BATCH_SIZE = Histogram("lorafleet_batch_size", "Rows per engine step", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                       registry=REGISTRY)
BATCH_ADAPTERS = Histogram("lorafleet_batch_distinct_adapters", "Distinct adapters per engine step",
                           buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128), registry=REGISTRY)
RESIDENT_ADAPTERS = Gauge("lorafleet_resident_adapters", "Adapters resident per tier", ["replica", "tier"],
                          registry=REGISTRY)
RESIDENT_BYTES = Gauge("lorafleet_resident_adapter_bytes", "Adapter bytes resident per tier", ["replica", "tier"],
                       registry=REGISTRY)
COLD_LOAD_QUEUE = Gauge("lorafleet_cold_load_queue_depth", "Adapter loads waiting for admission", ["replica"],
                        registry=REGISTRY)
COLD_LOAD_REFUSALS = Counter("lorafleet_cold_load_refusals", "Adapter loads refused by admission control",
                             ["replica", "kind"], registry=REGISTRY)

# rollout
ROLLOUT_SECONDS = Histogram("lorafleet_rollout_seconds", "Rollout duration by stage and outcome",
                            ["stage", "outcome"], buckets=_LATENCY, registry=REGISTRY)
ROLLOUTS = Gauge("lorafleet_rollouts", "Rollouts by state", ["state"], registry=REGISTRY)
ROLLOUT_OLDEST_AGE = Gauge("lorafleet_rollout_oldest_age_seconds",
                           "Age of the oldest rollout in each active state (0 when there is none)", ["state"],
                           registry=REGISTRY)
OBJECT_STORE_ERRORS = Counter("lorafleet_object_store_errors", "Object store operations that failed",
                              ["operation"], registry=REGISTRY)
REPLICA_HEARTBEAT_AGE = Gauge("lorafleet_replica_heartbeat_age_seconds", "Seconds since a replica's heartbeat",
                              ["replica", "role"], registry=REGISTRY)

_policy_lock = threading.Lock()
_policy_labels: set[str] = set()


def policy_label(policy: str | None) -> str:
    if not policy:
        return "base"
    with _policy_lock:
        if policy in _policy_labels:
            return policy
        if len(_policy_labels) < MAX_POLICY_LABELS:
            _policy_labels.add(policy)
            return policy
    return "other"
