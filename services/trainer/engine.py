"""The trainer's engine: one frozen base model, many LoRA training runs.

A trainer worker serves one base model and many users' runs. Each run owns only a LoRA adapter,
an AdamW optimizer over that adapter's factors, and a step count; the base weights are loaded once
and shared. A ``forward_backward`` routes the batch rows to the run's adapter, so one base-model
pass trains exactly that adapter and leaves every other run untouched;
``forward_backward_many`` puts several runs' calls through one pass the same way, each keeping
its own loss, outputs, metrics and gradients.

Semantics follow Tinker (``../shared/losses.md`` §1): per-datum losses are summed, gradients
accumulate across ``forward_backward`` calls until ``optim_step`` consumes them, and
``forward_only`` computes the same outputs with no gradient at all. ``optim_step`` is AdamW with
every ``AdamParams`` field taken per step, after clipping the accumulated gradient to
``grad_clip_norm`` by global norm; ``optim_step_many`` steps several runs in one AdamW launch.
A run's factors live in one flat fp32 leaf (``LoraAdapter.flatten``), so each run has one
gradient and one optimizer tensor.

The base model is Whetstone's packed Qwen3 (``whetstone_ml.qwen3``): a call's datums are packed one
after another into one row of tokens with no padding, each attending only to itself, and the
adapter's fp32 master factors are applied in the base dtype (bf16 on CUDA). Full-vocabulary
logits are never materialised for a whole batch: the final hidden states go through the
unembedding a block of tokens at a time (``whetstone_ml.logprobs``), keeping only each position's
target logprobs.

A call larger than ``micro_batch_tokens`` is split into micro-batches of whole datums, each with
its own forward and backward: losses are per datum, so the accumulated gradient is the one of a
single pass. If a micro-batch still runs out of device memory, the call is redone from the
gradients it started with at half the budget (and the engine keeps the smaller budget); only a
single datum too large for the device fails.

No bus code lives here: the handlers call these methods from a worker thread. The engine holds a
lock so that two calls can never interleave on the shared model. (The module runs past 700
lines: the run lifecycle, the packed pass, the optimizer steps and the checkpoints share the run
state and its lock.)
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.adam import adam as adam_update

from services.trainer.custom_loss import loss_for
from services.trainer.losses import LossFn, count_metrics
from whetstone.errors import Conflict, NotFound, UserError, WhetstoneError
from whetstone.messages import (
    AdamParams,
    Datum,
    ForwardBackward,
    ForwardBackwardResult,
    LoraConfig,
    OptimStepResult,
)
from whetstone.models.registry import ModelSpec
from whetstone.tensors import Tensor
from whetstone_ml.loading import load_base_model, local_model_dir, torch_dtype
from whetstone_ml.logprobs import (
    DEFAULT_CHUNK_TOKENS,
    linear_target_logprobs,
)
from whetstone_ml.lora import LoraAdapter, Segment
from whetstone_ml.qwen3 import (
    AdapterWeights,
    Attention,
    Checkpointing,
    ModelOptions,
    Pack,
    Qwen3Packed,
)

DEFAULT_MAX_LORA_RANK = 64
DEFAULT_MICRO_BATCH_TOKENS = 16_384
OPTIMIZER_FILE = "optimizer.pt"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class RunState:
    """Everything one training run owns on this worker."""

    adapter: LoraAdapter
    optimizer: torch.optim.AdamW
    step: int = 0


@dataclass
class ParsedDatum:
    """A checked datum as tensors on the model's device."""

    tokens: torch.Tensor  # (N,) int64
    inputs: dict[str, torch.Tensor]  # the loss's inputs, each shaped like target_tokens


@dataclass
class _Job:
    """One checked forward_backward call: the run, its datums and its loss."""

    run_id: str
    datums: list[ParsedDatum]
    loss_fn: LossFn
    config: Mapping[str, float]
    forward_only: bool


@dataclass
class PackedBatch:
    """Token rows packed one after another, and which run's adapter each contiguous block of
    tokens uses."""

    tokens: torch.Tensor  # (T,) int64
    pack: Pack
    segments: list[Segment]  # over token positions, tiling [0, T)


