"""Token sampling for a batch of rows, each with its own parameters and its own uniform draw.

Per row: ``temperature`` (0: greedy), ``top_k`` (the vocabulary size when off), ``top_p``, and
one uniform ``u`` in [0, 1) drawn from the request's seeded generator. No step sorts the whole
vocabulary:

* rows without truncation draw by inverse CDF over the unsorted vocabulary (float64 cumsum);
* truncated rows take ``torch.topk`` over a bounded candidate set (``max(top_k)`` or
  ``CANDIDATES``), apply top-k, renormalise, apply top-p on it (as vLLM does: the nucleus of the
  top-k distribution; the most likely token always survives) and draw by inverse CDF. A top-p row
  whose candidates hold less mass than ``top_p`` falls back to a full sort, so the result is
  exact whatever the distribution.

Reported logprobs are those of **the distribution actually sampled**: temperature applied, then
top-k/top-p truncation, renormalised. At temperature 1 without truncation that is the model's own
log-softmax, the number a trainer computes for the same weights. Greedy rows (temperature 0)
report the temperature-1, untruncated logprob of the argmax (a point mass would say 0 for every
token, which tells a client nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# topk candidates for rows that use top_p without a top_k at least this large.
CANDIDATES = 1024
# Width of the chunks a wide row's inverse CDF is summed over first.
CHUNK = 1024


@dataclass
class SamplingRows:
    """The rows' parameters as tensors on the logits' device, plus host-side flags that let a
    step skip work no row needs."""

    temperature: torch.Tensor  # [B] float32; greedy rows hold 1
    greedy: torch.Tensor  # [B] bool
    top_k: torch.Tensor  # [B] long; vocabulary size when off
    top_p: torch.Tensor  # [B] float32
    uniforms: torch.Tensor  # [B] float32
    any_greedy: bool
    all_greedy: bool
    any_truncated: bool
    max_top_k: int  # largest top_k that is on (0 if none): every such row's set is complete


def sample(logits: torch.Tensor, rows: SamplingRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[B]`` and their logprobs ``[B]`` under the distribution each row sampled from."""
    vocab = logits.shape[-1]
    if rows.all_greedy:
        return _greedy(logits)
    logp = torch.log_softmax(logits / rows.temperature[:, None], dim=-1)
    tokens = _inverse_cdf(logp.exp(), rows.uniforms)
    logprobs = logp.gather(-1, tokens[:, None]).squeeze(-1)
    if rows.any_truncated:
        truncated = (rows.top_k < vocab) | (rows.top_p < 1)
        k = min(vocab, max(CANDIDATES, rows.max_top_k))
        t_tokens, t_logprobs, covered = _truncated(logp, rows, k)
        if not bool(covered.all()):  # a nucleus wider than the candidates: sort this step
            t_tokens, t_logprobs, _ = _truncated(logp, rows, vocab)
        tokens = torch.where(truncated, t_tokens, tokens)
        logprobs = torch.where(truncated, t_logprobs, logprobs)
    if rows.any_greedy:
        g_tokens, g_logprobs = _greedy(logits)
        tokens = torch.where(rows.greedy, g_tokens, tokens)
        logprobs = torch.where(rows.greedy, g_logprobs, logprobs)
    return tokens, logprobs


