"""Prices: what each meter costs on each base model, from which date, in exact decimals.

Users pay only for work (``UsageMeter``): train, forward, prefill (full and cached) and sample
tokens, and, at zero unless configured, checkpoints and their stored bytes. Prices are operator
configuration, loaded once at start-up from a JSON file (or the built-in table) with the model
registry's prices laid over it, and handed to the ledger when it prices a report. The ledger
stores quantities, never money, so a corrected price reprices every later report.

Units: token meters are priced per 1,000,000 tokens, ``checkpoints`` per checkpoint and
``checkpoint_bytes`` per GB (10^9 bytes) stored. Every amount is a ``Decimal``, parsed from the
file's text (a JSON number ``0.1`` becomes ``Decimal("0.1")``, not the float's binary expansion),
and costs are computed in ``Decimal``: a sum of costs equals the cost of the sum, to the last digit.

JSON layout (``from`` is a UTC date; a price applies from that midnight until the next one)::

    {
      "default": {"train_tokens": "0.40", "prefill_tokens": "0.10", "sample_tokens": "0.30"},
      "models": {
        "whetstone/tiny-qwen3": [
          {"from": "2025-01-01", "train_tokens": "0.40", "prefill_tokens": "0.10",
           "sample_tokens": "0.30"},
          {"from": "2026-01-01", "train_tokens": "0.50", "prefill_tokens": "0.10",
           "sample_tokens": "0.30", "cached_prefill_tokens": "0.05"}
        ]
      }
    }

A price is one object (in effect since ever) or a list of dated ones. It must name the three
``Meter`` token meters; ``forward_tokens`` and ``cached_prefill_tokens`` default to the prefill
price, ``checkpoints`` and ``checkpoint_bytes`` to zero. ``default`` prices every base model that
``models`` does not list, so a model added to the registry is billed (not silently free) before
anyone remembers to price it. Effective dates are whole UTC days because reports price daily and
hourly buckets: one price holds for a whole bucket.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import get_args

from whetstone.messages import PRICE_UNITS, Meter, UsageMeter
from whetstone.models.registry import ModelRegistry

METERS: tuple[Meter, ...] = get_args(Meter)  # a price must name these
USAGE_METERS: tuple[UsageMeter, ...] = get_args(UsageMeter)
TOKENS_PER_PRICE_UNIT = 1_000_000
UNITS: Mapping[UsageMeter, int] = {m: n for m, (n, _) in PRICE_UNITS.items()}
UNIT_NAMES: Mapping[UsageMeter, str] = {m: name for m, (_, name) in PRICE_UNITS.items()}
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_decimal(value: object, what: str) -> Decimal:
    """``value`` (a string, int, float or Decimal) as a finite ``Decimal`` >= 0."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        raise ValueError(f"{what} must be a number >= 0, got {value!r}")
    try:
        # A float goes through its shortest repr: 0.1 is Decimal("0.1"), not 0.1000000000000000055.
        d = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except InvalidOperation:
        raise ValueError(f"{what} must be a number >= 0, got {value!r}") from None
    if not d.is_finite() or d < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return d


@dataclass(frozen=True)
class Price:
    """USD per unit (``UNITS``) of each meter; field names are the ``UsageMeter`` values.

    Numbers given as floats or strings are stored as ``Decimal``. ``forward_tokens`` and
    ``cached_prefill_tokens`` left out (``None``) cost what a prefill token costs.
    """

    train_tokens: Decimal
    prefill_tokens: Decimal
    sample_tokens: Decimal
    forward_tokens: Decimal | None = None
    cached_prefill_tokens: Decimal | None = None
    checkpoints: Decimal = Decimal(0)
    checkpoint_bytes: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        # A negative or NaN price would silently corrupt every invoice; refuse it at load time.
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in ("forward_tokens", "cached_prefill_tokens"):
                value = self.prefill_tokens
            object.__setattr__(self, f.name, to_decimal(value, f"price for {f.name}"))

    def per_unit(self, meter: UsageMeter) -> Decimal:
        if meter not in UNITS:
            raise ValueError(f"unknown meter {meter!r}")
        value: Decimal = getattr(self, meter)
        return value

    def usd_per_million(self, meter: UsageMeter) -> float:
        """For display only (a float); money is computed with ``per_unit``."""
        return float(self.per_unit(meter))

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> Price:
        unknown = set(d) - set(USAGE_METERS)
        missing = set(METERS) - set(d)
        if unknown or missing:
            optional = sorted(set(USAGE_METERS) - set(METERS))
            raise ValueError(
                f"price needs {sorted(METERS)} (and may name {optional}); "
                f"unknown {sorted(unknown)}, missing {sorted(missing)}"
            )
        values = {m: to_decimal(v, f"price for {m}") for m, v in d.items()}
        return cls(**values)  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, str]:
        return {m: str(self.per_unit(m)) for m in USAGE_METERS}


