"""Placement of training runs on trainer workers, from their heartbeats.

Pure bookkeeping, no I/O: the handlers feed it heartbeats and ask it where a run should go and
which workers are gone. A worker is live while its last heartbeat is ``worker_timeout_s`` recent
and does not say ``draining``; a worker never heard of is taken for gone only once this replica
has listened for ``worker_timeout_s`` (a scheduler that just started knows no one yet).

A run assigned to a worker counts against it (``reserve``) until a heartbeat lists it; a
reservation that no heartbeat has listed for ``worker_timeout_s`` lapses (the run left the worker
before any heartbeat saw it, e.g. ``unload_model`` right after creation), so it cannot hold the
worker's room for ever.
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
    reserved_at: dict[str, float] = field(default_factory=dict)  # monotonic seconds, per run

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
        kept = {
            run
            for run in (old.reserved - set(beat.runs) if old else set())
            if old and now - old.reserved_at.get(run, now) <= self.worker_timeout_s
        }
        at = {run: old.reserved_at[run] for run in kept if run in old.reserved_at} if old else {}
        new = WorkerView(beat, now, kept, at)
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

    def reserve(self, worker_id: str, run_id: str, now: float | None = None) -> None:
        view = self.workers[worker_id]
        view.reserved.add(run_id)
        view.reserved_at[run_id] = time.monotonic() if now is None else now

    def release(self, worker_id: str, run_id: str) -> None:
        """Undo ``reserve`` for an assignment that did not happen."""
        view = self.workers.get(worker_id)
        if view is not None:
            view.reserved.discard(run_id)
            view.reserved_at.pop(run_id, None)
