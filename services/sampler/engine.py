"""Whetstone's generation engine: continuous batching over many LoRA adapters, a paged KV cache.

Two ways in, one engine, driven by one thread (it owns no bus code and is not thread-safe):

* :meth:`SamplerEngine.add` queues a request (validated at once) and :meth:`SamplerEngine.step`
  runs one engine step and returns the requests that finished in it: requests join and leave
  between steps, which is what a continuous-batching loop drives;
* :meth:`SamplerEngine.generate` does that for a list of jobs and returns their results in order.

One step:

1. **admit** waiting requests while rows (``max_seqs``) and KV blocks allow. A request's blocks
   are promised at admission for its worst case (prompt + ``max_tokens`` for every sample), so a
   running sequence never waits for memory and nothing is ever preempted. An admitted request
   starts after the longest prefix of its prompt whose full blocks the **prefix cache**
   (``kvcache.PrefixCache``, keyed by weights and tokens) holds from an earlier request
   (``prompt_cache_hit_tokens``); idle cached blocks are evicted when a promise needs them;
2. **prefill** up to ``prefill_tokens`` prompt tokens (chunks of one or more prompts packed in one
   forward; a long prompt takes several steps). A prompt whose last chunk ran is **forked** into
   its ``num_samples`` sequences, which share its full KV blocks (prefill once), and each draws its
   first token from the same last-position logits; its full blocks enter the prefix cache;
3. **decode** one token for every running sequence in one forward (a CUDA graph per batch and
   context bucket on GPU, the same function eagerly on CPU) and sample it on the device; then read
   back the *previous* step's tokens and retire the sequences that hit a stop token, a stop string
   or ``max_tokens``. The host's bookkeeping thus overlaps the device's next step, and a step's
   input tokens never travel through the host (``_decode``); inputs are staged through pinned
   memory, so nothing on the way waits for the device. The same code runs on CPU.

Every adapter of a batch is applied in the same forward (``weights.AdapterSlots``): rows need
not be grouped by adapter, so sequences come and go freely, and however many adapters are
resident a step reads only those of its batch.
Seeded requests draw every uniform they will need at admission from their own
``torch.Generator`` (row ``i`` of a ``[num_samples, max_tokens]`` draw for sample ``i``), so
their output does not depend on their neighbours or on when they were scheduled. Logprobs are
those of the distribution actually sampled (``sampling``'s docstring).

The module runs past 600 lines because admission, prefill, decode and retirement share one
request/sequence state and one block accounting; what can stand alone lives beside it: prompt
scores (``prompt_scores``), the prefix cache and allocator (``kvcache``), token draws
(``sampling``), the decoder (``model``).
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedModel

from services.sampler.checks import checked_prompt
from services.sampler.graphs import DecodeGraphs
from services.sampler.kvcache import BlockAllocator, CacheShape, PagedKVCache, PrefixCache
from services.sampler.model import DecodeBatch, ModelLora, PrefillBatch
from services.sampler.prompt_scores import PromptScores
from services.sampler.sampling import SamplingRows, sample, sampled_topk
from services.sampler.weights import (
    AdapterSlots,
    ResidentAdapters,
    decoder_from_hf,
    resident_from_hf,
)
from whetstone.errors import UserError, WhetstoneError
from whetstone.messages import (
    TOPK_EMPTY_LOGPROB,
    SampledSequence,
    SampleRequest,
    SampleResult,
    TopkLogprobs,
)
from whetstone.models.registry import ModelSpec
from whetstone.tensors import Tensor
from whetstone_ml.loading import load_base_model, local_model_dir, torch_dtype
from whetstone_ml.lora import LoraAdapter

# Tokens that end a turn in ChatML-style tokenizers, on top of the tokenizer's own eos token.
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
# Prompt positions whose full-vocabulary logits are materialised at once when scoring a prompt.
SCORE_ROWS = 256


@dataclass
class _Request:
    """One admitted or waiting request and what its samples have produced so far."""

    handle: int
    request: SampleRequest
    adapter_id: str | None
    prompt: list[int]
    stop_ids: frozenset[int]
    uniforms: np.ndarray  # [num_samples, max(1, max_tokens)] float32, drawn at admission
    promised_blocks: int
    blocks: list[int] = field(default_factory=list)  # the prompt's KV, until the fork
    prefilled: int = 0
    scores: PromptScores | None = None  # what it asked of its prompt (prompt_scores)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prefix_keys: list[bytes] = field(default_factory=list)  # its full blocks' cache keys
    sequences: list[SampledSequence | None] = field(default_factory=list)


@dataclass
class _Seq:
    """One sample being decoded: its KV blocks, how many tokens they hold, what it sampled."""

    req: _Request
    index: int
    blocks: list[int]
    length: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    topk: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # per token
    issued: int = 0  # tokens drawn on the device so far (``tokens`` lags while a draw is out)
    done: bool = False  # retired: a row of it still in flight is dropped


@dataclass
class _Draw:
    """Tokens drawn on the device for ``seqs`` (in row order), on their way to the host.

    ``tokens`` stays on the device as the next decode step's input; ``host`` (tokens and
    logprobs, float64: token ids are exact) and ``topk`` are copies the host reads once
    ``ready`` has passed, so the device runs on meanwhile."""

    seqs: list[_Seq]
    tokens: torch.Tensor  # [B] long, on the device
    host: torch.Tensor  # [2, B] float64
    topk: torch.Tensor | None  # [2, B, k] float64: ids, logprobs
    ready: torch.cuda.Event | None


class SamplerEngine:
    """A Qwen3 base model, a tokenizer (stop strings, EOS), a paged KV cache, an LRU of adapters.

    ``max_adapters`` bounds the resident adapters (least recently used evicted), so a caller must
    :meth:`ensure_adapter` every adapter of its requests right before adding them. ``dtype`` is
    the weights' (adapters are cast to it); sampling runs in float32 on the logits.
    ``max_seqs`` bounds the sequences decoded together, ``kv_cache_tokens`` the cache,
    ``prefill_tokens`` the prompt tokens run per step, ``cuda_graphs`` (default: on for CUDA)
    captures the decode step, ``decode_attention`` picks ``"sdpa"`` (gathered blocks, the
    CPU's) or ``"triton"`` (the paged kernel of ``paged_attention``, CUDA's default);
    ``compile_decode`` (default: on with CUDA graphs) ``torch.compile``s the graphed step's layer
    bodies (``model.decode_fns``) and those of prefills without LoRA (``model.prefill_fns``); CPU
    and eager steps run the same functions uncompiled.
    ``adapter_slots`` (default ``min(max_seqs, max_adapters)``) bounds the distinct adapters of
    one decode batch per rank class (``weights.AdapterSlots``); admission keeps to it.
    """

    def __init__(
        self,
        model_dir: Path | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        max_adapters: int = 32,
        context_length: int | None = None,
        *,
        model: PreTrainedModel | None = None,
        tokenizer_dir: Path | None = None,
        max_seqs: int = 256,
        kv_cache_tokens: int = 65_536,
        block_size: int = 16,
        prefill_tokens: int = 8192,
        cuda_graphs: bool | None = None,
        decode_attention: str | None = None,
        prefix_cache_blocks: int | None = None,
        compile_decode: bool | None = None,
        adapter_slots: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.max_adapters = max_adapters
        if model is None:
            assert model_dir is not None, "give a model directory or a loaded model"
            model = load_base_model(model_dir, self.dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir))
        self.config = model.config
        self.vocab_size = int(model.config.vocab_size)
        self.context_length = context_length or int(model.config.max_position_embeddings)
        self.model = decoder_from_hf(model, self.context_length)
        self.resident = resident_from_hf(model)
        del model  # the decoder holds every weight it needs (q/k/v and gate/up fused copies)
        vocab = self.tokenizer.get_vocab()
        eos = {vocab[t] for t in EOS_TOKENS if t in vocab}
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_ids = sorted(eos)
        self._adapters: OrderedDict[str, Path] = OrderedDict()

        s = self.model.shape
        self.max_seqs = max_seqs
        self.prefill_tokens = prefill_tokens
        self.block_size = block_size
        num_blocks = math.ceil(kv_cache_tokens / block_size) + 1  # + the scratch block
        self.cache = PagedKVCache(
            CacheShape(s.layers, s.kv_heads, s.head_dim, block_size, num_blocks),
            self.dtype,
            self.device,
        )
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # The Triton paged kernel on CUDA (tests/gpu checks it against float64 and the CPU path).
        self.decode_attention = decode_attention or (
            "triton" if self.device.type == "cuda" else "sdpa"
        )
        self.compile_decode = self.cuda_graphs if compile_decode is None else compile_decode
        self.slots = AdapterSlots(
            self.resident,
            s,
            adapter_slots or min(max_seqs, max_adapters),
            self.dtype,
            self.device,
        )
        self._slots_version = self.slots.version
        self._graphs: DecodeGraphs | None = None
        self._waiting: deque[_Request] = deque()
        self._prefilling: list[_Request] = []
        self._running: list[_Seq] = []
        self._pending: _Draw | None = None  # the decode step in flight, not read back yet
        self._free_blocks = num_blocks - 1  # not promised to any admitted request
        self._free_rows = max_seqs
        self._next_handle = 0
        # Full prompt blocks kept for later requests (default: up to half the cache).
        self.prefix = PrefixCache(
            self.cache, num_blocks // 2 if prefix_cache_blocks is None else prefix_cache_blocks
        )
        self._loads: dict[str, int] = {}  # adapter -> which load of it (the prefix cache's key)
        self._load_count = 0

    @classmethod
    def from_spec(
        cls,
        spec: ModelSpec,
        *,
        device: str | None = None,
        max_adapters: int = 32,
        prefix_cache_blocks: int | None = None,
    ) -> SamplerEngine:
        """The engine for a registry entry: its directory (the built-in model is generated there
        if missing), dtype, device and context length. ``device`` overrides the registry's."""
        if device:
            spec = spec.on_device(device)
        return cls(
            local_model_dir(spec),
            device=spec.device,
            dtype=spec.dtype,
            max_adapters=max_adapters,
            context_length=spec.context_length,
            prefix_cache_blocks=prefix_cache_blocks,
        )

    @property
    def lora(self) -> ResidentAdapters:
        return self.resident

    # ------------------------------------------------------------------------------ adapters

    def ensure_adapter(self, adapter_id: str, directory: Path) -> None:
        """Load the PEFT adapter in ``directory`` as ``adapter_id`` unless it is resident already.

        An adapter whose modules or shapes do not fit the base model is a ``UserError``: it came
        from a client's checkpoint, not from us. Loading reads only the adapter's own factors;
        evicting one drops them (and its decode slot, if it had one).
        """
        if adapter_id in self._adapters:
            self._adapters.move_to_end(adapter_id)
            return
        adapter = LoraAdapter.load_peft(Path(directory), device=self.device, dtype=self.dtype)
        for name, f in adapter.factors.items():
            module = self.resident.layers.get(name)
            if module is None:
                raise UserError(
                    f"adapter {adapter_id!r} targets {name!r}, absent from the base model"
                )
            if f.a.shape[1] != module.in_features or f.b.shape[0] != module.out_features:
                raise UserError(f"adapter {adapter_id!r} does not fit the shape of {name!r}")
        self.resident.add(adapter_id, adapter.factors)  # refuses a rank above the largest class
        self._adapters[adapter_id] = Path(directory)
        self._load_count += 1
        self._loads[adapter_id] = self._load_count  # blocks cached under an earlier load: stale
        # An adapter a queued or running request needs is never evicted.
        busy = {r.adapter_id for r in (*self._waiting, *self._prefilling)}
        busy |= {q.req.adapter_id for q in self._running}
        while len(self._adapters) > self.max_adapters:
            evicted = next((a for a in self._adapters if a not in busy), None)
            if evicted is None:
                break  # every resident adapter is in use; shrink once they finish
            del self._adapters[evicted]
            self.resident.remove(evicted)
            self.slots.drop(evicted)

    # ------------------------------------------------------------------------------ validation

    def _validate(self, request: SampleRequest, adapter_id: str | None) -> _Request:
        """Reject what the client can fix before any compute is spent on it."""
        p = request.params
        prompt = checked_prompt(
            request,
            vocab_size=self.vocab_size,
            context_length=self.context_length,
            max_seqs=self.max_seqs,
        )
        n = request.num_samples
        if adapter_id is not None and adapter_id not in self._adapters:
            # The handler forgot ensure_adapter (or it was evicted): our fault, not the client's.
            raise WhetstoneError(f"adapter {adapter_id!r} is not loaded")
        promised = self._blocks_needed(len(prompt), p.max_tokens, n)
        if promised > self.cache.shape.num_blocks - 1:
            raise UserError("prompt, max_tokens and num_samples exceed this sampler's KV cache")
        target = request.target_prompt_logprobs
        if target is not None:
            ids = target.to_numpy()
            if ids.size and (ids.min() < -1 or ids.max() >= self.vocab_size):
                raise UserError(
                    "target_prompt_logprobs holds token ids outside the vocabulary "
                    f"[0, {self.vocab_size}) (-1: nothing requested)"
                )
        stop_ids = frozenset(list(p.stop_token_ids) + (self.eos_ids if p.stop_on_eos else []))
        gen = torch.Generator()
        if p.seed is None:
            gen.seed()
        else:
            gen.manual_seed(p.seed)
        uniforms = torch.rand(n, max(1, p.max_tokens), generator=gen).numpy()
        scores = PromptScores.of(request, prompt, gen)  # its draws after the samples'
        handle, self._next_handle = self._next_handle, self._next_handle + 1
        return _Request(
            handle, request, adapter_id, prompt, stop_ids, uniforms, promised,
            scores=scores if scores.wanted else None, sequences=[None] * n,
        )  # fmt: skip

    def _blocks_needed(self, prompt: int, max_tokens: int, samples: int) -> int:
        """Worst case: sample 0 keeps the prompt's blocks, the others share its full ones."""
        bs = self.block_size
        per_seq = math.ceil((prompt + max(max_tokens - 1, 0)) / bs)
        return per_seq + (samples - 1) * (per_seq - prompt // bs)

    # ------------------------------------------------------------------------------ the loop

    def add(self, request: SampleRequest, adapter_id: str | None) -> int:
        """Queue ``request``; its handle comes back from :meth:`step` with its result."""
        req = self._validate(request, adapter_id)
        if adapter_id is not None:
            self._adapters.move_to_end(adapter_id)
        self._waiting.append(req)
        return req.handle

    def abort(self) -> list[int]:
        """Drop every request in flight (after a failed step) and free their blocks and rows;
        their handles."""
        handles = [r.handle for r in (*self._waiting, *self._prefilling)]
        handles += list(dict.fromkeys(q.req.handle for q in self._running))
        shape = self.cache.shape
        self.cache.allocator = BlockAllocator(shape.num_blocks)
        self.prefix.clear()
        self._waiting.clear()
        self._prefilling, self._running, self._pending = [], [], None
        self._free_blocks, self._free_rows = shape.num_blocks - 1, self.max_seqs
        return handles

    def cancel(self, handles: set[int]) -> list[int]:
        """Drop the requests ``handles`` wherever they are (waiting, prefilling or decoding):
        their rows and KV blocks are free for the next step and their results never come back
        (a row of theirs in the decode step in flight is dropped when it is read). The handles
        found."""
        found: list[int] = []
        kept = deque(r for r in self._waiting if r.handle not in handles)
        found += [r.handle for r in self._waiting if r.handle in handles]
        self._waiting = kept
        for req in [r for r in self._prefilling if r.handle in handles]:
            self.cache.allocator.release(req.blocks)
            req.blocks = []
            self._free_rows += req.request.num_samples
            self._free_blocks += req.promised_blocks
            found.append(req.handle)
        self._prefilling = [r for r in self._prefilling if r.handle not in handles]
        cancelled: dict[int, _Request] = {}
        for seq in self._running:
            if seq.req.handle in handles:
                self._release(seq)
                cancelled[seq.req.handle] = seq.req
        for req in cancelled.values():  # samples that had retired freed their rows already
            self._free_blocks += req.promised_blocks
            found.append(req.handle)
        self._running = [q for q in self._running if not q.done]
        return found

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running or self._pending)

    @property
    def num_waiting(self) -> int:
        """Requests added but not admitted yet (no rows or KV blocks for them so far)."""
        return len(self._waiting)

    @torch.inference_mode()
    def step(self) -> list[tuple[int, SampleResult]]:
        """Admit, prefill one chunk budget, decode one token: the requests that finished."""
        finished: list[tuple[int, SampleResult]] = []
        while self._waiting:
            req = self._waiting[0]
            n = req.request.num_samples
            if n > self._free_rows or not self._room_for(req.promised_blocks):
                break
            if not self._slot_for(req.adapter_id):
                break
            self._waiting.popleft()
            self._free_rows -= n
            self._free_blocks -= req.promised_blocks
            self._reuse_prefix(req)
            self._prefilling.append(req)
        if self._prefilling:
            self._prefill(finished)
        if self._running or self._pending is not None:
            self._decode(finished)
        return finished

    @torch.inference_mode()
    def generate(self, jobs: list[tuple[SampleRequest, str | None]]) -> list[SampleResult]:
        """Sample every request of ``jobs`` together; results in ``jobs`` order. Every request is
        validated before any runs, so one bad request fails the call before compute is spent."""
        assert not self.has_work, "generate() needs an idle engine; use add()/step() instead"
        checked = [self._validate(request, adapter_id) for request, adapter_id in jobs]
        for req in checked:
            if req.adapter_id is not None:
                self._adapters.move_to_end(req.adapter_id)
        self._waiting.extend(checked)
        results: dict[int, SampleResult] = {}
        while self.has_work:
            results.update(self.step())
        return [results[req.handle] for req in checked]

    # ------------------------------------------------------------------------------ prefix cache

    def _room_for(self, blocks: int) -> bool:
        """Whether ``blocks`` more can be promised, evicting idle cached blocks if need be.

        Promises are never reduced by prefix hits, so the blocks not promised to anyone are
        free or idle in the prefix cache: evicting idle ones is always enough to keep a promise.
        """
        if blocks <= self._free_blocks - len(self.prefix):
            return True  # room even if every cached block were idle
        if blocks > self._free_blocks:
            return False
        short = blocks - (self._free_blocks - self.prefix.idle())
        if short > 0:
            self.prefix.evict_idle(short)
        return True

    def _slot_for(self, adapter: str | None) -> bool:
        """Whether the admitted requests and one of ``adapter`` fit the decode slots of its rank
        class (``adapter_slots`` distinct adapters)."""
        if adapter is None:
            return True
        rank = self.resident.rank_class[adapter]
        admitted = {r.adapter_id for r in self._prefilling} | {
            q.req.adapter_id for q in self._running
        }
        same = {a for a in admitted if a is not None and self.resident.rank_class[a] == rank}
        return adapter in same or len(same) < self.slots.capacity

    def _admitted_adapters(self) -> set[str | None]:
        """Adapters of the requests admitted so far (their decode slots are kept)."""
        admitted = {r.adapter_id for r in self._prefilling}
        return admitted | {q.req.adapter_id for q in self._running}

    def _reuse_prefix(self, req: _Request) -> None:
        """Start the request's prefill after the longest cached prefix of its prompt that it may
        skip: never its last token (its logits start the sampling), nor a position it scores."""
        adapter = req.adapter_id
        weights = "" if adapter is None else f"{adapter}#{self._loads[adapter]}"
        req.prefix_keys = self.prefix.keys(weights, req.prompt)
        limit = len(req.prompt) - 1
        if req.scores is not None:
            limit = min(limit, req.scores.first_position)
        req.blocks = self.prefix.lookup(req.prefix_keys[: limit // self.block_size])
        req.prefilled = req.cached_tokens = len(req.blocks) * self.block_size

    # ------------------------------------------------------------------------------ prefill

    def _prefill(self, finished: list[tuple[int, SampleResult]]) -> None:
        budget = self.prefill_tokens
        picked: list[tuple[_Request, int, int]] = []
        for req in self._prefilling:
            if budget <= 0:
                break
            start = req.prefilled
            stop = min(len(req.prompt), start + budget)
            picked.append((req, start, stop))
            budget -= stop - start
        # Packed by adapter (stable): one LoRA run per adapter, not one per request, so a batch
        # of requests over a few adapters costs a few GEMM pairs per projection.
        picked.sort(key=lambda chunk: chunk[0].adapter_id or "")
        bs, dev = self.block_size, self.device
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        adapters: list[str | None] = []
        chunks = []
        for req, start, stop in picked:
            while len(req.blocks) * bs < stop:
                req.blocks.append(self.cache.allocator.allocate())
            row = len(ids)
            ids += req.prompt[start:stop]
            positions += range(start, stop)
            slots += self.cache.slots(req.blocks, start, stop)
            adapters += [req.adapter_id] * (stop - start)
            table = torch.tensor(req.blocks[: math.ceil(stop / bs)], device=dev)
            chunks.append((row, len(ids), start, table))
        lora = self._prefill_lora(
            [
                (row, stop, req.adapter_id)
                for (req, _, _), (row, stop, _, _) in zip(picked, chunks, strict=True)
            ]
        )
        hidden = self.model.forward(
            torch.tensor(ids, device=dev),
            torch.tensor(positions, device=dev),
            self.cache,
            PrefillBatch(torch.tensor(slots, device=dev), chunks),
            lora,
            compiled=self.compile_decode and lora is None,
        )
        done: list[tuple[_Request, int]] = []
        for (req, start, stop), (row, _, _, _) in zip(picked, chunks, strict=True):
            if req.scores is not None:
                self._score_prompt(req, req.scores, hidden, row, start, stop)
            req.prefilled = stop
            if stop == len(req.prompt):
                self.prefix.insert(req.prefix_keys, req.blocks)
                done.append((req, row + stop - start - 1))
        self._prefilling = [r for r in self._prefilling if r.prefilled < len(r.prompt)]
        if not done:
            return
        rows = [row for _, row in done]
        lora = self._prefill_lora([(i, i + 1, adapters[r]) for i, r in enumerate(rows)])
        logits = self.model.logits(hidden[rows], lora)
        forked: list[_Seq] = []
        forked_rows: list[int] = []
        for i, (req, _) in enumerate(done):
            n = len(req.prompt)
            seqs = [
                _Seq(req, k, req.blocks if k == 0 else self.cache.fork(req.blocks, n), n)
                for k in range(req.request.num_samples)
            ]
            req.blocks = []
            forked += seqs
            forked_rows += [i] * len(seqs)
        self._start(forked, logits[forked_rows], finished)

    def _score_prompt(
        self,
        req: _Request,
        scores: PromptScores,
        hidden: torch.Tensor,
        row: int,
        start: int,
        stop: int,
    ) -> None:
        """The prompt scores of this chunk's positions (``prompt_scores``), ``SCORE_ROWS``
        positions' logits at a time."""
        lo, hi = max(start, scores.first_position), min(stop, len(req.prompt) - 1)
        for a in range(lo, hi, SCORE_ROWS):
            b = min(hi, a + SCORE_ROWS)
            lora = self._prefill_lora([(0, b - a, req.adapter_id)])
            scores.score(self.model.logits(hidden[row + a - start : row + b - start], lora), a)

    # ------------------------------------------------------------------------------ decode

    def _decode(self, finished: list[tuple[int, SampleResult]]) -> None:
        """Launch one decode step for every running sequence that still needs a token, then read
        back the step before it: the host's bookkeeping for step N (stop checks, results) runs
        while the device computes step N + 1, whose input tokens never leave the device.

        A sequence that step N stops (a stop token or string) was already launched in step
        N + 1; that row's KV write lands in its own released block (stream order puts any later
        use of the block after it) and its draw is dropped. Seeded draws are unchanged: the
        uniform of token ``i`` is the request's ``i``-th, whenever it is drawn.
        """
        prev, self._pending = self._pending, None
        seqs = [q for q in self._running if q.issued < q.req.request.params.max_tokens]
        if seqs:
            self._pending = self._draw(seqs, self._decode_logits(seqs, prev))
        if prev is not None:
            self._record(prev, finished)

    def _decode_logits(self, seqs: list[_Seq], prev: _Draw | None) -> torch.Tensor:
        """One decode step's logits for ``seqs``; inputs are staged without waiting for the
        device, and a token still in ``prev`` is taken from the device."""
        bs = self.block_size
        for seq in seqs:  # the block for the token fed now
            if seq.length // bs == len(seq.blocks):
                seq.blocks.append(self.cache.allocator.allocate())
        b = len(seqs)
        positions = np.fromiter((seq.length for seq in seqs), np.int64, b)
        n_blocks = int(positions.max()) // bs + 1
        table = np.zeros((b, n_blocks), dtype=np.int64)
        for row, seq in enumerate(seqs):
            table[row, : len(seq.blocks)] = seq.blocks[:n_blocks]
        in_prev = {id(q): i for i, q in enumerate(prev.seqs)} if prev is not None else {}
        src = np.full(b, -1, dtype=np.int64)  # row of ``prev`` holding the input token
        host_ids = np.zeros(b, dtype=np.int64)
        for row, seq in enumerate(seqs):
            if len(seq.tokens) == seq.issued:
                host_ids[row] = seq.tokens[-1]
            else:
                src[row] = in_prev[id(seq)]  # one draw at most is out at a time
        inputs = self._to_device(
            np.stack(
                [
                    host_ids,
                    positions,
                    table[np.arange(b), positions // bs] * bs + positions % bs,
                    positions + 1,
                    src,
                ]
            )
        )
        ids = inputs[0]
        if prev is not None and (src >= 0).any():
            ids = torch.where(inputs[4] >= 0, prev.tokens[inputs[4].clamp(min=0)], ids)
        table_t = self._to_device(table)
        lora_rows = self.slots.rows([seq.req.adapter_id for seq in seqs], self._admitted_adapters())
        if self.slots.version != self._slots_version:  # new stacks: the graphs' addresses are stale
            if self._graphs is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # no replay of them may still be running
            self._graphs, self._slots_version = None, self.slots.version
        for seq in seqs:
            seq.length += 1
        if self.cuda_graphs:
            if self._graphs is None:
                self._graphs = DecodeGraphs(
                    self.model,
                    self.cache,
                    self.slots,
                    self.max_seqs,
                    self._max_blocks,
                    self.decode_attention,
                    self.compile_decode,
                )
            return self._graphs.run(ids, inputs[1], inputs[2], table_t, inputs[3], lora_rows)
        batch = DecodeBatch(inputs[2], table_t, inputs[3], self.decode_attention)
        lora = None
        if lora_rows is not None:
            row_slots = {
                rank: self._to_device(np.asarray(slots, dtype=np.int64))
                for rank, slots in lora_rows.slots.items()
            }
            lora = self.slots.model_lora(lora_rows, row_slots)
        hidden = self.model.forward(ids, inputs[1], self.cache, batch, lora)
        return self.model.logits(hidden, lora)

    @property
    def _max_blocks(self) -> int:
        return math.ceil(self.context_length / self.block_size)

    def _prefill_lora(self, runs: list[tuple[int, int, str | None]]) -> ModelLora | None:
        """Prefill's LoRA for rows ``[start, stop)`` of each adapter (``None``: base model),
        consecutive runs of one adapter merged."""
        merged: list[tuple[int, int, str]] = []
        for start, stop, adapter in runs:
            if adapter is None:
                continue
            if merged and merged[-1][2] == adapter and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], stop, adapter)
            else:
                merged.append((start, stop, adapter))
        return self.slots.prefill_lora(merged, self._admitted_adapters())

    # ------------------------------------------------------------------------------ device I/O

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        """``array`` on the engine's device, staged through pinned memory so that the host does
        not wait for the device (torch's pinned allocator keeps the staging buffer until the
        copy has run)."""
        t = torch.from_numpy(array)
        if self.device.type != "cuda":
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        """A host copy of ``t`` that is complete once an event recorded after it has passed."""
        if t.device.type != "cuda":
            return t
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return out.copy_(t, non_blocking=True)

    # ------------------------------------------------------------------------------ sampling

    def _start(
        self, seqs: list[_Seq], logits: torch.Tensor, finished: list[tuple[int, SampleResult]]
    ) -> None:
        """Forked sequences' first tokens from their prompt's logits, drawn and recorded at
        once; a ``max_tokens=0`` request's samples retire without a draw."""
        live = [seq for seq in seqs if seq.req.request.params.max_tokens > 0]
        for seq in seqs:
            if seq.req.request.params.max_tokens == 0:
                self._retire(seq, stopped=False, finished=finished)
        if not live:
            return
        if len(live) < len(seqs):
            logits = logits[[i for i, seq in enumerate(seqs) if not seq.done]]
        self._running += live
        self._record(self._draw(live, logits), finished)

    def _draw(self, seqs: list[_Seq], logits: torch.Tensor) -> _Draw:
        """Draw each sequence's next token on the device and start copying it to the host."""
        rows = self._sampling_rows(seqs)
        tokens_t, logprobs_t = sample(logits, rows)
        host = self._to_host(torch.stack([tokens_t.double(), logprobs_t.double()]))
        ks = [seq.req.request.topk_sample_logprobs for seq in seqs]
        topk = None
        if any(ks):
            top_ids, top_logprobs = sampled_topk(logits, rows, max(ks))
            topk = self._to_host(torch.stack([top_ids.double(), top_logprobs.double()]))
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        for seq in seqs:
            seq.issued += 1
        return _Draw(seqs, tokens_t, host, topk, ready)

    def _record(self, draw: _Draw, finished: list[tuple[int, SampleResult]]) -> None:
        """Wait for ``draw``'s copy, append each live row's token, retire the ones that stop."""
        if draw.ready is not None:
            draw.ready.synchronize()
        host = draw.host.numpy()
        top = draw.topk.numpy() if draw.topk is not None else None
        retired = False
        for i, seq in enumerate(draw.seqs):
            if seq.done:
                continue  # stopped by the draw before this one
            p = seq.req.request.params
            token = int(host[0, i])
            seq.tokens.append(token)
            seq.logprobs.append(float(host[1, i]))
            k = seq.req.request.topk_sample_logprobs
            if k and top is not None:
                ids, values = top[0, i, :k].astype(np.int64), top[1, i, :k].astype(np.float32)
                cut = ~np.isfinite(values)  # removed by top-k/top-p: an empty cell
                ids[cut], values[cut] = 0, TOPK_EMPTY_LOGPROB
                seq.topk.append((ids, values))
            stopped = token in seq.req.stop_ids or self._hits_stop_string(seq, p.stop_strings)
            if stopped or len(seq.tokens) >= p.max_tokens:
                self._retire(seq, stopped=stopped, finished=finished)
                retired = True
        if retired:
            self._running = [q for q in self._running if not q.done]

    def _sampling_rows(self, seqs: list[_Seq]) -> SamplingRows:
        vocab = self.vocab_size
        params = [seq.req.request.params for seq in seqs]
        temperature = [p.temperature for p in params]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        greedy = [t == 0 for t in temperature]
        uniforms = [float(seq.req.uniforms[seq.index, seq.issued]) for seq in seqs]
        floats = self._to_device(
            np.array(
                [[t if t > 0 else 1.0 for t in temperature], top_p, uniforms, top_k, greedy],
                dtype=np.float64,
            )
        )
        finite_k = [k for k in top_k if k < vocab]
        return SamplingRows(
            temperature=floats[0].float(),
            greedy=floats[4] > 0,
            top_k=floats[3].long(),
            top_p=floats[1].float(),
            uniforms=floats[2].float(),
            any_greedy=any(greedy),
            all_greedy=all(greedy),
            any_truncated=any(k < vocab or p < 1 for k, p in zip(top_k, top_p, strict=True)),
            max_top_k=max(finite_k, default=0),
        )

    def _hits_stop_string(self, seq: _Seq, strings: list[str]) -> bool:
        """Whether the newest token completes a stop string (which may span token boundaries).

        Only the tail is decoded: a string of ``c`` characters spans at most ``4c`` byte-level
        tokens, and an earlier occurrence would have stopped the row already. Special tokens are
        kept in the text so that ``stop=["<|im_end|>"]`` works as a string.
        """
        if not strings:
            return False
        window = 4 * max(len(s) for s in strings) + 2
        text = self.tokenizer.decode(seq.tokens[-window:], skip_special_tokens=False)
        return any(s and s in text for s in strings)

    def _release(self, seq: _Seq) -> None:
        """Free the sequence's KV blocks and row; a row of it still in flight is dropped."""
        self.cache.allocator.release(seq.blocks)
        seq.blocks, seq.done = [], True
        self._free_rows += 1

    def _retire(
        self, seq: _Seq, *, stopped: bool, finished: list[tuple[int, SampleResult]]
    ) -> None:
        req = seq.req
        self._release(seq)
        k = req.request.topk_sample_logprobs
        topk = None
        if k:
            rows = len(seq.topk)
            topk = TopkLogprobs(
                token_ids=Tensor.from_numpy(
                    np.stack([i for i, _ in seq.topk]) if rows else np.zeros((0, k), np.int64)
                ),
                logprobs=Tensor.from_numpy(
                    np.stack([v for _, v in seq.topk]) if rows else np.zeros((0, k), np.float32)
                ),
            )
        req.sequences[seq.index] = SampledSequence(
            tokens=Tensor.from_numpy(np.asarray(seq.tokens, dtype=np.int64)),
            logprobs=Tensor.from_numpy(np.asarray(seq.logprobs, dtype=np.float32)),
            stop_reason="stop" if stopped else "length",
            topk_logprobs=topk,
        )
        if all(s is not None for s in req.sequences):
            self._free_blocks += req.promised_blocks
            scores = req.scores.result(req.request.target_prompt_csr) if req.scores else {}
            result = SampleResult(
                sequences=[s for s in req.sequences if s is not None],
                prompt_cache_hit_tokens=req.cached_tokens,
                **scores,  # type: ignore[arg-type]
            )
            finished.append((req.handle, result))
