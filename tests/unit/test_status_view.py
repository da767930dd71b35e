"""``whetstone status``: building a snapshot from raw readings, and rendering it (no server)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from rich.console import Console

from whetstone import subjects as s
from whetstone.messages import (
    LoraConfig,
    TrainingRunRecord,
    UsageReport,
    UsageRow,
    WorkerHeartbeat,
)
from whetstone.reports import run_costs
from whetstone.status import (
    WORKER_GONE_S,
    DeadLetter,
    Observed,
    QueueView,
    build_snapshot,
    consumer_label,
    render,
)

RUN = "sess-1:train:0"


# Billing's answer to the collector's query (grouped by run and meter): RUN's training tokens
# and checkpoint bytes (not tokens), and a sampler's tokens (no run: not a training run's cost).
BILLED = UsageReport(
    rows=[
        UsageRow(run_id=RUN, meter="train_tokens", tokens=1200, cost_usd=Decimal("0.0048")),
        UsageRow(run_id=RUN, meter="checkpoint_bytes", tokens=5000, cost_usd=Decimal("0.0001")),
        UsageRow(run_id=None, meter="sample_tokens", tokens=77, cost_usd=Decimal("1")),
    ]
)


def observed(dead_letters: list[DeadLetter] | None = None, billed: bool = True) -> Observed:
    now = 1000.0
    trainer = WorkerHeartbeat(
        worker_id="trainer-a", role="trainer", base_models=["m"], runs=[RUN], max_runs=8
    )
    gone = WorkerHeartbeat(worker_id="trainer-old", role="trainer", base_models=["m"])
    sampler = WorkerHeartbeat(worker_id="sampler-a", role="sampler", base_models=["m"])
    run = TrainingRunRecord(
        run_id=RUN, tenant="alice", session_id="sess-1", base_model="m", lora=LoraConfig(rank=8)
    )
    unplaced = TrainingRunRecord(
        run_id="sess-2:train:0",
        tenant="bob",
        session_id="sess-2",
        base_model="m",
        lora=LoraConfig(rank=4),
    )
    return Observed(
        beats={
            "trainer-a": (trainer, now - 0.5),
            "sampler-a": (sampler, now - 5.0),
            "trainer-old": (gone, now - WORKER_GONE_S - 1),
        },
        runs=[unplaced, run],
        placements={s.token(RUN): "trainer-a"},
        queues=[
            QueueView(s.USAGE_STREAM, "billing", "billing", 3, 1, 0),
            QueueView(s.TRAIN_STREAM, s.train_consumer(RUN), RUN, 2, 1, 4),
        ],
        dead_letters=dead_letters,
        costs=run_costs(BILLED) if billed else None,
    )


def test_snapshot_joins_runs_with_workers_and_queues() -> None:
    snap = build_snapshot(observed(), now=1000.0, nats_url="nats://x", base_url="http://y")
    assert [w.worker_id for w in snap.workers] == ["sampler-a", "trainer-a"]  # old one dropped
    assert snap.workers[1].runs == 1 and snap.workers[1].max_runs == 8
    by_run = {r.run_id: r for r in snap.runs}
    assert by_run[RUN].worker == "trainer-a" and by_run[RUN].queued == 3
    assert by_run["sess-2:train:0"].worker is None and by_run["sess-2:train:0"].queued == 0
    # Cost so far: every meter's money, only the token meters' quantities; a run billed nothing
    # yet costs zero.
    assert by_run[RUN].tokens == 1200 and by_run[RUN].cost_usd == Decimal("0.0049")
    assert by_run["sess-2:train:0"].tokens == 0 and by_run["sess-2:train:0"].cost_usd == 0
    assert [q.stream for q in snap.queues] == [s.TRAIN_STREAM, s.USAGE_STREAM]  # stream order
    assert snap.dead_letters is None


def test_consumer_labels_decode_their_tokens() -> None:
    assert consumer_label(s.train_consumer(RUN)) == RUN
    assert consumer_label(s.sample_consumer("org/model")) == "org/model"
    assert consumer_label("billing") == "billing"


def text_of(snap_observed: Observed) -> str:
    snap = build_snapshot(
        snap_observed,
        now=1000.0,
        nats_url="nats://x",
        base_url="http://y",
        taken_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    console = Console(record=True, width=200)
    console.print(render(snap))
    return console.export_text()


def test_render_shows_every_part() -> None:
    text = text_of(observed())
    for expected in (
        "trainer-a",
        "sampler-a",
        "1/8",
        "5 s ago",
        RUN,
        "alice",
        "unplaced",
        "WS_TRAIN",
        "billing",
        "no WS_DEADLETTER stream",
        "2026-01-02 03:04:05",
    ):
        assert expected in text, expected
    assert "trainer-old" not in text


def test_render_shows_the_last_dead_letters() -> None:
    dead = [
        DeadLetter(
            7, "ws.dlq.train.abc", datetime(2026, 1, 2, 3, 0, 0, tzinfo=UTC), {"Ws-Error": "boom"}
        ),
        DeadLetter(9, "ws.dlq.sample.def", None, {}),
    ]
    text = text_of(observed(dead))
    assert "recent errors (WS_DEADLETTER)" in text
    assert "ws.dlq.train.abc" in text and "Ws-Error=boom" in text
    assert text.index("ws.dlq.sample.def") < text.index("ws.dlq.train.abc")  # newest first


def run_cells(text: str, run_id: str) -> list[str]:
    line = next(line for line in text.splitlines() if run_id in line)
    return [cell.strip() for cell in line.split("│")[1:-1]]


def test_render_shows_each_runs_cost_so_far() -> None:
    text = text_of(observed())
    assert run_cells(text, RUN)[-2:] == ["1,200", "$0.004900"]
    assert run_cells(text, "sess-2:train:0")[-2:] == ["0", "$0.000000"]
    # Billing not answering: no numbers rather than zeros.
    assert run_cells(text_of(observed(billed=False)), RUN)[-2:] == ["-", "-"]
