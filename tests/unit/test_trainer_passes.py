"""plan_pass: which runs' next requests share the trainer's next base-model pass. The picks, in
order, are those fair sharing makes one request at a time; a pass takes one request per run,
closes at the first next turn that cannot join, and keeps to ``max_runs`` and the token budget.
No server: the worker's buffers are stood in for by per-run lists of (kind, tokens)."""

from __future__ import annotations

from services.trainer.passes import plan_pass
from whetstone.fairness import FairShare, Ready

BIG = 10**9


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
        ready = {
            run: Ready(tenant_of[run], float(tokens) if kind != "step" else 1.0)
            for run, (kind, tokens) in heads.items()
        }
        joinable = {run for run, (kind, _) in heads.items() if kind != "step"}
        planned = plan_pass(
            fair,
            ready,
            joinable.__contains__,
            max_runs=max_runs,
            budget_tokens=budget_tokens,
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
    "a2": [("step", 0), ("fb", 20), ("fb", 20)],
    "b1": [("fb", 10), ("fb", 10), ("step", 0), ("fwd", 5)],
    "c1": [("fwd", 30), ("fb", 5)],
}
TENANTS = {"a1": "a", "a2": "a", "b1": "b", "c1": "c"}


def test_nothing_ready_plans_nothing() -> None:
    assert plan_pass(FairShare(), {}, lambda run: True, max_runs=8, budget_tokens=BIG) == []


def test_passes_run_the_requests_in_the_order_of_one_at_a_time() -> None:
    passes = drive(copy(QUEUES), TENANTS)
    assert [run for p in passes for run, _, _ in p] == lone_order(copy(QUEUES), TENANTS)
    assert max(len(p) for p in passes) >= 3  # not vacuous: passes of several runs happened
    for p in passes:
        runs = [run for run, _, _ in p]
        assert len(set(runs)) == len(runs)  # one request per run: seq_id order holds
        if len(p) > 1:
            assert all(kind != "step" for _, kind, _ in p)  # only forwards and forward_backwards
    # each run's requests came in its own order
    for run, items in QUEUES.items():
        assert [(k, t) for p in passes for r, k, t in p if r == run] == items


def test_max_runs_and_the_token_budget_bound_a_pass() -> None:
    queues = {f"r{n}": [("fb", 10)] for n in range(6)}
    tenants = {run: run for run in queues}
    assert [len(p) for p in drive(copy(queues), tenants, max_runs=4)] == [4, 2]
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
