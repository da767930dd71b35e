"""``whetstone status``: the operator's view of a running platform, in the terminal.

Three parts, kept apart so each is tested alone:

* ``StatusCollector`` does the I/O, read-only: it listens to worker heartbeats
  (``ws.ctl.heartbeat.>``, ``WorkerHeartbeat``) and reads training runs and their placements
  (KV ``ws_runs``, ``ws_placements``), the depth of every consumer of the work streams (JetStream
  consumer info: pending and ack-pending) and the last messages of the dead-letter stream
  ``WS_DEADLETTER`` when it exists, and asks billing for each run's cost so far (request/reply
  on ``ws.ctl.billing.report``, grouped by run and meter). It declares nothing on the bus.
* ``build_snapshot`` is pure: it turns what was read into a ``StatusSnapshot`` (workers not
  heard from lately are dropped, runs are joined with their worker, queue depth and cost).
* ``render`` turns a snapshot into rich tables; ``show`` prints one (``--once``) or refreshes
  them with ``rich.live`` until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NoKeysError, NotFoundError
from nats.js.kv import KeyValue
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from whetstone import subjects as s
from whetstone.messages import TrainingRunRecord, UsageReport, UsageReportQuery, WorkerHeartbeat
from whetstone.reports import RUN_COST_GROUPING, RunCost, run_costs

WORK_STREAMS = (s.TRAIN_STREAM, s.SAMPLE_STREAM, s.USAGE_STREAM, s.CONTROL_STREAM)
DEADLETTER_STREAM = s.DEADLETTER_STREAM  # ws.dlq.>; skipped while it does not exist
DEAD_LETTERS_SHOWN = 5
WORKER_LATE_S = 3.0  # a worker not heard from for this long is shown as late ...
WORKER_GONE_S = 15.0  # ... and for this long is not shown at all
ROWS_SHOWN = 20  # per table; the rest is counted
BILLING_TIMEOUT_S = 1.0  # the view shows no costs rather than wait longer for billing


@dataclass(frozen=True)
class WorkerView:
    worker_id: str
    role: str
    base_models: tuple[str, ...]
    runs: int
    max_runs: int
    last_beat_s: float  # seconds since its last heartbeat


@dataclass(frozen=True)
class QueueView:
    stream: str
    consumer: str
    label: str  # what the consumer serves: a run id, a base model, or its own name
    pending: int  # not yet delivered
    ack_pending: int  # delivered, not yet acknowledged
    redelivered: int


@dataclass(frozen=True)
class RunView:
    run_id: str
    tenant: str
    base_model: str
    rank: int
    worker: str | None  # None: not placed (yet)
    queued: int  # pending + ack-pending requests on its consumer
    tokens: int | None = None  # billed so far (token meters); None: billing did not answer
    cost_usd: Decimal | None = None


@dataclass(frozen=True)
class DeadLetter:
    seq: int
    subject: str
    at: datetime | None
    headers: Mapping[str, str]


@dataclass(frozen=True)
class StatusSnapshot:
    taken_at: datetime
    nats_url: str
    base_url: str | None
    workers: tuple[WorkerView, ...]
    runs: tuple[RunView, ...]
    queues: tuple[QueueView, ...]
    dead_letters: tuple[DeadLetter, ...] | None  # None: no dead-letter stream
    problems: tuple[str, ...] = ()  # what could not be read


@dataclass
class Observed:
    """Raw readings, as the collector gathers them."""

    beats: dict[str, tuple[WorkerHeartbeat, float]] = field(default_factory=dict)  # id -> at
    runs: list[TrainingRunRecord] = field(default_factory=list)
    placements: dict[str, str] = field(default_factory=dict)  # run token -> worker id
    queues: list[QueueView] = field(default_factory=list)
    dead_letters: list[DeadLetter] | None = None
    costs: dict[str, RunCost] | None = None  # run id -> cost so far; None: billing did not answer
    problems: list[str] = field(default_factory=list)


def consumer_label(consumer: str) -> str:
    """A consumer's name in words: per-run and per-model consumers carry a ``token()``."""
    for prefix in ("run-", "sampler-"):
        if consumer.startswith(prefix):
            try:
                return s.untoken(consumer.removeprefix(prefix))
            except (ValueError, UnicodeDecodeError):
                return consumer
    return consumer


