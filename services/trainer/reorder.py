"""The per-run reorder buffer: requests run in ``seq_id`` order, whatever order they arrive in.

Chunks of one forward_backward call are posted concurrently with the lowest seq_id last, and
gateways are replicated, so a run's messages reach the trainer out of order. The buffer holds
them (unacknowledged, so a crash loses nothing) until every earlier seq_id has run.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class ReorderBuffer(Generic[T]):
    def __init__(self, next_seq: int = 1) -> None:
        self.next_seq = next_seq
        self._held: dict[int, T] = {}

    def push(self, seq_id: int, item: T) -> bool:
        """Hold ``item``; False for a seq_id that already ran or is already held (a redelivery)."""
        if seq_id < self.next_seq or seq_id in self._held:
            return False
        self._held[seq_id] = item
        return True

    def pop_ready(self) -> list[T]:
        """The held items that can run now, in order."""
        ready = []
        while self.next_seq in self._held:
            ready.append(self._held.pop(self.next_seq))
            self.next_seq += 1
        return ready

    def __len__(self) -> int:
        return len(self._held)
