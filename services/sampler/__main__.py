"""Sampler worker: ``python -m services.sampler``. Serves every adapter of one base model, on
the engine its registry entry names: Whetstone's own, or vLLM (``engine = "vllm"``; then this
runs in the interpreter of ``scripts/setup-vllm``'s environment, which ``whetstone up`` picks)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from typing import Any, cast

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
    options: dict[str, Any] = {
        "device": settings.device or None,
        "max_adapters": settings.max_adapters,
        "prefix_cache_blocks": settings.prefix_cache_blocks,
    }
    close: Callable[[], None] | None = None
    if spec.engine == "vllm":
        from services.sampler.vllm_engine import VllmEngine  # only its environment has vLLM

        vllm_engine = VllmEngine.from_spec(spec, **options)
        close = vllm_engine.close  # its model-runner process
        # The same public interface as SamplerEngine's (add/step/abort/ensure_adapter, ...).
        engine = cast(SamplerEngine, vllm_engine)
    else:
        engine = SamplerEngine.from_spec(spec, **options)
    log.info("sampler engine", engine=spec.engine, base_model=spec.name)
    bus = await b.connect(settings.nats_url, settings.worker_id, service="sampler")
    worker = SamplerWorker(settings, bus, engine, settings.checkpoint_store(), log)
    await worker.declare()
    try:
        await serve(bus, settings.metrics_port, log, on_start=worker.start)
    finally:
        if close is not None:
            close()


if __name__ == "__main__":
    asyncio.run(main())
