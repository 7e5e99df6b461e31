"""``python -m bench.accuracy``: the command line of the accuracy study."""

from __future__ import annotations

import argparse

from .plan import ALL_VARIANTS
from .report import markdown
from .study import run


def _parser() -> argparse.ArgumentParser:
    import bench.accuracy

    p = argparse.ArgumentParser(prog="python -m bench.accuracy", description=bench.accuracy.__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, synth only, no k sweep")
    p.add_argument("--datasets", default=None, help="comma-separated: synth,digits (default: both; quick: synth)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 3; quick 1)")
    p.add_argument("--out", default="bench/results", help="where accuracy*.json / *.png go")
    p.add_argument("--output", default=None,
                   help="the results JSON's path instead of <out>/accuracy[_quick].json; plots go next to it, "
                        "named after it (e.g. bench/results/accuracy_codecs.json)")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated: run only these, of {','.join(ALL_VARIANTS)} (default: the study's "
                        "main variants and k sweep; the codec study: ce,kd_cache,kd_gap8,kd_sampled)")
    p.add_argument("--workdir", default="runs/accuracy", help="data, teachers, caches, student runs")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of cache builds")
    p.add_argument("--student-workers", type=int, default=0, help="DataLoader workers of teacher and student training")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the main process")
    p.add_argument("--resume", action="store_true", help="reuse finished student runs with the same settings")
    p.add_argument("--synth-epochs", type=int, default=None, help="student epochs on synth (default 10)")
    p.add_argument("--digits-epochs", type=int, default=None, help="student epochs on digits (default 15)")
    return p


def _print_summary(results: dict) -> None:
    print(markdown(results))
    rt = results["runtime"]
    print(f"\nruntime: {rt['wall_s']:.0f} s wall, {rt['cpu_total_s']:.0f} s cpu "
          f"(quiet 2-core estimate {rt['quiet_2core_estimate_s']:.0f} s)")
    for k in sorted(results):
        if k.startswith(("acc_", "digits_acc_")):
            v = results[k]
            print(f"{k}: {'n/a' if v is None else f'{v:+.2f}'}")
    for k, v in results.get("checks", {}).items():
        print(f"check {k}: {v}")
    for k in results["failures"]:
        print(f"FAILED: {'/'.join(map(str, k))}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    datasets = args.datasets.split(",") if args.datasets else None
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
    results = run(args.quick, datasets=datasets, seeds=args.seeds, out=args.out, workdir=args.workdir,
                  workers=args.workers, student_workers=args.student_workers, jobs=args.jobs, threads=args.threads,
                  resume=args.resume, synth_epochs=args.synth_epochs, digits_epochs=args.digits_epochs,
                  variants=variants, output=args.output)
    _print_summary(results)
    return 1 if results["failures"] else 0
