"""The per-run reorder buffer: requests run in ``seq_id`` order, whatever order they arrive in.

Chunks of one forward_backward call are posted concurrently with the lowest seq_id last, and
gateways are replicated, so a run's messages reach the trainer out of order. The buffer holds
them (unacknowledged, so a crash loses nothing) until every earlier seq_id has run.

A gap (an earlier seq_id that has not arrived) is timed from the moment it first holds work
back: ``gap_open_s`` tells the worker how long, so that a seq_id that never comes fails the
waiting requests with a clear error instead of hanging them (``skip_gap``).
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class ReorderBuffer(Generic[T]):
    def __init__(self, next_seq: int = 1) -> None:
        self.next_seq = next_seq
        self._held: dict[int, T] = {}
        self._gap_since: float | None = None

    def push(self, seq_id: int, item: T, now: float = 0.0) -> bool:
        """Hold ``item``; False for a seq_id that already ran or is already held (a redelivery)."""
        if seq_id < self.next_seq or seq_id in self._held:
            return False
        self._held[seq_id] = item
        if self.next_seq not in self._held and self._gap_since is None:
            self._gap_since = now
        return True

    def replace(self, seq_id: int, item: T) -> bool:
        """Swap in a redelivered copy of a held item; False when ``seq_id`` is not held."""
        if seq_id not in self._held:
            return False
        self._held[seq_id] = item
        return True

    def pop_ready(self) -> list[T]:
        """The held items that can run now, in order."""
        ready = []
        while self.next_seq in self._held:
            ready.append(self._held.pop(self.next_seq))
            self.next_seq += 1
        if ready or not self._held:
            self._gap_since = None
        return ready

    def peek(self) -> T | None:
        """The item that can run next, left in place; None while ``next_seq`` is missing."""
        return self._held.get(self.next_seq)

    def peek_after(self) -> T | None:
        """The item that can run once the next one has, left in place; None unless both are
        held (the trainer's passes ask what one at a time would see next)."""
        if self.next_seq not in self._held:
            return None
        return self._held.get(self.next_seq + 1)

    def pop_next(self) -> T | None:
        """Take the one item that can run next (``pop_ready`` one at a time), or None."""
        item = self._held.pop(self.next_seq, None)
        if item is None:
            return None
        self.next_seq += 1
        self._gap_since = None  # as ``pop_ready``: a gap behind it is timed from the next push
        return item

    def gap_open_s(self, now: float) -> float:
        """How long the missing ``next_seq`` has held later requests back (0: no gap)."""
        return 0.0 if self._gap_since is None else now - self._gap_since

    def skip_gap(self) -> list[T]:
        """Give up on the missing seq_ids: every held item, in order, and the buffer moves past
        them (a late arrival then counts as already run)."""
        items = [self._held[k] for k in sorted(self._held)]
        if self._held:
            self.next_seq = max(self._held) + 1
        self._held.clear()
        self._gap_since = None
        return items

    def held(self) -> list[T]:
        return [self._held[k] for k in sorted(self._held)]

    def clear(self) -> list[T]:
        """Drop and return every held item (a worker handing its run back)."""
        items = self.held()
        self._held.clear()
        self._gap_since = None
        return items

    def __len__(self) -> int:
        return len(self._held)
