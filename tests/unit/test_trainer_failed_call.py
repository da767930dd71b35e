"""A forward_backward that fails as it runs leaves every run's gradients as they were: the
worker retries such a call in place, or reruns a failed pass's calls one by one, and neither
may count a micro-batch twice. The failure here is a server-side custom loss erring on a value
(an index past the end) in the call's second micro-batch, after the first one's backward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss
from transformers import Qwen3Config, Qwen3ForCausalLM

from services.trainer.engine import TrainerEngine
from whetstone.custom_loss import CustomLoss
from whetstone.errors import UserError
from whetstone.messages import Datum, ForwardBackward, LoraConfig
from whetstone.tensors import Tensor

VOCAB = 97


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = Qwen3Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = Qwen3ForCausalLM(config).float()
    path = tmp_path_factory.mktemp("tiny-qwen3-failed-call")
    model.save_pretrained(path)
    return path


def pick_loss(logprobs: Any, index: Any) -> Any:
    return -logprobs.gather(0, index.long()).sum(), {}


def pick_call(indexes: list[list[float]]) -> ForwardBackward:
    handle = trace_loss(pick_loss, {"logprobs": 1, "index": 1}, "session-1")  # type: ignore[arg-type]
    graph = encode_graph(handle).model_dump(mode="json")
    loss = CustomLoss(
        name=handle.name, inputs=[i.model_dump() for i in handle.inputs], nodes=graph["nodes"]
    )
    data = [
        Datum(
            model_input=Tensor.from_list([3 + n, 14, 15, 9][: len(index)], "int64"),
            loss_fn_inputs={
                "target_tokens": Tensor.from_list([14, 15, 9, 2][: len(index)], "int64"),
                "index": Tensor.from_list(index, "float32"),
            },
        )
        for n, index in enumerate(indexes)
    ]
    return ForwardBackward(
        data=data, loss_fn="custom", loss_fn_config={"loss_id": "x"}, custom_loss=loss
    )


def grads(engine: TrainerEngine) -> list[torch.Tensor]:
    return [
        torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for p in engine.runs["r"].adapter.parameters()
    ]


def test_a_call_failing_in_its_second_micro_batch_adds_no_gradient(model_dir: Path) -> None:
    engine = TrainerEngine(model_dir, micro_batch_tokens=4)  # one datum per micro-batch
    engine.create_run("r", LoraConfig(rank=4, seed=3))
    engine.forward_backward("r", pick_call([[0.0, 1.0, 2.0, 3.0]]))
    before = grads(engine)
    bad = pick_call([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 99.0]])
    with pytest.raises(UserError, match="gather"):
        engine.forward_backward("r", bad)
    for x, y in zip(grads(engine), before, strict=True):
        torch.testing.assert_close(x, y, atol=0.0, rtol=0.0)

    # Not vacuous: the first micro-batch alone does move the gradient.
    engine.forward_backward("r", pick_call([[3.0, 2.0, 1.0, 0.0]]))
    assert any(bool((x - y).abs().max() > 0) for x, y in zip(grads(engine), before, strict=True))
