"""The operator's guard rails that need no server: the state directory's lock, the port check,
the restart back-off and where ``--state-dir`` may go on the command line."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from whetstone.cli import _parser
from whetstone.platform import (
    RESTART_MAX_S,
    AlreadyRunning,
    PortInUse,
    StateLock,
    check_port_free,
    lock_holder,
    restart_delay_s,
)


def test_second_lock_is_refused_with_the_holders_pid_and_url(tmp_path: Path) -> None:
    assert lock_holder(tmp_path) is None
    lock = StateLock.acquire(tmp_path)
    lock.record(pid=os.getpid(), base_url="http://127.0.0.1:1234")
    try:
        with pytest.raises(AlreadyRunning) as refused:
            StateLock.acquire(tmp_path)  # another open file description: flock refuses it
        assert refused.value.holder.pid == os.getpid()
        assert refused.value.holder.base_url == "http://127.0.0.1:1234"
        assert f"pid {os.getpid()}" in str(refused.value)
        holder = lock_holder(tmp_path)
        assert holder is not None and holder.pid == os.getpid()
    finally:
        lock.release()
    assert lock_holder(tmp_path) is None  # released: the file stays, the lock does not
    StateLock.acquire(tmp_path).release()


def test_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} is in use"):
            check_port_free(port)
    check_port_free(port)  # free again once closed


def test_restart_back_off_doubles_up_to_a_ceiling() -> None:
    delays = [restart_delay_s(n) for n in range(1, 10)]
    assert delays[:3] == [1.0, 2.0, 4.0]
    assert delays == sorted(delays) and delays[-1] == RESTART_MAX_S


@pytest.mark.parametrize(
    "argv",
    [
        ["--state-dir", "X", "up", "--port", "0"],
        ["up", "--state-dir", "X", "--port", "0"],
        ["up", "--port", "0", "--state-dir", "X"],
    ],
)
def test_state_dir_before_or_after_the_subcommand(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    assert args.state_dir == Path("X") and args.port == 0


def test_state_dir_defaults_and_nested_commands() -> None:
    assert _parser().parse_args(["usage"]).state_dir == Path(".whetstone")
    args = _parser().parse_args(["keys", "revoke", "tml-abcd", "--state-dir", "Y"])
    assert (args.keys_command, args.key, args.state_dir) == ("revoke", "tml-abcd", Path("Y"))
    assert _parser().parse_args(["status", "--once", "--state-dir", "Z"]).state_dir == Path("Z")