def build_snapshot(
    observed: Observed,
    now: float,
    nats_url: str,
    base_url: str | None = None,
    taken_at: datetime | None = None,
) -> StatusSnapshot:
    """The snapshot of ``observed`` at monotonic time ``now``; pure."""
    workers = sorted(
        (
            WorkerView(
                beat.worker_id,
                beat.role,
                tuple(beat.base_models),
                len(beat.runs),
                beat.max_runs,
                max(0.0, now - at),
            )
            for beat, at in observed.beats.values()
            if now - at < WORKER_GONE_S
        ),
        key=lambda w: (w.role, w.worker_id),
    )
    depth = {
        q.consumer: q.pending + q.ack_pending for q in observed.queues if q.stream == s.TRAIN_STREAM
    }
    costs = observed.costs
    runs = sorted(
        (
            RunView(
                r.run_id,
                r.tenant,
                r.base_model,
                r.lora.rank,
                observed.placements.get(s.token(r.run_id)) or None,
                depth.get(s.train_consumer(r.run_id), 0),
                None if costs is None else costs.get(r.run_id, RunCost()).tokens,
                None if costs is None else costs.get(r.run_id, RunCost()).cost_usd,
            )
            for r in observed.runs
        ),
        key=lambda r: (r.tenant, r.run_id),
    )
    queues = sorted(
        observed.queues,
        key=lambda q: (
            WORK_STREAMS.index(q.stream) if q.stream in WORK_STREAMS else 99,
            q.consumer,
        ),
    )
    dead = (
        None
        if observed.dead_letters is None
        else tuple(sorted(observed.dead_letters, key=lambda d: -d.seq))
    )
    return StatusSnapshot(
        taken_at or datetime.now(UTC),
        nats_url,
        base_url,
        tuple(workers),
        tuple(runs),
        tuple(queues),
        dead,
        tuple(observed.problems),
    )


class StatusCollector:
    """Keeps a heartbeat subscription open; ``snapshot()`` reads the rest each time."""

    def __init__(self, nc: NATS, nats_url: str, base_url: str | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.nats_url = nats_url
        self.base_url = base_url
        self._beats: dict[str, tuple[WorkerHeartbeat, float]] = {}

    @classmethod
    async def open(cls, nats_url: str, base_url: str | None = None) -> StatusCollector:
        nc = await nats.connect(
            nats_url, name="whetstone-status", connect_timeout=5, max_reconnect_attempts=-1
        )
        collector = cls(nc, nats_url, base_url)
        await nc.subscribe(f"{s.HEARTBEAT_PREFIX}.>", cb=collector._on_beat)
        return collector

    async def close(self) -> None:
        await self.nc.close()

    async def _on_beat(self, msg: Msg) -> None:
        try:
            beat = WorkerHeartbeat.decode(msg.data)
        except ValueError:
            return
        self._beats[beat.worker_id] = (beat, time.monotonic())

    async def wait_for_workers(self, roles: Iterable[str], timeout_s: float) -> None:
        """Wait until a worker of each role has been heard from (or ``timeout_s``)."""
        wanted = set(roles)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if wanted <= {beat.role for beat, _ in self._beats.values()}:
                return
            await asyncio.sleep(0.05)

    async def snapshot(self) -> StatusSnapshot:
        observed = Observed(beats=dict(self._beats))
        await asyncio.gather(
            self._read_runs(observed),
            self._read_queues(observed),
            self._read_dead_letters(observed),
            self._read_costs(observed),
        )
        return build_snapshot(observed, time.monotonic(), self.nats_url, self.base_url)

    async def _read_runs(self, observed: Observed) -> None:
        try:
            runs = await self.js.key_value(s.RUNS_BUCKET)
            placements = await self.js.key_value(s.PLACEMENTS_BUCKET)
            for key in await _keys(runs):
                entry = await runs.get(key)
                if entry.value:
                    observed.runs.append(TrainingRunRecord.decode(entry.value))
            for key in await _keys(placements):
                entry = await placements.get(key)
                if entry.value:
                    observed.placements[key] = entry.value.decode()
        except (nats.errors.Error, ValueError) as exc:
            observed.problems.append(f"runs: {exc!r}")

    async def _read_costs(self, observed: Observed) -> None:
        query = UsageReportQuery(group_by=RUN_COST_GROUPING)
        try:
            reply = await self.nc.request(
                s.USAGE_REPORT_SUBJECT, query.encode(), timeout=BILLING_TIMEOUT_S
            )
            report = UsageReport.decode(reply.data)
        except (nats.errors.Error, ValueError) as exc:
            observed.problems.append(f"run costs: billing did not answer ({exc!r})")
            return
        if report.error:
            observed.problems.append(f"run costs: {report.error}")
            return
        observed.costs = run_costs(report)

    async def _read_queues(self, observed: Observed) -> None:
        for stream in WORK_STREAMS:
            try:
                infos = await self.js.consumers_info(stream)
            except NotFoundError:
                continue
            except nats.errors.Error as exc:
                observed.problems.append(f"{stream}: {exc!r}")
                continue
            for info in infos:
                name = info.name or "?"
                observed.queues.append(
                    QueueView(
                        stream,
                        name,
                        consumer_label(name),
                        info.num_pending or 0,
                        info.num_ack_pending or 0,
                        info.num_redelivered or 0,
                    )
                )

    async def _read_dead_letters(self, observed: Observed) -> None:
        try:
            info = await self.js.stream_info(DEADLETTER_STREAM)
        except NotFoundError:
            return
        except nats.errors.Error as exc:
            observed.problems.append(f"{DEADLETTER_STREAM}: {exc!r}")
            return
        observed.dead_letters = []
        last, first = info.state.last_seq, info.state.first_seq
        for seq in range(last, max(first, last - DEAD_LETTERS_SHOWN + 1) - 1, -1):
            if seq <= 0:
                break
            try:
                msg = await self.js.get_msg(DEADLETTER_STREAM, seq)
            except NotFoundError:  # deleted from the middle of the stream
                continue
            headers = {str(k): str(v) for k, v in (msg.headers or {}).items()}
            observed.dead_letters.append(DeadLetter(seq, msg.subject or "?", msg.time, headers))


async def _keys(kv: KeyValue) -> list[str]:
    try:
        return await kv.keys()
    except NoKeysError:
        return []


# ---------------------------------------------------------------- rendering


def _age(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds >= 1 else "now"


def _money(cost: Decimal | None) -> str:
    """Dollars to the micro-dollar (a tiny model's step costs fractions of a cent)."""
    return "-" if cost is None else f"${cost:,.6f}"


def _table(title: str, columns: tuple[str, ...], rows: list[list[str | Text]], total: int) -> Table:
    """A table whose cells are plain text: ids such as ``s:train:0`` must not turn into emoji or
    markup, so every string becomes a ``Text`` as it is."""
    table = Table(title=title, title_justify="left", expand=True)
    for column in columns:
        table.add_column(column)
    for row in rows[:ROWS_SHOWN]:
        table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in row))
    if total > ROWS_SHOWN:
        table.add_row(Text(f"... {total - ROWS_SHOWN} more"))
    return table


