"""Which requests share the trainer's next base-model pass.

A worker holds many runs, each with a queue of requests in ``seq_id`` order. The next request to
run is the one whose turn it is under fair sharing (``whetstone.fairness``). When it is a
forward or forward_backward, the engine can put other runs' forward/forward_backward requests
through the same pass (``TrainerEngine.forward_backward_many``); this module decides which.

The rule keeps both promises of running one request at a time: a run contributes at most its
next request (its ``seq_id`` order cannot break), and a request joins only when it is the one
whose turn comes next (``FairShare.peek``), so the requests of a pass are exactly those that
would have run one after another and fair sharing sees no difference. The pass closes at the
first next turn that cannot join (another kind of request, or one past the token budget), or
at ``max_runs``. Pure bookkeeping on the fair-sharing state; the worker pops the requests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from whetstone.fairness import FairShare, Ready


def plan_pass(
    fair: FairShare[str],
    ready: Mapping[str, Ready],
    joins: Callable[[str], bool],
    *,
    max_runs: int,
    budget_tokens: float,
) -> list[str]:
    """The runs whose next requests make the next pass, in turn order (each turn charged).

    ``ready`` maps each run with a request that can run now to its tenant and that request's
    cost (tokens for a forward/forward_backward); ``joins(run)`` says whether that request may
    share a pass. The first turn's request is taken whatever its cost; the others only while
    the pass stays within ``budget_tokens``. Empty when nothing is ready.
    """
    first = fair.pick(ready)
    if first is None:
        return []
    planned = [first]
    budget = budget_tokens - ready[first].cost
    while joins(first) and len(planned) < max_runs:
        rest = [run for run in ready if run not in planned]
        following = fair.peek(ready, among=rest)
        if following is None or not joins(following) or ready[following].cost > budget:
            break
        fair.pick(ready, among=rest)  # charges the turn peek named
        planned.append(following)
        budget -= ready[following].cost
    return planned
