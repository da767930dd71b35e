"""The ``whetstone`` command.

    whetstone up [--state-dir DIR] [--port N]     start the embedded platform; Ctrl-C stops it
    whetstone keys create --tenant NAME           mint an API key (printed once, stored hashed)
    whetstone usage [--tenant NAME] [--json]      usage report per tenant, base model and meter
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from whetstone import bus as b
from whetstone import subjects as s
from whetstone.keys import create_key
from whetstone.messages import UsageReport, UsageReportQuery
from whetstone.platform import read_platform, start_platform
from whetstone.settings import ServiceSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="whetstone", description="Self-hosted Tinker-compatible training service")
    parser.add_argument("--state-dir", type=Path, default=Path(".whetstone"), help="platform state (default .whetstone)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start NATS, the five services and the built-in model")
    up.add_argument("--port", type=int, default=8000, help="gateway port (0: any free port)")
    keys = sub.add_parser("keys", help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="mint a key for a tenant")
    create.add_argument("--tenant", required=True)
    usage = sub.add_parser("usage", help="token usage and cost per tenant, base model and meter")
    usage.add_argument("--tenant")
    usage.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)

    if args.command == "up":
        return _up(args.state_dir, args.port)
    try:
        platform = read_platform(args.state_dir)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "keys":
        key = asyncio.run(_create_key(platform["nats_url"], args.tenant))
        print(key)
        return 0
    report = asyncio.run(request_usage_report(platform["nats_url"], UsageReportQuery(tenant=args.tenant)))
    if report.error:
        print(f"error: {report.error}", file=sys.stderr)
        return 1
    print(report.model_dump_json(indent=2) if args.json else format_report(report))
    return 0


def _up(state_dir: Path, port: int) -> int:
    print("starting Whetstone ...", flush=True)
    try:
        platform = start_platform(state_dir, port, models_dir=ServiceSettings().models_dir)
    except (RuntimeError, TimeoutError) as exc:  # a service died at start (e.g. the port is taken)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Whetstone is up.\n  base URL: {platform.base_url}\n  API key:  {platform.api_key}\n"
          f"  state:    {platform.state_dir}\n"
          f"Try: TINKER_BASE_URL={platform.base_url} TINKER_API_KEY={platform.api_key} python examples/sft.py\n"
          "Ctrl-C stops everything.", flush=True)
    stop = False

    def on_signal(signum, frame) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop:
            platform.check_children()
            time.sleep(0.5)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        platform.stop()
        return 1
    print("stopping ...", flush=True)
    platform.stop()
    print("stopped.", flush=True)
    return 0


async def _create_key(nats_url: str, tenant: str) -> str:
    bus = await b.connect(nats_url, "whetstone-cli")
    try:
        return await create_key(bus, tenant)
    finally:
        await bus.close()


async def request_usage_report(nats_url: str, query: UsageReportQuery) -> UsageReport:
    bus = await b.connect(nats_url, "whetstone-cli")
    try:
        reply = await bus.nc.request(s.USAGE_REPORT_SUBJECT, query.encode(), timeout=30)
        return UsageReport.decode(reply.data)
    finally:
        await bus.close()


def format_report(report: UsageReport) -> str:
    header = f"{'tenant':<16} {'base model':<24} {'meter':<16} {'tokens':>12} {'cost (USD)':>12}"
    lines = [header, "-" * len(header)]
    for row in report.rows:
        lines.append(f"{row.tenant:<16} {row.base_model:<24} {row.meter:<16} {row.tokens:>12,} {row.cost_usd:>12.6f}")
    total = sum(r.cost_usd for r in report.rows)
    lines.append("-" * len(header))
    lines.append(f"{'total':<58} {sum(r.tokens for r in report.rows):>12,} {total:>12.6f}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
