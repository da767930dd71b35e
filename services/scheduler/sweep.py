"""What the active scheduler should change, from what the bus says now: a pure function.

Each sweep the handlers gather the placements (``ws_placements``), the requests waiting per run
(the train stream's subject counts), the records of those runs and their sessions, and the
workers' heartbeats (``Placement``); ``plan`` answers with the actions that bring them in line:

* ``Expire``: a session whose heartbeats stopped ``session_ttl_s`` ago is ended (finished).
* ``Unload``: a run of an ended session with nothing waiting leaves its worker (its snapshot is
  kept; a gone worker holds nothing, so only the placement goes).
* ``Move``: a run placed on a worker that died or drains goes to another live worker.
* ``Assign``: a run placed on a live worker that does not hold it (an assignment that failed, a
  restart that did not take it back) is assigned again.
* ``Load``: a run with waiting requests and no placement (unloaded earlier) is placed again; its
  new holder restores the snapshot.
* ``Discard``: a worker holds a run placed on another worker (it lost it while cut off): it drops
  the run without writing anything.

Less often (``checkpoint_sweep_interval_s``), ``expired_checkpoints`` names the checkpoints whose
TTL has passed (``DeleteCheckpoint``): their record and files are deleted.

Deciding from the current state alone (not from events) lets a standby that takes over carry on
with nothing handed to it. Time comes in as parameters, so the tests never sleep.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from services.scheduler.placement import Placement
from whetstone.messages import CheckpointRecord, SessionRecord, TrainingRunRecord


@dataclass(frozen=True)
class Expire:
    session_id: str


@dataclass(frozen=True)
class Unload:
    run: TrainingRunRecord
    worker_id: str
    revision: int  # of the placement, for the compare-and-set that removes it
    worker_gone: bool


@dataclass(frozen=True)
class Move:
    run: TrainingRunRecord
    worker_id: str
    revision: int


@dataclass(frozen=True)
class Assign:
    run: TrainingRunRecord
    worker_id: str


@dataclass(frozen=True)
class Load:
    run: TrainingRunRecord


@dataclass(frozen=True)
class Discard:
    run_id: str
    worker_id: str


@dataclass(frozen=True)
class DeleteCheckpoint:
    key: str  # in ``ws_checkpoints``
    revision: int  # of the record, for the compare-and-set that deletes it
    record: CheckpointRecord


Action = Expire | Unload | Move | Assign | Load | Discard


def expired_checkpoints(
    checkpoints: dict[str, tuple[CheckpointRecord, int]], wall_now: datetime
) -> list[DeleteCheckpoint]:
    """The checkpoints whose ``expires_at`` has passed, oldest expiry first."""
    expired = [
        DeleteCheckpoint(key, revision, record)
        for key, (record, revision) in checkpoints.items()
        if record.expires_at is not None and record.expires_at <= wall_now
    ]
    return sorted(expired, key=lambda action: (action.record.expires_at, action.key))


def session_ended(session: SessionRecord | None, wall_now: datetime, ttl_s: float) -> bool:
    """Finished, or silent for ``ttl_s``; a session with no record is left alone."""
    if session is None:
        return False
    return session.finished or (wall_now - session.last_heartbeat_at).total_seconds() > ttl_s


def plan(
    placements: dict[str, tuple[str, int]],  # run id -> (worker id, revision)
    runs: dict[str, TrainingRunRecord],
    sessions: dict[str, SessionRecord],
    queued: dict[str, int],  # run id -> requests waiting in its queue
    workers: Placement,
    now: float,
    wall_now: datetime,
    session_ttl_s: float,
) -> list[Action]:
    actions: list[Action] = []
    for session in sessions.values():
        if not session.finished and session_ended(session, wall_now, session_ttl_s):
            actions.append(Expire(session.session_id))
    for run_id, (worker_id, revision) in sorted(placements.items()):
        run = runs.get(run_id)
        if run is None or not worker_id:  # unknown, or a placement still waiting for room
            continue
        gone = workers.gone(worker_id, now)
        if queued.get(run_id, 0) == 0 and session_ended(
            sessions.get(run.session_id), wall_now, session_ttl_s
        ):
            actions.append(Unload(run, worker_id, revision, gone))
        elif gone:
            actions.append(Move(run, worker_id, revision))
        else:
            view = workers.workers.get(worker_id)
            if view is not None and run_id not in view.beat.runs and run_id not in view.reserved:
                actions.append(Assign(run, worker_id))
    for run_id, count in sorted(queued.items()):
        if count > 0 and run_id not in placements and run_id in runs:
            actions.append(Load(runs[run_id]))
    for view in workers.live(now):
        for run_id in view.beat.runs:
            placed = placements.get(run_id)
            if placed is not None and placed[0] and placed[0] != view.beat.worker_id:
                actions.append(Discard(run_id, view.beat.worker_id))
    return actions
