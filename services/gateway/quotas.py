"""Per-tenant quotas at the gateway: concurrent training runs and in-flight requests.

**Limits.** An API key may carry ``max_runs`` and ``max_inflight`` (``whetstone keys create
--max-runs N --max-inflight M``, ``whetstone keys set-limits``); a key without them gets the
platform's defaults (``GatewaySettings.default_max_runs``, ``default_max_inflight``); 0 means no
limit. The limits of the key that makes a request apply; what counts against them is the
tenant's, over all of its keys and every gateway. A run's creation (``create_model``, or a
``load_weights`` that creates one) takes a run slot, checked before the run is recorded, and no
in-flight slot; every other submission (training, sampling) takes an in-flight slot.

**Counting.** One record per tenant and quota in KV ``ws_quotas`` (``<tenant>.inflight`` and
``<tenant>.runs``, a ``QuotaSlots``): the ids holding a slot, each with when it was admitted.
Admission is a compare-and-set on that record, so gateways racing for a tenant's last slot never
both win, and the record lives in NATS, so a restarted gateway (or another replica) carries on
with the same count. Nothing ever has to give a slot back: the record is an index, and the truth
is elsewhere. When the record is full, the gateway checks its ids against that truth and drops
those that are done: a request once its future is final (or gone, past its TTL), a run once its
record says unloaded or its session has finished (the scheduler marks an expired session
finished). An id whose record is missing counts as done only once admitted ``GRACE_S`` ago:
its future or run record may not be written yet. So a crash anywhere (gateway, worker) leaks no
slot, workers take no part, and a tenant under its limits pays one read and one write per
submission (no limit: nothing at all).

**Refusing consumes nothing.** Over a limit the submission raises ``RateLimited`` (HTTP 429 with
``Retry-After``) before any dedup record, future or message exists, and nothing is billed. A 429
does not refuse a training request's seq_id: the SDK sends the same seq_id again
(``tinker-wire/protocol.md`` §4.7), so no ``Skip`` fills it. One exception keeps a run from
wedging itself: a training request without which its run's accepted requests cannot run is
admitted over the limit (``exempt``, ``Gateway._unblocks``). The SDK posts the chunks of one
``forward_backward`` at once, the lowest seq_id last and only after the others were accepted;
refusing any of them while its siblings hold the tenant's slots would leave them all waiting
until the reorder buffer's gap timeout failed them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from whetstone import bus as b
from whetstone import subjects as s
from whetstone.errors import RateLimited
from whetstone.messages import ApiKeyRecord, QuotaSlots, SessionRecord, TrainingRunRecord

GRACE_S = 60.0  # an id admitted this recently holds its slot while its record is missing
_CAS_TRIES = 50  # compare-and-set rounds before a contended admission gives up (a 429)
_Done = Callable[[str], Awaitable[bool | None]]  # True: done, False: not, None: no record


@dataclass(frozen=True)
class Limits:
    """A caller's quotas; 0 means no limit."""

    max_runs: int = 0
    max_inflight: int = 0

    @classmethod
    def of(cls, key: ApiKeyRecord, default: Limits) -> Limits:
        return cls(
            max_runs=default.max_runs if key.max_runs is None else key.max_runs,
            max_inflight=default.max_inflight if key.max_inflight is None else key.max_inflight,
        )


