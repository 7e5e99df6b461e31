"""Means with 95% confidence intervals over seeds, and the fidelity rows they decide.

A fidelity row compares two variants that should teach the same thing (KD from the cache
vs the same KD with the teacher online on the same views; the default gap8 codec vs
float16; projector distillation from cached vs online features), paired by seed: same
student initialisation, batch order and views, so only the teacher signal differs. Its
target: a mean paired difference within ``FIDELITY_MEAN_PP`` whose 95% interval excludes a
loss larger than ``FIDELITY_LOSS_PP`` (the interval's lower end above -0.5 pp).

The interval is Student's t over the n seeds: mean +- t(0.975, n - 1) x std / sqrt(n).
"""

from __future__ import annotations

import math
import statistics

#: (a, b): a - b per seed; a is the cheaper way (cache, gap8), b the reference
FIDELITY_PAIRS = {
    "cache_minus_online": ("kd_cache", "kd_online"),
    "gap8_minus_float16": ("kd_gap8", "kd_cache"),
    "projector_cache_minus_online": ("projector_cache", "projector_online"),
}
FIDELITY_MEAN_PP = 0.3
FIDELITY_LOSS_PP = 0.5
MIN_FIDELITY_SEEDS = 5


def ci95(values: list[float]) -> dict:
    """n, mean, sample std and the 95% t interval (lo, hi) of ``values``; None bounds below 2 values."""
    n = len(values)
    mean = statistics.fmean(values) if values else None
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "lo": None, "hi": None}
    from scipy.stats import t

    std = statistics.stdev(values)
    half = float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "lo": mean - half, "hi": mean + half}


def paired_values(runs: dict[str, dict], a: str, b: str) -> tuple[list[int], list[float]]:
    """Seeds both ``a`` and ``b`` finished, and a - b of each (final val top-1, pp). Paired (same
    seed): same init, batch order and views; only the teacher signal differs."""
    if a not in runs or b not in runs:
        return [], []
    da, db = dict(zip(runs[a]["seeds"], runs[a]["top1"])), dict(zip(runs[b]["seeds"], runs[b]["top1"]))
    seeds = sorted(set(da) & set(db))
    return seeds, [da[s] - db[s] for s in seeds]


def fidelity_rows(runs: dict[str, dict]) -> dict[str, dict]:
    """Each fidelity pair that ran: its seeds, paired differences, interval and verdict
    (``meets_target``: |mean| <= 0.3 pp, lower end >= -0.5 pp, at least 5 seeds)."""
    rows = {}
    for name, (a, b) in FIDELITY_PAIRS.items():
        seeds, diffs = paired_values(runs, a, b)
        if not diffs:
            continue
        c = ci95(diffs)
        meets = (c["lo"] is not None and abs(c["mean"]) <= FIDELITY_MEAN_PP and c["lo"] >= -FIDELITY_LOSS_PP
                 and c["n"] >= MIN_FIDELITY_SEEDS)
        rows[name] = {"a": a, "b": b, "seeds": seeds, "paired_pp": diffs, **c, "meets_target": meets}
    return rows


def method_rows(runs: dict[str, dict], reference: str = "ce") -> dict[str, dict]:
    """Every variant: its val top-1 mean with a 95% interval, and its paired difference to
    ``reference`` (CE on the same views) with one."""
    rows = {}
    for v, r in runs.items():
        row = {"top1": ci95(r["top1"])}
        if v != reference:
            row["minus_" + reference] = ci95(paired_values(runs, v, reference)[1])
        rows[v] = row
    return rows


def fmt(c: dict, sign: str = "") -> str:
    """'+1.23 [+0.40, +2.06] (n=5)', or the mean alone below 2 values."""
    if c["mean"] is None:
        return "–"
    if c["lo"] is None:
        return f"{c['mean']:{sign}.2f} (n={c['n']})"
    return f"{c['mean']:{sign}.2f} [{c['lo']:{sign}.2f}, {c['hi']:{sign}.2f}] (n={c['n']})"
