"""Fair sharing of one worker among tenants: which queue's next request runs now.

A worker holds queues with ready work (a trainer: one per run; a sampler: one per tenant), each
owned by a tenant. Taking them in arrival order (FIFO over everything) lets one tenant that
floods a worker starve the others; this policy shares the worker by tenant instead, whatever
the number of queues or requests each tenant has.

The rule is start-time fair queuing (weighted fair queuing with equal weights): every tenant
carries a virtual finish time, advanced by the cost of each request it is served (tokens, for
instance, so a tenant of big batches gets as much compute as one of small ones, not more). The
next request comes from the ready tenant whose start time, ``max(its finish, the worker's
virtual clock)``, is the smallest; the clock moves to that start. A tenant that was idle starts
at the clock: it cannot bank credit while away and flood later, and it waits for no one's
backlog. Ties go to the tenant served least recently, then by name. Within a tenant its queues
take turns (round robin, the least recently served first).

Pure bookkeeping, no I/O and no clock: the worker's loop asks ``pick`` for every request it runs
(the unit tests drive it directly). State is kept only for tenants and queues ahead of the clock
or with work, so it stays as small as the set of busy tenants.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Ready:
    """A queue with work: its tenant and the cost of its next request (any unit, > 0)."""

    tenant: str
    cost: float = 1.0


class FairShare(Generic[K]):
    def __init__(self) -> None:
        self._clock = 0.0  # virtual time: the start of the last request picked
        self._finish: dict[str, float] = {}  # tenant -> virtual finish of its last request
        self._tenant_turn: dict[str, int] = {}  # tenant -> pick number when last served
        self._queue_turn: dict[K, int] = {}  # queue -> pick number when last served
        self._picks = 0

    def pick(self, ready: Mapping[K, Ready], among: Collection[K] | None = None) -> K | None:
        """The queue whose next request runs now, among ``ready`` (None when it is empty); the
        request is charged to its tenant at once. With ``among``, only those queues may be
        picked while the others still count as waiting (their turns are kept)."""
        chosen = self.peek(ready, among)
        if chosen is None:
            return None
        tenant = ready[chosen].tenant
        start = self._start(tenant)
        self._clock = start
        self._finish[tenant] = start + max(ready[chosen].cost, 0.0)
        self._picks += 1
        self._tenant_turn[tenant] = self._queue_turn[chosen] = self._picks
        self._forget_idle(ready)
        return chosen

    def peek(self, ready: Mapping[K, Ready], among: Collection[K] | None = None) -> K | None:
        """The queue ``pick`` would choose now, charging nothing: a worker that runs several
        queues' requests together (the trainer's passes) lets the next one join only if it is
        the one whose turn it is, so running together never reorders the turns."""
        tenants: dict[str, list[K]] = {}
        for key, item in ready.items():
            if among is None or key in among:
                tenants.setdefault(item.tenant, []).append(key)
        if not tenants:
            return None
        tenant = min(
            tenants,
            key=lambda t: (self._start(t), self._tenant_turn.get(t, -1), t),
        )
        order = {key: n for n, key in enumerate(tenants[tenant])}
        return min(tenants[tenant], key=lambda k: (self._queue_turn.get(k, -1), order[k]))

    def _start(self, tenant: str) -> float:
        return max(self._finish.get(tenant, self._clock), self._clock)

    def _forget_idle(self, ready: Mapping[K, Ready]) -> None:
        """Drop what no longer matters: queues without work (one that comes back goes first
        among its tenant's, having waited longest) and tenants not ahead of the clock (one that
        comes back starts at the clock either way)."""
        busy = {item.tenant for item in ready.values()}
        for tenant in [t for t, f in self._finish.items() if f <= self._clock and t not in busy]:
            del self._finish[tenant]
            self._tenant_turn.pop(tenant, None)
        for key in [k for k in self._queue_turn if k not in ready]:
            del self._queue_turn[key]

    def finish_of(self, tenant: str) -> float:
        """A tenant's virtual finish time (the clock's for one with none): for tests and logs."""
        return self._finish.get(tenant, self._clock)
