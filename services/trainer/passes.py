"""Which requests share the trainer's next pass.

A worker holds many runs, each with a queue of requests in ``seq_id`` order. The next request to
run is the one whose turn it is under fair sharing (``whetstone.fairness``). Some kinds of
request can run for several runs at once: forwards and forward_backwards through one base-model
pass (``TrainerEngine.forward_backward_many``), optim_steps through one optimizer call
(``TrainerEngine.optim_step_many``); this module decides which requests go together.

A pass is of one kind: the first request's. The rule keeps both promises of running one request
at a time: a run contributes at most its next request (its ``seq_id`` order cannot break), and a
request joins only when it is the one whose turn comes next (``FairShare.peek``), so the
requests of a pass are exactly those that would have run one after another and fair sharing
sees no difference. "Next" is judged as one at a time would judge it: a run already in the pass
still counts as ready when its following request is held too, and when the turn is its, the
pass closes (that request must wait for this one). The pass also closes at a turn of another
kind, at one past the token budget, or at ``max_runs``. Pure bookkeeping on the fair-sharing
state; the worker pops the requests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from whetstone.fairness import FairShare, Ready


def plan_pass(
    fair: FairShare[str],
    ready: Mapping[str, Ready],
    kind: Callable[[str], str | None],
    *,
    max_runs: int,
    budget_tokens: float,
    after: Mapping[str, Ready] | None = None,
) -> list[str]:
    """The runs whose next requests make the next pass, in turn order (each turn charged).

    ``ready`` maps each run with a request that can run now to its tenant and that request's
    cost (tokens for a forward/forward_backward, 1 for a step); ``after`` the same for the
    request following it, for the runs that hold that one too; ``kind(run)`` names the kind of
    pass a run's next request may share (``None``: it runs alone). The first turn's request is
    taken whatever its cost; the others only while they are of its kind and the pass stays
    within ``budget_tokens``. Empty when nothing is ready.
    """
    after = after or {}
    first = fair.pick(ready)
    if first is None:
        return []
    planned = [first]
    shared = kind(first)
    budget = budget_tokens - ready[first].cost
    while shared is not None and len(planned) < max_runs:
        # What one at a time would see now: the planned runs' next requests in their place.
        view = {run: after.get(run) if run in planned else turn for run, turn in ready.items()}
        waiting = {run: turn for run, turn in view.items() if turn is not None}
        following = fair.peek(waiting)
        if (
            following is None
            or following in planned
            or kind(following) != shared
            or ready[following].cost > budget
        ):
            break
        fair.pick(waiting)  # charges the turn peek named
        planned.append(following)
        budget -= ready[following].cost
    return planned
