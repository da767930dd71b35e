"""From a Hugging Face Qwen3 model and PEFT adapters to what the sampler's decoder reads.

``decoder_from_hf`` borrows an HF model's weights for ``model.Qwen3Decoder`` (q/k/v and gate/up
fused into one matrix each). Adapters live at two levels:

* ``ResidentAdapters``: every adapter the engine holds (an LRU the engine bounds), as its own
  factors per HF module name, on the device in the model's dtype. Loading one reads its
  checkpoint and nothing else; evicting one drops its tensors.
* ``AdapterSlots``: the stacks a forward reads. Per rank class (8, 16, 32, 64: an adapter's
  rank rounded up) a pool of ``capacity`` slots, preallocated per fused projection and layer at
  fixed addresses (so the CUDA graphs that read them stay valid), A ``[slots * width, in]`` and
  B ``[out, slots * width]`` with the scale folded in. B is fused over a projection's
  sub-projections (zero outside each one's rows): one expand GEMM per projection. A B per
  sub-projection reads no zeros but costs more GEMMs, and measured slower on the H200 (8.70
  against 7.62 ms per decode step with one adapter; bench/RESULTS.md). An adapter a batch needs
  is copied into a free slot (lowest first, so a batch's slots stay packed at the front and
  decode's GEMMs read only ``bucket(highest slot + 1)`` slots); a slot is reused once no
  admitted request needs it.
  A decode step thus reads only the factors of the adapters in its batch, however many are
  resident. Prefill reads the same slots, each run of rows against its own adapter's columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from services.sampler.model import FUSED, HEAD, Layer, LoraArg, ModelLora, Qwen3Decoder, Shape
from whetstone.errors import UserError
from whetstone_ml.lora import LoraFactors

RANK_CLASSES = (8, 16, 32, 64)
KINDS: dict[str, tuple[str, ...]] = {**FUSED, HEAD: ("",)}


class ModuleAdapters:
    """The factors every resident adapter has for one HF module (``model.layers.3.mlp.up_proj``)."""

    def __init__(self, out_features: int, in_features: int) -> None:
        self.out_features = out_features
        self.in_features = in_features
        self.adapters: dict[str, LoraFactors] = {}


class ResidentAdapters:
    """Resident adapters by module name, and each one's rank class."""

    def __init__(self, layers: dict[str, ModuleAdapters]) -> None:
        self.layers = layers
        self.order: list[str] = []
        self.rank_class: dict[str, int] = {}

    def has(self, adapter_id: str) -> bool:
        return adapter_id in self.rank_class

    def add(self, adapter_id: str, factors: dict[str, LoraFactors]) -> None:
        rank = max(f.a.shape[0] for f in factors.values())
        cls = next((c for c in RANK_CLASSES if rank <= c), None)
        if cls is None:
            raise UserError(f"adapter {adapter_id!r} has rank {rank}, above {RANK_CLASSES[-1]}")
        for name, f in factors.items():
            self.layers[name].adapters[adapter_id] = f
        self.rank_class[adapter_id] = cls
        self.order.append(adapter_id)

    def remove(self, adapter_id: str) -> None:
        for module in self.layers.values():
            module.adapters.pop(adapter_id, None)
        self.rank_class.pop(adapter_id, None)
        self.order.remove(adapter_id)

    def factors(self, adapter_id: str, kind: str, layer: int) -> list[LoraFactors | None]:
        """The adapter's factors of each sub-projection of ``kind`` in ``layer``."""
        names = [HEAD] if kind == HEAD else [f"model.layers.{layer}.{s}" for s in KINDS[kind]]
        return [self.layers[n].adapters.get(adapter_id) for n in names]


def out_sizes(s: Shape, kind: str) -> list[int]:
    """Output rows of each sub-projection of a fused kind."""
    return {
        "qkv": [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim],
        "o": [s.hidden],
        "gate_up": [s.intermediate, s.intermediate],
        "down": [s.hidden],
        HEAD: [s.vocab],
    }[kind]


def in_size(s: Shape, kind: str) -> int:
    return {"o": s.heads * s.head_dim, "down": s.intermediate}.get(kind, s.hidden)


