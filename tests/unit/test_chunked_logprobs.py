"""Chunked target logprobs (``whetstone_ml.logprobs``) against the unchunked computation, in
float64: a tiny Qwen3 with two LoRA adapters (attention, MLP and the unembedding) and a
base-model row in one padded batch, every block size from one token to the whole batch. Values
and parameter gradients must match ``log_softmax(model(row).logits)`` of each row run alone, and
no tensor kept for backward may hold more than one block of vocabulary-wide rows."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from whetstone.messages import LoraConfig
from whetstone_ml.logprobs import _clip, chunked_target_logprobs, packed_segments
from whetstone_ml.lora import LoraAdapter, LoraFactors, LoraModel, LoraRoute, Segment

VOCAB = 97  # a size no other dimension of the model has
ROWS = [[5, 17, 42, 7, 96, 3, 8], [1, 2, 3], [60, 61, 62, 63, 64, 65], [9, 8, 7, 6]]
ADAPTERS = ["a", "a", "b", None]  # rows 0-1 run "a", row 2 runs "b", row 3 the base model
SEGMENTS = [Segment("a", 0, 2), Segment("b", 2, 3), Segment(None, 3, 4)]


@pytest.fixture(scope="module")
def lora_model() -> LoraModel:
    config = Qwen3Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=48,
        vocab_size=VOCAB,
        tie_word_embeddings=False,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        model = Qwen3ForCausalLM(config).double().eval()
        lora = LoraModel(model)
        for i, name in enumerate(["a", "b"]):
            adapter = LoraAdapter.init(lora, LoraConfig(rank=4, seed=i, train_unembed=True))
            for f in adapter.factors.values():  # float64 factors, B nonzero: a real adapter
                f.a = f.a.detach().double().requires_grad_()
                f.b = (0.05 * torch.randn(f.b.shape, dtype=torch.float64)).requires_grad_()
            assert "lm_head" in adapter.factors
            lora.add(name, adapter)
    return lora


def factors(lora: LoraModel) -> list[torch.Tensor]:
    params: list[LoraFactors] = [
        f for layer in lora.layers.values() for f in layer.adapters.values()
    ]
    return [t for f in params for t in (f.a, f.b)]


def targets_for(row: list[int]) -> torch.Tensor:
    """Two target columns per position: the next token and an arbitrary second id."""
    nxt = row[1:] + [0]
    return torch.tensor([[y, (3 * y + 1) % VOCAB] for y in nxt])


def reference(lora: LoraModel, weights: list[torch.Tensor]):
    """Each row alone through the whole model: full logits, log_softmax, gather."""
    logprobs, total = [], torch.zeros((), dtype=torch.float64)
    for row, adapter, w in zip(ROWS, ADAPTERS, weights, strict=True):
        with lora.route.use([Segment(adapter, 0, 1)]):
            logits = lora.model(input_ids=torch.tensor([row]), use_cache=False).logits[0]
        lp = torch.log_softmax(logits, dim=-1).gather(-1, targets_for(row))
        logprobs.append(lp.detach())
        total = total + (lp * w).sum()
    return logprobs, torch.autograd.grad(total, factors(lora))


def chunked(lora: LoraModel, weights: list[torch.Tensor], chunk_tokens: int, saved: list):
    lengths = [len(r) for r in ROWS]
    input_ids = torch.zeros((len(ROWS), max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(ROWS):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with lora.route.use(SEGMENTS):
            hidden = lora.model.get_decoder()(
                input_ids=input_ids, attention_mask=mask, use_cache=False
            ).last_hidden_state
        packed = hidden[mask.bool()]
        targets = torch.cat([targets_for(r) for r in ROWS])
        lp = chunked_target_logprobs(
            lora.model.get_output_embeddings(),
            lora.route,
            packed,
            targets,
            packed_segments(SEGMENTS, lengths),
            chunk_tokens,
        )
        total = (lp * torch.cat(weights)).sum()
    return list(lp.detach().split(lengths)), torch.autograd.grad(total, factors(lora))


@pytest.mark.parametrize("chunk_tokens", [1, 3, 5, 7, 1000])
def test_chunked_equals_unchunked_in_float64(lora_model: LoraModel, chunk_tokens: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(len(r), 2, generator=gen, dtype=torch.float64) for r in ROWS]
    expected_lp, expected_grads = reference(lora_model, weights)
    saved: list[tuple[int, ...]] = []
    got_lp, got_grads = chunked(lora_model, weights, chunk_tokens, saved)
    for got, want in zip(got_lp, expected_lp, strict=True):
        torch.testing.assert_close(got.double(), want, atol=1e-12, rtol=0)
    assert any(bool(g.abs().max() > 0) for g in got_grads)
    for got, want in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-11, rtol=1e-9)
    # What autograd keeps outside the checkpointed blocks has no vocabulary-wide rows at all.
    assert not [shape for shape in saved if VOCAB in shape]


def test_logits_are_float32_for_low_precision_heads() -> None:
    """A bf16 head still yields float32 logprobs, equal to log_softmax of its float32 logits."""
    head = torch.nn.Linear(8, VOCAB, bias=False).to(torch.bfloat16)
    hidden = torch.randn(10, 8, dtype=torch.bfloat16)
    targets = torch.randint(0, VOCAB, (10, 1))
    with torch.no_grad():
        lp = chunked_target_logprobs(head, LoraRoute(), hidden, targets, [], chunk_tokens=4)
        expected = torch.log_softmax(head(hidden).float(), -1).gather(-1, targets)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, expected, atol=1e-6, rtol=0)


def test_segments_are_packed_and_clipped_to_blocks() -> None:
    packed = packed_segments(SEGMENTS, [len(r) for r in ROWS])
    assert packed == [Segment("a", 0, 10), Segment("b", 10, 16), Segment(None, 16, 20)]
    assert _clip(packed, 8, 12) == [Segment("a", 0, 2), Segment("b", 2, 4)]
    assert _clip(packed, 16, 20) == [Segment(None, 0, 4)]
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_target_logprobs(
            torch.nn.Identity(), None, torch.zeros(1, 1), torch.zeros(1, 1), [], 0
        )  # type: ignore[arg-type]
