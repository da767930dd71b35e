"""The benchmarks run at a tiny size: they stay runnable; their numbers are not checked here
(speed is measured in bench/, not asserted in tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=BENCH.parent
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_billing_bench_smoke(tmp_path: Path) -> None:
    out = run_bench(str(BENCH / "bench_billing.py"), "20000", "--dir", str(tmp_path / "chdb"))
    assert "ingest" in out


def test_overhead_bench_smoke(tmp_path: Path, models_dir: Path) -> None:
    out = run_bench(
        str(BENCH / "bench_overhead.py"),
        "--quick",
        "--dir",
        str(tmp_path / "state"),
        "--models-dir",
        str(models_dir),
    )
    assert "platform overhead" in out
