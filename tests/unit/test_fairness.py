"""FairShare: a worker's next request comes from the tenants in turn (start-time fair queuing by
cost), whatever the number of queues or requests each one has; and the sampler's batcher admits
by it."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from services.sampler.handlers import Batcher
from whetstone.fairness import FairShare, Ready
from whetstone.messages import SampleRequest, SampleResult, SamplingParams
from whetstone.tasks import Offload
from whetstone.tensors import Tensor


def drain(
    fair: FairShare[str], backlog: dict[str, int], tenant_of: Callable[[str], str], n: int
) -> list[str]:
    """Pick ``n`` times over queues with ``backlog[q]`` requests left; the queues picked."""
    picked = []
    for _ in range(n):
        ready = {q: Ready(tenant_of(q)) for q, left in backlog.items() if left}
        chosen = fair.pick(ready)
        assert chosen is not None
        backlog[chosen] -= 1
        picked.append(chosen)
    return picked


def test_nothing_ready_picks_nothing() -> None:
    assert FairShare[str]().pick({}) is None


def test_a_tenant_arriving_behind_a_flood_is_served_next() -> None:
    fair: FairShare[str] = FairShare()
    backlog = {"flood": 1000}
    assert drain(fair, backlog, lambda q: q, 50) == ["flood"] * 50
    backlog["late"] = 1
    # FIFO would serve the 950 flood requests first; the latecomer goes at once.
    assert drain(fair, backlog, lambda q: q, 2) == ["late", "flood"]


def test_equal_costs_alternate_between_tenants() -> None:
    fair: FairShare[str] = FairShare()
    picked = drain(fair, {"a": 10, "b": 10}, lambda q: q, 10)
    assert picked == ["a", "b"] * 5


def test_tenants_share_by_tenant_not_by_number_of_queues() -> None:
    fair: FairShare[str] = FairShare()
    backlog = {"a1": 100, "a2": 100, "a3": 100, "b1": 100}
    picked = drain(fair, backlog, lambda q: q[0], 60)
    by_tenant = Counter(q[0] for q in picked)
    assert by_tenant == {"a": 30, "b": 30}
    # within tenant a its queues take turns
    assert Counter(q for q in picked if q[0] == "a") == {"a1": 10, "a2": 10, "a3": 10}
    assert [q for q in picked if q[0] == "a"][:6] == ["a1", "a2", "a3", "a1", "a2", "a3"]


def test_costs_weigh_the_share() -> None:
    fair: FairShare[str] = FairShare()
    picked = []
    for _ in range(110):
        chosen = fair.pick({"big": Ready("big", cost=10.0), "small": Ready("small", cost=1.0)})
        assert chosen is not None
        picked.append(chosen)
    counts = Counter(picked)
    # ten small requests for every big one: the same tokens each
    assert counts == {"big": 10, "small": 100}


def test_an_idle_tenant_banks_no_credit() -> None:
    fair: FairShare[str] = FairShare()
    backlog = {"a": 1000}
    drain(fair, backlog, lambda q: q, 100)
    backlog["b"] = 1000  # b was away while a ran 100 requests
    picked = drain(fair, backlog, lambda q: q, 20)
    assert picked[:4] in (["b", "a", "b", "a"], ["a", "b", "a", "b"])
    assert Counter(picked) == {"a": 10, "b": 10}  # shared from now on, not b's 100 turns in a row


def test_state_shrinks_when_tenants_go_idle() -> None:
    fair: FairShare[str] = FairShare()
    backlog = {f"t{i}": 1 for i in range(50)}
    drain(fair, backlog, lambda q: q, 50)
    fair.pick({"last": Ready("last")})
    fair.pick({"last": Ready("last")})
    assert len(fair._finish) <= 1 and len(fair._queue_turn) <= 1


def test_requests_joining_a_pass_at_their_turn_keep_the_order_of_lone_picks() -> None:
    """The trainer's passes: after a pick, the next queue joins only while it is the one whose
    turn it is (``peek``) and can join; the picks, in order, are those made one at a time, so a
    queue that cannot join (a2) is not starved by its tenant's joining one (a1)."""
    ready = {"a1": Ready("a"), "a2": Ready("a"), "b1": Ready("b")}
    joinable = {"a1", "b1"}
    fair: FairShare[str] = FairShare()
    passes = []
    for _ in range(12):
        members = [fair.pick(ready)]
        while members[-1] in joinable:
            rest = [q for q in ready if q not in members]
            following = fair.peek(ready, among=rest)
            if following is None or following not in joinable:
                break
            assert fair.pick(ready, among=rest) == following  # peek charged nothing
            members.append(following)
        passes.append(members)
    alone = drain(FairShare(), {q: 100 for q in ready}, lambda q: q[0], 20)
    picks = [q for members in passes for q in members]
    assert picks == alone[: len(picks)]
    assert ["a1", "b1"] in passes and ["b1", "a1"] in passes  # passes of two happened
    assert Counter(picks)["a2"] >= 3


class RecordingEngine:
    """A stand-in for the sampler's engine (no model): records the tenants of the requests it
    is given and finishes each in the step after it was added."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self._running: list[int] = []

    @property
    def has_work(self) -> bool:
        return bool(self._running)

    @property
    def num_waiting(self) -> int:
        return 0

    def add(self, req: SampleRequest, adapter_id: str | None) -> int:
        self.added.append(req.tenant)
        self._running.append(len(self.added))
        return len(self.added)

    def step(self) -> list[tuple[int, SampleResult]]:
        done, self._running = self._running, []
        return [(h, SampleResult(sequences=[])) for h in done]

    def abort(self) -> list[int]:
        return []


def sample_request(tenant: str, n: int) -> SampleRequest:
    return SampleRequest(
        request_id=f"{tenant}-{n}",
        tenant=tenant,
        base_model="m",
        prompt=Tensor.from_list([1, 2, 3], "int64"),
        params=SamplingParams(max_tokens=4),
    )


async def test_the_batcher_admits_across_tenants_in_turn_and_reports_held_requests() -> None:
    engine = RecordingEngine()
    states: list[tuple[str, str]] = []
    batcher = Batcher(
        engine,  # type: ignore[arg-type]
        Offload("fairness-test"),
        max_batch=2,
        on_state=lambda req, state: states.append((req.request_id, state)),
        hold_report_s=0.0,
    )
    flood = [
        asyncio.ensure_future(batcher.generate(sample_request("a", n), None)) for n in range(8)
    ]
    await asyncio.sleep(0)  # the flood is queued before the other tenant's request
    other = asyncio.ensure_future(batcher.generate(sample_request("b", 0), None))
    await asyncio.sleep(0)
    runner = asyncio.ensure_future(batcher.run())
    try:
        await asyncio.wait_for(asyncio.gather(*flood, other), 10)
    finally:
        runner.cancel()
    assert sorted(engine.added) == ["a"] * 8 + ["b"]
    assert engine.added[:2] == ["a", "b"]  # FIFO would have added b's last, after 8 of a's
    # a's requests waiting behind their own tenant's turn were told so, and let in again
    held = [rid for rid, state in states if state == "paused_rate_limit"]
    assert held and all(rid.startswith("a-") for rid in held)
    assert {rid for rid, state in states if state == "active"} == set(held)
