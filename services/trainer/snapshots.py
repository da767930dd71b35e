"""Snapshots of a training run: what a new holder needs to continue it exactly.

A snapshot is a directory in the checkpoint store holding the run's adapter and optimizer state
(``TrainerEngine.save_state``: the PEFT files and ``optimizer.pt`` with the AdamW moments and the
step) plus, when ``forward_backward`` calls have accumulated a gradient that no ``optim_step``
has consumed yet, that gradient (``grads.pt``). Restoring one and replaying the requests after it
reproduces the same weights bit for bit on the same device (the work is deterministic given the
state and the requests).

Snapshots live under ``<tenant>/<run>/snapshot/<next seq_id>-<nonce>`` (each part ``token()``-
encoded), outside the names a user's checkpoint can take. The nonce keeps two writers (a holder
that lost the run and its successor) from ever sharing a directory. Which snapshot is current is
recorded in KV ``ws_run_progress`` (``RunProgress``), written by the handlers after the
directory is committed, so a crash between the two leaves the previous snapshot in force.

Blocking torch and file work: the handlers call these on the trainer's torch thread.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import torch

from services.trainer.engine import TrainerEngine
from whetstone.messages import LoraConfig, RunProgress
from whetstone.subjects import token

GRADS_FILE = "grads.pt"


def snapshot_key(tenant: str, run_id: str, next_seq_id: int) -> str:
    nonce = secrets.token_hex(4)
    return "/".join((token(tenant), token(run_id), "snapshot", f"{next_seq_id}-{nonce}"))


def parse_progress(run_id: str, value: bytes | None) -> RunProgress | None:
    """A run's position as KV holds it; a bare number is one written before snapshots existed
    (a position with no snapshot)."""
    if not value:
        return None
    if value.isdigit():
        return RunProgress(run_id=run_id, next_seq_id=int(value))
    return RunProgress.decode(value)


def save_snapshot(engine: TrainerEngine, run_id: str, directory: Path) -> int:
    """Write the run's full training state into ``directory``; bytes written."""
    written = engine.save_state(run_id, directory)
    params = engine.runs[run_id].adapter.parameters()
    grads = {i: p.grad.detach().cpu() for i, p in enumerate(params) if p.grad is not None}
    if grads:
        path = directory / GRADS_FILE
        torch.save(grads, path)
        written += path.stat().st_size
    return written


def load_snapshot(engine: TrainerEngine, run_id: str, lora: LoraConfig, directory: Path) -> None:
    """Make the run's state on ``engine`` the snapshot's (creating the run from ``lora`` first
    when it is not there, so its adapter targets the run's modules)."""
    if not engine.has_run(run_id):
        engine.create_run(run_id, lora)
    engine.load_state(run_id, directory, with_optimizer=True)  # drops any pending gradient
    path = directory / GRADS_FILE
    if path.is_file():
        grads = torch.load(path, map_location=engine.device, weights_only=True)
        adapter = engine.runs[run_id].adapter
        if adapter.flat is not None and set(grads) - {0}:  # saved per factor, before flat ones
            grads = {0: adapter.flat_from_per_factor(grads)}
        for i, p in enumerate(adapter.parameters()):
            if i in grads:
                p.grad = grads[i].to(p.device)
