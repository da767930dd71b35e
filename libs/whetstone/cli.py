"""The ``whetstone`` command: the operator's entry point to the embedded platform.

    whetstone up [--port N] [--models FILE]     start the platform; Ctrl-C (or `down`) stops it
    whetstone down                              stop the platform running on the state directory
    whetstone status [--once]                   workers, runs, queues and recent errors, live
    whetstone keys create --tenant NAME [--admin] [--max-runs N] [--max-inflight M]
                                                mint an API key (printed once, stored hashed)
    whetstone keys set-limits PREFIX_OR_KEY [--max-runs N] [--max-inflight M]
                                                change a key's quotas ("default": the platform's)
    whetstone keys list                         tenant, prefix, key id, admin, quotas, created,
                                                revoked
    whetstone keys revoke PREFIX_OR_KEY         revoke a key; gateways refuse it at once
    whetstone usage [filters] [--group-by G,..] [--format table|csv|json]
                                                usage and exact cost; filters: --tenant --key
                                                --model --run --session --meter --since --until
    whetstone dlq list [--limit N]              dead letters: subject, error, tries, request id
    whetstone dlq replay SEQ [SEQ ...]          publish dead letters to their subjects again

Every command takes ``--state-dir DIR`` (default ``.whetstone``), before or after its name.
Whether a platform runs on a state directory is decided by its lock (see ``platform.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from whetstone import bus as b
from whetstone import reports
from whetstone import subjects as s
from whetstone.errors import WhetstoneError
from whetstone.keys import UNSET, create_key, key_id_of_hash, list_keys, revoke_key, set_limits
from whetstone.messages import DEFAULT_GROUP_BY, GroupBy, UsageReport, UsageReportQuery
from whetstone.platform import (
    AlreadyRunning,
    PortInUse,
    lock_holder,
    read_platform,
    start_platform,
)
from whetstone.settings import ServiceSettings

DEFAULT_STATE_DIR = Path(".whetstone")


def _parser() -> argparse.ArgumentParser:
    # ``--state-dir`` after the subcommand: SUPPRESS leaves the top-level value unless given.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="platform state (default .whetstone)",
    )
    parser = argparse.ArgumentParser(
        prog="whetstone", description="Self-hosted Tinker-compatible training service"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="platform state (default .whetstone)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="start NATS, the five services and the model")
    up.add_argument("--port", type=int, default=8000, help="gateway port (0: any free port)")
    up.add_argument(
        "--models",
        type=Path,
        metavar="FILE",
        help="model registry file, passed to the services as WHETSTONE_MODELS_FILE",
    )
    down = sub.add_parser("down", parents=[common], help="stop the platform on the state directory")
    down.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the stop")
    status = sub.add_parser("status", parents=[common], help="workers, runs, queues, errors")
    status.add_argument("--once", action="store_true", help="print one snapshot and exit")
    status.add_argument("--interval", type=float, default=1.0, help="refresh period in seconds")

    keys = sub.add_parser("keys", parents=[common], help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", parents=[common], help="mint a key for a tenant")
    create.add_argument("--tenant", required=True)
    create.add_argument(
        "--admin", action="store_true", help="an operator's key: every tenant's usage, invoices"
    )
    _quota_arguments(create, default=None)
    limits = keys_sub.add_parser("set-limits", parents=[common], help="change a key's quotas")
    limits.add_argument("key", metavar="PREFIX_OR_KEY", help="the key or its listed prefix")
    _quota_arguments(limits, default=UNSET)
    keys_sub.add_parser("list", parents=[common], help="every key: tenant, prefix, revoked")
    revoke = keys_sub.add_parser("revoke", parents=[common], help="revoke a key")
    revoke.add_argument("key", metavar="PREFIX_OR_KEY", help="the key or its listed prefix")

    dlq = sub.add_parser("dlq", parents=[common], help="the dead-letter stream")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_sub.add_parser("list", parents=[common], help="the newest dead letters")
    dlq_list.add_argument("--limit", type=int, default=50)
    replay = dlq_sub.add_parser("replay", parents=[common], help="publish them again, then drop")
    replay.add_argument("seqs", metavar="SEQ", type=int, nargs="+", help="as `dlq list` shows")

    usage = sub.add_parser(
        "usage", parents=[common], help="token usage and cost per tenant, base model and meter"
    )
    usage.add_argument("--tenant")
    usage.add_argument("--key", metavar="KEY_ID", help="an API key id (see `keys list`)")
    usage.add_argument("--model", help="a base model")
    usage.add_argument("--run", help="a training run or sampler id")
    usage.add_argument("--session")
    usage.add_argument("--meter")
    usage.add_argument("--since", help="UTC date or time, inclusive (e.g. 2026-01-01)")
    usage.add_argument("--until", help="UTC date or time, exclusive")
    usage.add_argument(
        "--group-by",
        default="tenant,model,meter",
        help="comma-separated: tenant, model, meter, run, sampler, session, key, hour, day, "
        "month, price (default tenant,model,meter)",
    )
    usage.add_argument("--format", choices=("table", "csv", "json"), default="table")
    usage.add_argument("--json", action="store_true", help="same as --format json")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    state_dir: Path = args.state_dir
    if args.command == "up":
        return _up(state_dir, args.port, args.models)
    if args.command == "down":
        return _down(state_dir, args.timeout)
    if args.command == "usage":
        try:
            query = _usage_query(args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return _usage(state_dir, query, "json" if args.json else args.format)
    try:
        platform = read_platform(state_dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "status":
        from whetstone.status import show  # rich is only needed here

        try:
            asyncio.run(
                show(platform["nats_url"], platform.get("base_url"), args.once, args.interval)
            )
        except KeyboardInterrupt:
            pass
        return 0
    if args.command == "dlq":
        return asyncio.run(_dlq(platform["nats_url"], args))
    try:
        return asyncio.run(_keys(platform["nats_url"], args))
    except WhetstoneError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------- up and down


def _say(line: str) -> None:
    print(line, flush=True)


def _up(state_dir: Path, port: int, models_file: Path | None) -> int:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt  # a stop while starting: start_platform cleans up

    signal.signal(signal.SIGTERM, interrupt)
    _say("starting Whetstone ...")
    try:
        platform = start_platform(
            state_dir,
            port,
            models_dir=ServiceSettings().models_dir,
            models_file=models_file,
            progress=_say,
        )
    except AlreadyRunning as exc:
        pid, url = exc.holder.pid or "?", exc.holder.base_url or "?"
        print(
            f"error: already running, pid {pid}, URL {url} (state {state_dir.resolve()}; "
            "stop it with `whetstone down`)",
            file=sys.stderr,
        )
        return 1
    except (PortInUse, FileNotFoundError, RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped while starting.", file=sys.stderr)
        return 130
    _say(
        f"Whetstone is up and ready.\n  base URL: {platform.base_url}\n"
        f"  API key:  {platform.api_key}\n  state:    {platform.state_dir}\n"
        f"Try: TINKER_BASE_URL={platform.base_url} TINKER_API_KEY={platform.api_key} "
        "python examples/sft.py\nCtrl-C or `whetstone down` stops everything."
    )
    stop = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop:
        try:
            platform.supervise()
        except (RuntimeError, TimeoutError) as exc:  # nats-server could not be restarted
            print(f"error: {exc}", file=sys.stderr)
            platform.stop()
            return 1
        time.sleep(0.5)
    _say("stopping ...")
    platform.stop()
    _say("stopped.")
    return 0


def _down(state_dir: Path, timeout_s: float) -> int:
    holder = lock_holder(state_dir)
    if holder is None:
        print(f"no platform is running under {state_dir.resolve()}", file=sys.stderr)
        return 1
    if holder.pid is None:
        print(
            f"error: a platform holds {state_dir.resolve()} but its pid is not recorded",
            file=sys.stderr,
        )
        return 1
    _say(f"stopping the platform (pid {holder.pid}, {holder.base_url}) ...")
    try:
        os.kill(holder.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while lock_holder(state_dir) is not None or _alive(holder.pid):
        if time.monotonic() > deadline:
            print(f"error: pid {holder.pid} still running after {timeout_s:.0f} s", file=sys.stderr)
            return 1
        time.sleep(0.1)
    _say("stopped.")
    return 0


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(") ", 1)[-1][:1] != "Z"


# ---------------------------------------------------------------- keys


async def _keys(nats_url: str, args: argparse.Namespace) -> int:
    bus = await b.connect(nats_url, "whetstone-cli")
    try:
        if args.keys_command == "create":
            key = await create_key(
                bus,
                args.tenant,
                admin=args.admin,
                max_runs=args.max_runs,
                max_inflight=args.max_inflight,
            )
            print(key)
        elif args.keys_command == "set-limits":
            record = await set_limits(
                bus, args.key, max_runs=args.max_runs, max_inflight=args.max_inflight
            )
            print(
                f"{record.key_prefix}... of tenant {record.tenant}: "
                f"max runs {_quota(record.max_runs)}, max in flight {_quota(record.max_inflight)}"
            )
        elif args.keys_command == "list":
            header = (
                f"{'tenant':<24} {'key prefix':<12} {'key id':<17} {'admin':<6}"
                f"{'max runs':<9} {'in flight':<9} {'created (UTC)':<20} revoked"
            )
            print(header)
            print("-" * len(header))
            for digest, record in await list_keys(bus):
                created = f"{record.created_at:%Y-%m-%d %H:%M:%S}"
                revoked = "yes" if record.revoked else "no"
                admin = "yes" if record.admin else "no"
                runs, inflight = _quota_cell(record.max_runs), _quota_cell(record.max_inflight)
                print(
                    f"{record.tenant:<24} {record.key_prefix:<12} {key_id_of_hash(digest):<17} "
                    f"{admin:<6}{runs:<9} {inflight:<9} {created:<20} {revoked}"
                )
        else:
            record = await revoke_key(bus, args.key)
            print(f"revoked {record.key_prefix}... of tenant {record.tenant}")
        return 0
    finally:
        await bus.close()


def _quota_arguments(parser: argparse.ArgumentParser, default: int | None) -> None:
    for flag, what in (
        ("--max-runs", "training runs at once"),
        ("--max-inflight", "requests in flight"),
    ):
        parser.add_argument(
            flag,
            type=_quota_value,
            default=default,
            metavar="N",
            help=f"most {what} of the tenant when this key asks; 0: no limit, "
            "default: the platform's",
        )


def _quota_value(text: str) -> int | None:
    if text == "default":
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("a quota is 0 (no limit) or more")
    return value


def _quota(value: int | None) -> str:
    return "platform default" if value is None else "no limit" if value == 0 else str(value)


def _quota_cell(value: int | None) -> str:
    return "default" if value is None else "none" if value == 0 else str(value)


# ---------------------------------------------------------------- dead letters


async def _dlq(nats_url: str, args: argparse.Namespace) -> int:
    from whetstone.deadletter import list_dead_letters, replay

    bus = await b.connect(nats_url, "whetstone-cli")
    try:
        if args.dlq_command == "list":
            letters = await list_dead_letters(bus, args.limit)
            print(f"{'seq':>6} {'tries':>5} {'request id':<38} {'subject':<48} error")
            for d in letters:
                print(
                    f"{d.seq:>6} {d.deliveries:>5} {d.request_id or '-':<38} {d.subject:<48} "
                    f"{d.error}"
                )
            return 0
        failed = 0
        for seq in args.seqs:
            try:
                print(f"replayed {seq} to {await replay(bus, seq)}")
            except LookupError as exc:
                print(f"error: {exc}", file=sys.stderr)
                failed += 1
        return 1 if failed else 0
    finally:
        await bus.close()


# ---------------------------------------------------------------- usage


def _usage_query(args: argparse.Namespace) -> UsageReportQuery:
    """The report query of ``whetstone usage``'s flags (``ValueError`` names a bad one)."""
    return UsageReportQuery.model_validate(
        {
            "tenant": args.tenant,
            "api_key_id": args.key,
            "base_model": args.model,
            "run_id": args.run,
            "session_id": args.session,
            "meter": args.meter,
            "since": _utc_time(args.since),
            "until": _utc_time(args.until),
            "group_by": [g.strip() for g in args.group_by.split(",") if g.strip()],
        }
    )


