"""plan_pass: which runs' next requests share the trainer's next pass. The picks, in order, are
those fair sharing makes one request at a time; a pass is of one kind (forwards and
forward_backwards through the base model, or optim_steps through one optimizer call), takes one
request per run, closes at the first next turn that cannot join, and keeps to ``max_runs`` and
the token budget. No server: the worker's buffers are stood in for by per-run lists of (kind,
tokens)."""

from __future__ import annotations

import random

from services.trainer.passes import plan_pass
from whetstone.fairness import FairShare, Ready

BIG = 10**9
# The kind of pass each request kind may share, as the worker names them (a save runs alone).
PASS_OF = {"fb": "forward_backward", "fwd": "forward_backward", "step": "optim_step", "save": None}


def turn(tenant: str, kind: str, tokens: int) -> Ready:
    """A request's turn as the worker states it: its tenant and cost (tokens; a step or a
    save: 1)."""
    return Ready(tenant, float(tokens) if kind in ("fb", "fwd") else 1.0)


def drive(
    queues: dict[str, list[tuple[str, int]]],
    tenant_of: dict[str, str],
    *,
    max_runs: int = 8,
    budget_tokens: float = BIG,
) -> list[list[tuple[str, str, int]]]:
    """Plan passes until every queue is empty: each pass as [(run, kind, tokens)]."""
    fair: FairShare[str] = FairShare()
    passes = []
    while any(queues.values()):
        heads = {run: items[0] for run, items in queues.items() if items}
        ready = {run: turn(tenant_of[run], *head) for run, head in heads.items()}
        after = {run: turn(tenant_of[run], *items[1]) for run, items in queues.items() if items[1:]}
        planned = plan_pass(
            fair,
            ready,
            lambda run, heads=heads: PASS_OF[heads[run][0]],
            max_runs=max_runs,
            budget_tokens=budget_tokens,
            after=after,
        )
        passes.append([(run, *queues[run].pop(0)) for run in planned])
    return passes


def lone_order(queues: dict[str, list[tuple[str, int]]], tenant_of: dict[str, str]) -> list[str]:
    """The runs in the order fair sharing runs their requests one at a time."""
    return [run for p in drive(queues, tenant_of, max_runs=1) for run, _, _ in p]


def copy(queues: dict[str, list[tuple[str, int]]]) -> dict[str, list[tuple[str, int]]]:
    return {run: list(items) for run, items in queues.items()}


QUEUES = {
    "a1": [("fb", 10), ("step", 0), ("fwd", 10), ("fb", 10)],
    "a2": [("step", 0), ("fb", 20), ("fb", 20), ("step", 0)],
    "b1": [("fb", 10), ("fb", 10), ("step", 0), ("fwd", 5), ("save", 0)],
    "c1": [("fwd", 30), ("fb", 5), ("step", 0)],
    "d1": [("step", 0), ("save", 0), ("step", 0)],
}
TENANTS = {"a1": "a", "a2": "a", "b1": "b", "c1": "c", "d1": "d"}


def test_nothing_ready_plans_nothing() -> None:
    none = plan_pass(FairShare(), {}, lambda run: "optim_step", max_runs=8, budget_tokens=BIG)
    assert none == []


def test_passes_run_the_requests_in_the_order_of_one_at_a_time() -> None:
    passes = drive(copy(QUEUES), TENANTS)
    assert [run for p in passes for run, _, _ in p] == lone_order(copy(QUEUES), TENANTS)
    # not vacuous: passes of several runs happened, of both kinds
    shared = {PASS_OF[p[0][1]] for p in passes if len(p) > 1}
    assert shared == {"forward_backward", "optim_step"}
    assert max(len(p) for p in passes) >= 3
    for p in passes:
        runs = [run for run, _, _ in p]
        assert len(set(runs)) == len(runs)  # one request per run: seq_id order holds
        if len(p) > 1:
            assert len({PASS_OF[kind] for _, kind, _ in p}) == 1  # a pass is of one kind
            assert all(kind != "save" for _, kind, _ in p)  # a save runs alone
    # each run's requests came in its own order
    for run, items in QUEUES.items():
        assert [(k, t) for p in passes for r, k, t in p if r == run] == items


