"""What a sample request asks of its prompt, filled in as its prefill chunks run.

Position ``p`` of a prompt of ``n`` tokens gives the next-token distribution over prompt token
``p + 1``. From those logits a request may ask for (protocol.md 5.8-5.9):

* ``prompt_logprobs``: ``log p(prompt[p + 1])`` at temperature 1, float32 ``[n]``, NaN at
  position 0 and, with ``prompt_logprobs_last_n = N``, at every position before the last ``N``;
* ``topk_prompt_logprobs = k``: the ``k`` most likely tokens at temperature 1, rows ``[n, k]``
  (row ``p + 1`` for position ``p``), empty rows ``(0, -99999.0)`` where nothing was scored
  (row 0, and before the last ``N`` with ``prompt_logprobs_last_n``);
* ``target_prompt_logprobs``: the logprobs (temperature 1) of the token ids the client listed,
  ``[n - 1, K]``, 0.0 where it listed ``-1``;
* ``prompt_alt_tokens_k = k``: ``k`` independent draws with replacement at the request's
  temperature (no top-k/top-p), ``[n - 1, k]``, and their logprobs under the distribution drawn
  from (temperature 0: the argmax ``k`` times, with its temperature-1 logprob, as greedy
  sampling reports). The uniforms come from the request's seeded generator.

``first_position`` is the first position whose logits are needed; a prefix cache may serve
every token before it (the engine never reuses more than ``n - 1`` tokens: the last position's
logits start the sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from whetstone.messages import TOPK_EMPTY_LOGPROB, SampleRequest, TopkLogprobs
from whetstone.tensors import Tensor


@dataclass
class PromptScores:
    n: int
    prompt: torch.Tensor  # [n] int64, on the logits' device once scoring starts
    last_n: int | None
    logprobs: np.ndarray | None  # [n] float32
    topk_ids: np.ndarray | None  # [n, k] int64
    topk_logprobs: np.ndarray | None  # [n, k] float32
    target_ids: np.ndarray | None  # [n - 1, K] int64
    target_logprobs: np.ndarray | None  # [n - 1, K] float32
    alt_uniforms: np.ndarray | None  # [n - 1, k] float32
    alt_ids: np.ndarray | None
    alt_logprobs: np.ndarray | None
    temperature: float

    @classmethod
    def of(cls, request: SampleRequest, prompt: list[int], gen: torch.Generator) -> PromptScores:
        n = len(prompt)
        k = request.topk_prompt_logprobs
        alt_k = request.prompt_alt_tokens_k
        target = request.target_prompt_logprobs
        target_ids = target.to_numpy().astype(np.int64) if target is not None else None
        return cls(
            n=n,
            prompt=torch.tensor(prompt, dtype=torch.long),
            last_n=request.prompt_logprobs_last_n,
            logprobs=np.full(n, np.nan, dtype=np.float32) if request.prompt_logprobs else None,
            topk_ids=np.zeros((n, k), dtype=np.int64) if k else None,
            topk_logprobs=np.full((n, k), TOPK_EMPTY_LOGPROB, dtype=np.float32) if k else None,
            target_ids=target_ids,
            target_logprobs=(
                np.zeros(target_ids.shape, dtype=np.float32) if target_ids is not None else None
            ),
            alt_uniforms=(
                torch.rand(n - 1, alt_k, generator=gen).numpy() if alt_k and n > 1 else None
            ),
            alt_ids=np.zeros((n - 1, alt_k), dtype=np.int64) if alt_k else None,
            alt_logprobs=np.zeros((n - 1, alt_k), dtype=np.float32) if alt_k else None,
            temperature=request.params.temperature,
        )

    @property
    def wanted(self) -> bool:
        return any(
            a is not None for a in (self.logprobs, self.topk_ids, self.target_ids, self.alt_ids)
        )

    @property
    def _first_scored(self) -> int:
        """First position whose prompt (and top-k prompt) logprobs are reported."""
        return self.n - 1 - self.last_n if self.last_n is not None else 0

    @property
    def first_position(self) -> int:
        if self.target_ids is not None or self.alt_ids is not None:
            return 0
        if self.logprobs is not None or self.topk_ids is not None:
            return self._first_scored
        return self.n - 1

    def score(self, logits: torch.Tensor, start: int) -> None:
        """Fill the scores of positions ``start .. start + len(logits)`` (all ``< n - 1``)
        from their float32 logits ``[m, V]``."""
        m = logits.shape[0]
        stop = start + m
        logp = torch.log_softmax(logits, dim=-1)
        first = max(start, self._first_scored)
        if first < stop and (self.logprobs is not None or self.topk_ids is not None):
            rows = logp[first - start :]
            if self.logprobs is not None:
                nxt = self.prompt[first + 1 : stop + 1].to(logp.device)
                values = rows.gather(-1, nxt[:, None]).squeeze(-1)
                self.logprobs[first + 1 : stop + 1] = values.cpu().numpy()
            if self.topk_ids is not None and self.topk_logprobs is not None:
                values, ids = rows.topk(min(self.topk_ids.shape[1], rows.shape[-1]), dim=-1)
                width = ids.shape[1]
                self.topk_ids[first + 1 : stop + 1, :width] = ids.cpu().numpy()
                self.topk_logprobs[first + 1 : stop + 1, :width] = values.cpu().numpy()
        if self.target_ids is not None and self.target_logprobs is not None:
            ids = torch.from_numpy(self.target_ids[start:stop]).to(logp.device)
            listed = ids >= 0
            values = logp.gather(-1, ids.clamp(min=0))
            self.target_logprobs[start:stop] = torch.where(listed, values, 0.0).cpu().numpy()
        if self.alt_uniforms is not None and self.alt_ids is not None:
            ids, values = self._draws(logits, logp, start, stop)
            self.alt_ids[start:stop] = ids.cpu().numpy()
            assert self.alt_logprobs is not None
            self.alt_logprobs[start:stop] = values.cpu().numpy()

    def _draws(
        self, logits: torch.Tensor, logp: torch.Tensor, start: int, stop: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.alt_uniforms is not None
        k = self.alt_uniforms.shape[1]
        if self.temperature == 0:
            ids = logits.argmax(dim=-1, keepdim=True).expand(-1, k)
            return ids, logp.gather(-1, ids)
        drawn = torch.log_softmax(logits / self.temperature, dim=-1)
        cdf = drawn.exp().double().cumsum(dim=-1)  # [m, V]
        u = torch.from_numpy(self.alt_uniforms[start:stop]).to(logits.device).double()
        ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=cdf.shape[-1] - 1)
        return ids, drawn.gather(-1, ids)

    def result(self, csr: bool) -> dict[str, object]:
        """The ``SampleResult`` fields these scores fill."""
        out: dict[str, object] = {}
        if self.logprobs is not None:
            out["prompt_logprobs"] = Tensor.from_numpy(self.logprobs)
        if self.topk_ids is not None and self.topk_logprobs is not None:
            out["topk_prompt_logprobs"] = TopkLogprobs(
                token_ids=Tensor.from_numpy(self.topk_ids),
                logprobs=Tensor.from_numpy(self.topk_logprobs),
            )
        if self.target_logprobs is not None:
            out["target_prompt_logprobs"] = Tensor.from_numpy(self.target_logprobs)
            out["target_prompt_csr"] = csr
        if self.alt_ids is not None and self.alt_logprobs is not None:
            out["prompt_alt_tokens"] = TopkLogprobs(
                token_ids=Tensor.from_numpy(self.alt_ids),
                logprobs=Tensor.from_numpy(self.alt_logprobs),
            )
        return out
