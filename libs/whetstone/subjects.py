"""Names on the bus: subjects, streams, consumers, KV buckets and headers.

Every service creates what it owns from these names, idempotently, at start-up (see ``bus.py``),
so tests, ``whetstone up`` and a cluster share one definition.

Run ids (``<session>:train:<n>``) and base-model names (``org/name``) are not valid NATS tokens in
every position (``.`` separates tokens, durable names forbid ``/``), so they pass through
``token()`` before they appear in a subject, a consumer name or a KV key.
"""

from __future__ import annotations

import base64

# Streams (JetStream, file storage, work-queue retention: a message lives until acknowledged).
TRAIN_STREAM = "WS_TRAIN"
SAMPLE_STREAM = "WS_SAMPLE"
USAGE_STREAM = "WS_USAGE"
CONTROL_STREAM = "WS_CONTROL"
# Dead letters (limits retention: kept for inspection and replay, see ``deadletter.py``).
DEADLETTER_STREAM = "WS_DEADLETTER"
DEADLETTER_PREFIX = "ws.dlq"  # ws.dlq.<original subject>
# The audit log (limits retention, kept ``AUDIT_MAX_AGE_S``; see ``audit.py``).
AUDIT_STREAM = "WS_AUDIT"
AUDIT_PREFIX = "ws.audit"  # ws.audit.<event>: security-relevant actions, one message each

# Subjects.
TRAIN_PREFIX = "ws.train"  # ws.train.<run token>: the durable queue of one training run
SAMPLE_PREFIX = "ws.sample"  # ws.sample.<base token>: the shared queue of one base model
USAGE_PREFIX = "ws.usage"  # ws.usage.<tenant token>: token-usage events for billing
PLACE_SUBJECT = "ws.ctl.place"  # create_model requests waiting for the scheduler (durable)
HEARTBEAT_PREFIX = "ws.ctl.heartbeat"  # ws.ctl.heartbeat.<role>.<worker>: liveness (core NATS)
ASSIGN_PREFIX = "ws.ctl.assign"  # ws.ctl.assign.<worker>: scheduler -> trainer (request/reply)
RELEASE_PREFIX = "ws.ctl.release"  # ws.ctl.release.<worker>: scheduler -> trainer (request/reply)
USAGE_REPORT_SUBJECT = "ws.ctl.billing.report"  # request/reply: usage report

# Durable consumers.
BILLING_CONSUMER = "billing"
SCHEDULER_CONSUMER = "scheduler"

# KV buckets.
FUTURES_BUCKET = "ws_futures"  # request_id -> FutureRecord (TTL)
DEDUP_BUCKET = "ws_dedup"  # <run token>.<seq_id> -> request_id (TTL)
KEYS_BUCKET = "ws_api_keys"  # sha256(key) -> ApiKeyRecord
SESSIONS_BUCKET = "ws_sessions"  # session id -> SessionRecord
RUNS_BUCKET = "ws_runs"  # run token -> TrainingRunRecord
SAMPLERS_BUCKET = "ws_samplers"  # sampler token -> SamplingSessionRecord
CUSTOM_LOSSES_BUCKET = "ws_custom_losses"  # loss token -> CustomLossRecord
CHECKPOINTS_BUCKET = "ws_checkpoints"  # <run token>.<kind>.<name token> -> CheckpointRecord
# <session or sampling-session token>.<request_id> -> "" (TTL): which futures belong to which
# session (trace export) and sampling session (retrieve_futures).
FUTURE_INDEX_BUCKET = "ws_future_index"
PLACEMENTS_BUCKET = "ws_placements"  # run token -> worker id
QUOTAS_BUCKET = "ws_quotas"  # <tenant token>.<quota> -> QuotaSlots (gateway quotas.py)
RUN_PROGRESS_BUCKET = "ws_run_progress"  # run token -> RunProgress (snapshot, next seq_id)
RUN_SEQ_BUCKET = "ws_run_seq"  # run token -> next seq_id handed out by gateways (hpcai sends none)
SCHEDULER_BUCKET = "ws_scheduler"  # "leader" -> SchedulerLease
STABILITY_BUCKET = "ws_stability"  # request_id -> StabilityRecord (TTL; record_stability_info)
LEADER_KEY = "leader"

# Object store: payloads over the bus limit (the message carries the object's name).
PAYLOADS_BUCKET = "ws_payloads"

# Headers.
MSG_ID_HEADER = "Nats-Msg-Id"  # JetStream de-duplication within the stream's window
TENANT_HEADER = "Ws-Tenant"
REQUEST_ID_HEADER = "Ws-Request-Id"  # lets the fate wrapper fail a future it cannot decode
OP_HEADER = "Ws-Op"
MODEL_HEADER = "Ws-Model"  # the base model a message's work runs on (metrics labels)
RUN_HEADER = "Ws-Run"
PAYLOAD_REF_HEADER = "Ws-Payload-Ref"  # the body lies in the object store under this name
DLQ_SUBJECT_HEADER = "Ws-Dlq-Subject"  # dead letters: where the message was published
DLQ_ERROR_HEADER = "Ws-Dlq-Error"
DLQ_DELIVERIES_HEADER = "Ws-Dlq-Deliveries"


def token(name: str) -> str:
    """A reversible encoding of ``name`` that is safe as one NATS subject token, durable-consumer
    name and KV key: unpadded url-safe base64 (``[A-Za-z0-9_-]``)."""
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def untoken(tok: str) -> str:
    return base64.urlsafe_b64decode(tok + "=" * (-len(tok) % 4)).decode()


def train_subject(run_id: str) -> str:
    return f"{TRAIN_PREFIX}.{token(run_id)}"


def train_consumer(run_id: str) -> str:
    return f"run-{token(run_id)}"


def sample_subject(base_model: str) -> str:
    return f"{SAMPLE_PREFIX}.{token(base_model)}"


def sample_consumer(base_model: str) -> str:
    return f"sampler-{token(base_model)}"


def usage_subject(tenant: str) -> str:
    return f"{USAGE_PREFIX}.{token(tenant)}"


def heartbeat_subject(role: str, worker_id: str) -> str:
    return f"{HEARTBEAT_PREFIX}.{role}.{token(worker_id)}"


def assign_subject(worker_id: str) -> str:
    return f"{ASSIGN_PREFIX}.{token(worker_id)}"


def release_subject(worker_id: str) -> str:
    return f"{RELEASE_PREFIX}.{token(worker_id)}"


def deadletter_subject(subject: str) -> str:
    return f"{DEADLETTER_PREFIX}.{subject}"
