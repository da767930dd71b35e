"""Placement of training runs on trainer workers, from their heartbeats.

Pure bookkeeping, no I/O: the handlers feed it heartbeats and ask it where a run should go and
which workers are gone. A worker is live while its last heartbeat is ``worker_timeout_s`` recent
and does not say ``draining``; a worker never heard of is taken for gone only once this replica
has listened for ``worker_timeout_s`` (a scheduler that just started knows no one yet).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from whetstone.messages import WorkerHeartbeat


@dataclass
class WorkerView:
    beat: WorkerHeartbeat
    seen_at: float  # monotonic seconds
    reserved: set[str] = field(default_factory=set)  # runs assigned since the last heartbeat

    @property
    def load(self) -> int:
        return len(set(self.beat.runs) | self.reserved)


class Placement:
    def __init__(self, worker_timeout_s: float, now: float | None = None) -> None:
        self.worker_timeout_s = worker_timeout_s
        self.workers: dict[str, WorkerView] = {}
        self.listening_since = time.monotonic() if now is None else now

    def observe(self, beat: WorkerHeartbeat, now: float | None = None) -> bool:
        """Record a heartbeat; True when it brings capacity that was not there (a new or revived
        worker, or one whose load fell), so that waiting runs should be placed again now, or when
        the worker starts draining, so that its runs should move now."""
        now = time.monotonic() if now is None else now
        old = self.workers.get(beat.worker_id)
        new = WorkerView(beat, now, (old.reserved - set(beat.runs)) if old else set())
        self.workers[beat.worker_id] = new
        if beat.draining:
            return old is None or not old.beat.draining
        if new.load >= beat.max_runs:
            return False
        if old is None or old.beat.draining or now - old.seen_at > self.worker_timeout_s:
            return True  # new, or back from the dead
        return new.load < old.load

    def live(self, now: float | None = None) -> list[WorkerView]:
        now = time.monotonic() if now is None else now
        return [
            w
            for w in self.workers.values()
            if now - w.seen_at <= self.worker_timeout_s and not w.beat.draining
        ]

    def is_live(self, worker_id: str, now: float | None = None) -> bool:
        return any(w.beat.worker_id == worker_id for w in self.live(now))

    def gone(self, worker_id: str, now: float | None = None) -> bool:
        """True when ``worker_id`` died, drains, or has never been heard of in a full timeout:
        its runs must move."""
        now = time.monotonic() if now is None else now
        view = self.workers.get(worker_id)
        if view is None:
            return now - self.listening_since > self.worker_timeout_s
        return view.beat.draining or now - view.seen_at > self.worker_timeout_s

    def choose(self, base_model: str, now: float | None = None) -> str | None:
        """The least-loaded live worker that serves ``base_model`` and has room, or None."""
        candidates = [
            w
            for w in self.live(now)
            if base_model in w.beat.base_models and w.load < w.beat.max_runs
        ]
        if not candidates:
            return None
        best = min(candidates, key=lambda w: (w.load, w.beat.worker_id))
        return best.beat.worker_id

    def reserve(self, worker_id: str, run_id: str) -> None:
        self.workers[worker_id].reserved.add(run_id)

    def release(self, worker_id: str, run_id: str) -> None:
        """Undo ``reserve`` for an assignment that did not happen."""
        view = self.workers.get(worker_id)
        if view is not None:
            view.reserved.discard(run_id)
