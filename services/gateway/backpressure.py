"""Back-pressure on sampling: ``asample`` answers 429 while a base model's samplers are full.

A base model's sampling queue is its subject ``ws.sample.<base>`` on the work-queue stream: every
replica pulls from one consumer and takes what it can batch (``SamplerSettings.
max_batch_requests`` at a time), so the messages the stream holds on that subject are exactly
the requests waiting for or running on that model's samplers. Past ``sample_queue_limit`` of
them, an ``asample`` that announces ``X-Tinker-Sampling-Backpressure: 1`` (tinker 0.38 always
does) is refused with ``RateLimited`` (HTTP 429, ``Retry-After``) before anything is recorded:
the SDK waits and submits the same request again with the same seq_id, so no sample is lost and
none fails. A client that does not announce it is queued whatever the depth.

The depth is read from the server at most every ``check_s`` per base model; what this gateway
published since is added to it, so a burst between two reads is still bounded.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from whetstone import bus as b
from whetstone import subjects as s
from whetstone.errors import RateLimited

BACKPRESSURE_HEADER = "x-tinker-sampling-backpressure"


@dataclass
class _Depth:
    read_at: float  # monotonic
    messages: int  # what the stream held then, plus this gateway's publications since


class SampleBackpressure:
    def __init__(self, bus: b.Bus, limit: int, retry_after_s: float, check_s: float = 0.1) -> None:
        self.bus = bus
        self.limit = limit  # 0: no limit
        self.retry_after_s = retry_after_s
        self.check_s = check_s
        self._depths: dict[str, _Depth] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def admit(self, base_model: str, announced: bool) -> None:
        """Raise ``RateLimited`` when ``base_model``'s queue is full and the client said it
        resubmits on 429; otherwise count the request about to be published."""
        if self.limit <= 0:
            return
        depth = await self._depth(base_model)
        if announced and depth.messages >= self.limit:
            raise RateLimited(
                f"the samplers of {base_model} are full ({depth.messages} requests queued); "
                f"retry in {self.retry_after_s:g} s",
                self.retry_after_s,
            )
        depth.messages += 1

    async def _depth(self, base_model: str) -> _Depth:
        depth = self._depths.setdefault(base_model, _Depth(-math.inf, 0))
        if time.monotonic() - depth.read_at < self.check_s:
            return depth
        lock = self._locks.setdefault(base_model, asyncio.Lock())
        async with lock:  # one read at a time: concurrent submissions count on the same depth
            if time.monotonic() - depth.read_at >= self.check_s:
                subject = s.sample_subject(base_model)
                info = await self.bus.js.stream_info(s.SAMPLE_STREAM, subjects_filter=subject)
                depth.messages = int((info.state.subjects or {}).get(subject, 0))
                depth.read_at = time.monotonic()
        return depth
