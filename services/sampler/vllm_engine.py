"""The sampler's vLLM engine: vLLM's offline ``LLMEngine`` behind ``SamplerEngine``'s interface.

A registry entry with ``engine = "vllm"`` makes the sampler build this instead of Whetstone's own
engine (``services/sampler/__main__.py``); it runs in the interpreter of ``scripts/setup-vllm``'s
virtual environment (vLLM pins its own torch and transformers). The handlers drive it the same
way: :meth:`VllmEngine.add` queues a request (validated at once), :meth:`VllmEngine.step` runs
one step of vLLM's own continuous-batching loop (``LLMEngine.step``) and returns the requests that
finished in it, :meth:`VllmEngine.generate` does both for a list of jobs. vLLM's engine core
(scheduler, KV cache manager) runs in the sampler's process; its model runner in one child
process (vLLM's multiprocessing executor, which its CPU backend needs to bind OpenMP threads:
in-process it is ~9x slower). That child watches its parent and exits with it, however the
sampler dies; it is started with ``spawn``, so whatever creates the engine must be import-safe
(the sampler's ``__main__`` is guarded).

What maps onto vLLM (protocol.md 5.8-5.9): temperature, top_p, top_k, max_tokens, seed
(``n > 1`` samples get ``seed + i``), stop strings (matched on the text with special tokens
kept), stop token ids, EOS (Whetstone's ChatML EOS set, only with ``stop_on_eos``),
``stop_reason``, per-token logprobs of the distribution actually sampled (``logprobs_mode =
"processed_logprobs"``: temperature, top-k and top-p applied, as Whetstone's engine reports them;
greedy rows report the temperature-1 distribution), top-k sample logprobs (cells removed by the
truncation are empty), prompt logprobs at temperature 1 with ``prompt_logprobs_last_n``, top-k
prompt logprobs, and prefix caching (``num_cached_tokens`` is ``prompt_cache_hit_tokens``; vLLM
serves no cached prefix to a request that asks for prompt logprobs). ``target_prompt_logprobs``
and ``prompt_alt_tokens_k`` have no vLLM counterpart: such a request is refused with a
``UserError`` naming the option, never answered with other numbers.

LoRA: every adapter is a ``LoRARequest`` on its PEFT directory in the checkpoint store (what the
trainer exports), loaded by :meth:`ensure_adapter` so a bad adapter fails its request early.
Base-model requests run on a LoRA too, one whose factors are zero (it adds exactly 0.0): vLLM
0.32's LoRA decode kernels index the adapter slots with a base row's slot -1, i.e. the last
slot, so once every slot holds an adapter a base-model row decodes with that adapter (the "mixed
batch" bug of ``environment.md``; it hits base-only batches too). With no row at -1, base and
LoRA requests share batches correctly (``tests/vllm``: a mixed batch equals each request alone).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer
from vllm import EngineArgs, LLMEngine
from vllm import SamplingParams as VllmParams
from vllm.inputs import TokensPrompt
from vllm.lora.request import LoRARequest
from vllm.sampling_params import RequestOutputKind
from vllm.v1.executor import Executor

from services.sampler.checks import checked_prompt
from whetstone.errors import UserError, WhetstoneError
from whetstone.messages import (
    MAX_TOPK_LOGPROBS,
    TOPK_EMPTY_LOGPROB,
    SampledSequence,
    SampleRequest,
    SampleResult,
    TopkLogprobs,
)
from whetstone.models.registry import ModelSpec
from whetstone.tensors import Tensor
from whetstone_ml.loading import local_model_dir

# Tokens that end a turn in ChatML-style tokenizers, on top of the tokenizer's own eos token
# (the same set as Whetstone's engine).
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
GREEDY_BELOW = 1e-5  # vLLM samples greedily below this temperature (and refuses n > 1 there)
# Request options vLLM has no counterpart for: refused, never answered with other numbers.
UNSUPPORTED = ("target_prompt_logprobs", "prompt_alt_tokens_k")


@dataclass
class _Job:
    handle: int
    request: SampleRequest
    adapter_id: str | None
    params: Any  # vllm.SamplingParams
    prompt: list[int]


class VllmEngine:
    """vLLM's ``LLMEngine`` on one base model, with LoRA, prefix caching and an LRU of adapters.

    ``max_adapters`` bounds the adapters registered with vLLM (least recently used removed; vLLM
    itself reloads a removed one from its directory if a request still names it), ``max_loras``
    the adapters in one vLLM batch, ``max_seqs`` the sequences in flight, ``kv_cache_tokens`` the
    KV cache. ``enforce_eager`` (default: on for CPU) skips torch.compile and CUDA graphs, which
    cost minutes of start-up on a CPU.
    """

    def __init__(
        self,
        model_dir: Path,
        dtype: str = "float32",
        max_adapters: int = 32,
        context_length: int | None = None,
        *,
        device: str = "cpu",
        max_seqs: int = 256,
        max_loras: int = 8,
        max_lora_rank: int = 64,
        kv_cache_tokens: int = 65_536,
        prefix_caching: bool = True,
        enforce_eager: bool | None = None,
    ) -> None:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.vocab_size = int(config["vocab_size"])
        self.context_length = context_length or int(config["max_position_embeddings"])
        self.max_adapters = max_adapters
        self.max_seqs = max_seqs
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        vocab = self.tokenizer.get_vocab()
        eos = {vocab[t] for t in EOS_TOKENS if t in vocab}
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_ids = sorted(eos)
        on_cpu = device.split(":", 1)[0] == "cpu"
        rank = next((r for r in LORA_RANKS if r >= max_lora_rank), LORA_RANKS[-1])
        args = EngineArgs(
            model=str(model_dir),
            dtype=dtype,
            max_model_len=self.context_length,
            max_num_seqs=max_seqs,
            enable_lora=True,
            # One slot more for the zero adapter of base-model requests, pinned.
            max_loras=max(1, min(max_loras, max_adapters)) + 1,
            max_cpu_loras=max(1, max_adapters) + 1,
            max_lora_rank=rank,
            enable_prefix_caching=prefix_caching,
            logprobs_mode="processed_logprobs",
            max_logprobs=MAX_TOPK_LOGPROBS,
            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
            kv_cache_memory_bytes=_kv_bytes(config, dtype, kv_cache_tokens) if on_cpu else None,
            disable_log_stats=True,
            seed=0,
        )
        # Not LLMEngine.from_engine_args: it would put the engine core in a child process too,
        # one that outlives a killed sampler.
        vllm_config = args.create_engine_config()
        self.llm = LLMEngine(
            vllm_config=vllm_config,
            executor_class=Executor.get_class(vllm_config),
            log_stats=False,
            multiprocess_mode=False,
        )
        self._adapters: OrderedDict[str, LoRARequest] = OrderedDict()
        self._zero_dir = tempfile.TemporaryDirectory(prefix="whetstone-zero-lora-")
        self._base = LoRARequest(
            "whetstone-base", 1, _zero_adapter(Path(self._zero_dir.name), config)
        )
        self.llm.add_lora(self._base)
        self.llm.pin_lora(self._base.lora_int_id)
        self._next_lora_id = 2
        self._waiting: deque[_Job] = deque()
        self._in_flight: dict[str, _Job] = {}  # vLLM request id -> its job
        self._seqs = 0  # sequences in flight
        self._next_handle = 0

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        *,
        device: str | None = None,
        max_adapters: int = 32,
        prefix_cache_blocks: int | None = None,
    ) -> VllmEngine:
        """The engine for a registry entry (the built-in model is generated if missing).
        ``prefix_cache_blocks=0`` turns vLLM's prefix cache off; vLLM sizes it otherwise."""
        if device:
            spec = spec.on_device(device)
        return cls(
            local_model_dir(spec),
            dtype=spec.dtype,
            max_adapters=max_adapters,
            context_length=spec.context_length,
            device=spec.device,
            max_lora_rank=spec.max_lora_rank,
            prefix_caching=prefix_cache_blocks != 0,
        )

    def close(self) -> None:
        """Stop vLLM's model-runner process now (it would notice the sampler's exit anyway)."""
        self.llm.engine_core.shutdown()

    # ------------------------------------------------------------------------------ adapters

    def ensure_adapter(self, adapter_id: str, directory: Path) -> None:
        """Register the PEFT adapter in ``directory`` as ``adapter_id`` unless it is already.

        vLLM loads it now, so an adapter that does not fit the base model is a ``UserError``
        here, before its request is queued. Past ``max_adapters`` the least recently used
        adapter no queued or running request needs is removed.
        """
        if adapter_id in self._adapters:
            self._adapters.move_to_end(adapter_id)
            return
        # Room first, so vLLM's own cache (one entry larger) never has to pick what goes.
        busy = {j.adapter_id for j in (*self._waiting, *self._in_flight.values())}
        while len(self._adapters) >= self.max_adapters:
            evicted = next((a for a in self._adapters if a not in busy), None)
            if evicted is None:
                break  # every registered adapter is in use
            self.llm.remove_lora(self._adapters.pop(evicted).lora_int_id)
        lora = LoRARequest(adapter_id, self._next_lora_id, str(directory))
        self._next_lora_id += 1
        try:
            self.llm.add_lora(lora)
        except Exception as exc:  # noqa: BLE001 - vLLM's loader raises many kinds
            raise UserError(f"adapter {adapter_id!r} cannot be loaded by vLLM: {exc}") from None
        self._adapters[adapter_id] = lora

    # ------------------------------------------------------------------------------ validation

    def _validate(self, request: SampleRequest, adapter_id: str | None) -> _Job:
        """Reject what the client can fix, and what vLLM cannot do, before any compute."""
        for option in UNSUPPORTED:
            if getattr(request, option):
                raise UserError(
                    f"{option} is not supported by this base model's sampler (the vLLM engine)"
                )
        # vLLM draws a token even for max_tokens=0 (and drops it): that one must fit too
        prompt = checked_prompt(
            request,
            vocab_size=self.vocab_size,
            context_length=self.context_length,
            max_seqs=self.max_seqs,
            min_new_tokens=1,
        )
        if adapter_id is not None and adapter_id not in self._adapters:
            raise WhetstoneError(f"adapter {adapter_id!r} is not loaded")
        try:
            params = self._params(request)
        except ValueError as exc:  # vLLM's own checks (VLLMValidationError)
            raise UserError(f"sampling parameters refused by vLLM: {exc}") from None
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        return _Job(handle, request, adapter_id, params, prompt)

    def _params(self, request: SampleRequest) -> Any:
        """The request's options as vLLM's ``SamplingParams``."""
        p = request.params
        wants_prompt = request.prompt_logprobs or request.topk_prompt_logprobs > 0
        stop_ids = list(p.stop_token_ids) + (self.eos_ids if p.stop_on_eos else [])
        return VllmParams(
            # vLLM refuses n > 1 for greedy sampling: one greedy sample, copied n times.
            n=1 if p.temperature < GREEDY_BELOW else request.num_samples,
            # max_tokens 0 (prompt scores only) draws one token, which the result leaves out.
            max_tokens=max(p.max_tokens, 1),
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k if 0 < p.top_k < self.vocab_size else 0,  # 0: off, as k >= vocab is
            seed=p.seed,
            stop=list(p.stop_strings) or None,
            stop_token_ids=list(dict.fromkeys(stop_ids)) or None,
            ignore_eos=True,  # EOS is in stop_token_ids when it stops a row
            logprobs=request.topk_sample_logprobs,
            prompt_logprobs=request.topk_prompt_logprobs if wants_prompt else None,
            skip_special_tokens=False,  # stop strings see "<|im_end|>" as text
            detokenize=bool(p.stop_strings),
            output_kind=RequestOutputKind.FINAL_ONLY,  # every sample, once all are done
        )

    # ------------------------------------------------------------------------------ the loop

    def add(self, request: SampleRequest, adapter_id: str | None) -> int:
        """Queue ``request``; its handle comes back from :meth:`step` with its result."""
        job = self._validate(request, adapter_id)
        if adapter_id is not None:
            self._adapters.move_to_end(adapter_id)
        self._waiting.append(job)
        return job.handle

    def abort(self) -> list[int]:
        """Drop every request queued or in vLLM (after a failed step); their handles."""
        handles = [j.handle for j in (*self._waiting, *self._in_flight.values())]
        if self._in_flight:
            self.llm.abort_request(list(self._in_flight))
        self._waiting.clear()
        self._in_flight.clear()
        self._seqs = 0
        return handles

    def cancel(self, handles: set[int]) -> list[int]:
        """Drop the requests ``handles``, queued here or running in vLLM (aborted there); the
        handles found."""
        found = [j.handle for j in self._waiting if j.handle in handles]
        self._waiting = deque(j for j in self._waiting if j.handle not in handles)
        running = [rid for rid, j in self._in_flight.items() if j.handle in handles]
        if running:
            self.llm.abort_request(running)
        for rid in running:
            job = self._in_flight.pop(rid)
            self._seqs -= job.request.num_samples
            found.append(job.handle)
        return found

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._in_flight)

    @property
    def num_waiting(self) -> int:
        """Requests added but not handed to vLLM yet (no rows for them so far)."""
        return len(self._waiting)

    def step(self) -> list[tuple[int, SampleResult]]:
        """Hand vLLM the waiting requests it may take, run one vLLM step: what finished."""
        self._admit()
        if not self._in_flight:
            return []
        finished: list[tuple[int, SampleResult]] = []
        for out in self.llm.step():
            if not out.finished or out.request_id not in self._in_flight:
                continue
            job = self._in_flight.pop(out.request_id)
            self._seqs -= job.request.num_samples
            finished.append((job.handle, self._result(job, out)))
        return finished

    def generate(self, jobs: list[tuple[SampleRequest, str | None]]) -> list[SampleResult]:
        """Sample every request of ``jobs`` together; results in ``jobs`` order. Every request is
        validated before any runs, so one bad request fails the call before compute is spent."""
        assert not self.has_work, "generate() needs an idle engine; use add()/step() instead"
        checked = [self._validate(request, adapter_id) for request, adapter_id in jobs]
        self._waiting.extend(checked)
        results: dict[int, SampleResult] = {}
        while self.has_work:
            results.update(self.step())
        return [results[job.handle] for job in checked]

    def _admit(self) -> None:
        """Waiting requests enter vLLM in arrival order while it has rows for their samples."""
        while self._waiting:
            job = self._waiting[0]
            n = job.request.num_samples
            if self._in_flight and self._seqs + n > self.max_seqs:
                break
            self._waiting.popleft()
            request_id = f"{job.handle}"
            self.llm.add_request(
                request_id,
                TokensPrompt(prompt_token_ids=job.prompt),
                job.params,
                lora_request=self._adapters[job.adapter_id] if job.adapter_id else self._base,
            )
            self._in_flight[request_id] = job
            self._seqs += n

    # ------------------------------------------------------------------------------ results

    def _result(self, job: _Job, out: Any) -> SampleResult:
        request = job.request
        k = request.topk_sample_logprobs
        sequences = []
        completions = sorted(out.outputs, key=lambda c: c.index)
        if len(completions) < request.num_samples:  # greedy: the one sample, for each
            completions = completions * request.num_samples
        for completion in completions:
            tokens = list(completion.token_ids)
            positions = list(completion.logprobs or [])
            if request.params.max_tokens == 0:
                tokens, positions = [], []
            logprobs = [float(pos[t].logprob) for pos, t in zip(positions, tokens, strict=True)]
            topk = None
            if k:
                ids, values = _topk_rows(positions, k)
                topk = TopkLogprobs(
                    token_ids=Tensor.from_numpy(ids), logprobs=Tensor.from_numpy(values)
                )
            stopped = completion.finish_reason == "stop" and request.params.max_tokens > 0
            sequences.append(
                SampledSequence(
                    tokens=Tensor.from_numpy(np.asarray(tokens, dtype=np.int64)),
                    logprobs=Tensor.from_numpy(np.asarray(logprobs, dtype=np.float32)),
                    stop_reason="stop" if stopped else "length",
                    topk_logprobs=topk,
                )
            )
        return SampleResult(
            sequences=sequences,
            prompt_cache_hit_tokens=int(out.num_cached_tokens or 0),
            **_prompt_scores(request, job.prompt, out.prompt_logprobs),  # type: ignore[arg-type]
        )