def pack_requests(
    requests: Sequence[tuple[str | None, Sequence[torch.Tensor]]], device: torch.device
) -> PackedBatch:
    """Pack ``[(run_id, token rows)]`` into one row of tokens, one ``Segment`` per run.

    Today each call carries one run; packing several runs' requests into one pass only needs a
    caller that passes several entries.
    """
    rows = [tokens for _, token_rows in requests for tokens in token_rows]
    segments: list[Segment] = []
    start = 0
    for run_id, token_rows in requests:
        stop = start + sum(int(r.shape[0]) for r in token_rows)
        segments.append(Segment(run_id, start, stop))
        start = stop
    pack = Pack.of([int(r.shape[0]) for r in rows], device)
    return PackedBatch(torch.cat(rows).to(device), pack, segments)


def micro_batches(lengths: Sequence[int], budget_tokens: int) -> list[range]:
    """Consecutive datums in groups of at most ``budget_tokens`` tokens (a longer datum alone)."""
    groups: list[range] = []
    start, tokens = 0, 0
    for i, n in enumerate(lengths):
        if i > start and tokens + n > budget_tokens:
            groups.append(range(start, i))
            start, tokens = i, 0
        tokens += n
    if lengths:
        groups.append(range(start, len(lengths)))
    return groups


def num_tokens(cmd: ForwardBackward) -> int:
    """Tokens billed for a forward_backward: the sum of the datums' ``model_input`` lengths."""
    return sum(d.model_input.numel for d in cmd.data)


def _to_torch(tensor: Tensor, what: str) -> torch.Tensor:
    try:
        array = tensor.to_numpy()
    except ValueError as exc:
        raise UserError(f"{what}: {exc}") from None
    return torch.from_numpy(np.array(array))  # a writable copy, detached from the wire buffer


def _to_wire(tensor: torch.Tensor) -> Tensor:
    return Tensor.from_numpy(tensor.detach().float().cpu().numpy())


