"""One trace per request: an in-memory span exporter sees the span tree of one forward_backward
crossing the gateway (HTTP span, publish), the bus (time queued), the trainer (consume, execute)
and the result's way back (the gateway's delivery of the future), each span from the service
that did the work. Gateway, scheduler and trainer run in this process, each with its own broker
and ``service.name``, on a real nats-server."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.scheduler.handlers import Scheduler
from services.scheduler.settings import SchedulerSettings
from services.trainer.engine import TrainerEngine
from services.trainer.handlers import TrainerWorker
from services.trainer.settings import TrainerSettings
from tests.integration.gateway_app import (
    PROTOBUF,
    client,
    create_run,
    fb_body,
    result_of,
    running_gateway,
)
from whetstone import bus as b
from whetstone import observability
from whetstone.checkpoints import LocalCheckpointStore
from whetstone.keys import create_key

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    observability.add_span_exporter(exporter)
    return exporter


async def test_one_forward_backward_is_one_trace_across_the_services(
    bus: b.Bus,
    spawned: None,
    nats_url: str,
    models_dir: Path,
    builtin_model: Path,
    tmp_path: Path,
    log,
    spans: InMemorySpanExporter,
) -> None:
    trainer_bus = await b.connect(nats_url, "trainer-w1", service="trainer")
    scheduler_bus = await b.connect(nats_url, "scheduler", service="scheduler")
    try:
        for service_bus in (trainer_bus, scheduler_bus):
            await service_bus.broker.start()
        worker = TrainerWorker(
            TrainerSettings(worker_id="w1", nats_url=nats_url, state_dir=tmp_path),
            trainer_bus,
            TrainerEngine(builtin_model),
            LocalCheckpointStore(tmp_path / "checkpoints"),
            log,
        )
        scheduler = Scheduler(SchedulerSettings(nats_url=nats_url), scheduler_bus, log)
        for service in (worker, scheduler):
            await service.declare()
            await service.start()

        key = await create_key(bus, "tenant-a")
        async with running_gateway(nats_url, models_dir, log) as app, client(app, key) as http:
            run_id, create_id = await create_run(http)
            await result_of(http, create_id)
            spans.clear()
            answer = await http.post(
                "/api/v1/forward_backward",
                content=fb_body(run_id, 1),
                headers={"content-type": PROTOBUF},
            )
            request_id = answer.json()["request_id"]
            result = await result_of(http, request_id, accept=PROTOBUF)
            assert PROTOBUF in result.headers["content-type"]
    finally:
        await trainer_bus.close()
        await scheduler_bus.close()

    finished = spans.get_finished_spans()
    http_span = next(
        sp
        for sp in finished
        if sp.name == "POST /api/v1/forward_backward" and sp.kind.name == "SERVER"
    )
    trace_id = http_span.context.trace_id
    tree = [sp for sp in finished if sp.context.trace_id == trace_id]
    by_id = {sp.context.span_id: sp for sp in tree}

    def service(sp) -> str:  # type: ignore[no-untyped-def]
        return str(sp.resource.attributes["service.name"])

    def one(prefix: str, who: str):  # type: ignore[no-untyped-def]
        found = [sp for sp in tree if sp.name.startswith(prefix) and service(sp) == who]
        assert found, f"no {prefix!r} span from {who} in {[(sp.name, service(sp)) for sp in tree]}"
        return found[0]

    publish = one("ws.train.", "whetstone-gateway")
    queued = one("queued ws.train", "whetstone-trainer")
    consume = next(
        sp for sp in tree if sp.name.endswith(" process") and service(sp) == "whetstone-trainer"
    )
    execute = one("execute forward_backward", "whetstone-trainer")
    deliver = one("deliver forward_backward", "whetstone-gateway")

    def ancestors(sp) -> list:  # type: ignore[no-untyped-def]
        chain = []
        while sp.parent is not None and sp.parent.span_id in by_id:
            sp = by_id[sp.parent.span_id]
            chain.append(sp)
        return chain

    # One tree: every span hangs under the gateway's HTTP span, in causal order.
    for sp in (publish, queued, consume, execute, deliver):
        assert http_span in ancestors(sp), f"{sp.name} is not under the HTTP span"
    assert any(a.name.startswith("ws.train.") for a in ancestors(consume))  # consume after publish
    assert consume in ancestors(execute)  # the reorder buffer carried the message's context
    assert execute in ancestors(deliver)  # the result's way back continues from the execution
    assert queued.start_time <= consume.start_time
    assert {service(sp) for sp in tree} >= {"whetstone-gateway", "whetstone-trainer"}