class Quotas:
    def __init__(self, bus: b.Bus, inflight_retry_s: float, runs_retry_s: float) -> None:
        self.bus = bus
        self.inflight_retry_s = inflight_retry_s
        self.runs_retry_s = runs_retry_s

    async def admit_request(
        self,
        tenant: str,
        request_id: str,
        limits: Limits,
        *,
        exempt: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        """Take an in-flight slot for ``request_id`` or raise ``RateLimited``. ``exempt``, asked
        only when the tenant is at its limit: True admits the request all the same (a training
        request its run would wedge without; it is counted)."""
        if limits.max_inflight == 0:
            return
        key = _key(tenant, "inflight")
        limit = limits.max_inflight
        if not await self._admit(key, request_id, limit, self._request_done, exempt):
            raise RateLimited(
                f"tenant {tenant!r} has {limits.max_inflight} requests in flight, its limit; "
                "retry once some have finished",
                self.inflight_retry_s,
            )

    async def release_request(self, tenant: str, request_id: str) -> None:
        """Give back a slot taken for a request id that will never have a future (a submission
        that lost the race for its dedup record to a copy of itself). Best effort: a slot left
        behind is pruned after ``GRACE_S`` anyway."""
        await self._drop(_key(tenant, "inflight"), request_id)

    async def admit_run(self, tenant: str, run_id: str, limits: Limits) -> None:
        """Take a run slot for ``run_id`` (again for a retried creation: no second slot) or
        raise ``RateLimited``."""
        if limits.max_runs == 0:
            return
        if not await self._admit(_key(tenant, "runs"), run_id, limits.max_runs, self._run_done):
            raise RateLimited(
                f"tenant {tenant!r} has {limits.max_runs} training runs, its limit; finish a "
                "session (or unload a run) first",
                self.runs_retry_s,
            )

    async def in_use(self, tenant: str, quota: str) -> int:
        """Slots held now (as recorded: pruning happens only at the limit)."""
        slots, _ = await self._read(_key(tenant, quota))
        return len(slots.slots)

    # ------------------------------------------------------------ the compare-and-set

    async def _admit(
        self,
        key: str,
        member: str,
        limit: int,
        done: _Done,
        exempt: Callable[[], Awaitable[bool]] | None = None,
    ) -> bool:
        """Add ``member`` to the record under ``key`` if it has fewer than ``limit`` members
        after pruning what ``done`` says finished, or if ``exempt()`` says so; False when
        full."""
        kv = self.bus.kv[s.QUOTAS_BUCKET]
        exempted = False
        for _ in range(_CAS_TRIES):
            slots, revision = await self._read(key)
            held = dict(slots.slots)
            if member in held:
                return True
            if len(held) >= limit and not exempted:
                held = await self._prune(held, done)
                if len(held) >= limit:
                    exempted = exempt is not None and await exempt()
                    if not exempted:
                        if len(held) < len(slots.slots):
                            await self._write(kv, key, held, revision)  # pruning's finds stay
                        return False
            held[member] = time.time()
            if await self._write(kv, key, held, revision):
                return True
        return False  # contended past reason: the client's retry comes back later

    async def _drop(self, key: str, member: str) -> None:
        kv = self.bus.kv[s.QUOTAS_BUCKET]
        for _ in range(_CAS_TRIES):
            slots, revision = await self._read(key)
            if member not in slots.slots:
                return
            held = {k: v for k, v in slots.slots.items() if k != member}
            if await self._write(kv, key, held, revision):
                return

    async def _read(self, key: str) -> tuple[QuotaSlots, int | None]:
        try:
            entry = await self.bus.kv[s.QUOTAS_BUCKET].get(key)
        except (KeyNotFoundError, NotFoundError):
            return QuotaSlots(), None
        if entry.value is None or entry.operation is not None:
            return QuotaSlots(), entry.revision
        return QuotaSlots.decode(entry.value), entry.revision

    @staticmethod
    async def _write(kv: object, key: str, held: dict[str, float], revision: int | None) -> bool:
        value = QuotaSlots(slots=held).encode()
        try:
            if revision is None:
                await kv.create(key, value)  # type: ignore[attr-defined]
            else:
                await kv.update(key, value, last=revision)  # type: ignore[attr-defined]
        except KeyWrongLastSequenceError:
            return False
        return True

    async def _prune(self, held: dict[str, float], done: _Done) -> dict[str, float]:
        """``held`` without the members that are done (a missing record: past ``GRACE_S``)."""
        cutoff = time.time() - GRACE_S
        members = list(held)
        states = await asyncio.gather(*(done(m) for m in members))
        return {
            m: held[m]
            for m, state in zip(members, states, strict=True)
            if state is False or (state is None and held[m] >= cutoff)
        }

    # ------------------------------------------------------------ the truth

    async def _request_done(self, request_id: str) -> bool | None:
        """Whether the request has finished; None while it has no future (yet, or any more)."""
        record = await b.future_record(self.bus, request_id)
        return None if record is None else record.final

    async def _run_done(self, run_id: str) -> bool | None:
        """Whether the run has ended; None while it has no record (yet: it is being created)."""
        run = await b.kv_get(self.bus.kv[s.RUNS_BUCKET], s.token(run_id), TrainingRunRecord)
        if run is None:
            return None
        if run.unloaded_at is not None:
            return True
        session = await b.kv_get(
            self.bus.kv[s.SESSIONS_BUCKET], s.token(run.session_id), SessionRecord
        )
        return session is None or session.finished


def _key(tenant: str, quota: str) -> str:
    return f"{s.token(tenant)}.{quota}"
