"""Trainer worker: ``python -m services.trainer``. Holds one base model and many LoRA runs."""

from __future__ import annotations

import asyncio
import socket

import torch

from services.trainer.engine import TrainerEngine
from services.trainer.handlers import TrainerWorker
from services.trainer.settings import TrainerSettings
from whetstone import bus as b
from whetstone.observability import configure_logging
from whetstone.service import serve


async def main() -> None:
    settings = TrainerSettings()
    # A stable id: a restarted trainer is the same worker and takes its runs back.
    settings.worker_id = settings.worker_id or f"trainer-{socket.gethostname()}"
    log = configure_logging("trainer", settings.log_level)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    spec = settings.registry().resolve(settings.base_model)
    engine = TrainerEngine.from_spec(
        spec,
        device=settings.device or None,
        micro_batch_tokens=settings.micro_batch_tokens,
        compile=settings.compile,
        checkpointing=settings.checkpointing,
    )
    bus = await b.connect(settings.nats_url, settings.worker_id, service="trainer")
    worker = TrainerWorker(settings, bus, engine, settings.checkpoint_store(), log)
    await worker.declare()
    await serve(bus, settings.metrics_port, log, on_start=worker.start, on_stop=worker.stop)


if __name__ == "__main__":
    asyncio.run(main())