def _to_host(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A host copy of ``tensor``; on CUDA queued into pinned memory, with the event to wait on
    before reading it."""
    if tensor.device.type != "cuda":
        return tensor.cpu(), None
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _check_adam(adam: AdamParams) -> None:
    values = adam.model_dump()
    if not all(math.isfinite(v) for v in values.values()):
        raise UserError(f"AdamParams must be finite, got {values}")
    if adam.learning_rate < 0 or adam.eps < 0 or adam.weight_decay < 0 or adam.grad_clip_norm < 0:
        raise UserError("learning_rate, eps, weight_decay and grad_clip_norm must be >= 0")
    if not (0 <= adam.beta1 < 1 and 0 <= adam.beta2 < 1):
        raise UserError(f"betas must lie in [0, 1), got {adam.beta1} and {adam.beta2}")


def _flat_optimizer_state(saved: dict[str, Any], state: RunState) -> dict[str, Any]:
    """An AdamW state dict for the run's flat adapter. One saved before flat adapters holds a
    state per factor (two per module): their moments are laid out as the flat tensor is."""
    params = saved["param_groups"][0]["params"]
    adapter = state.adapter
    if adapter.flat is None or len(params) == 1:
        return saved
    per_param = saved["state"]
    flat_state: dict[int, dict[str, Any]] = {}
    if per_param:
        first = per_param[min(per_param)]
        flat_state[0] = {"step": first["step"]} | {
            key: adapter.flat_from_per_factor({i: v[key] for i, v in per_param.items()})
            for key in ("exp_avg", "exp_avg_sq")
        }
    groups = [{**saved["param_groups"][0], "params": [0]}]
    return {"state": flat_state, "param_groups": groups}


class TrainerEngine:
    """One base model (frozen, shared) and the LoRA runs trained on it.

    ``model_dir`` is a Hugging Face Qwen3 directory. ``device``/``dtype`` place the base weights
    (``dtype`` a torch dtype or its registry name, ``"bfloat16"``); the adapters' factors and
    their AdamW moments stay float32 master weights whatever the base dtype, and logprobs are
    computed in float32. ``context_length`` defaults to the config's ``max_position_embeddings``;
    ``base_model_name`` is recorded in exported adapters (default: ``model_dir``);
    ``logprob_chunk_tokens`` is how many tokens are unembedded at once (peak logits memory is
    that many rows of vocabulary); ``micro_batch_tokens`` the most tokens one forward/backward
    pass takes (larger calls are split); ``compile``, ``checkpointing`` and ``attention`` are the
    packed model's :class:`whetstone_ml.qwen3.ModelOptions`. :meth:`from_spec` builds one from a
    registry entry.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
        context_length: int | None = None,
        base_model_name: str | None = None,
        logprob_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        micro_batch_tokens: int = DEFAULT_MICRO_BATCH_TOKENS,
        compile: bool = False,
        checkpointing: Checkpointing = "selective",
        attention: Attention = "auto",
    ) -> None:
        if micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        hf = load_base_model(model_dir, self.dtype, self.device)
        config = hf.config
        if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
            # The chunked head computes logits as lm_head(last hidden state), nothing more.
            raise ValueError(f"{config.model_type}: scaled or soft-capped logits are not supported")
        options = ModelOptions(compile=compile, checkpointing=checkpointing, attention=attention)
        self.model = Qwen3Packed.from_hf(hf, options)
        del hf  # the packed model holds the weights it needs (q/k/v and gate/up fused)
        self.lora_modules = self.model.shape.lora_modules()
        self.logprob_chunk_tokens = logprob_chunk_tokens
        self.micro_batch_tokens = micro_batch_tokens
        self.vocab_size: int = int(config.vocab_size)
        self.context_length: int = context_length or int(config.max_position_embeddings)
        self.max_lora_rank = max_lora_rank
        self.base_model_name = base_model_name or str(model_dir)
        self.runs: dict[str, RunState] = {}
        self._lock = threading.RLock()

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        *,
        device: str | None = None,
        micro_batch_tokens: int = DEFAULT_MICRO_BATCH_TOKENS,
        compile: bool = False,
        checkpointing: Checkpointing = "selective",
    ) -> TrainerEngine:
        """The engine for a registry entry: its directory (the built-in model is generated there
        if missing), dtype, device, LoRA rank limit and context length. ``device`` overrides the
        registry's device (see ``ModelSpec.on_device`` for what that does to the dtype); the
        other arguments are the worker's settings (``TrainerSettings``)."""
        if device:
            spec = spec.on_device(device)
        return cls(
            local_model_dir(spec),
            device=spec.device,
            dtype=spec.dtype,
            max_lora_rank=spec.max_lora_rank,
            context_length=spec.context_length,
            micro_batch_tokens=micro_batch_tokens,
            compile=compile,
            checkpointing=checkpointing,
        )

    # ------------------------------------------------------------ runs

    def create_run(self, run_id: str, lora: LoraConfig) -> None:
        """A fresh adapter (B = 0, so it starts as the base model) and a fresh optimizer."""
        with self._lock:
            if run_id in self.runs:
                raise Conflict(f"training run {run_id!r} already exists on this worker")
            if not 1 <= lora.rank <= self.max_lora_rank:
                raise UserError(
                    f"LoRA rank must be between 1 and {self.max_lora_rank}, got {lora.rank}"
                )
            if lora.seed is None:
                # Record the seed drawn for the run: that makes it reproducible from its config.
                lora = lora.model_copy(update={"seed": secrets.randbits(63)})
            adapter = LoraAdapter.init(self.lora_modules, lora, self.device)
            adapter.flatten(self.model.lora_order)  # one leaf: one gradient and update per run
            self.runs[run_id] = RunState(adapter, self._new_optimizer(adapter))

    def has_run(self, run_id: str) -> bool:
        return run_id in self.runs

    def drop_run(self, run_id: str) -> None:
        """Forget a run and free its adapter; dropping an unknown run is a no-op."""
        with self._lock:
            self.runs.pop(run_id, None)

    def _run(self, run_id: str) -> RunState:
        state = self.runs.get(run_id)
        if state is None:
            raise NotFound(f"training run {run_id!r} is not loaded on this worker")
        return state

    @staticmethod
    def _new_optimizer(adapter: LoraAdapter) -> torch.optim.AdamW:
        # Hyperparameters are overwritten by every optim_step; these only satisfy the constructor.
        # On CUDA the fused kernel updates all of a run's factors in one launch.
        params = adapter.parameters()
        fused = bool(params) and params[0].device.type == "cuda"
        return torch.optim.AdamW(params, lr=0.0, weight_decay=0.0, fused=fused or None)

    num_tokens = staticmethod(num_tokens)

    # ------------------------------------------------------------ training

    def forward_backward(self, run_id: str, cmd: ForwardBackward) -> ForwardBackwardResult:
        """One forward pass over all datums; add the summed loss's gradient unless forward_only.

        Outputs per datum: ``logprobs`` (the learner's, pre-update, shaped like the targets) and
        ``elementwise_loss``. Metrics: ``loss:sum`` and the loss's counts as ``<name>:sum``.
        Every datum is checked before anything runs, so a bad one changes no gradient.
        """
        with self._lock:
            return self._run_jobs([self._job(run_id, cmd)])[0]

    def forward_backward_many(
        self, calls: Sequence[tuple[str, ForwardBackward]]
    ) -> list[ForwardBackwardResult | WhetstoneError]:
        """Several calls (of one run or of many) through the base model together.

        Each call's datums are packed after the previous call's, each run's rows use its own
        adapter, and every call keeps its own loss, outputs and metrics: the results (and each
        run's gradients) equal calling :meth:`forward_backward` once per call in order, up to
        float rounding. A call that fails its checks (unknown run, bad datum, bad config) is
        returned as its error and leaves the others to run; call order within a run is kept.
        An error during the pass itself (a custom loss failing on a value) raises and leaves
        every run's gradients as they were.
        """
        with self._lock:
            results: list[ForwardBackwardResult | WhetstoneError] = []
            jobs: list[_Job] = []
            for run_id, cmd in calls:
                try:
                    jobs.append(self._job(run_id, cmd))
                    results.append(ForwardBackwardResult(outputs=[], metrics={}))
                except UserError as exc:
                    results.append(exc)
            done = iter(self._run_jobs(jobs) if jobs else [])
            return [r if isinstance(r, WhetstoneError) else next(done) for r in results]

    def _job(self, run_id: str, cmd: ForwardBackward) -> _Job:
        self._run(run_id)
        loss_fn = loss_for(cmd)
        config = loss_fn.check_config(cmd.loss_fn_config)
        if not cmd.data:
            raise UserError("forward_backward needs at least one datum")
        datums = [self._parse_datum(i, datum, loss_fn) for i, datum in enumerate(cmd.data)]
        return _Job(run_id, datums, loss_fn, config, cmd.forward_only)

    def _run_jobs(self, jobs: list[_Job]) -> list[ForwardBackwardResult]:
        """:meth:`_micro_batched`, redone from the gradients it started with at half the token
        budget if a micro-batch runs out of device memory (and the smaller budget kept). A call
        that fails leaves the gradients as they were, so it can be retried (or a pass's calls
        rerun one by one) without counting a micro-batch twice."""
        trained = {job.run_id for job in jobs if not job.forward_only}
        params = [p for run_id in sorted(trained) for p in self.runs[run_id].adapter.parameters()]
        before = [None if p.grad is None else p.grad.clone() for p in params]
        longest = max(int(d.tokens.shape[0]) for job in jobs for d in job.datums)

        def restore() -> None:
            for p, g in zip(params, before, strict=True):
                p.grad = None if g is None else g.clone()

        while True:
            try:
                return self._micro_batched(jobs)
            except torch.OutOfMemoryError:
                restore()
                if self.micro_batch_tokens <= longest:
                    raise  # a single datum too large for the device cannot be split
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.micro_batch_tokens = max(longest, self.micro_batch_tokens // 2)
            except Exception:
                restore()
                raise

    def _micro_batched(self, jobs: list[_Job]) -> list[ForwardBackwardResult]:
        """Forward (and backward) over every job's datums in micro-batches of at most
        ``micro_batch_tokens`` tokens; each job's outputs and metrics as its own pass gives."""
        entries = [(j, d) for j, job in enumerate(jobs) for d in job.datums]
        outputs: list[list[dict[str, Tensor]]] = [[] for _ in jobs]
        totals = [torch.zeros((), dtype=torch.float64, device=self.device) for _ in jobs]
        counts: list[dict[str, torch.Tensor]] = [{} for _ in jobs]
        lengths = [int(d.tokens.shape[0]) for _, d in entries]
        train = not all(job.forward_only for job in jobs)
        for group in micro_batches(lengths, self.micro_batch_tokens):
            part = [entries[i] for i in group]
            runs = [(j, [d for k, d in part if k == j]) for j in dict.fromkeys(k for k, _ in part)]
            with torch.set_grad_enabled(train):
                logprobs = self._target_logprobs(
                    [(jobs[j], [d.tokens for d in ds]) for j, ds in runs],
                    [d.inputs["target_tokens"] for _, d in part],
                )
                loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
                pieces: list[torch.Tensor] = []
                for (j, datum), lp in zip(part, logprobs, strict=True):
                    job = jobs[j]
                    loss = job.loss_fn(lp, datum.inputs, job.config)
                    total = loss.elementwise.sum()
                    totals[j] = totals[j] + total.detach().double()
                    if not job.forward_only:
                        loss_sum = loss_sum + total
                    for name, value in loss.counts.items():
                        value = value.detach().double()
                        counts[j][name] = counts[j][name] + value if name in counts[j] else value
                    pieces += [lp.detach(), loss.elementwise.detach()]
                # One device-to-host copy per micro-batch (outputs and the running metrics),
                # queued before the backward: the host turns it into outputs while the device
                # runs the backward, and nothing waits for the backward to finish.
                names = [(j, name) for j in range(len(jobs)) for name in counts[j]]
                scalars = torch.stack([*totals, *(counts[j][name] for j, name in names)])
                flat, copied = _to_host(
                    torch.cat([*(p.double().reshape(-1) for p in pieces), scalars])
                )
                if loss_sum.requires_grad:
                    loss_sum.backward()  # accumulates into each adapter's .grad until optim_step
            if copied is not None:
                copied.synchronize()
            sizes = [p.numel() for p in pieces] + [len(scalars)]
            *host, host_scalars = flat.split(sizes)
            host = [x.reshape(p.shape) for x, p in zip(host, pieces, strict=True)]
            for i, (j, _) in enumerate(part):
                output = {"logprobs": _to_wire(host[2 * i])}
                if jobs[j].loss_fn.per_token:  # a custom loss has one value per datum
                    output["elementwise_loss"] = _to_wire(host[2 * i + 1])
                outputs[j].append(output)
        results = []
        host_counts: list[dict[str, torch.Tensor]] = [{} for _ in jobs]
        for (j, name), value in zip(names, host_scalars[len(jobs) :], strict=True):
            host_counts[j][name] = value
        for j in range(len(jobs)):
            metrics = {"loss:sum": float(host_scalars[j])}
            metrics.update(count_metrics(host_counts[j]))
            results.append(ForwardBackwardResult(outputs=outputs[j], metrics=metrics))
        return results

    def _target_logprobs(
        self, requests: list[tuple[_Job, list[torch.Tensor]]], targets: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Each row's learner logprobs of its targets (``(N,)`` or ``(N, K)``, float32), the rows
        of each request through its run's adapter (detached for a forward_only job, so that it
        gains no gradient).

        The rows are packed into one row of tokens; the final hidden states go through the fused
        head one run segment and one block at a time, so only one block's logits exist at a
        time. Rows with fewer target columns than the widest are padded with id 0, whose
        logprobs are dropped.
        """
        batch = pack_requests([(job.run_id, rows) for job, rows in requests], self.device)
        segments = []
        for (job, _), seg in zip(requests, batch.segments, strict=True):
            with torch.set_grad_enabled(torch.is_grad_enabled() and not job.forward_only):
                segments.append((seg, self.model.lora_weights(self.runs[job.run_id].adapter)))
        hidden = self.model.hidden(batch.tokens, batch.pack, segments)
        columns = [t.reshape(t.shape[0], -1) for t in targets]
        width = max(c.shape[1] for c in columns)
        packed_targets = torch.cat(
            [torch.nn.functional.pad(c, (0, width - c.shape[1])) for c in columns]
        )
        # Neighbouring runs without a head LoRA share the plain head: one call over their rows.
        spans: list[tuple[int, int, tuple[torch.Tensor, torch.Tensor] | None]] = []
        for seg, weights in segments:
            if spans and weights.head is None and spans[-1][2] is None:
                spans[-1] = (spans[-1][0], seg.stop, None)
            else:
                spans.append((seg.start, seg.stop, weights.head))
        lp = torch.cat(
            [
                linear_target_logprobs(
                    hidden[start:stop],
                    self.model.head,
                    packed_targets[start:stop],
                    head,
                    self.logprob_chunk_tokens,
                )
                for start, stop, head in spans
            ]
        )
        return [
            row[:, : c.shape[1]].reshape(t.shape)
            for row, c, t in zip(lp.split(batch.pack.lengths), columns, targets, strict=True)
        ]

    def _route(self, segments: list[Segment]) -> list[tuple[Segment, AdapterWeights | None]]:
        """Each segment with its run's adapter in the model's compute form."""
        return [
            (
                s,
                None
                if s.adapter_id is None
                else self.model.lora_weights(self._run(s.adapter_id).adapter),
            )
            for s in segments
        ]

    def _parse_datum(self, index: int, datum: Datum, loss_fn: LossFn) -> ParsedDatum:
        """Check one datum against the model (vocab, context) and the loss (inputs, shapes)."""
        where = f"datum {index}"
        tokens = _to_torch(datum.model_input, f"{where}: model_input")
        if tokens.is_floating_point() or tokens.dim() != 1:
            raise UserError(f"{where}: model_input must be a 1-D tensor of integer token ids")
        n = int(tokens.shape[0])
        if n == 0:
            raise UserError(f"{where}: model_input is empty")
        if n > self.context_length:
            raise UserError(f"{where}: {n} tokens exceed the context length {self.context_length}")
        self._check_token_ids(tokens, f"{where}: model_input")
        raw = {
            key: _to_torch(value, f"{where}: loss_fn_inputs[{key!r}]")
            for key, value in datum.loss_fn_inputs.items()
            if key in loss_fn.input_names  # unknown keys are ignored, never even decoded
        }
        inputs = loss_fn.check_inputs(raw, n, where)
        self._check_token_ids(inputs["target_tokens"], f"{where}: target_tokens")
        return ParsedDatum(
            tokens.long().to(self.device), {k: v.to(self.device) for k, v in inputs.items()}
        )

    def _check_token_ids(self, ids: torch.Tensor, what: str) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise UserError(
                f"{what}: token ids must lie in [0, {self.vocab_size}), "
                f"got min {int(ids.min())} and max {int(ids.max())}"
            )

    def optim_step(self, run_id: str, adam: AdamParams) -> OptimStepResult:
        """One AdamW step on the accumulated gradient, then zero it.

        Every ``AdamParams`` field applies to this step only (Tinker sends them every step):
        learning rate, betas, eps and decoupled weight decay go to AdamW (bias correction uses
        this step's betas), and when ``grad_clip_norm`` > 0 the gradient is first scaled by
        ``grad_clip_norm / norm`` if its global L2 norm exceeds it. ``grad_norm:mean`` is the norm
        before clipping.
        """
        result = self.optim_step_many([(run_id, adam)])[0]
        if isinstance(result, WhetstoneError):
            raise result
        return result

    def optim_step_many(
        self, calls: Sequence[tuple[str, AdamParams]]
    ) -> list[OptimStepResult | WhetstoneError]:
        """:meth:`optim_step` for several calls at once, with the same results as calling it once
        per call in order; a call that fails its checks is returned as its error.

        The runs' updates reach the device together: one AdamW launch (fused on CUDA) over every
        run whose hyperparameters are equal, each run keeping its own moments and step count in
        its own optimizer, and one device-to-host copy for all the gradient norms (one more
        before the update when a run clips). A run named twice takes its second step after its
        first.
        """
        with self._lock:
            results: list[OptimStepResult | WhetstoneError | None] = [None] * len(calls)
            wave: list[tuple[int, RunState, AdamParams]] = []
            for i, (run_id, adam) in enumerate(calls):
                try:
                    state = self._run(run_id)
                    _check_adam(adam)
                except UserError as exc:
                    results[i] = exc
                    continue
                if any(state is other for _, other, _ in wave):
                    self._optim_wave(wave, results)
                    wave = []
                wave.append((i, state, adam))
            self._optim_wave(wave, results)
            return [r for r in results if r is not None]

    def _optim_wave(
        self,
        wave: list[tuple[int, RunState, AdamParams]],
        results: list[OptimStepResult | WhetstoneError | None],
    ) -> None:
        """One optimizer step of distinct runs: clip each to its norm, then AdamW."""
        if not wave:
            return
        grads = [
            [p.grad for p in st.adapter.parameters() if p.grad is not None] for _, st, _ in wave
        ]
        norms = torch.stack(
            [
                torch.nn.utils.get_total_norm(g) if g else torch.zeros((), device=self.device)
                for g in grads
            ]
        )
        host_norms: list[float] | None = None
        if any(adam.grad_clip_norm > 0 for _, _, adam in wave):
            host_norms = norms.tolist()
            for (_, _, adam), run_grads, norm in zip(wave, grads, host_norms, strict=True):
                if adam.grad_clip_norm > 0 and norm > adam.grad_clip_norm:
                    for grad in run_grads:
                        grad.mul_(adam.grad_clip_norm / norm)
        # Every run's parameters with equal hyperparameters go to one functional AdamW call,
        # gathered as each run's own optimizer gathers them for its step (state made on first use).
        batches: dict[tuple[Any, ...], list[list[torch.Tensor]]] = {}
        with torch.no_grad():
            for _, state, adam in wave:
                for group in state.optimizer.param_groups:
                    group["lr"] = adam.learning_rate
                    group["betas"] = (adam.beta1, adam.beta2)
                    group["eps"] = adam.eps
                    group["weight_decay"] = adam.weight_decay
                    flags = ("amsgrad", "maximize", "foreach", "capturable", "differentiable")
                    key = (
                        adam.learning_rate,
                        adam.beta1,
                        adam.beta2,
                        adam.eps,
                        adam.weight_decay,
                        group["fused"],
                        group["decoupled_weight_decay"],
                        *(group[f] for f in flags),
                    )
                    lists = batches.setdefault(key, [[] for _ in range(6)])
                    state.optimizer._init_group(group, *lists)  # type: ignore[attr-defined]
            for key, lists in batches.items():
                lr, beta1, beta2, eps, weight_decay, fused, decoupled = key[:7]
                amsgrad, maximize, foreach, capturable, differentiable = key[7:]
                params, run_grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
                if params:
                    adam_update(
                        params,
                        run_grads,
                        exp_avgs,
                        exp_avg_sqs,
                        max_exp_avg_sqs,
                        steps,
                        foreach=foreach,
                        capturable=capturable,
                        differentiable=differentiable,
                        fused=fused,
                        decoupled_weight_decay=decoupled,
                        amsgrad=amsgrad,
                        beta1=beta1,
                        beta2=beta2,
                        lr=lr,
                        weight_decay=weight_decay,
                        eps=eps,
                        maximize=maximize,
                    )
        for _, state, _ in wave:
            state.optimizer.zero_grad(set_to_none=True)
            state.step += 1
        for (i, _, adam), norm in zip(wave, host_norms or norms.tolist(), strict=True):
            results[i] = OptimStepResult(
                metrics={"grad_norm:mean": norm, "learning_rate:mean": adam.learning_rate}
            )

    # ------------------------------------------------------------ inspection

    def forward_logits(self, run_id: str | None, input_ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``(B, T, V)`` of unpadded rows through ``run_id``'s adapter (``None``:
        the base model). No gradient; for parity checks against PEFT and the sampler."""
        with self._lock, torch.no_grad():
            rows = list(input_ids.to(self.device).long())
            batch = pack_requests([(run_id, rows)], self.device)
            segments = self._route(batch.segments)
            hidden = self.model.hidden(batch.tokens, batch.pack, segments)
            logits = self.model.head_logits(hidden, segments).float()
            return logits.reshape(*input_ids.shape, -1)

    # ------------------------------------------------------------ checkpoints

    def save_sampler(self, run_id: str, directory: Path) -> int:
        """The adapter alone, in PEFT format (what samplers, PEFT and vLLM load); bytes written."""
        with self._lock:
            state = self._run(run_id)
            return state.adapter.save_peft(directory, self.base_model_name)

    def save_state(self, run_id: str, directory: Path) -> int:
        """The PEFT adapter plus ``optimizer.pt`` (AdamW moments and the step); bytes written."""
        with self._lock:
            state = self._run(run_id)
            written = self.save_sampler(run_id, directory)
            path = directory / OPTIMIZER_FILE
            torch.save({"optimizer": state.optimizer.state_dict(), "step": state.step}, path)
            return written + path.stat().st_size

    def load_state(self, run_id: str, directory: Path, with_optimizer: bool) -> None:
        """Restore a run's adapter weights (and optimizer state with ``with_optimizer``).

        A run not on this worker is created from the checkpoint's LoRA config. Weights are copied
        into the run's existing tensors, so routing and optimizer bindings stay valid; without the
        optimizer, AdamW restarts from zero moments and step 0. Pending gradients are dropped.
        """
        with self._lock:
            if not all((directory / name).is_file() for name in PEFT_FILES):
                raise UserError(f"no adapter checkpoint in {str(directory)!r}")
            optimizer_path = directory / OPTIMIZER_FILE
            if with_optimizer and not optimizer_path.is_file():
                raise UserError("this checkpoint holds no optimizer state (a sampler checkpoint?)")
            loaded = LoraAdapter.load_peft(directory, device=self.device)
            created = run_id not in self.runs
            if created:
                self.create_run(run_id, loaded.config.model_copy(update={"seed": 0}))
            state = self.runs[run_id]
            try:
                self._copy_factors(state.adapter, loaded)
            except UserError:
                if created:
                    self.drop_run(run_id)
                raise
            state.optimizer = self._new_optimizer(state.adapter)
            state.step = 0
            if with_optimizer:
                saved = torch.load(optimizer_path, map_location=self.device, weights_only=True)
                state.optimizer.load_state_dict(_flat_optimizer_state(saved["optimizer"], state))
                state.step = int(saved["step"])

    @staticmethod
    def _copy_factors(target: LoraAdapter, source: LoraAdapter) -> None:
        if set(target.factors) != set(source.factors):
            raise UserError("checkpoint adapter targets other modules than this run's adapter")
        for name, f in target.factors.items():  # check everything before changing anything
            g = source.factors[name]
            if f.a.shape != g.a.shape or f.b.shape != g.b.shape:
                raise UserError(
                    f"checkpoint adapter has rank {g.a.shape[0]}, this run has rank {f.a.shape[0]}"
                )
        with torch.no_grad():
            for name, f in target.factors.items():
                g = source.factors[name]
                f.a.copy_(g.a)
                f.b.copy_(g.b)
        for p in target.parameters():
            p.grad = None