def test_max_runs_and_the_token_budget_bound_a_pass() -> None:
    queues = {f"r{n}": [("fb", 10)] for n in range(6)}
    tenants = {run: run for run in queues}
    assert [len(p) for p in drive(copy(queues), tenants, max_runs=4)] == [4, 2]
    steps = {f"r{n}": [("step", 0)] for n in range(6)}
    assert [len(p) for p in drive(copy(steps), tenants, max_runs=4)] == [4, 2]
    assert [len(p) for p in drive(copy(steps), tenants, max_runs=1)] == [1] * 6
    assert [len(p) for p in drive(copy(queues), tenants, budget_tokens=25)] == [2, 2, 2]
    # a first request past the budget still runs, alone
    lone = drive({"x": [("fb", 40)], "y": [("fb", 5)]}, {"x": "x", "y": "y"}, budget_tokens=30)
    assert [len(p) for p in lone] == [1, 1]


def test_a_pass_closes_at_a_turn_that_cannot_join() -> None:
    """After b's forward_backward, the next turn is a's optim_step: it ends the pass, and c's
    forward_backward, whose turn comes after a's, does not jump ahead of it."""
    queues = {"b": [("fb", 10)], "a": [("step", 0)], "c": [("fb", 10)]}
    tenants = {"b": "t1", "a": "t2", "c": "t3"}  # equal standing: turns go by tenant name
    passes = drive(queues, tenants)
    assert [[run for run, _, _ in p] for p in passes] == [["b"], ["a"], ["c"]]


def test_steps_share_a_pass_and_close_at_a_turn_of_another_kind() -> None:
    """Three tenants' steps go together; a's forward_backward, whose turn comes between b's and
    c's steps, ends the step pass, and c's step does not jump ahead of it. A save runs alone."""
    queues = {
        "a": [("step", 0), ("fb", 10)],
        "b": [("step", 0), ("step", 0)],
        "c": [("step", 0), ("save", 0)],
        "d": [("save", 0), ("step", 0)],
    }
    tenants = {"a": "t1", "b": "t2", "c": "t3", "d": "t4"}  # equal standing: turns by name
    got = [[(run, kind) for run, kind, _ in p] for p in drive(copy(queues), tenants)]
    assert got == [
        [("a", "step"), ("b", "step"), ("c", "step")],
        [("d", "save")],
        [("a", "fb")],
        [("b", "step")],
        [("c", "save")],
        [("d", "step")],
    ]
    assert [r for p in got for r, _ in p] == lone_order(copy(queues), tenants)


def test_a_turn_of_a_run_already_in_the_pass_closes_it() -> None:
    """After a1's and b1's steps, the turn is tenant a's again, with a1's forward_backward (held
    behind its step): one at a time runs it before b2's step, so b2 may not join the pass."""
    queues = {"a1": [("step", 0), ("fb", 1)], "b1": [("step", 0)], "b2": [("step", 0)]}
    tenants = {"a1": "a", "b1": "b", "b2": "b"}
    got = [[run for run, _, _ in p] for p in drive(copy(queues), tenants)]
    assert got == [["a1", "b1"], ["a1"], ["b2"]]
    assert [r for p in got for r in p] == lone_order(copy(queues), tenants)


def test_random_queues_run_in_the_order_of_one_at_a_time() -> None:
    rng = random.Random(7)
    several = 0
    for _ in range(400):
        runs = [f"{t}{n}" for t in "abc"[: rng.randint(1, 3)] for n in range(rng.randint(1, 2))]
        kinds = ["fb", "fwd", "step", "save"]
        queues = {
            run: [(rng.choice(kinds), rng.choice([1, 5, 20])) for _ in range(rng.randint(1, 4))]
            for run in runs
        }
        tenants = {run: run[0] for run in runs}
        passes = drive(copy(queues), tenants, max_runs=rng.choice([2, 3, 8]), budget_tokens=30)
        assert [r for p in passes for r, _, _ in p] == lone_order(copy(queues), tenants), queues
        several += sum(len(p) > 1 for p in passes)
    assert several > 100  # not vacuous
