"""Every message that crosses a process boundary, defined once.

The gateway translates Tinker's wire types (protobuf and JSON) into these at the edge; trainer,
sampler, scheduler and billing speak only these. They are pydantic models serialised as JSON, with
tensors as base64 of their raw little-endian bytes (``tensors.Tensor``).

Which subject carries what (``subjects.py`` has the names):

* ``TrainRequest``      gateway -> trainer, on the run's durable subject ``ws.train.<run>``
* ``SampleRequest``     gateway -> sampler, on the base model's shared subject ``ws.sample.<base>``
* ``PlaceRun``          gateway -> scheduler, durable ``ws.ctl.place``
* ``AssignRun``         scheduler -> trainer worker, request/reply ``ws.ctl.assign.<worker>``
* ``ReleaseRun``        scheduler -> trainer worker, request/reply ``ws.ctl.release.<worker>``
* ``WorkerHeartbeat``   trainer/sampler -> scheduler, ``ws.ctl.heartbeat.<role>.<worker>``
* ``UsageEvent``        trainer/sampler -> billing, durable ``ws.usage.<tenant>``
* ``UsageReportQuery``  anyone -> billing, request/reply ``ws.ctl.billing.report``
* ``FutureRecord``      worker -> gateway, KV ``ws_futures`` under the request id
* ``RunProgress``       trainer -> trainer, KV ``ws_run_progress``: a run's snapshot and next seq_id
* ``SchedulerLease``    scheduler replicas, KV ``ws_scheduler``: which one is active
* ``StabilityRecord``   sampler -> trainer, KV ``ws_stability``: sequences sampled with
  ``record_stability_info``
* the ``*Record`` types are the values of the state buckets.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from whetstone.custom_loss import CustomLoss
from whetstone.tensors import Tensor


def utcnow() -> datetime:
    return datetime.now(UTC)


class Message(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> Self:
        return cls.model_validate_json(data)


# ---------------------------------------------------------------- configuration carried by runs


# The rules on these models are the only definition of what a valid request is: the gateway
# refuses a body that breaks them (HTTP 400) and a worker can never decode one. Limits that
# depend on the base model (largest LoRA rank, context length, vocabulary) are checked against
# its ``ModelSpec`` instead, where the spec is known.

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class LoraConfig(Message):
    rank: int = Field(32, ge=1)
    seed: int | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True

    @model_validator(mode="after")
    def _trains_something(self) -> LoraConfig:
        if not (self.train_attn or self.train_mlp or self.train_unembed):
            raise ValueError("LoRA config must train at least one of attn, mlp, unembed")
        return self


class AdamParams(Message):
    learning_rate: FiniteFloat = Field(1e-4, ge=0)
    beta1: FiniteFloat = Field(0.9, ge=0, lt=1)
    beta2: FiniteFloat = Field(0.95, ge=0, lt=1)
    eps: FiniteFloat = Field(1e-12, gt=0)
    weight_decay: FiniteFloat = Field(0.0, ge=0)
    grad_clip_norm: FiniteFloat = Field(0.0, ge=0)  # 0: no clipping


# ---------------------------------------------------------------- training


class Datum(Message):
    """One sequence: ``model_input`` holds N int64 token ids; every loss input has N rows."""

    model_input: Tensor
    loss_fn_inputs: dict[str, Tensor] = {}


class ForwardBackward(Message):
    """``custom_loss``: for ``loss_fn="custom"``, the stored loss that ``loss_fn_config``'s
    ``loss_id`` names, resolved (and tenant-checked) by the gateway, so the command is whole."""

    op: Literal["forward_backward"] = "forward_backward"
    data: list[Datum]
    loss_fn: str
    loss_fn_config: dict[str, float | str] = {}
    forward_only: bool = False
    custom_loss: CustomLoss | None = None


class OptimStep(Message):
    op: Literal["optim_step"] = "optim_step"
    adam: AdamParams


class SaveWeights(Message):
    """``kind="training"``: adapter and optimizer state (``save_state``); ``kind="sampler"``:
    adapter only, in PEFT format; ``kind="external"``: the same PEFT files, exported for download
    (``save_weights_external``). ``sampler_id`` is set for the ephemeral form, where the result
    is a sampling session over the saved weights."""

    op: Literal["save_weights"] = "save_weights"
    kind: Literal["training", "sampler", "external"]
    name: str
    overwrite: bool = False
    ttl_seconds: int | None = None
    sampler_id: str | None = None


class LoadWeights(Message):
    """``load_state``: the run's adapter becomes a checkpoint's (``optimizer``: its AdamW moments
    and step too; else they restart from zero). Gradients not yet stepped are dropped; the run's
    seq_id position is its own (the load is one of its requests)."""

    op: Literal["load_weights"] = "load_weights"
    tinker_path: str
    store_key: str
    optimizer: bool


class Skip(Message):
    """Fills the seq_id of a submission the gateway refused, so the run's later requests do not
    wait for it forever. The trainer only advances past it; no future belongs to it."""

    op: Literal["skip"] = "skip"
    reason: str


TrainCommand = Annotated[
    ForwardBackward | OptimStep | SaveWeights | LoadWeights | Skip, Field(discriminator="op")
]


class TrainRequest(Message):
    """One step of one training run, executed by the run's trainer in ``seq_id`` order.
    ``api_key_id`` (``keys.key_id`` of the caller's key, never the key) names the key in the
    step's usage events."""

    request_id: str
    tenant: str
    run_id: str
    seq_id: int
    command: TrainCommand
    api_key_id: str | None = None


# ---------------------------------------------------------------- sampling


MAX_STOP_SEQUENCES = 64  # stop strings or stop token ids in one request
MAX_STOP_STRING_CHARS = 1024
MAX_TOPK_LOGPROBS = 64  # top-k prompt/sample logprobs and prompt alternatives per position
MAX_TARGET_PROMPT_LOGPROBS = 1024  # token ids scored per prompt position
# Cells of top-k, target and alternative-token tables one sample result may carry (12 bytes
# each, base64 in the future's record, which must stay under the bus's message size).
MAX_SCORE_CELLS = 262_144


class SamplingParams(Message):
    max_tokens: int = Field(16, ge=1)
    temperature: FiniteFloat = Field(1.0, ge=0)
    top_p: FiniteFloat = Field(1.0, gt=0, le=1)
    top_k: int = -1  # -1: off
    seed: int | None = None
    # ``stop`` as the client sent it, split by kind. ``stop_on_eos`` is False when the client
    # gave any explicit stop list (an empty list disables every stop, EOS included).
    stop_strings: list[str] = Field([], max_length=MAX_STOP_SEQUENCES)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field([], max_length=MAX_STOP_SEQUENCES)
    stop_on_eos: bool = True

    @field_validator("top_k")
    @classmethod
    def _top_k_off_or_positive(cls, top_k: int) -> int:
        if top_k != -1 and top_k < 1:
            raise ValueError("top_k must be -1 (off) or >= 1")
        return top_k

    @field_validator("stop_strings")
    @classmethod
    def _stop_strings_not_empty(cls, stops: list[str]) -> list[str]:
        if any(not stop or len(stop) > MAX_STOP_STRING_CHARS for stop in stops):
            raise ValueError(f"stop strings must hold 1..{MAX_STOP_STRING_CHARS} characters")
        return stops


class AdapterRef(Message):
    """LoRA weights to sample with: where they lie in the checkpoint store."""

    tinker_path: str
    store_key: str


class SampleRequest(Message):
    """One sampling request. ``sampler_id``, ``session_id`` and ``api_key_id`` (``keys.key_id``
    of the caller's key) attribute its usage events."""

    request_id: str
    tenant: str
    base_model: str
    adapter: AdapterRef | None = None
    prompt: Tensor  # int64 token ids
    num_samples: int = Field(1, ge=1)  # the most a gateway accepts is its own setting
    params: SamplingParams
    prompt_logprobs: bool = False
    # Top-k alternatives per prompt position and per sampled token (protocol.md 5.8-5.9).
    topk_prompt_logprobs: int = Field(0, ge=0, le=MAX_TOPK_LOGPROBS)
    topk_sample_logprobs: int = Field(0, ge=0, le=MAX_TOPK_LOGPROBS)
    # Score only the last N prompt positions (prompt and top-k prompt logprobs).
    prompt_logprobs_last_n: int | None = Field(None, ge=1)
    # int64 ``[len(prompt) - 1, K]`` token ids to score at prompt positions 1..; -1: none.
    target_prompt_logprobs: Tensor | None = None
    target_prompt_csr: bool = False  # the client sent it sparse: answer in the same layout
    prompt_alt_tokens_k: int = Field(0, ge=0, le=MAX_TOPK_LOGPROBS)
    record_stability_info: bool = False
    sampler_id: str | None = None
    session_id: str | None = None
    api_key_id: str | None = None

    @model_validator(mode="after")
    def _prompt_options_fit(self) -> Self:
        positions = self.prompt.numel - 1
        if self.prompt_logprobs_last_n is not None:
            if not self.prompt_logprobs:
                raise ValueError("prompt_logprobs_last_n needs prompt_logprobs")
            if self.prompt_logprobs_last_n > positions:
                raise ValueError(
                    f"prompt_logprobs_last_n must be in 1..{positions} (len(prompt) - 1)"
                )
        target = self.target_prompt_logprobs
        if target is not None:
            if target.dtype not in ("int64", "int32") or len(target.shape) != 2:
                raise ValueError("target_prompt_logprobs must be int64 [len(prompt) - 1, K]")
            if target.shape[0] != positions or target.shape[1] > MAX_TARGET_PROMPT_LOGPROBS:
                raise ValueError(
                    f"target_prompt_logprobs must have shape [{positions}, K] with "
                    f"K <= {MAX_TARGET_PROMPT_LOGPROBS}, got {list(target.shape)}"
                )
        cells = (
            self.num_samples * self.params.max_tokens * self.topk_sample_logprobs
            + self.prompt.numel * self.topk_prompt_logprobs
            + positions * self.prompt_alt_tokens_k
            + (target.numel if target is not None else 0)
        )
        if cells > MAX_SCORE_CELLS:
            raise ValueError(
                f"the top-k, target and alternative-token tables asked for hold {cells} cells, "
                f"more than {MAX_SCORE_CELLS}: ask for fewer (smaller k, fewer samples or tokens)"
            )
        return self


# ---------------------------------------------------------------- results and futures


class CreateModelResult(Message):
    op: Literal["create_model"] = "create_model"
    model_id: str


class ForwardBackwardResult(Message):
    op: Literal["forward_backward"] = "forward_backward"
    outputs: list[dict[str, Tensor]]  # one dict per datum, in request order
    metrics: dict[str, float]  # keys are "name:reduction"


class OptimStepResult(Message):
    op: Literal["optim_step"] = "optim_step"
    metrics: dict[str, float] = {}


class SaveWeightsResult(Message):
    op: Literal["save_weights"] = "save_weights"
    kind: Literal["training", "sampler", "external"]
    path: str  # tinker://<run>/<weights|sampler_weights|external_weights>/<name>
    sampler_id: str | None = None
    size_bytes: int | None = None


class LoadWeightsResult(Message):
    op: Literal["load_weights"] = "load_weights"
    path: str
    model_id: str


class CreateCustomLossResult(Message):
    op: Literal["create_custom_loss"] = "create_custom_loss"
    loss_id: str


class UnloadModelResult(Message):
    op: Literal["unload_model"] = "unload_model"
    model_id: str


class TopkLogprobs(Message):
    """The ``k`` most likely tokens at ``length`` positions: ids int64 ``[length, k]`` and
    logprobs float32 ``[length, k]``, most likely first; an empty cell is ``(0, -99999.0)``."""

    token_ids: Tensor
    logprobs: Tensor


TOPK_EMPTY_LOGPROB = -99999.0  # the SDK's sentinel of an empty top-k cell (with token id 0)


class SampledSequence(Message):
    tokens: Tensor  # int64
    logprobs: Tensor  # float32, one per token
    stop_reason: Literal["stop", "length"]
    topk_logprobs: TopkLogprobs | None = None  # one row per sampled token


class SampleResult(Message):
    op: Literal["sample"] = "sample"
    sequences: list[SampledSequence]
    prompt_logprobs: Tensor | None = None  # float32, NaN at position 0
    topk_prompt_logprobs: TopkLogprobs | None = None  # one row per prompt position
    target_prompt_logprobs: Tensor | None = None  # float32, the request's shape, 0.0 where -1
    target_prompt_csr: bool = False
    prompt_alt_tokens: TopkLogprobs | None = None  # [len(prompt) - 1, k] draws and logprobs
    prompt_cache_hit_tokens: int = 0  # prompt tokens served from the prefix cache


class RecordedSequence(Message):
    tokens: Tensor  # int64, the sampled tokens
    logprobs: Tensor  # float32, the sampler's logprob of each (the distribution it drew from)


class StabilityRecord(Message):
    """What a sampler keeps of a request sampled with ``record_stability_info`` (losses.md 2.7,
    the recommended record): its prompt, each sequence's tokens and float32 logprobs, the sampler
    weights and parameters, for a day (KV ``ws_stability`` under the request id). Sequence ``i``
    of it is the SDK's ``sequence_id`` ``<request_id>:<i>``; a training request of the same
    session may name it in provenance spans."""

    request_id: str
    tenant: str
    session_id: str | None = None
    sampler_id: str | None = None
    adapter: str | None = None  # tinker:// path of the sampler weights; None: the base model
    params: SamplingParams
    prompt: Tensor  # int64
    sequences: list[RecordedSequence]
    recorded_at: datetime = Field(default_factory=utcnow)


Result = Annotated[
    CreateModelResult
    | ForwardBackwardResult
    | OptimStepResult
    | SaveWeightsResult
    | LoadWeightsResult
    | UnloadModelResult
    | SampleResult
    | CreateCustomLossResult,
    Field(discriminator="op"),
]

QueueState = Literal["active", "paused_capacity", "paused_rate_limit"]


class FutureRecord(Message):
    """What a client's ``retrieve_future`` sees. Written pending by the gateway, final by the
    worker that did the work."""

    request_id: str
    tenant: str
    op: str  # create_model | forward_backward | forward | optim_step | save_weights | sample
    status: Literal["pending", "done", "failed"] = "pending"
    queue_state: QueueState = "active"
    result: Result | None = None
    error: str | None = None
    category: Literal["user", "server", "unknown"] | None = None
    created_at: datetime = Field(default_factory=utcnow)
    # The request's timing as the worker saw it: queued on the bus (the stream's timestamp of
    # the message), taken up for execution, and finished (``bus.finish_future``/``fail_future``).
    # A session's trace export is built from these.
    enqueued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    # W3C trace context of the work that wrote the record: the gateway continues the request's
    # trace from it when it hands the result back.
    trace: dict[str, str] = {}

    @property
    def final(self) -> bool:
        return self.status != "pending"


# ---------------------------------------------------------------- state records (KV values)


class ApiKeyRecord(Message):
    tenant: str
    key_prefix: str  # first characters of the key, to recognise it in listings
    created_at: datetime = Field(default_factory=utcnow)
    revoked: bool = False
    # An operator's key: reads every tenant's usage, invoices and the finance page.
    admin: bool = False
    # Quotas of requests made with this key, counted over the tenant's keys (gateway
    # ``quotas.py``): concurrent training runs and in-flight requests. None: the platform's
    # default; 0: no limit.
    max_runs: int | None = Field(None, ge=0)
    max_inflight: int | None = Field(None, ge=0)


class QuotaSlots(Message):
    """The ids holding one tenant's slots of one quota (KV ``ws_quotas``, gateway
    ``quotas.py``), each with when it was admitted (Unix seconds). An index, pruned against the
    truth (futures, run and session records) when full; never the truth itself."""

    slots: dict[str, float] = {}


class SessionRecord(Message):
    session_id: str
    tenant: str
    tags: list[str] = []
    user_metadata: dict[str, str] = {}
    created_at: datetime = Field(default_factory=utcnow)
    last_heartbeat_at: datetime = Field(default_factory=utcnow)
    finished: bool = False
    project_id: str | None = None  # Tinker's project (``PUT /sessions/{id}/project``)
    display_name: str | None = None
    finish_reason: str | None = None  # what the client said when it finished it (success, ...)


class InitialWeights(Message):
    """A run created from a checkpoint (``create_training_client_from_state[_with_optimizer]``):
    its first holder starts it from these weights (and optimizer state) instead of a fresh
    adapter; that load is the run's seq 0."""

    tinker_path: str
    store_key: str
    optimizer: bool


class TrainingRunRecord(Message):
    """A training run. ``initial``: created from a checkpoint; ``unloaded_at``: freed by
    ``unload_model``, every later request on it is refused. ``copied_from``: a run made by
    ``copy_weights`` to hold a copy of that checkpoint; as in Tinker it cannot be trained on
    (it is recorded unloaded from the start)."""

    run_id: str  # <session>:train:<model_seq_id>
    tenant: str
    session_id: str
    base_model: str  # registry name
    lora: LoraConfig
    user_metadata: dict[str, str] = {}
    created_at: datetime = Field(default_factory=utcnow)
    initial: InitialWeights | None = None
    unloaded_at: datetime | None = None
    copied_from: str | None = None


class SamplingSessionRecord(Message):
    """A sampling session. ``clients``: how many unpickled copies of its SamplingClient have
    joined it (``join_sampling_session``); the n-th gets clone id n."""

    sampler_id: str  # <session>:sample:<n>
    tenant: str
    session_id: str
    base_model: str
    adapter: AdapterRef | None = None
    clients: int = 0


class CustomLossRecord(Message):
    """A loss uploaded by ``create_custom_loss`` (KV ``ws_custom_losses``); usable only by
    training runs of its session."""

    loss_id: str  # <session>:loss:<custom_loss_seq_id>
    tenant: str
    session_id: str
    loss: CustomLoss
    created_at: datetime = Field(default_factory=utcnow)


class CheckpointRecord(Message):
    """A listed checkpoint. ``public``: readable by every tenant (loading, sampling, copying);
    ``expires_at``: the scheduler deletes it (files and record) after this time."""

    tinker_path: str
    run_id: str
    tenant: str
    kind: Literal["training", "sampler", "external"]
    name: str
    store_key: str
    size_bytes: int
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    public: bool = False


# ---------------------------------------------------------------- control


class WorkerHeartbeat(Message):
    """A worker's liveness and capacity. ``draining``: it is stopping and takes no new runs;
    the scheduler moves the runs it names elsewhere at once."""

    worker_id: str
    role: Literal["trainer", "sampler"]
    base_models: list[str]
    runs: list[str] = []
    max_runs: int = 0
    draining: bool = False
    sent_at: datetime = Field(default_factory=utcnow)


class PlaceRun(Message):
    """A training run waiting for a trainer worker; ``request_id`` is its create_model future."""

    request_id: str
    run: TrainingRunRecord


class AssignRun(Message):
    """Take ``run``. ``request_id`` is its create_model future, which the worker completes; None
    for a run that moves or is loaded again (no one waits on a future for that)."""

    request_id: str | None = None
    run: TrainingRunRecord


class AssignReply(Message):
    """A trainer's answer to ``AssignRun`` and to ``ReleaseRun``."""

    ok: bool
    error: str | None = None


class ReleaseRun(Message):
    """Unload a run from the worker that holds it: stop its consumer, snapshot it (every request
    it ran is then acknowledged) and free its adapter and optimizer state. ``discard``: the run
    belongs to another worker now; drop it without writing anything."""

    run_id: str
    discard: bool = False


class RunProgress(Message):
    """A training run's durable position (KV ``ws_run_progress``): every request below
    ``next_seq_id`` is covered by the snapshot at ``snapshot_key`` (adapter, optimizer state and
    any gradient not yet stepped) and acknowledged; its holder replays the rest from the stream.
    ``holder`` wrote it last; every write compares the revision, so a holder that lost the run
    finds out at its next write."""

    run_id: str
    next_seq_id: int = 1
    snapshot_key: str | None = None
    step: int = 0
    holder: str = ""


class SchedulerLease(Message):
    """The active scheduler (KV ``ws_scheduler``, key ``leader``): renewed by its holder with a
    compare-and-set; a standby takes it over when the revision has not moved for the lease's
    time (measured on the standby's own clock)."""

    holder: str
    renewed_at: datetime = Field(default_factory=utcnow)


# ---------------------------------------------------------------- billing

# The token meters every price must name (the model registry's and billing's price files).
Meter = Literal["train_tokens", "prefill_tokens", "sample_tokens"]
# Everything billing meters. ``forward_tokens``: a forward pass without backward (training
# client's ``forward``); ``cached_prefill_tokens``: prompt tokens served from a prefix cache;
# ``checkpoints`` and ``checkpoint_bytes``: one event per save (count 1, its size in bytes),
# priced at zero unless the operator says otherwise.
UsageMeter = Literal[
    "train_tokens",
    "forward_tokens",
    "prefill_tokens",
    "cached_prefill_tokens",
    "sample_tokens",
    "checkpoints",
    "checkpoint_bytes",
]
Operation = Literal["forward_backward", "forward", "sample", "save_weights"]
# What one unit of price buys, per meter: prices are USD per this many of the meter's quantity.
PRICE_UNITS: dict[UsageMeter, tuple[int, str]] = {
    "train_tokens": (1_000_000, "1M tokens"),
    "forward_tokens": (1_000_000, "1M tokens"),
    "prefill_tokens": (1_000_000, "1M tokens"),
    "cached_prefill_tokens": (1_000_000, "1M tokens"),
    "sample_tokens": (1_000_000, "1M tokens"),
    "checkpoints": (1, "checkpoint"),
    "checkpoint_bytes": (1_000_000_000, "GB"),
}


class UsageEvent(Message):
    """One meter of one completed request.

    ``event_id`` is ``<request_id>:<meter>``: redelivery or a replayed request can never bill
    twice. ``tokens`` is the meter's quantity (tokens, checkpoints or bytes). The attribution
    fields after ``run_id`` are optional, so older producers stay valid: ``session_id`` (the
    Tinker session), ``sampler_id`` (the sampling session, for sampling usage), ``api_key_id``
    (``keys.key_id`` of the caller's key) and ``operation``.
    """

    event_id: str
    request_id: str
    tenant: str
    base_model: str
    meter: UsageMeter
    tokens: int = Field(ge=0)
    run_id: str | None = None
    occurred_at: datetime = Field(default_factory=utcnow)
    session_id: str | None = None
    sampler_id: str | None = None
    api_key_id: str | None = None
    operation: Operation | None = None

    @classmethod
    def of(
        cls,
        request_id: str,
        tenant: str,
        base_model: str,
        meter: UsageMeter,
        tokens: int,
        run_id: str | None = None,
        *,
        session_id: str | None = None,
        sampler_id: str | None = None,
        api_key_id: str | None = None,
        operation: Operation | None = None,
    ) -> UsageEvent:
        """The event of one meter of one completed request, with its deterministic id. A
        training run's session is its id's first part (``<session>:train:<n>``)."""
        if session_id is None and run_id is not None and ":" in run_id:
            session_id = run_id.split(":", 1)[0]
        return cls(
            event_id=f"{request_id}:{meter}",
            request_id=request_id,
            tenant=tenant,
            base_model=base_model,
            meter=meter,
            tokens=tokens,
            run_id=run_id,
            session_id=session_id,
            sampler_id=sampler_id,
            api_key_id=api_key_id,
            operation=operation,
        )


# What a report can group by: attribution dimensions and time buckets (UTC).
GroupBy = Literal[
    "tenant", "model", "meter", "run", "sampler", "session", "key", "hour", "day", "month", "price"
]
DEFAULT_GROUP_BY: tuple[GroupBy, ...] = ("tenant", "model", "meter")


class UsageReportQuery(Message):
    """Filters (each optional; a missing time bound is open, the window is ``[since, until)``)
    and the dimensions to group by. ``run_id`` matches a training run or a sampler id.
    ``"price"`` groups by unit price, so that every row of an invoice has one."""

    tenant: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    api_key_id: str | None = None
    base_model: str | None = None
    run_id: str | None = None
    session_id: str | None = None
    meter: UsageMeter | None = None
    group_by: list[GroupBy] = list(DEFAULT_GROUP_BY)


class UsageRow(Message):
    """One group of a report. A dimension not grouped by is ``None``; ``tokens`` is the meter's
    quantity; money is exact (``Decimal``, a string in JSON). ``unit_price_usd`` (per million
    tokens, per checkpoint, per GB) is set when one price applies to the whole row."""

    tenant: str | None = None
    base_model: str | None = None
    meter: UsageMeter | None = None
    run_id: str | None = None
    sampler_id: str | None = None
    session_id: str | None = None
    api_key_id: str | None = None
    bucket_start: datetime | None = None
    tokens: int
    events: int = 0
    cost_usd: Decimal
    unit_price_usd: Decimal | None = None


class UsageReport(Message):
    rows: list[UsageRow]
    total_cost_usd: Decimal = Decimal(0)
    error: str | None = None
