"""Trainer worker: ``python -m services.trainer``. Holds one base model and many LoRA runs."""

from __future__ import annotations

import asyncio
import os
import socket

import torch

from services.trainer.engine import TrainerEngine
from services.trainer.handlers import TrainerWorker
from services.trainer.settings import TrainerSettings
from whetstone import bus as b
from whetstone.observability import configure_logging


async def main() -> None:
    settings = TrainerSettings()
    settings.worker_id = settings.worker_id or f"trainer-{socket.gethostname()}-{os.getpid()}"
    log = configure_logging("trainer", settings.log_level)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    spec = settings.registry().resolve(settings.base_model)
    engine = TrainerEngine(spec.path, device=settings.device, max_lora_rank=spec.max_lora_rank,
                           context_length=spec.context_length)
    bus = await b.connect(settings.nats_url, settings.worker_id)
    worker = TrainerWorker(settings, bus, engine, settings.checkpoint_store(), log)
    await worker.start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