def _utc_time(text: str | None) -> datetime | None:
    if text is None:
        return None
    ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def _usage(state_dir: Path, query: UsageReportQuery, output: str) -> int:
    try:
        if lock_holder(state_dir) is not None:
            report = asyncio.run(request_usage_report(read_platform(state_dir)["nats_url"], query))
        else:
            report = offline_usage_report(state_dir, query)
    except (FileNotFoundError, WhetstoneError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if report.error:
        print(f"error: {report.error}", file=sys.stderr)
        return 1
    if output == "json":
        print(report.model_dump_json(indent=2, exclude_none=True))
    elif output == "csv":
        print(reports.to_csv(report, query.group_by), end="")
    else:
        print(format_report(report, query.group_by))
    return 0


async def request_usage_report(nats_url: str, query: UsageReportQuery) -> UsageReport:
    bus = await b.connect(nats_url, "whetstone-cli")
    try:
        reply = await bus.nc.request(s.USAGE_REPORT_SUBJECT, query.encode(), timeout=30)
        return UsageReport.decode(reply.data)
    finally:
        await bus.close()


def offline_usage_report(state_dir: Path, query: UsageReportQuery) -> UsageReport:
    """The report straight from the ledger, in this process, while no platform runs.

    The embedded engine admits one process per data directory, so this works only while billing
    is stopped; while it runs, billing answers over NATS. The one place where ``libs/`` reaches
    into a service: the operator's command reads billing's ledger with billing's own code and
    settings (DSN, price file), imported here only, so nothing else pulls them in.
    """
    from services.billing.ledger import Ledger
    from services.billing.prices import DEFAULT_PRICE_TABLE, PriceTable
    from services.billing.settings import BillingSettings

    settings = BillingSettings(state_dir=state_dir.resolve())
    dsn = settings.dsn()
    if dsn.startswith("chdb:") and not Path(dsn.removeprefix("chdb://")).is_dir():
        raise FileNotFoundError(f"no usage ledger under {state_dir} (no platform has run there)")
    prices = (
        PriceTable.from_json(settings.prices_file) if settings.prices_file else DEFAULT_PRICE_TABLE
    )
    print(f"(no platform running: read from the ledger at {dsn})", file=sys.stderr)
    ledger = Ledger.connect(dsn)
    try:
        return ledger.report(query, prices)
    finally:
        ledger.close()


def format_report(report: UsageReport, group_by: list[GroupBy] | None = None) -> str:
    return reports.to_table(report, group_by or list(DEFAULT_GROUP_BY))


if __name__ == "__main__":
    sys.exit(main())