@dataclass(frozen=True)
class PriceSchedule:
    """One base model's prices over time: ``(effective_from, price)`` sorted by date; the first
    entry also covers everything before its date (usage is never free for want of a price)."""

    entries: tuple[tuple[datetime, Price], ...]

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError("a price schedule needs at least one price")
        starts = [start for start, _ in self.entries]
        if starts != sorted(starts) or len(set(starts)) != len(starts):
            raise ValueError("price dates must be distinct and in order")
        for start in starts:
            if start.tzinfo is None or start != datetime.combine(start.date(), time(), UTC):
                raise ValueError(f"a price's date must be a UTC midnight, got {start}")

    @classmethod
    def always(cls, price: Price) -> PriceSchedule:
        return cls(((EPOCH, price),))

    def at(self, ts: datetime) -> Price:
        starts = [start for start, _ in self.entries]
        i = bisect.bisect_right(starts, ts) - 1
        return self.entries[max(i, 0)][1]

    @property
    def current(self) -> Price:
        return self.at(datetime.now(UTC))

    @classmethod
    def from_json(cls, value: object, what: str) -> PriceSchedule:
        if isinstance(value, Mapping):
            return cls.always(Price.from_dict(value))
        if not isinstance(value, Sequence) or isinstance(value, str) or not value:
            raise ValueError(f"{what}: a price is an object or a non-empty list of dated ones")
        entries: list[tuple[datetime, Price]] = []
        for item in value:
            if not isinstance(item, Mapping) or "from" not in item:
                raise ValueError(f"{what}: each dated price needs 'from' (a UTC date)")
            day = date.fromisoformat(str(item["from"]))
            rest = {k: v for k, v in item.items() if k != "from"}
            entries.append((datetime.combine(day, time(), UTC), Price.from_dict(rest)))
        return cls(tuple(sorted(entries, key=lambda e: e[0])))

    def to_json(self) -> object:
        if len(self.entries) == 1 and self.entries[0][0] == EPOCH:
            return self.entries[0][1].to_dict()
        return [{"from": start.date().isoformat(), **p.to_dict()} for start, p in self.entries]


@dataclass(frozen=True)
class PriceTable:
    """Base-model name -> prices over time, with ``default`` for every model not listed.

    ``default`` and the values of ``models`` may be plain ``Price`` objects (in effect always).
    """

    default: PriceSchedule | Price
    models: Mapping[str, PriceSchedule | Price] = field(default_factory=dict)

    def schedule(self, base_model: str) -> PriceSchedule:
        return _as_schedule(self.models.get(base_model, self.default))

    def price_for(self, base_model: str, at: datetime | None = None) -> Price:
        """The price of ``base_model`` at ``at`` (default: now)."""
        return self.schedule(base_model).at(at or datetime.now(UTC))

    def cost(
        self, base_model: str, meter: UsageMeter, quantity: int, at: datetime | None = None
    ) -> Decimal:
        """Exact cost in USD of ``quantity`` units of ``meter`` on ``base_model`` at ``at``."""
        if quantity < 0:
            raise ValueError(f"quantity must be >= 0, got {quantity}")
        unit_price = self.price_for(base_model, at).per_unit(meter)
        return unit_price * quantity / UNITS[meter]

    def cost_usd(self, base_model: str, meter: UsageMeter, tokens: int) -> float:
        """Today's cost as a float, for display; money paths use ``cost``."""
        return float(self.cost(base_model, meter, tokens))

    def change_dates(self) -> list[datetime]:
        """Every date on which some price changes (the first entries excluded)."""
        schedules = [_as_schedule(p) for p in [self.default, *self.models.values()]]
        return sorted({start for sched in schedules for start, _ in sched.entries[1:]})

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> PriceTable:
        unknown = set(d) - {"default", "models"}
        if unknown:
            raise ValueError(f"unknown keys in price table: {sorted(unknown)}")
        if "default" not in d:
            raise ValueError("price table needs a 'default' price")
        models = d.get("models", {})
        if not isinstance(models, Mapping):
            raise ValueError("'models' must be an object of base-model name -> price")
        return cls(
            default=PriceSchedule.from_json(d["default"], "default"),
            models={str(n): PriceSchedule.from_json(p, str(n)) for n, p in models.items()},
        )

    @classmethod
    def from_json(cls, path: str | Path) -> PriceTable:
        # Numbers parse as Decimal straight from the text: no float ever holds a price.
        return cls.from_dict(json.loads(Path(path).read_text(), parse_float=Decimal))

    @classmethod
    def from_registry(cls, registry: ModelRegistry, base: PriceTable | None = None) -> PriceTable:
        """``base`` (default: the built-in table) with every registry entry's own prices on top.

        A model the registry prices is billed at the registry's price (in effect always), even
        where ``base`` lists it too; a model without prices keeps ``base``'s price for it, or
        ``base.default``.
        """
        base = base or DEFAULT_PRICE_TABLE
        models: dict[str, PriceSchedule | Price] = dict(base.models)
        for spec in registry.specs():
            if spec.prices is not None:
                models[spec.name] = Price.from_dict(spec.prices)
        return cls(default=base.default, models=models)

    def to_dict(self) -> dict[str, object]:
        return {
            "default": _as_schedule(self.default).to_json(),
            "models": {name: self.schedule(name).to_json() for name in sorted(self.models)},
        }


def _as_schedule(price: PriceSchedule | Price) -> PriceSchedule:
    return price if isinstance(price, PriceSchedule) else PriceSchedule.always(price)


# Prices for the built-in CPU model (``whetstone.models.builtin.BUILTIN_MODEL_NAME``); the name is
# spelled out rather than imported so that loading prices never imports the model generator.
BUILTIN_PRICE = Price(
    train_tokens=Decimal("0.40"), prefill_tokens=Decimal("0.10"), sample_tokens=Decimal("0.30")
)
DEFAULT_PRICE_TABLE = PriceTable(
    default=BUILTIN_PRICE, models={"whetstone/tiny-qwen3": BUILTIN_PRICE}
)