def _topk_rows(positions: list[Any], k: int) -> tuple[np.ndarray, np.ndarray]:
    """``[len(positions), k]`` ids and logprobs, most likely first, from vLLM's per-position
    dicts (its top k plus the chosen token, which may rank lower); cells vLLM's truncation
    removed (logprob -inf) and missing ones are the SDK's empty cell."""
    ids = np.zeros((len(positions), k), dtype=np.int64)
    values = np.full((len(positions), k), TOPK_EMPTY_LOGPROB, dtype=np.float32)
    for row, pos in enumerate(positions):
        if not pos:
            continue
        ranked = sorted(pos.items(), key=lambda item: -item[1].logprob)[:k]
        for col, (token, lp) in enumerate(ranked):
            if math.isfinite(lp.logprob):
                ids[row, col], values[row, col] = token, lp.logprob
    return ids, values


def _prompt_scores(
    request: SampleRequest, prompt: list[int], scored: list[Any] | None
) -> dict[str, object]:
    """The ``SampleResult`` prompt fields from vLLM's prompt logprobs (position 0 is None)."""
    if scored is None:
        return {}
    n = len(prompt)
    last_n = request.prompt_logprobs_last_n
    first = n - last_n if last_n is not None else 1  # first prompt token reported, >= 1
    out: dict[str, object] = {}
    if request.prompt_logprobs:
        logprobs = np.full(n, np.nan, dtype=np.float32)
        for i in range(first, n):
            logprobs[i] = scored[i][prompt[i]].logprob
        out["prompt_logprobs"] = Tensor.from_numpy(logprobs)
    k = request.topk_prompt_logprobs
    if k:
        ids, values = _topk_rows([None] * first + list(scored[first:]), k)
        out["topk_prompt_logprobs"] = TopkLogprobs(
            token_ids=Tensor.from_numpy(ids), logprobs=Tensor.from_numpy(values)
        )
    return out


def _zero_adapter(directory: Path, config: dict[str, Any]) -> str:
    """A PEFT adapter whose factors are zero, on one projection of the first layer (vLLM gives
    every other module of its slot zeros too): the base model, as a LoRA. Its directory."""
    hidden = int(config["hidden_size"])
    rank = 8
    (directory / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": rank,
                "lora_dropout": 0.0,
                "bias": "none",
                "target_modules": ["o_proj"],
            }
        )
    )
    heads = int(config["num_attention_heads"])
    width = int(config.get("head_dim") or hidden // heads) * heads
    prefix = "base_model.model.model.layers.0.self_attn.o_proj"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.zeros(rank, width),
            f"{prefix}.lora_B.weight": torch.zeros(hidden, rank),
        },
        str(directory / "adapter_model.safetensors"),
    )
    return str(directory)


def _kv_bytes(config: dict[str, Any], dtype: str, tokens: int) -> int:
    """The bytes of a KV cache of ``tokens`` tokens for this config (keys and values, every
    layer), the size vLLM's CPU backend is given instead of a share of free memory."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    itemsize = 4 if dtype == "float32" else 2
    return 2 * int(config["num_hidden_layers"]) * kv_heads * head_dim * itemsize * tokens
