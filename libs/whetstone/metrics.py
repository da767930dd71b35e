"""The platform's Prometheus metrics, defined once (prometheus-client's default registry).

Every service exposes them: the gateway at ``/metrics`` on its HTTP port, the workers (trainer,
sampler, scheduler, billing) at ``/metrics`` on ``WHETSTONE_METRICS_PORT``. FastStream's own
middleware adds per-subject message counts and processing times (``faststream_*``) beside these.
The ``service`` label tells which process a series comes from when several share a registry
(tests run services in one process).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)

MESSAGES = Counter(
    "whetstone_messages_total",
    "Bus messages by the fate the message-fate wrapper gave them",
    ["service", "subject", "fate"],
)
ERRORS = Counter(
    "whetstone_errors_total",
    "Failed requests and messages by category (user, server, decode)",
    ["service", "op", "category"],
)
REQUESTS = Counter(
    "whetstone_requests_total",
    "Completed requests per operation",
    ["service", "op", "model"],
)
REQUEST_LATENCY = Histogram(
    "whetstone_request_duration_seconds",
    "Execution time of a request on a worker",
    ["service", "op", "model"],
    buckets=LATENCY_BUCKETS_S,
)
QUEUE_WAIT = Histogram(
    "whetstone_queue_wait_seconds",
    "Time a request waited on the bus before a worker took it",
    ["service", "queue", "model"],
    buckets=LATENCY_BUCKETS_S,
)
QUEUE_DEPTH = Gauge(
    "whetstone_queue_depth",
    "Messages waiting (pending + unacknowledged) per queue",
    ["service", "queue", "model"],
)
IN_FLIGHT = Gauge("whetstone_in_flight", "Requests being worked on now", ["service", "op"])
TOKENS = Counter(
    "whetstone_tokens_total",
    "Tokens processed per meter (rate() gives tokens per second)",
    ["service", "meter", "model"],
)
ADAPTERS = Gauge(
    "whetstone_adapters_resident", "LoRA adapters held in memory", ["service", "model"]
)
DEAD_LETTERS = Counter(
    "whetstone_dead_letters_total",
    "Messages moved to the dead-letter stream",
    ["service", "subject"],
)
PASS_RUNS = Histogram(
    "whetstone_trainer_pass_runs",
    "Runs whose requests went through one trainer pass together (op forward_backward: forwards "
    "and forward_backwards through one base-model pass; op optim_step: one optimizer call)",
    ["service", "model", "op"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)
GPU_MEMORY = Gauge(
    "whetstone_gpu_memory_bytes",
    "GPU memory allocated by this process (when a GPU is present)",
    ["service", "device"],
)

__all__ = [
    "ADAPTERS",
    "DEAD_LETTERS",
    "ERRORS",
    "GPU_MEMORY",
    "IN_FLIGHT",
    "MESSAGES",
    "PASS_RUNS",
    "QUEUE_DEPTH",
    "QUEUE_WAIT",
    "REGISTRY",
    "REQUESTS",
    "REQUEST_LATENCY",
    "TOKENS",
]