def render(snap: StatusSnapshot) -> RenderableType:
    """The snapshot as rich tables; no I/O."""
    title = Text.assemble(
        ("Whetstone", "bold"),
        f"  {snap.base_url or ''}  NATS {snap.nats_url}  at {snap.taken_at:%Y-%m-%d %H:%M:%S} UTC",
    )
    late = "yellow"
    workers: list[list[str | Text]] = [
        [
            w.role,
            w.worker_id,
            ", ".join(w.base_models),
            f"{w.runs}/{w.max_runs}" if w.max_runs else str(w.runs),
            Text(_age(w.last_beat_s), style=late if w.last_beat_s > WORKER_LATE_S else ""),
        ]
        for w in snap.workers
    ]
    runs: list[list[str | Text]] = [
        [
            r.run_id,
            r.tenant,
            r.base_model,
            str(r.rank),
            r.worker or Text("unplaced", style=late),
            str(r.queued),
            "-" if r.tokens is None else f"{r.tokens:,}",
            _money(r.cost_usd),
        ]
        for r in snap.runs
    ]
    queues: list[list[str | Text]] = [
        [q.stream, q.label, str(q.pending), str(q.ack_pending), str(q.redelivered)]
        for q in snap.queues
    ]
    parts: list[RenderableType] = [
        title,
        _table(
            f"workers ({len(workers)})",
            ("role", "worker", "base models", "runs", "last heartbeat"),
            workers,
            len(workers),
        ),
        _table(
            f"training runs ({len(runs)})",
            ("run", "tenant", "base model", "rank", "worker", "queued", "tokens", "cost"),
            runs,
            len(runs),
        ),
        _table(
            "queues",
            ("stream", "consumer", "pending", "ack pending", "redelivered"),
            queues,
            len(queues),
        ),
    ]
    if snap.dead_letters is None:
        parts.append(Text(f"recent errors: no {DEADLETTER_STREAM} stream", style="dim"))
    else:
        dead: list[list[str | Text]] = [
            [
                str(d.seq),
                f"{d.at:%H:%M:%S}" if d.at else "",
                d.subject,
                " ".join(f"{k}={v}" for k, v in sorted(d.headers.items())),
            ]
            for d in snap.dead_letters
        ]
        parts.append(
            _table(
                f"recent errors ({DEADLETTER_STREAM})",
                ("seq", "at", "subject", "headers"),
                dead,
                len(dead),
            )
        )
    for problem in snap.problems:
        parts.append(Text(f"could not read {problem}", style="red"))
    return Group(*parts)


async def show(
    nats_url: str,
    base_url: str | None,
    once: bool,
    interval_s: float = 1.0,
    console: Console | None = None,
) -> None:
    """Print one snapshot (``once``) or refresh the view every ``interval_s`` until Ctrl-C."""
    console = console or Console()
    collector = await StatusCollector.open(nats_url, base_url)
    try:
        # Heartbeats come every second or so: listen a moment before the first snapshot.
        await collector.wait_for_workers(("trainer", "sampler"), timeout_s=2.5)
        if once:
            console.print(render(await collector.snapshot()))
            return
        with Live(
            render(await collector.snapshot()), console=console, refresh_per_second=4
        ) as live:
            while True:
                await asyncio.sleep(interval_s)
                live.update(render(await collector.snapshot()))
    finally:
        await collector.close()