def _layer_args(
    arg: Callable[[str, int], LoraArg], layer: int
) -> tuple[LoraArg, LoraArg, LoraArg, LoraArg]:
    return arg("qkv", layer), arg("o", layer), arg("gate_up", layer), arg("down", layer)


@dataclass
class SlotPool:
    """``capacity`` slots of one rank class; stacks allocated per kind on first use."""

    rank: int
    capacity: int
    a: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    b: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    holder: list[str | None] = field(default_factory=list)
    kinds: list[frozenset[str]] = field(default_factory=list)  # kinds each slot's adapter has

    def width(self, kind: str) -> int:
        return self.rank * len(KINDS[kind])


@dataclass(frozen=True)
class DecodeRows:
    """Which slot each row of a decode batch reads, per rank class: ``slots[rank]`` (-1: none),
    how many slots from the front the GEMMs read (``used[rank]``, a power of two), and the kinds
    any of them has. ``key`` identifies the shapes (a CUDA graph per key)."""

    slots: dict[int, list[int]]
    used: dict[int, int]
    kinds: dict[int, tuple[str, ...]]

    @property
    def key(self) -> tuple[tuple[int, int, tuple[str, ...]], ...]:
        return tuple((r, self.used[r], self.kinds[r]) for r in sorted(self.slots))


