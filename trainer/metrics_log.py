"""A run's metrics log: JSON lines (``metrics.jsonl``: one row per epoch; ``steps.jsonl``: one
row per optimiser step) and TensorBoard scalars, written by the main rank only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


class Logger:
    """JSON lines (metrics.jsonl: epochs; steps.jsonl: steps) and TensorBoard, main rank only."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, resume_from: dict | None = None):
        """``resume_from`` (a checkpoint's state): keep the rows the checkpoint covers (steps up
        to its step, epochs before its epoch) and append; rows a killed run wrote after its
        last checkpoint are dropped, so the logs read like one uninterrupted run."""
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        if resume_from is not None:
            keep_rows(out / "steps.jsonl", lambda r: r.get("step", 0) <= resume_from["step"])
            keep_rows(out / "metrics.jsonl", lambda r: r.get("epoch", 0) < resume_from["epoch"])
        mode = "a" if resume_from is not None else "w"
        self.epochs = open(out / "metrics.jsonl", mode)
        self.steps = open(out / "steps.jsonl", mode)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def step(self, step: int, **row) -> None:
        if not self.enabled:
            return
        self.steps.write(json.dumps({"step": step, **row}) + "\n")
        self.steps.flush()  # one small write per step; lets a watcher follow the run
        self._scalars("train", row, step)

    def epoch(self, **row) -> None:
        if not self.enabled:
            return
        self.epochs.write(json.dumps(row) + "\n")
        self.epochs.flush()
        self.steps.flush()
        self._scalars("epoch", row, row["epoch"])
        if self.tb is not None:
            self.tb.flush()

    def _scalars(self, prefix: str, row: dict, x: int) -> None:
        """The row's numbers as TensorBoard scalars ``<prefix>/<key>`` at ``x``."""
        if self.tb is None:
            return
        for k, v in row.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{prefix}/{k}", v, x)

    def close(self) -> None:
        if self.enabled:
            self.epochs.close()
            self.steps.close()
            if self.tb is not None:
                self.tb.close()


def read_rows(path: Path) -> list[dict]:
    """Every row of a JSON-lines file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def keep_rows(path: Path, keep: Callable[[dict], bool]) -> None:
    """Rewrite a JSON-lines file with the rows ``keep(row)`` accepts (a torn last line is dropped)."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if keep(row):
            rows.append(line + "\n")
    path.write_text("".join(rows))
