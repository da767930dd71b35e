"""Multi-adapter LoRA over a Hugging Face causal LM, shared by the trainer and the sampler.

One base model, many adapters: every targeted ``nn.Linear`` is wrapped in a ``LoraLinear`` that
holds the low-rank factors of every loaded adapter. A ``LoraRoute`` (one per model, shared by all
its layers) says which contiguous rows of the current batch belong to which adapter, so one
base-model pass serves many training runs or many sampling sessions at once; rows routed to
``None`` see the plain base model.

Adapters are stored and exchanged in PEFT's format (``adapter_config.json`` +
``adapter_model.safetensors``), so PEFT and vLLM load Whetstone's sampler weights as they are.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from whetstone.errors import UserError
from whetstone.messages import LoraConfig

ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
UNEMBED_MODULES = ("lm_head",)
# Fixed so that the effective scale alpha/rank is a property of the rank alone, as in Tinker.
LORA_ALPHA = 32
WHETSTONE_CONFIG = "whetstone_lora.json"


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of the batch use ``adapter_id`` (``None``: the base model)."""

    adapter_id: str | None
    start: int
    stop: int


@dataclass
class LoraRoute:
    segments: list[Segment] = field(default_factory=list)

    @contextmanager
    def use(self, segments: list[Segment]) -> Iterator[None]:
        previous, self.segments = self.segments, segments
        try:
            yield
        finally:
            self.segments = previous


@dataclass
class LoraFactors:
    a: torch.Tensor  # (rank, in_features)
    b: torch.Tensor  # (out_features, rank)
    scale: float


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, route: LoraRoute) -> None:
        super().__init__()
        self.base = base
        self.route = route
        self.adapters: dict[str, LoraFactors] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        segments = self.route.segments
        if not any(s.adapter_id in self.adapters for s in segments):
            return y
        parts = []
        for seg in segments:
            rows = x[seg.start : seg.stop]
            f = self.adapters.get(seg.adapter_id) if seg.adapter_id is not None else None
            if f is None:
                parts.append(rows.new_zeros(*rows.shape[:-1], y.shape[-1]))
            else:
                parts.append(((rows.to(f.a.dtype) @ f.a.T) @ f.b.T * f.scale).to(y.dtype))
        return y + torch.cat(parts)


class _LoraGemm(torch.autograd.Function):
    """``x Wᵀ + s Bᵀ`` as one GEMM, ``[x | s] · [W | B]ᵀ``, for a frozen ``W``.

    A separate LoRA expand (``addmm`` into the base output) reads and rewrites the whole
    ``[T, out]`` output once more; here the rank's columns only widen the base GEMM's inner
    dimension (by ``r / in``: 1-4 %). Backward is two GEMMs: ``[dx | ds] = dy · [W | B]`` (the
    input gradient and the LoRA's in one pass over ``dy``) and ``dB = dyᵀ s``; ``W`` gets no
    gradient, so its gradient GEMM (as large as the forward) is never run. Only ``s`` is saved
    besides the weights: the frozen ``W`` needs no ``x`` for backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, s: torch.Tensor, w: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        if ctx.needs_input_grad[2]:
            raise ValueError("lora_gemm computes no gradient for the base weight")
        ctx.save_for_backward(s, w, b)
        ctx.x_width = x.shape[-1]
        return torch.cat([x, s], -1) @ torch.cat([w, b], -1).T

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        s, w, b = ctx.saved_tensors
        need_x, need_s, _, need_b = ctx.needs_input_grad
        dx = ds = db = None
        if need_x:
            dx, ds = (dy @ torch.cat([w, b], -1)).split([ctx.x_width, s.shape[-1]], -1)
        elif need_s:
            ds = dy @ b
        if need_b:
            db = dy.T @ s
        return dx, ds if need_s else None, None, db


def lora_gemm(x: torch.Tensor, s: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x @ w.T + s @ b.T`` in one GEMM (``x`` ``[T, in]``, ``s = x Aᵀ`` ``[T, r]`` (masked or
    not), ``w`` ``[out, in]`` frozen, ``b`` ``[out, r]`` with the scale folded in); gradients
    reach ``x``, ``s`` and ``b`` (see :class:`_LoraGemm`)."""
    out: torch.Tensor = _LoraGemm.apply(x, s, w, b)
    return out


def target_modules(config: LoraConfig) -> tuple[str, ...]:
    names: tuple[str, ...] = ()
    if config.train_attn:
        names += ATTN_MODULES
    if config.train_mlp:
        names += MLP_MODULES
    if config.train_unembed:
        names += UNEMBED_MODULES
    if not names:
        raise UserError("LoRA config must train at least one of attn, mlp, unembed")
    return names


