"""Sampler worker: ``python -m services.sampler``. Serves every adapter of one base model, on
the engine its registry entry names: Whetstone's own, or vLLM (``engine = "vllm"``; then this
runs in the interpreter of ``scripts/setup-vllm``'s environment, which ``whetstone up`` picks)."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import cast

import torch

from services.sampler.engine import SamplerEngine
from services.sampler.handlers import SamplerWorker
from services.sampler.settings import SamplerSettings
from whetstone import bus as b
from whetstone.observability import configure_logging
from whetstone.service import serve


async def main() -> None:
    settings = SamplerSettings()
    settings.worker_id = settings.worker_id or f"sampler-{socket.gethostname()}-{os.getpid()}"
    log = configure_logging("sampler", settings.log_level)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    spec = settings.registry().resolve(settings.base_model)
    engine_class: type[SamplerEngine] = SamplerEngine
    if spec.engine == "vllm":
        from services.sampler.vllm_engine import VllmEngine  # only its environment has vLLM

        # The same public interface as SamplerEngine's (add/step/abort/ensure_adapter, ...).
        engine_class = cast(type[SamplerEngine], VllmEngine)
    engine = engine_class.from_spec(
        spec,
        device=settings.device or None,
        max_adapters=settings.max_adapters,
        prefix_cache_blocks=settings.prefix_cache_blocks,
    )
    log.info("sampler engine", engine=spec.engine, base_model=spec.name)
    bus = await b.connect(settings.nats_url, settings.worker_id, service="sampler")
    worker = SamplerWorker(settings, bus, engine, settings.checkpoint_store(), log)
    await worker.declare()
    await serve(bus, settings.metrics_port, log, on_start=worker.start)


if __name__ == "__main__":
    asyncio.run(main())