class AdapterSlots:
    """Decode's slot stacks over the resident adapters (module docstring)."""

    def __init__(
        self,
        resident: ResidentAdapters,
        shape: Shape,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.resident = resident
        self.shape = shape
        self.capacity = capacity
        self.dtype = dtype
        self.device = device
        self.pools: dict[int, SlotPool] = {}
        self.version = 0  # bumped when stacks are (re)allocated: the CUDA graphs hold addresses

    def drop(self, adapter_id: str) -> None:
        """Forget the adapter's slot (it was evicted); its columns are never read again."""
        for pool in self.pools.values():
            if adapter_id in pool.holder:
                pool.holder[pool.holder.index(adapter_id)] = None

    def rows(self, adapters: list[str | None], keep: set[str | None]) -> DecodeRows | None:
        """Slots for a decode batch's rows (``None``: the base model), copying in any adapter
        that holds none (never over the slot of one in ``keep``, the engine's admitted
        requests'); ``None`` when no row has an adapter."""
        placed = self._place(adapters, keep)
        if not placed:
            return None
        slots, used, kinds = {}, {}, {}
        for rank, where in placed.items():
            pool = self.pools[rank]
            slots[rank] = [where.get(a, -1) if a is not None else -1 for a in adapters]
            top = max(where.values()) + 1
            used[rank] = min(pool.capacity, 1 << (top - 1).bit_length())
            kinds[rank] = tuple(k for k in KINDS if any(k in pool.kinds[i] for i in where.values()))
        return DecodeRows(slots, used, kinds)

    def prefill_lora(
        self, runs: list[tuple[int, int, str]], keep: set[str | None]
    ) -> ModelLora | None:
        """Prefill's ``ModelLora``: each run of rows ``(start, stop, adapter)`` against its
        adapter's own slot columns only (exact FLOPs: prefill's rows are many)."""
        placed = self._place([adapter for _, _, adapter in runs], keep)
        if not placed:
            return None
        located = [(r0, r1, self.resident.rank_class[ad], ad) for r0, r1, ad in runs]

        def arg(kind: str, layer: int) -> LoraArg:
            out = []
            for r0, r1, rank, adapter in located:
                pool, slot = self.pools[rank], placed[rank][adapter]
                if kind in pool.kinds[slot]:
                    w = pool.width(kind)
                    a = pool.a[kind][layer][slot * w : (slot + 1) * w]
                    out.append((r0, r1, a, pool.b[kind][layer][:, slot * w : (slot + 1) * w]))
            return tuple(out) or None

        return ModelLora([_layer_args(arg, i) for i in range(self.shape.layers)], arg(HEAD, 0))

    def _place(
        self, adapters: list[str | None], keep: set[str | None]
    ) -> dict[int, dict[str, int]]:
        """Each distinct adapter's slot in its rank class's pool, copying in those without one
        into the lowest slots that no adapter of ``adapters`` or ``keep`` holds."""
        wanted: dict[int, list[str]] = {}
        for adapter in dict.fromkeys(a for a in adapters if a is not None):
            wanted.setdefault(self.resident.rank_class[adapter], []).append(adapter)
        placed = {}
        for rank, ids in wanted.items():
            pool = self._pool(rank)
            if len(ids) > pool.capacity:
                raise RuntimeError("more adapters in one forward than slots")
            needed = set(ids)
            where = {a: i for i, a in enumerate(pool.holder) if a in needed}
            taken = needed | keep
            free = [i for i, a in enumerate(pool.holder) if a is None or a not in taken]
            for adapter in ids:
                if adapter not in where:
                    where[adapter] = slot = free.pop(0)
                    self._copy_in(pool, slot, adapter)
            placed[rank] = where
        return placed

    def model_lora(self, rows: DecodeRows, row_slots: dict[int, torch.Tensor]) -> ModelLora:
        """The ``ModelLora`` of a decode batch: views of the first ``used`` slots of each pool,
        with each row's slot from ``row_slots[rank]`` (a device tensor, ``[T]``)."""

        def arg(kind: str, layer: int) -> LoraArg:
            out = []
            for rank in sorted(rows.slots):
                if kind in rows.kinds[rank]:
                    pool = self.pools[rank]
                    w = pool.width(kind)
                    n = rows.used[rank] * w
                    a, b = pool.a[kind][layer][:n], pool.b[kind][layer][:, :n]
                    out.append((a, b, row_slots[rank], w))
            return tuple(out) or None

        s = self.shape
        layers = [
            (arg("qkv", i), arg("o", i), arg("gate_up", i), arg("down", i)) for i in range(s.layers)
        ]
        return ModelLora(layers, arg(HEAD, 0))

    def _pool(self, rank: int) -> SlotPool:
        pool = self.pools.get(rank)
        if pool is None:
            pool = self.pools[rank] = SlotPool(rank, self.capacity)
            pool.holder = [None] * self.capacity
            pool.kinds = [frozenset()] * self.capacity
        return pool

    def _stacks(self, pool: SlotPool, kind: str) -> None:
        if kind in pool.a:
            return
        s, w, c = self.shape, pool.width(kind), pool.capacity
        n_layers = 1 if kind == HEAD else s.layers
        opts: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        pool.a[kind] = [torch.zeros(c * w, in_size(s, kind), **opts) for _ in range(n_layers)]
        pool.b[kind] = [
            torch.zeros(sum(out_sizes(s, kind)), c * w, **opts) for _ in range(n_layers)
        ]
        self.version += 1

    def _copy_in(self, pool: SlotPool, slot: int, adapter: str) -> None:
        """Write the adapter's factors into ``slot`` of every kind's stacks (zero where it has no
        factor, so a previous holder's columns never leak)."""
        s, r = self.shape, pool.rank
        has = frozenset(
            k
            for k in KINDS
            for i in range(1 if k == HEAD else s.layers)
            if any(f is not None for f in self.resident.factors(adapter, k, i))
        )
        for kind in has:
            self._stacks(pool, kind)
        for kind in pool.a:
            w = pool.width(kind)
            offsets = [0]
            for size in out_sizes(s, kind):
                offsets.append(offsets[-1] + size)
            for i, (a, b) in enumerate(zip(pool.a[kind], pool.b[kind], strict=True)):
                c0 = slot * w
                a[c0 : c0 + w].zero_()
                b[:, c0 : c0 + w].zero_()
                if kind not in has:
                    continue
                for j, f in enumerate(self.resident.factors(adapter, kind, i)):
                    if f is None:
                        continue
                    rank = f.a.shape[0]
                    a[c0 + j * r : c0 + j * r + rank] = f.a
                    b[offsets[j] : offsets[j + 1], c0 + j * r : c0 + j * r + rank] = f.b * f.scale
        pool.holder[slot] = adapter
        pool.kinds[slot] = has


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
