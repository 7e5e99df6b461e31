"""Run the benchmarks: ``python -m bench.run [--quick] [--only NAME,...] [--device auto|cpu|cuda]``.

Each benchmark writes ``bench/results/<name>.json`` (environment, settings, results,
summary); then ``bench/RESULTS.md``, the plots and ``bench/results/summary.json`` are
regenerated from every JSON file present (``python -m bench.report`` does only that).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from logitcache.distributed import resolve_device

from .common import RESULTS_DIR, Clock, Ctx, environment

BENCHMARKS = ("build", "train_step", "reader", "frontier", "scale", "features", "replay", "epoch", "teachers",
              "published")


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def run_one(name: str, ctx: Ctx) -> dict:
    mod = importlib.import_module(f"bench.{name}")
    torch.manual_seed(0)
    clock = Clock()
    data = mod.run(ctx)
    spent = clock.read()
    meta = {**environment(ctx.device), "quick": ctx.quick, "tiny": ctx.tiny, "wall_seconds": spent["wall_s"],
            "cpu_seconds": spent["cpu_main_s"] + spent["cpu_workers_s"]}
    return {"name": name, "meta": meta, **data}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small settings (<= 5 min on a quiet 2-core CPU)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tiny", action="store_true", help="smoke-test the suite itself (minimal sizes, meaningless "
                                                       "numbers); implies --results-dir in a temporary folder")
    p.add_argument("--results-dir", default=None, help=f"where the JSON files go [{RESULTS_DIR}]")
    p.add_argument("--workdir", default=None, help="scratch folder for datasets and caches [a temporary folder]")
    args = p.parse_args(argv)

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    device = resolve_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to torch")
    if args.results_dir:
        results = Path(args.results_dir)
    elif args.tiny:
        results = Path(tempfile.mkdtemp(prefix="bench-tiny-results-"))
    else:
        results = RESULTS_DIR
    results.mkdir(parents=True, exist_ok=True)

    failed = []
    t_all = time.perf_counter()
    for name in names:
        print(f"== {name} ({'quick' if args.quick else 'full'}{', tiny' if args.tiny else ''}, {device})", flush=True)
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-", dir=args.workdir) as tmp:
            ctx = Ctx(device=device, quick=args.quick, workdir=Path(tmp), tiny=args.tiny)
            try:
                data = run_one(name, ctx)
            except Exception:  # noqa: BLE001 - report, go on with the others
                traceback.print_exc()
                failed.append(name)
                continue
        (results / f"{name}.json").write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
        for k, v in data["summary"].items():
            print(f"   {k} = {v:.4g}" if isinstance(v, float) else f"   {k} = {v}")
        print(f"   ({data['meta']['wall_seconds']:.1f} s)", flush=True)
    total = time.perf_counter() - t_all

    from .report import write_report

    md = write_report(results, results.parent / "RESULTS.md" if results == RESULTS_DIR else results / "RESULTS.md")
    print(f"== done in {total:.1f} s; {md}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
