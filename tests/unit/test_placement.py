"""Placement: which live trainer worker takes a new run (liveness from heartbeats, base model,
least load, ``max_runs``, and runs reserved since the worker's last heartbeat). Times are
passed explicitly, so no test sleeps."""

from __future__ import annotations

from services.scheduler.placement import Placement
from whetstone.messages import WorkerHeartbeat

TINY = "whetstone/tiny-qwen3"
BIG = "Qwen/Qwen3-8B"


def beat(
    worker_id: str, runs: list[str] = (), base: str = TINY, max_runs: int = 4
) -> WorkerHeartbeat:
    return WorkerHeartbeat(
        worker_id=worker_id, role="trainer", base_models=[base], runs=list(runs), max_runs=max_runs
    )


def test_a_worker_is_live_until_its_heartbeat_is_older_than_the_timeout() -> None:
    p = Placement(worker_timeout_s=5.0)
    p.observe(beat("w1"), now=100.0)
    assert p.is_live("w1", now=100.0)
    assert p.is_live("w1", now=105.0)  # the boundary still counts
    assert not p.is_live("w1", now=105.01)
    assert p.choose(TINY, now=106.0) is None  # a dead worker is never chosen
    p.observe(beat("w1"), now=106.0)  # it comes back
    assert p.choose(TINY, now=106.5) == "w1"
    assert not p.is_live("never-seen", now=106.0)


def test_choose_the_least_loaded_live_worker_of_the_base_model() -> None:
    p = Placement(worker_timeout_s=5.0)
    p.observe(beat("busy", runs=["a", "b"]), now=0.0)
    p.observe(beat("idle-other-model", base=BIG), now=0.0)
    p.observe(beat("light", runs=["c"]), now=0.0)
    assert p.choose(TINY, now=1.0) == "light"
    assert p.choose(BIG, now=1.0) == "idle-other-model"
    assert p.choose("unknown/model", now=1.0) is None
    p.observe(beat("dead-idle"), now=-10.0)  # emptier, but its last heartbeat is too old
    assert p.choose(TINY, now=1.0) == "light"


def test_ties_break_by_worker_id() -> None:
    p = Placement(worker_timeout_s=5.0)
    p.observe(beat("w2"), now=0.0)
    p.observe(beat("w1"), now=0.0)
    assert p.choose(TINY, now=0.0) == "w1"


def test_max_runs_is_respected() -> None:
    p = Placement(worker_timeout_s=5.0)
    p.observe(beat("full", runs=["a", "b"], max_runs=2), now=0.0)
    assert p.choose(TINY, now=0.0) is None
    p.observe(beat("roomy", runs=["c", "d", "e"], max_runs=4), now=0.0)
    assert p.choose(TINY, now=0.0) == "roomy"  # more loaded, but the only one with room
    p.observe(beat("no-capacity", max_runs=0), now=0.0)
    assert p.choose(TINY, now=0.0) == "roomy"


def test_reservations_count_until_a_heartbeat_lists_the_run() -> None:
    p = Placement(worker_timeout_s=5.0)
    p.observe(beat("w1", max_runs=2), now=0.0)
    p.observe(beat("w2", max_runs=2), now=0.0)
    assert p.choose(TINY, now=0.0) == "w1"
    p.reserve("w1", "r1")
    assert p.choose(TINY, now=0.0) == "w2"  # w1 now carries r1 before any heartbeat says so
    p.reserve("w2", "r2")
    p.reserve("w1", "r3")
    assert p.choose(TINY, now=0.0) == "w2"
    p.reserve("w2", "r4")
    assert p.choose(TINY, now=0.0) is None  # both full with reservations alone

    # A heartbeat sent before the assignment landed keeps the reservations.
    p.observe(beat("w1", runs=[], max_runs=2), now=1.0)
    assert p.workers["w1"].load == 2
    # One that lists the run replaces the reservation (no double count) ...
    p.observe(beat("w1", runs=["r1"], max_runs=2), now=2.0)
    assert p.workers["w1"].reserved == {"r3"}
    assert p.workers["w1"].load == 2
    # ... and once the runs are gone from the heartbeat, the room is back.
    p.observe(beat("w1", runs=["r3"], max_runs=2), now=3.0)
    assert p.workers["w1"].reserved == set()
    p.observe(beat("w1", runs=[], max_runs=2), now=4.0)
    assert p.choose(TINY, now=4.0) == "w1"


def test_reserving_the_same_run_twice_counts_once() -> None:
    p = Placement(worker_timeout_s=5.0)
    p.observe(beat("w1", max_runs=2), now=0.0)
    p.reserve("w1", "r1")
    p.reserve("w1", "r1")  # a retried placement
    assert p.workers["w1"].load == 1
    assert p.choose(TINY, now=0.0) == "w1"


def test_a_heartbeat_reports_when_it_brings_room() -> None:
    p = Placement(worker_timeout_s=5.0)
    assert p.observe(beat("w1", runs=["a"], max_runs=2), now=0.0)  # a new worker with room
    assert not p.observe(beat("w1", runs=["a"], max_runs=2), now=1.0)  # nothing changed
    assert not p.observe(beat("w1", runs=["a", "b"], max_runs=2), now=2.0)  # now full
    assert p.observe(beat("w1", runs=["b"], max_runs=2), now=3.0)  # a run left: room again
    assert p.observe(beat("w1", runs=["b"], max_runs=2), now=30.0)  # revived after a silence
    assert not p.observe(beat("full", runs=["x"], max_runs=1), now=30.0)  # new, but no room


def test_a_failed_assignment_gives_its_reservation_back() -> None:
    p = Placement(worker_timeout_s=5.0)
    p.observe(beat("w1", max_runs=1), now=0.0)
    p.reserve("w1", "r1")
    assert p.choose(TINY, now=0.5) is None
    p.release("w1", "r1")
    assert p.choose(TINY, now=0.5) == "w1"


def test_a_reservation_no_heartbeat_lists_lapses_after_the_timeout() -> None:
    """A run that left its worker before any heartbeat listed it (unloaded at once) stops
    counting once a heartbeat comes ``worker_timeout_s`` after the assignment."""
    p = Placement(worker_timeout_s=5.0)
    p.observe(beat("w1", max_runs=1), now=0.0)
    p.reserve("w1", "r1", now=0.0)
    assert not p.observe(beat("w1", max_runs=1), now=5.0)  # within the grace: still counted
    assert p.choose(TINY, now=5.0) is None
    assert p.observe(beat("w1", max_runs=1), now=5.5)  # lapsed: room again, and said so
    assert p.workers["w1"].reserved == set()
    assert p.choose(TINY, now=5.5) == "w1"
