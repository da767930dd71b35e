"""Token prices: what one million tokens of each meter costs, per base model.

Users pay only for tokens that did work (``Meter``: train, prefill, sample). Prices are operator
configuration, loaded once at start-up from a JSON file (or the built-in default table) and
handed to the ledger when it prices a report. Reports price the *aggregated* token counts, so a
price change applies to every report made after it, including reports over older usage: the
ledger stores tokens, never money, which keeps the stored facts immune to price mistakes.

JSON layout (all numbers are USD per 1,000,000 tokens)::

    {
      "default": {"train_tokens": 0.40, "prefill_tokens": 0.10, "sample_tokens": 0.30},
      "models": {
        "whetstone/tiny-qwen3": {
          "train_tokens": 0.40, "prefill_tokens": 0.10, "sample_tokens": 0.30
        }
      }
    }

``default`` prices every base model that ``models`` does not list, so a model added to the
registry is billed (not silently free) before anyone remembers to price it.

The model registry (``whetstone.models.registry``, the operator's models file) may also price
each base model; :meth:`PriceTable.from_registry` lays those prices over this table (the JSON
file's, or the built-in default), so one file can configure a model's serving and its price.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import get_args

from whetstone.messages import Meter
from whetstone.models.registry import ModelRegistry

TOKENS_PER_PRICE_UNIT = 1_000_000
METERS: tuple[Meter, ...] = get_args(Meter)


@dataclass(frozen=True)
class Price:
    """USD per 1,000,000 tokens for each meter; field names are the ``Meter`` values."""

    train_tokens: float
    prefill_tokens: float
    sample_tokens: float

    def __post_init__(self) -> None:
        # A negative or NaN price would silently corrupt every invoice; refuse it at load time.
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"price for {f.name} must be a finite number >= 0, got {value!r}")

    def usd_per_million(self, meter: Meter) -> float:
        if meter not in METERS:
            raise ValueError(f"unknown meter {meter!r}")
        return float(getattr(self, meter))

    @classmethod
    def from_dict(cls, d: Mapping[str, float]) -> Price:
        unknown = set(d) - set(METERS)
        missing = set(METERS) - set(d)
        if unknown or missing:
            raise ValueError(
                f"price needs exactly {sorted(METERS)}; "
                f"unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
        return cls(**{m: float(d[m]) for m in METERS})

    def to_dict(self) -> dict[str, float]:
        return {m: self.usd_per_million(m) for m in METERS}


@dataclass(frozen=True)
class PriceTable:
    """Base-model name -> ``Price``, with ``default`` for every model not listed."""

    default: Price
    models: Mapping[str, Price] = field(default_factory=dict)

    def price_for(self, base_model: str) -> Price:
        return self.models.get(base_model, self.default)

    def cost_usd(self, base_model: str, meter: Meter, tokens: int) -> float:
        """Cost of ``tokens`` tokens of ``meter`` on ``base_model``, in USD."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        return self.price_for(base_model).usd_per_million(meter) * tokens / TOKENS_PER_PRICE_UNIT

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> PriceTable:
        unknown = set(d) - {"default", "models"}
        if unknown:
            raise ValueError(f"unknown keys in price table: {sorted(unknown)}")
        default = d.get("default")
        models = d.get("models", {})
        if not isinstance(default, Mapping):
            raise ValueError("price table needs a 'default' object")
        if not isinstance(models, Mapping):
            raise ValueError("'models' must be an object of base-model name -> price")
        return cls(
            default=Price.from_dict(default),
            models={str(name): Price.from_dict(p) for name, p in models.items()},
        )

    @classmethod
    def from_json(cls, path: str | Path) -> PriceTable:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_registry(cls, registry: ModelRegistry, base: PriceTable | None = None) -> PriceTable:
        """``base`` (default: the built-in table) with every registry entry's own prices on top.

        A model the registry prices is billed at the registry's price, even where ``base`` lists
        it too; a model without prices keeps ``base``'s price for it, or ``base.default``.
        """
        base = base or DEFAULT_PRICE_TABLE
        models = dict(base.models)
        for spec in registry.specs():
            if spec.prices is not None:
                models[spec.name] = Price.from_dict(spec.prices)
        return cls(default=base.default, models=models)

    def to_dict(self) -> dict[str, object]:
        return {
            "default": self.default.to_dict(),
            "models": {name: p.to_dict() for name, p in sorted(self.models.items())},
        }


# Prices for the built-in CPU model (``whetstone.models.builtin.BUILTIN_MODEL_NAME``); the name is
# spelled out rather than imported so that loading prices never imports the model generator.
BUILTIN_PRICE = Price(train_tokens=0.40, prefill_tokens=0.10, sample_tokens=0.30)
DEFAULT_PRICE_TABLE = PriceTable(
    default=BUILTIN_PRICE, models={"whetstone/tiny-qwen3": BUILTIN_PRICE}
)