def _greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = logits.argmax(dim=-1)
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index ``i`` with ``cdf[i-1] <= u * total < cdf[i]`` (float64 sums); never a
    zero-probability entry. A wide row goes in two levels: the float64 sums of ``CHUNK``-wide
    chunks pick the chunk, then one chunk's cumulative sum the entry (a full-vocabulary float64
    cumsum costs 0.29 ms per step on an H200 at 64 x 152k; this reads the row once)."""
    b, v = probs.shape
    if v <= 4 * CHUNK:
        cdf = probs.double().cumsum(dim=-1)
        target = (uniforms.double() * cdf[:, -1])[:, None]
        pick = torch.searchsorted(cdf, target, right=True).clamp(max=v - 1)
        return pick.squeeze(-1)
    chunks = F.pad(probs, (0, (-v) % CHUNK)).view(b, -1, CHUNK)  # zeros past the vocabulary
    sums = chunks.sum(dim=-1, dtype=torch.float64)  # [B, C]
    outer = sums.cumsum(dim=-1)
    target = (uniforms.double() * outer[:, -1])[:, None]
    last_chunk = (sums > 0).long().cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    c = torch.minimum(torch.searchsorted(outer, target, right=True), last_chunk)  # [B, 1]
    before = outer.gather(-1, (c - 1).clamp(min=0)) * (c > 0)
    inner = chunks.gather(1, c[:, :, None].expand(-1, 1, CHUNK)).squeeze(1)  # [B, CHUNK]
    j = torch.searchsorted(inner.double().cumsum(dim=-1) + before, target, right=True)
    # Rounding can leave the target at the chunk's end: then its last nonzero entry.
    last = (inner > 0).long().cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    j = torch.where(j >= CHUNK, last, j)
    return (c * CHUNK + j).squeeze(-1).clamp(max=v - 1)


def sampled_topk(
    logits: torch.Tensor, rows: SamplingRows, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely tokens ``[B, k]`` of the distribution each row sampled from, and
    their logprobs under it (``-inf`` for tokens the truncation removed): the same numbers as
    ``sample``'s logprobs, so a sampled token in the list carries its reported logprob. Greedy
    rows report the temperature-1, untruncated distribution, as ``sample`` does."""
    vocab = logits.shape[-1]
    logp = torch.log_softmax(logits / rows.temperature[:, None], dim=-1)
    values, ids = logp.topk(min(k, vocab), dim=-1)
    if rows.any_truncated:
        truncated = ((rows.top_k < vocab) | (rows.top_p < 1)) & ~rows.greedy
        width = min(vocab, max(CANDIDATES, rows.max_top_k, k))
        t_ids, kept, covered = _nucleus(logp, rows, width)
        if not bool(covered.all()):
            t_ids, kept, _ = _nucleus(logp, rows, vocab)
        t_values = (kept / kept.sum(dim=-1, keepdim=True)).log()[:, : values.shape[1]]
        values = torch.where(truncated[:, None], t_values, values)
        ids = torch.where(truncated[:, None], t_ids[:, : values.shape[1]], ids)
    return ids, values


def _nucleus(
    logp: torch.Tensor, rows: SamplingRows, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k then top-p over the ``k`` most likely tokens (sorted): their ids, their kept
    probability mass (0 where truncated away, not renormalised), and whether the candidates
    provably held every token the row may keep."""
    values, ids = logp.topk(k, dim=-1)  # sorted, descending
    probs = values.exp()
    ranks = torch.arange(k, device=logp.device)
    probs = probs * (ranks[None] < rows.top_k[:, None])
    within = rows.top_k <= k
    mass = probs.sum(dim=-1, keepdim=True)
    probs = torch.where(within[:, None], probs / mass, probs)
    cum = probs.cumsum(dim=-1)
    keep = (cum - probs) < rows.top_p[:, None]
    covered = within | (cum[:, -1] >= rows.top_p)
    return ids, probs * keep, covered


def _truncated(
    logp: torch.Tensor, rows: SamplingRows, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k then top-p over the ``k`` most likely tokens: tokens, logprobs under the truncated
    distribution, and whether the candidates provably held every token the row may keep."""
    ids, kept, covered = _nucleus(logp, rows, k)
    pick = _inverse_cdf(kept, rows.uniforms)
    total = kept.sum(dim=-1)
    chosen = kept.gather(-1, pick[:, None]).squeeze(-1)
    return ids.gather(-1, pick[:, None]).squeeze(-1), (chosen / total).log(), covered
