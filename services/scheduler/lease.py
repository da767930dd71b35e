"""The active scheduler's lease: one key (``leader``) in KV ``ws_scheduler``.

Every scheduler replica calls ``tick`` every ``ttl_s / 3``. The holder renews the lease with a
compare-and-set on the key's revision; a standby watches the revision and takes the lease over
(compare-and-set again, so two standbys cannot both win) once it has not moved for ``ttl_s`` by
the standby's own monotonic clock, so the replicas' wall clocks never have to agree. A holder
whose renewal fails (another replica took over while it stalled) is a standby from then on.
"""

from __future__ import annotations

import time

from nats.js.errors import KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

import whetstone.subjects as s
from whetstone.messages import SchedulerLease


class LeaderLease:
    def __init__(self, kv: KeyValue | None, holder: str, ttl_s: float) -> None:
        self.kv = kv
        self.holder = holder
        self.ttl_s = ttl_s
        self.leader = False
        self._seen: tuple[int, float] | None = None  # (revision, when it was first seen)

    async def tick(self, now: float | None = None) -> bool:
        """Acquire, renew or watch the lease; True while this replica holds it."""
        now = time.monotonic() if now is None else now
        self.leader = await self._tick(now)
        return self.leader

    async def _tick(self, now: float) -> bool:
        assert self.kv is not None, "the lease's bucket is declared by bus.connect"
        mine = SchedulerLease(holder=self.holder).encode()
        try:
            entry = await self.kv.get(s.LEADER_KEY)
        except NotFoundError:  # never held, or deleted by a holder that stepped down
            try:
                await self.kv.create(s.LEADER_KEY, mine)
                return True
            except KeyWrongLastSequenceError:
                return False
        current = SchedulerLease.decode(entry.value) if entry.value else None
        if current is None or current.holder != self.holder:
            revision = entry.revision or 0
            if self._seen is None or self._seen[0] != revision:
                self._seen = (revision, now)  # the holder is alive: it renewed
                return False
            if now - self._seen[1] < self.ttl_s:
                return False
        try:  # renew ours, or take over a lease that lapsed
            await self.kv.update(s.LEADER_KEY, mine, last=entry.revision)
            return True
        except KeyWrongLastSequenceError:
            return False

    async def give_up(self) -> None:
        """Step down at once (a clean shutdown): a standby need not wait for the lease to lapse."""
        if not self.leader:
            return
        self.leader = False
        assert self.kv is not None
        try:
            entry = await self.kv.get(s.LEADER_KEY)
            if entry.value and SchedulerLease.decode(entry.value).holder == self.holder:
                await self.kv.delete(s.LEADER_KEY, last=entry.revision)
        except (NotFoundError, KeyWrongLastSequenceError):
            pass
