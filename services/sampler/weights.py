"""From a Hugging Face Qwen3 model and PEFT adapters to what the sampler's decoder reads.

``decoder_from_hf`` borrows an HF model's weights for ``model.Qwen3Decoder`` (q/k/v and gate/up
fused into one matrix each); ``ResidentAdapters`` records, per HF module name, the factors of
every adapter the engine holds; ``build_stacks`` turns those into the decoder's ``LoraStacks``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from services.sampler.model import FUSED, HEAD, Layer, LoraStacks, Qwen3Decoder, Shape
from whetstone_ml.lora import LoraFactors


class ModuleAdapters:
    """The factors every resident adapter has for one HF module (``model.layers.3.mlp.up_proj``)."""

    def __init__(self, out_features: int, in_features: int) -> None:
        self.out_features = out_features
        self.in_features = in_features
        self.adapters: dict[str, LoraFactors] = {}


class ResidentAdapters:
    """Resident adapters by module name; the source ``LoraStacks`` are rebuilt from."""

    def __init__(self, layers: dict[str, ModuleAdapters]) -> None:
        self.layers = layers
        self.order: list[str] = []

    def has(self, adapter_id: str) -> bool:
        return adapter_id in self.order


def build_stacks(
    resident: ResidentAdapters, s: Shape, dtype: torch.dtype, device: torch.device
) -> LoraStacks:
    """``LoraStacks`` of the resident adapters: per fused projection, each adapter's columns in
    residency order, as wide as its largest rank for each sub-projection (a module it lacks in
    some layer stays zero there), its scale folded into B."""
    sizes = {
        "qkv": [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim],
        "o": [s.hidden],
        "gate_up": [s.intermediate, s.intermediate],
        "down": [s.hidden],
        HEAD: [s.vocab],
    }
    kinds: dict[str, tuple[str, ...]] = {**FUSED, HEAD: ("",)}
    stacks = LoraStacks()
    for kind, subs in kinds.items():
        names = (
            [[f"model.layers.{i}.{sub}" for sub in subs] for i in range(s.layers)]
            if kind != HEAD
            else [[HEAD]]
        )
        offsets = np.cumsum([0] + sizes[kind]).tolist()
        spans: dict[str, tuple[int, int]] = {}
        columns: list[tuple[str, int, int]] = []  # (adapter, sub index, rank)
        width = 0
        for adapter_id in resident.order:
            start = width
            for j in range(len(subs)):
                ranks = [
                    resident.layers[row[j]].adapters[adapter_id].a.shape[0]
                    for row in names
                    if adapter_id in resident.layers[row[j]].adapters
                ]
                if ranks:
                    columns.append((adapter_id, j, max(ranks)))
                    width += max(ranks)
            if width > start:
                spans[adapter_id] = (start, width)
        if not width:
            continue
        a_list, b_list = [], []
        for row in names:
            in_features = resident.layers[row[0]].in_features
            a = torch.zeros(width, in_features, dtype=dtype, device=device)
            b = torch.zeros(offsets[-1], width, dtype=dtype, device=device)
            col = 0
            for adapter_id, j, rank in columns:
                f = resident.layers[row[j]].adapters.get(adapter_id)
                if f is not None:
                    r = f.a.shape[0]
                    a[col : col + r] = f.a
                    b[offsets[j] : offsets[j + 1], col : col + r] = f.b * f.scale
                col += rank
            a_list.append(a)
            b_list.append(b)
        stacks.a[kind], stacks.b[kind], stacks.spans[kind] = a_list, b_list, spans
    return stacks


def decoder_from_hf(model: Any, max_positions: int) -> Qwen3Decoder:
    """Our decoder over an HF ``Qwen3ForCausalLM``'s weights (q/k/v and gate/up fused)."""
    c = model.config
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise NotImplementedError(f"RoPE scaling {rope.get('rope_type')!r} is not supported")
    if getattr(c, "use_sliding_window", False) or getattr(c, "attention_bias", False):
        raise NotImplementedError("sliding-window attention and attention biases")
    theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10_000.0)))
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    shape = Shape(
        vocab=int(c.vocab_size),
        hidden=int(c.hidden_size),
        layers=int(c.num_hidden_layers),
        heads=int(c.num_attention_heads),
        kv_heads=int(c.num_key_value_heads),
        head_dim=head_dim,
        intermediate=int(c.intermediate_size),
        eps=float(c.rms_norm_eps),
        rope_theta=theta,
        max_positions=max(max_positions, 1),
    )
    decoder = model.get_decoder()
    layers = []
    for block in decoder.layers:
        attn, mlp = block.self_attn, block.mlp
        layers.append(
            Layer(
                input_norm=block.input_layernorm.weight.detach(),
                qkv=torch.cat(
                    [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
                ).detach(),
                qk_norm=torch.cat(
                    [
                        attn.q_norm.weight.detach().expand(shape.heads, -1),
                        attn.k_norm.weight.detach().expand(shape.kv_heads, -1),
                    ]
                ),
                o=attn.o_proj.weight.detach(),
                post_norm=block.post_attention_layernorm.weight.detach(),
                gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                down=mlp.down_proj.weight.detach(),
            )
        )
    return Qwen3Decoder(
        shape,
        decoder.embed_tokens.weight.detach(),
        layers,
        decoder.norm.weight.detach(),
        model.get_output_embeddings().weight.detach(),
    )


def resident_from_hf(model: Any) -> ResidentAdapters:
    """Every module name an adapter may target, with its shape."""
    targets = {sub.rsplit(".", 1)[-1] for subs in FUSED.values() for sub in subs} | {HEAD}
    layers = {
        name: ModuleAdapters(module.out_features, module.in_features)
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear)
    }
    return ResidentAdapters(layers)
