"""Placement of training runs on trainer workers, from their heartbeats.

Pure bookkeeping, no I/O: the handlers feed it heartbeats and ask it where a run should go.
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
    def __init__(self, worker_timeout_s: float) -> None:
        self.worker_timeout_s = worker_timeout_s
        self.workers: dict[str, WorkerView] = {}

    def observe(self, beat: WorkerHeartbeat, now: float | None = None) -> bool:
        """Record a heartbeat; True when it brings capacity that was not there (a new or revived
        worker, or one whose load fell), so that waiting runs should be placed again now."""
        now = time.monotonic() if now is None else now
        old = self.workers.get(beat.worker_id)
        new = WorkerView(beat, now, (old.reserved - set(beat.runs)) if old else set())
        self.workers[beat.worker_id] = new
        if new.load >= beat.max_runs:
            return False
        if old is None or now - old.seen_at > self.worker_timeout_s:
            return True  # new, or back from the dead
        return new.load < old.load

    def live(self, now: float | None = None) -> list[WorkerView]:
        now = time.monotonic() if now is None else now
        return [w for w in self.workers.values() if now - w.seen_at <= self.worker_timeout_s]

    def is_live(self, worker_id: str, now: float | None = None) -> bool:
        return any(w.beat.worker_id == worker_id for w in self.live(now))

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
