"""The scheduler's sweep plan (``sweep.plan``): which runs move, load, unload or are assigned
again, which sessions expire, and which stale holders drop a run. Times are parameters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.scheduler.placement import Placement
from services.scheduler.sweep import Assign, Discard, Expire, Load, Move, Unload, plan
from whetstone.messages import LoraConfig, SessionRecord, TrainingRunRecord, WorkerHeartbeat

TINY = "whetstone/tiny-qwen3"
NOW = datetime(2026, 1, 1, tzinfo=UTC)
TTL_S = 60.0


def run(n: int, session: str = "s1") -> TrainingRunRecord:
    return TrainingRunRecord(
        run_id=f"{session}:train:{n}",
        tenant="t",
        session_id=session,
        base_model=TINY,
        lora=LoraConfig(),
    )


def session(sid: str = "s1", silent_s: float = 0.0, finished: bool = False) -> SessionRecord:
    return SessionRecord(
        session_id=sid,
        tenant="t",
        last_heartbeat_at=NOW - timedelta(seconds=silent_s),
        finished=finished,
    )


def workers(*beats: tuple[str, list[str], bool], now: float = 100.0) -> Placement:
    p = Placement(worker_timeout_s=5.0, now=0.0)
    for worker_id, runs, draining in beats:
        p.observe(
            WorkerHeartbeat(
                worker_id=worker_id,
                role="trainer",
                base_models=[TINY],
                runs=runs,
                max_runs=4,
                draining=draining,
            ),
            now=now,
        )
    return p


def test_a_run_on_a_dead_or_draining_worker_moves() -> None:
    r1, r2 = run(1), run(2)
    p = workers(("w2", [r2.run_id], True), ("w3", [], False), now=100.0)
    p.observe(
        WorkerHeartbeat(
            worker_id="w1", role="trainer", base_models=[TINY], runs=[r1.run_id], max_runs=4
        ),
        now=90.0,
    )
    actions = plan(
        {r1.run_id: ("w1", 7), r2.run_id: ("w2", 8)},
        {r1.run_id: r1, r2.run_id: r2},
        {"s1": session()},
        {},
        p,
        now=100.0,
        wall_now=NOW,
        session_ttl_s=TTL_S,
    )
    assert actions == [Move(r1, "w1", 7), Move(r2, "w2", 8)]


def test_a_new_scheduler_waits_a_timeout_before_it_calls_an_unknown_worker_dead() -> None:
    r1 = run(1)
    p = Placement(worker_timeout_s=5.0, now=0.0)
    args = ({r1.run_id: ("w1", 1)}, {r1.run_id: r1}, {}, {})
    assert plan(*args, p, now=4.0, wall_now=NOW, session_ttl_s=TTL_S) == []
    assert plan(*args, p, now=6.0, wall_now=NOW, session_ttl_s=TTL_S) == [Move(r1, "w1", 1)]


def test_a_silent_session_expires_and_its_idle_runs_unload() -> None:
    r1, r2 = run(1), run(2)
    p = workers(("w1", [r1.run_id, r2.run_id], False))
    actions = plan(
        {r1.run_id: ("w1", 1), r2.run_id: ("w1", 2)},
        {r1.run_id: r1, r2.run_id: r2},
        {"s1": session(silent_s=TTL_S + 1)},
        {r2.run_id: 3},  # r2 still has requests waiting: it stays until they ran
        p,
        now=100.0,
        wall_now=NOW,
        session_ttl_s=TTL_S,
    )
    assert actions == [Expire("s1"), Unload(r1, "w1", 1, False)]


def test_a_finished_sessions_run_on_a_gone_worker_only_loses_its_placement() -> None:
    r1 = run(1)
    actions = plan(
        {r1.run_id: ("w1", 1)},
        {r1.run_id: r1},
        {"s1": session(finished=True)},
        {},
        workers(now=100.0),
        now=100.0,
        wall_now=NOW,
        session_ttl_s=TTL_S,
    )
    assert actions == [Unload(r1, "w1", 1, True)]


def test_an_unplaced_run_with_waiting_requests_loads_and_a_lost_assignment_is_redone() -> None:
    r1, r2 = run(1), run(2)
    p = workers(("w1", [], False))
    actions = plan(
        {r2.run_id: ("w1", 1)},
        {r1.run_id: r1, r2.run_id: r2},
        {"s1": session()},
        {r1.run_id: 2},
        p,
        now=100.0,
        wall_now=NOW,
        session_ttl_s=TTL_S,
    )
    assert actions == [Assign(r2, "w1"), Load(r1)]
    p.reserve("w1", r2.run_id)  # an assignment in flight is not sent twice
    assert Assign(r2, "w1") not in plan(
        {r2.run_id: ("w1", 1)}, {r2.run_id: r2}, {}, {}, p, 100.0, NOW, TTL_S
    )


def test_a_worker_holding_a_run_placed_elsewhere_drops_it() -> None:
    r1 = run(1)
    p = workers(("w1", [r1.run_id], False), ("w2", [r1.run_id], False))
    actions = plan({r1.run_id: ("w2", 3)}, {r1.run_id: r1}, {}, {}, p, 100.0, NOW, TTL_S)
    assert actions == [Discard(r1.run_id, "w1")]


def test_a_draining_heartbeat_takes_the_worker_out_and_its_return_brings_capacity() -> None:
    p = Placement(worker_timeout_s=5.0, now=0.0)
    beat = WorkerHeartbeat(worker_id="w1", role="trainer", base_models=[TINY], max_runs=4)
    assert p.observe(beat, now=1.0)
    assert p.observe(beat.model_copy(update={"draining": True}), now=2.0)  # runs must move now
    assert p.gone("w1", now=2.0) and p.choose(TINY, now=2.0) is None
    assert p.observe(beat, now=3.0)  # restarted: room again
    assert not p.gone("w1", now=3.0) and p.choose(TINY, now=3.0) == "w1"
