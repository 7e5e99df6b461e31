"""What the small paired-seed studies share (bench/accuracy/repeats.py, teachers.py): one
student run per (variant, seed), found on disk when done; the differences paired by seed;
their Markdown tables."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from .jobs import log


def parse_args(prog: str, doc: str, argv: list[str] | None, *, epochs: int, teacher_epochs: int,
               output: str) -> argparse.Namespace:
    """A study's command line: --seeds, --epochs (student = cached), --teacher-epochs,
    --workdir, --workers (the teachers' runs and the builds), --output."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=epochs, help="student epochs = cached epochs")
    p.add_argument("--teacher-epochs", type=int, default=teacher_epochs)
    p.add_argument("--workdir", default="runs/accuracy")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the teachers' runs and the builds")
    p.add_argument("--output", default=output)
    return p.parse_args(argv)


def run_variants(data: Path, root: Path, variants: dict[str, dict], seeds: int, epochs: int,
                 defaults: dict) -> dict[str, list[dict]]:
    """Every variant (TrainConfig settings over ``defaults``) once per seed, under
    ``root/<variant>/seed<s>``; a finished run is read back from its ``result.json``."""
    from logitcache.trainer.config import TrainConfig
    from logitcache.trainer.train import train

    runs: dict[str, list[dict]] = {}
    for name, settings in variants.items():
        for seed in range(seeds):
            out = root / name / f"seed{seed}"
            done = out / "result.json"
            if not done.exists():
                log(f"{name} seed {seed}")
                t0 = time.perf_counter()
                summary = train(TrainConfig(data=str(data), out=str(out), epochs=epochs, seed=seed, tensorboard=False,
                                            progress=False, **{**defaults, **settings}))
                done.write_text(json.dumps({"top1": summary["final_top1"], "seconds": time.perf_counter() - t0}))
            runs.setdefault(name, []).append(json.loads(done.read_text()))
    return runs


def save_result(output: str, settings: dict, top1: dict[str, list[float]], differences: dict[str, list[float]],
                runs: dict[str, list[dict]]) -> dict:
    """The study's result (settings, top-1 per variant and seed, paired differences, seconds),
    written to ``output`` as JSON."""
    result = {"settings": settings, "top1": top1, "paired_pp": differences,
              "seconds": {name: sum(r["seconds"] for r in rs) for name, rs in runs.items()}}
    Path(output).write_text(json.dumps(result, indent=2))
    return result


def paired(top1: dict[str, list[float]], pairs: list[tuple[str, str, str]]) -> dict[str, list[float]]:
    """(what, variant, reference) -> the per-seed differences variant - reference, pp."""
    return {what: [x - y for x, y in zip(top1[v], top1[ref])] for what, v, ref in pairs}


def pm(values: list[float], sign: str = "") -> str:
    """mean +- sample std ("+1.23 +- 0.45" with ``sign="+"``)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{sign}.2f} +- {sd:.2f}"


def tables(result: dict, paired_title: str = "paired by seed") -> list[str]:
    """The two Markdown tables of a study: val top-1 per variant, and the paired differences."""
    lines = ["| variant | val top-1 |", "|---|---:|"]
    lines += [f"| {name} | {pm(v)} |" for name, v in result["top1"].items()]
    lines += ["", f"| {paired_title} | difference, pp |", "|---|---:|"]
    lines += [f"| {what} | {pm(d, '+')} |" for what, d in result["paired_pp"].items()]
    return lines
