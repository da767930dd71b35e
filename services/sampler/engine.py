"""Whetstone's generation engine: one base model, many LoRA adapters, one batched decode.

The sampler's handlers call :meth:`SamplerEngine.generate` from a worker thread with every
``SampleRequest`` they have gathered, each paired with the adapter id to sample with (``None``:
the base model). Every sequence of every request (``num_samples`` rows per request) goes through
the same forward passes:

* rows are grouped by adapter so each adapter owns a contiguous block of the batch, the layout
  ``LoraModel.route`` needs to apply many adapters in one pass;
* prompts are left-padded, so the last column is every row's newest token, and run with an
  attention mask plus explicit ``position_ids`` (padding must not shift the rotary positions);
* one prefill fills a ``DynamicCache``; each decode step then feeds only the newest token.
  Finished rows stay in the batch (their outputs are ignored) so the adapter segments never move.

Sampling is vectorised over rows; the only per-request Python in the loop draws that request's
uniforms from its own ``torch.Generator`` (same seed, same request, same batch -> same output)
and checks stop strings, which needs the decoded text. The engine owns no bus code, is not
thread-safe, and is meant to be driven by one thread.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, DynamicCache

from whetstone.errors import UserError, WhetstoneError
from whetstone.messages import SampledSequence, SampleRequest, SampleResult
from whetstone.models.registry import ModelSpec
from whetstone.tensors import Tensor
from whetstone_ml.loading import load_base_model, local_model_dir, torch_dtype
from whetstone_ml.lora import LoraAdapter, LoraModel, Segment

# Tokens that end a turn in ChatML-style tokenizers, on top of the tokenizer's own eos token.
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class _Job:
    """One validated request: its prompt as a Python list, its adapter and its stop tokens."""

    request: SampleRequest
    adapter_id: str | None
    prompt: list[int]
    stop_ids: list[int]


class SamplerEngine:
    """A base model wrapped in ``LoraModel``, a tokenizer (for stop strings) and an LRU of adapters.

    ``max_adapters`` bounds how many adapters stay resident; the least recently used one is
    unloaded when a new one arrives, so a handler must call :meth:`ensure_adapter` for every
    adapter of a batch right before :meth:`generate`.

    ``dtype`` (a torch dtype or its registry name) is the base weights' dtype; adapters are cast
    to it when loaded, and sampling and logprobs run in float32 on the logits. ``context_length``
    defaults to the config's ``max_position_embeddings``. :meth:`from_spec` builds one from a
    registry entry.
    """

    def __init__(
        self,
        model_dir: Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = torch.float32,
        max_adapters: int = 32,
        context_length: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.dtype = torch_dtype(dtype)
        self.max_adapters = max_adapters
        base = load_base_model(model_dir, self.dtype, self.device)
        self.lora = LoraModel(base)
        # Decoder and head are called separately: the prefill then only projects the positions
        # it needs onto the vocabulary (the last one, plus the prompt where logprobs are asked).
        self.decoder = base.get_decoder()
        self.lm_head = base.get_output_embeddings()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.config = base.config
        self.vocab_size = int(base.config.vocab_size)
        self.context_length = context_length or int(base.config.max_position_embeddings)
        vocab = self.tokenizer.get_vocab()
        eos = {vocab[t] for t in EOS_TOKENS if t in vocab}
        if self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        self.eos_ids = sorted(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)
        self._adapters: OrderedDict[str, Path] = OrderedDict()

    @classmethod
    def from_spec(
        cls, spec: ModelSpec, *, device: str | None = None, max_adapters: int = 32
    ) -> SamplerEngine:
        """The engine for a registry entry: its directory (the built-in model is generated there
        if missing), dtype, device and context length. ``device`` overrides the registry's device
        (see ``ModelSpec.on_device`` for what that does to the dtype)."""
        if device:
            spec = spec.on_device(device)
        return cls(
            local_model_dir(spec),
            device=spec.device,
            dtype=spec.dtype,
            max_adapters=max_adapters,
            context_length=spec.context_length,
        )

    # ------------------------------------------------------------------------------ adapters

    def ensure_adapter(self, adapter_id: str, directory: Path) -> None:
        """Load the PEFT adapter in ``directory`` as ``adapter_id`` unless it is resident already.

        An adapter whose modules or shapes do not fit the base model is a ``UserError``: it came
        from a client's checkpoint, not from us.
        """
        if adapter_id in self._adapters:
            self._adapters.move_to_end(adapter_id)
            return
        adapter = LoraAdapter.load_peft(Path(directory), device=self.device, dtype=self.dtype)
        for name, f in adapter.factors.items():
            layer = self.lora.layers.get(name)
            if layer is None:
                raise UserError(
                    f"adapter {adapter_id!r} targets {name!r}, absent from the base model"
                )
            if f.a.shape[1] != layer.base.in_features or f.b.shape[0] != layer.base.out_features:
                raise UserError(f"adapter {adapter_id!r} does not fit the shape of {name!r}")
        self.lora.add(adapter_id, adapter)
        self._adapters[adapter_id] = Path(directory)
        while len(self._adapters) > self.max_adapters:
            evicted, _ = self._adapters.popitem(last=False)
            self.lora.remove(evicted)

    # ------------------------------------------------------------------------------ validation

    def _validate(self, request: SampleRequest, adapter_id: str | None) -> _Job:
        """Reject what the client can fix before any compute is spent on the batch."""
        p = request.params
        prompt = request.prompt.to_numpy().reshape(-1).astype(np.int64).tolist()
        if not prompt:
            raise UserError("prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise UserError(f"prompt holds token ids outside the vocabulary [0, {self.vocab_size})")
        if p.max_tokens < 0:
            raise UserError("max_tokens must not be negative")
        if len(prompt) + p.max_tokens > self.context_length:
            raise UserError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({p.max_tokens}) exceeds the "
                f"context length {self.context_length}"
            )
        if request.num_samples < 1:
            raise UserError("num_samples must be at least 1")
        if not math.isfinite(p.temperature) or p.temperature < 0:
            raise UserError("temperature must be a finite number >= 0")
        if not 0 < p.top_p <= 1:
            raise UserError("top_p must be in (0, 1]")
        if adapter_id is not None and adapter_id not in self._adapters:
            # The handler forgot ensure_adapter (or evicted it within one batch): our fault.
            raise WhetstoneError(f"adapter {adapter_id!r} is not loaded")
        stop_ids = list(p.stop_token_ids) + (self.eos_ids if p.stop_on_eos else [])
        return _Job(request, adapter_id, prompt, stop_ids)

    # ------------------------------------------------------------------------------ generation

    @torch.inference_mode()
    def generate(self, jobs: list[tuple[SampleRequest, str | None]]) -> list[SampleResult]:
        """Sample every request of ``jobs`` in one batched decode; results in ``jobs`` order."""
        if not jobs:
            return []
        checked = [self._validate(request, adapter_id) for request, adapter_id in jobs]
        for job in checked:
            if job.adapter_id is not None:
                self._adapters.move_to_end(job.adapter_id)

        # Row layout: group jobs by adapter (first-seen order), each job's samples adjacent.
        adapters = list(dict.fromkeys(job.adapter_id for job in checked))
        order = [j for a in adapters for j, job in enumerate(checked) if job.adapter_id == a]
        first_row: dict[int, int] = {}  # job index -> its first batch row
        row_job: list[int] = []  # batch row -> job index
        segments: list[Segment] = []
        for j in order:
            job = checked[j]
            first_row[j] = len(row_job)
            row_job += [j] * job.request.num_samples
            if segments and segments[-1].adapter_id == job.adapter_id:
                segments[-1] = Segment(job.adapter_id, segments[-1].start, len(row_job))
            else:
                segments.append(Segment(job.adapter_id, first_row[j], len(row_job)))
        rows = len(row_job)
        dev = self.device

        # Per-row sampling parameters as tensors, so the loop below handles all rows at once.
        def per_row(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor([values[j] for j in row_job], dtype=dtype, device=dev)

        params = [job.request.params for job in checked]
        temperature = per_row([p.temperature for p in params], torch.float32)
        greedy = temperature == 0
        temperature = torch.where(greedy, torch.ones_like(temperature), temperature)
        top_k = per_row([p.top_k if p.top_k > 0 else self.vocab_size for p in params], torch.long)
        top_p = per_row([p.top_p for p in params], torch.float32)
        max_tokens = per_row([p.max_tokens for p in params], torch.long)
        # Stop ids padded with -1 (never a token) into one [rows, width] table.
        width = max(1, max(len(job.stop_ids) for job in checked))
        stop_table = [
            checked[j].stop_ids + [-1] * (width - len(checked[j].stop_ids)) for j in row_job
        ]
        stop_ids = torch.tensor(stop_table, dtype=torch.long, device=dev)
        generators = [self._generator(job.request.params.seed) for job in checked]
        string_rows = [r for r, j in enumerate(row_job) if checked[j].request.params.stop_strings]

        # Left-padded prompts; positions count real tokens only, so padding never shifts RoPE.
        prompt_len = max(len(job.prompt) for job in checked)
        padded = [
            [self.pad_id] * (prompt_len - len(checked[j].prompt)) + checked[j].prompt
            for j in row_job
        ]
        mask = [
            [0] * (prompt_len - len(checked[j].prompt)) + [1] * len(checked[j].prompt)
            for j in row_job
        ]
        input_ids = torch.tensor(padded, dtype=torch.long, device=dev)
        attention = torch.tensor(mask, dtype=torch.long, device=dev)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)

        cache = DynamicCache(config=self.config)
        with self.lora.route.use(segments):
            hidden = self._decode(input_ids, attention, positions, cache)
            logits = self.lm_head(hidden[:, -1]).float()
        prompt_logprobs = {
            j: self._prompt_logprobs(hidden[first_row[j]], job)
            for j, job in enumerate(checked)
            if job.request.prompt_logprobs
        }
        del hidden

        steps = int(max_tokens.max())
        tokens = torch.full((rows, max(steps, 1)), self.pad_id, dtype=torch.long, device=dev)
        logprobs = torch.zeros((rows, max(steps, 1)), dtype=torch.float32, device=dev)
        lengths = torch.zeros(rows, dtype=torch.long, device=dev)
        done = max_tokens == 0
        stopped = torch.zeros(rows, dtype=torch.bool, device=dev)
        for step in range(steps):
            # Logprobs are reported under the temperature-scaled distribution before any
            # truncation; greedy rows (temperature 0) report the temperature-1 distribution.
            scaled = torch.log_softmax(logits / temperature[:, None], dim=-1)
            uniforms = self._uniforms(generators, checked, order)
            sampled = _sample_truncated(scaled, top_k, top_p, uniforms)
            token = torch.where(greedy, logits.argmax(dim=-1), sampled)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)

            active = ~done
            tokens[active, step] = token[active]
            logprobs[active, step] = scaled.gather(-1, token[:, None]).squeeze(-1)[active]
            lengths += active.long()
            hit = (stop_ids == token[:, None]).any(-1) | self._stop_strings(
                string_rows, row_job, checked, tokens, lengths, active
            )
            stopped |= active & hit
            done = done | stopped | (lengths >= max_tokens)
            if bool(done.all()) or step == steps - 1:
                break

            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
            positions = positions[:, -1:] + 1
            with self.lora.route.use(segments):
                hidden = self._decode(token[:, None], attention, positions, cache)
                logits = self.lm_head(hidden[:, -1]).float()

        return self._results(
            checked, first_row, tokens, logprobs, lengths, stopped, prompt_logprobs
        )

    # ------------------------------------------------------------------------------ pieces

    def _decode(
        self,
        input_ids: torch.Tensor,
        attention: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
    ) -> torch.Tensor:
        """Hidden states of the new columns; appends their keys and values to ``cache``."""
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        return out.last_hidden_state

    def _prompt_logprobs(self, hidden_row: torch.Tensor, job: _Job) -> torch.Tensor:
        """log p(prompt[i] | prompt[:i]) at temperature 1 from the prefill's hidden states.

        Only this request's prompt positions are projected onto the vocabulary (one request at a
        time keeps the ``[positions, vocab]`` logits bounded); NaN at position 0 by contract.
        """
        n = len(job.prompt)
        out = torch.full((n,), float("nan"), dtype=torch.float32)
        if n > 1:
            states = hidden_row[-n:-1][None]  # positions that predict prompt[1:]
            with self.lora.route.use([Segment(job.adapter_id, 0, 1)]):
                scores = torch.log_softmax(self.lm_head(states)[0].float(), dim=-1)
            target = torch.tensor(job.prompt[1:], dtype=torch.long, device=scores.device)
            out[1:] = scores.gather(-1, target[:, None]).squeeze(-1).cpu()
        return out

    @staticmethod
    def _generator(seed: int | None) -> torch.Generator:
        """A CPU generator per request, so a seeded request is reproducible whatever the device."""
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        return gen

    def _uniforms(
        self, generators: list[torch.Generator], checked: list[_Job], order: list[int]
    ) -> torch.Tensor:
        """One uniform per row for this step, each request drawing from its own generator.

        Every request draws ``num_samples`` values each step, finished rows included, so its
        stream does not depend on the other requests in the batch.
        """
        draws = [torch.rand(checked[j].request.num_samples, generator=generators[j]) for j in order]
        return torch.cat(draws).to(self.device)

    def _stop_strings(
        self,
        string_rows: list[int],
        row_job: list[int],
        checked: list[_Job],
        tokens: torch.Tensor,
        lengths: torch.Tensor,
        active: torch.Tensor,
    ) -> torch.Tensor:
        """Rows whose newest token completes one of their stop strings.

        Only the tail of each row is decoded: a string of ``c`` characters spans at most ``4c``
        byte-level tokens, and any earlier occurrence would have stopped the row already.
        Special tokens are kept in the text so that ``stop=["<|im_end|>"]`` works as a string.
        """
        hit = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        if not string_rows:
            return hit
        active_list, lengths_list = active.tolist(), lengths.tolist()
        for r in string_rows:
            if not active_list[r]:
                continue
            strings = checked[row_job[r]].request.params.stop_strings
            n = lengths_list[r]
            window = 4 * max(len(s) for s in strings) + 2
            tail = tokens[r, max(0, n - window) : n].tolist()
            text = self.tokenizer.decode(tail, skip_special_tokens=False)
            hit[r] = any(s and s in text for s in strings)
        return hit

    @staticmethod
    def _results(
        checked: list[_Job],
        first_row: dict[int, int],
        tokens: torch.Tensor,
        logprobs: torch.Tensor,
        lengths: torch.Tensor,
        stopped: torch.Tensor,
        prompt_logprobs: dict[int, torch.Tensor],
    ) -> list[SampleResult]:
        token_rows, logprob_rows = tokens.cpu().numpy(), logprobs.cpu().numpy()
        lengths_list, stopped_list = lengths.tolist(), stopped.tolist()
        results = []
        for j, job in enumerate(checked):
            sequences = []
            for r in range(first_row[j], first_row[j] + job.request.num_samples):
                n = lengths_list[r]
                sequences.append(
                    SampledSequence(
                        tokens=Tensor.from_numpy(token_rows[r, :n].astype(np.int64)),
                        logprobs=Tensor.from_numpy(logprob_rows[r, :n].astype(np.float32)),
                        stop_reason="stop" if stopped_list[r] else "length",
                    )
                )
            plp = prompt_logprobs.get(j)
            results.append(
                SampleResult(
                    sequences=sequences,
                    prompt_logprobs=Tensor.from_numpy(plp.numpy()) if plp is not None else None,
                )
            )
        return results


def _sample_truncated(
    scaled_logprobs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor:
    """Draw one token per row by inverse CDF over the top-k, then top-p, truncated distribution.

    Top-p is applied to the distribution renormalised after top-k (as vLLM does); the most likely
    token always survives. The sort is stable so ties break by token id, deterministically.
    Inverse-CDF sampling with ``side="right"`` can never pick a zero-probability token.
    """
    probs = scaled_logprobs.exp()
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    sorted_probs = sorted_probs * (ranks[None] < top_k[:, None])
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs * (mass_before < top_p[:, None])
    cdf = sorted_probs.cumsum(dim=-1)
    target = (uniforms * cdf[:, -1])[:, None]
    pick = torch.searchsorted(cdf, target, side="right").clamp(max=probs.shape[-1] - 1)
    return sorted_ids.gather(-1, pick).squeeze(-1)
