"""Sampler worker: ``python -m services.sampler``. Serves every adapter of one base model."""

from __future__ import annotations

import asyncio
import os
import socket

import torch

from services.sampler.engine import SamplerEngine
from services.sampler.handlers import SamplerWorker
from services.sampler.settings import SamplerSettings
from whetstone import bus as b
from whetstone.observability import configure_logging


async def main() -> None:
    settings = SamplerSettings()
    settings.worker_id = settings.worker_id or f"sampler-{socket.gethostname()}-{os.getpid()}"
    log = configure_logging("sampler", settings.log_level)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    spec = settings.registry().resolve(settings.base_model)
    engine = SamplerEngine(spec.path, device=settings.device, max_adapters=settings.max_adapters)
    bus = await b.connect(settings.nats_url, settings.worker_id)
    await SamplerWorker(settings, bus, engine, settings.checkpoint_store(), log).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