class LoraModel:
    """A frozen base model with ``LoraLinear`` layers injected into every targetable linear."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.route = LoraRoute()
        self.layers: dict[str, LoraLinear] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        targets = ATTN_MODULES + MLP_MODULES + UNEMBED_MODULES
        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if child_name in targets and isinstance(child, nn.Linear):
                    wrapped = LoraLinear(child, self.route)
                    setattr(module, child_name, wrapped)
                    self.layers[f"{name}.{child_name}" if name else child_name] = wrapped

    def add(self, adapter_id: str, adapter: LoraAdapter) -> None:
        for name, factors in adapter.factors.items():
            layer = self.layers.get(name)
            if (
                layer is None
                or factors.a.shape[1] != layer.base.in_features
                or factors.b.shape[0] != layer.base.out_features
            ):
                raise UserError(f"adapter does not fit this base model (module {name!r})")
        for name, factors in adapter.factors.items():
            self.layers[name].adapters[adapter_id] = factors

    def remove(self, adapter_id: str) -> None:
        for layer in self.layers.values():
            layer.adapters.pop(adapter_id, None)

    def has(self, adapter_id: str) -> bool:
        return any(adapter_id in layer.adapters for layer in self.layers.values())


@dataclass
class LoraAdapter:
    """The factors of one adapter, keyed by the wrapped module's name in the base model.

    A trained adapter keeps them in one flat leaf (:meth:`flatten`): its ``parameters()`` is
    that one tensor, so autograd accumulates one gradient and the optimizer updates one tensor
    per run instead of two per module (a thousand for a 36-layer model, each costing host time
    in every backward and step)."""

    config: LoraConfig
    factors: dict[str, LoraFactors]
    flat: torch.Tensor | None = None
    flat_names: tuple[str, ...] = ()

    @classmethod
    def init(
        cls,
        model: LoraModel | Mapping[str, tuple[int, int]],
        config: LoraConfig,
        device: torch.device | None = None,
    ) -> LoraAdapter:
        """A fresh adapter: A from PEFT's Kaiming-uniform init drawn from ``config.seed``, B zero,
        so a new adapter leaves the base model's outputs unchanged. The factors are float32
        whatever the base model's dtype: they are the master weights the optimizer updates.

        ``model`` is a ``LoraModel`` or the targetable modules' ``(in_features, out_features)``
        by HF module name (what ``whetstone_ml.qwen3.Qwen3Shape.lora_modules`` gives)."""
        if isinstance(model, LoraModel):
            shapes = {n: (m.base.in_features, m.base.out_features) for n, m in model.layers.items()}
            first = next(iter(model.layers.values()), None)
            device = device or (first.base.weight.device if first else None)
        else:
            shapes = dict(model)
        # A private generator: never reseed the process's global one (other code relies on it).
        seed = config.seed if config.seed is not None else secrets.randbits(63)
        gen = torch.Generator().manual_seed(seed)
        wanted = target_modules(config)
        scale = LORA_ALPHA / config.rank
        factors: dict[str, LoraFactors] = {}
        for name in sorted(shapes):
            if name.rsplit(".", 1)[-1] not in wanted:
                continue
            in_features, out_features = shapes[name]
            bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5))
            a = (torch.rand(config.rank, in_features, generator=gen) * 2 - 1) * bound
            b = torch.zeros(out_features, config.rank)
            dev = device or torch.device("cpu")
            factors[name] = LoraFactors(
                a.to(dev).requires_grad_(), b.to(dev).requires_grad_(), scale
            )
        return cls(config, factors)

    def flatten(self, order: Sequence[str]) -> None:
        """Move every factor into one flat leaf tensor that requires grad: the ``A`` of
        ``order``'s modules one after another, then their ``B``. The factors become views of it
        without autograd history (reading, saving and copying into them work as before); a
        model computes from :attr:`flat` itself, so that gradients reach it."""
        names = tuple(n for n in order if n in self.factors)
        if set(names) != set(self.factors):
            raise ValueError("the order must name every module of the adapter")
        pieces = [self.factors[n].a for n in names] + [self.factors[n].b for n in names]
        flat = torch.cat([t.detach().reshape(-1) for t in pieces])
        # Views of a detached alias: they share the leaf's storage (and see its updates) but
        # carry no autograd view history, which in-place updates of the leaf would invalidate.
        alias, views, offset = flat.detach(), [], 0
        for t in pieces:
            views.append(alias[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        for i, n in enumerate(names):
            self.factors[n] = LoraFactors(views[i], views[len(names) + i], self.factors[n].scale)
        self.flat, self.flat_names = flat.requires_grad_(), names

    def flat_from_per_factor(self, pieces: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """A flat adapter's tensor (like :attr:`flat`) from one tensor per factor as adapters
        before flat ones kept them: parameter ``2i`` is module ``i``'s ``A``, ``2i + 1`` its ``B``,
        in the adapter's module order (how optimizer states and pending gradients were saved).
        A missing piece reads as zeros."""
        if self.flat is None:
            raise ValueError("the adapter is not flat")
        position = {name: i for i, name in enumerate(self.factors)}
        out = []
        for part in (0, 1):  # every A, then every B, as flatten lays them out
            for name in self.flat_names:
                like = self.factors[name].b if part else self.factors[name].a
                piece = pieces.get(2 * position[name] + part)
                if piece is None:
                    piece = torch.zeros_like(like)
                elif piece.shape != like.shape:
                    raise UserError(f"saved state of {name} has shape {tuple(piece.shape)}")
                out.append(piece.reshape(-1).to(like.device, like.dtype))
        return torch.cat(out)

    def parameters(self) -> list[torch.Tensor]:
        if self.flat is not None:
            return [self.flat]
        return [t for f in self.factors.values() for t in (f.a, f.b)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT's key names, so that the file is a PEFT adapter."""
        out: dict[str, torch.Tensor] = {}
        for name, f in self.factors.items():
            out[f"base_model.model.{name}.lora_A.weight"] = f.a.detach().float().cpu().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = f.b.detach().float().cpu().contiguous()
        return out

    def save_peft(self, directory: Path, base_model_path: str) -> int:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors``; return bytes written."""
        directory.mkdir(parents=True, exist_ok=True)
        peft_config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_path,
            "r": self.config.rank,
            "lora_alpha": LORA_ALPHA,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "target_modules": sorted({n.rsplit(".", 1)[-1] for n in self.factors}),
        }
        files = {"adapter_config.json", "adapter_model.safetensors", WHETSTONE_CONFIG}
        (directory / "adapter_config.json").write_text(json.dumps(peft_config, indent=2))
        # Our LoRA flags live beside PEFT's config, not in it: PEFT warns on unknown keys.
        (directory / WHETSTONE_CONFIG).write_text(self.config.model_dump_json())
        save_file(self.state_dict(), str(directory / "adapter_model.safetensors"))
        return sum((directory / f).stat().st_size for f in files)

    @classmethod
    def load_peft(
        cls,
        directory: Path,
        device: torch.device | str = "cpu",
        trainable: bool = False,
        dtype: torch.dtype | None = None,
    ) -> LoraAdapter:
        """Load a plain-LoRA PEFT adapter; PEFT variants this layer cannot apply are refused.

        ``dtype`` casts the factors (a sampler keeps them in the base model's dtype); ``None``
        keeps the file's (float32 for Whetstone's own adapters, the trainer's master weights).
        """
        peft_config = json.loads((directory / "adapter_config.json").read_text())
        unsupported = (
            "use_dora",
            "rank_pattern",
            "alpha_pattern",
            "modules_to_save",
            "lora_bias",
            "fan_in_fan_out",
        )
        for option in unsupported:
            if peft_config.get(option):
                raise UserError(f"unsupported PEFT adapter option {option!r}")
        ours = directory / WHETSTONE_CONFIG
        config = (
            LoraConfig.model_validate_json(ours.read_text())
            if ours.exists()
            else LoraConfig(rank=peft_config["r"])
        )
        r, alpha = peft_config["r"], peft_config["lora_alpha"]
        scale = alpha / math.sqrt(r) if peft_config.get("use_rslora") else alpha / r
        tensors = load_file(str(directory / "adapter_model.safetensors"), device=str(device))
        factors: dict[str, LoraFactors] = {}
        for key, a in tensors.items():
            if key.endswith(".lora_B.weight"):
                continue
            if not key.endswith(".lora_A.weight"):
                raise UserError(f"unsupported tensor {key!r} in PEFT adapter")
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            if dtype is not None:
                a, b = a.to(dtype), b.to(dtype)
            factors[name] = LoraFactors(
                a.requires_grad_(trainable), b.requires_grad_(trainable), scale
            )
        return cls(config, factors)
