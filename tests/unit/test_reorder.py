"""ReorderBuffer: a run's requests come out in seq_id order whatever order they arrive in;
redeliveries of a seq_id that already ran or is held are refused."""

from __future__ import annotations

from services.trainer.reorder import ReorderBuffer


def test_out_of_order_pushes_pop_in_seq_order() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer(next_seq=1)
    assert buf.push(3, "c") and buf.push(2, "b")
    assert buf.pop_ready() == []  # seq 1 has not arrived: nothing may run
    assert len(buf) == 2
    assert buf.push(1, "a")
    assert buf.pop_ready() == ["a", "b", "c"]
    assert len(buf) == 0 and buf.next_seq == 4


def test_pop_stops_at_the_first_gap() -> None:
    buf: ReorderBuffer[int] = ReorderBuffer(next_seq=1)
    for seq in (5, 1, 2, 4):
        buf.push(seq, seq)
    assert buf.pop_ready() == [1, 2]
    assert buf.next_seq == 3 and len(buf) == 2
    assert buf.pop_ready() == []  # pop is idempotent while the gap stays
    buf.push(3, 3)
    assert buf.pop_ready() == [3, 4, 5]


def test_duplicates_are_refused_whether_held_or_already_run() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer(next_seq=1)
    assert buf.push(2, "first")
    assert not buf.push(2, "again")  # held: the first copy stays
    assert buf.push(1, "one")
    assert buf.pop_ready() == ["one", "first"]
    assert not buf.push(1, "late")  # already ran
    assert not buf.push(2, "late")
    assert not buf.push(0, "before the start")
    assert len(buf) == 0 and buf.pop_ready() == []


def test_starts_from_the_given_seq() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer(next_seq=10)
    assert not buf.push(9, "old")
    assert buf.push(11, "b") and buf.push(10, "a")
    assert buf.pop_ready() == ["a", "b"]
    assert buf.next_seq == 12


def test_peek_after_names_the_item_behind_the_next_only_when_both_are_held() -> None:
    buf: ReorderBuffer[str] = ReorderBuffer(next_seq=1)
    buf.push(2, "two")
    assert buf.peek() is None and buf.peek_after() is None  # 1 is missing: nothing can run
    buf.push(1, "one")
    assert (buf.peek(), buf.peek_after()) == ("one", "two")
    assert buf.pop_next() == "one"
    assert (buf.peek(), buf.peek_after()) == ("two", None)  # 3 not held
    assert len(buf) == 1  # peeking took nothing
