"""The accuracy study's results from its finished tasks: per dataset the runs of every variant
with mean and sample std, the headline differences and checks; the runtime; the flat keys."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path

from .intervals import fidelity_rows, method_rows, paired_values
from .plan import (
    CODEC_REFERENCE,
    CODEC_VARIANTS,
    CURVE_VARIANTS,
    MAIN_K,
    METHOD_VARIANTS,
    RECIPE,
    SAMPLED_N,
    STUDENT,
    TEACHER,
    VARIANT_LABELS,
    DatasetPlan,
)

HEADLINE_KEYS = ("acc_cache_minus_online_pp", "acc_kd_minus_ce_pp", "acc_ce_std_pp")
#: the codec study's paired differences to float16 top-10 (``kd_cache``), per codec variant
CODEC_NAMES = {"kd_gap8": "gap8", "kd_sampled": "sampled"}
CODEC_KEYS = tuple(f"{pre}{CODEC_NAMES[v]}_minus_float16{post}" for v in CODEC_VARIANTS
                   for pre, post in (("acc_", "_pp"), ("acc_", "_std_pp"), ("acc_", "_abs_pp"), ("paired_", "_pp")))
#: the methods study's paired differences (same seeds: same init, batch order and views): name -> (a, b)
METHOD_PAIRS = {
    "projector_cache_minus_kd": ("projector_cache", "kd_cache"),
    "projector_cache_minus_online": ("projector_cache", "projector_online"),
    "projector_cache_minus_ce": ("projector_cache", "ce"),
    "prokt_minus_kd": ("prokt", "kd_cache"),
    "prokt_minus_ce": ("prokt", "ce"),
}
METHOD_KEYS = tuple(f"{pre}{name}{post}" for name in METHOD_PAIRS
                    for pre, post in (("acc_", "_pp"), ("acc_", "_std_pp"), ("paired_", "_pp")))


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _variant_runs(name: str, plan: DatasetPlan, variants: list[str], done: dict) -> dict[str, dict]:
    runs: dict[str, dict] = {v: {"label": VARIANT_LABELS[v], "seeds": [], "top1": [], "top5": [], "runs": []}
                             for v in variants}
    for seed in plan.seeds:
        for v in variants:
            r = done[("student", name, v, seed)]
            if "error" in r:
                runs[v]["runs"].append({"seed": seed, **r})
                continue
            runs[v]["seeds"].append(seed)
            runs[v]["top1"].append(r["top1"])
            runs[v]["top5"].append(r["top5"])
            runs[v]["runs"].append({"seed": seed, **r})
    for d in runs.values():
        d["mean"], d["std"] = mean_std(d["top1"])
        d["top5_mean"], d["top5_std"] = mean_std(d["top5"])
    return runs


def _headline(runs: dict[str, dict]) -> dict:
    def paired(a: str, b: str) -> list[float]:
        return paired_values(runs, a, b)[1]

    def diff(a: str, b: str) -> float | None:
        if a not in runs or b not in runs or runs[a]["mean"] is None or runs[b]["mean"] is None:
            return None
        return runs[a]["mean"] - runs[b]["mean"]

    def std(v: str) -> float | None:
        return runs[v]["std"] if v in runs else None

    headline = {
        "acc_cache_minus_online_pp": diff("kd_cache", "kd_online"),
        "acc_kd_minus_ce_pp": diff("kd_cache", "ce"),
        "acc_ce_std_pp": std("ce"),
        "acc_kd_std_pp": std("kd_cache"),
        "acc_online_std_pp": std("kd_online"),
        "paired_cache_minus_online_pp": paired("kd_cache", "kd_online"),
        "paired_kd_minus_ce_pp": paired("kd_cache", "ce"),
    }
    for v in CODEC_VARIANTS:  # the codec study: mean and sample std of the paired differences
        if v not in runs:
            continue
        name = CODEC_NAMES[v]
        d = paired(v, CODEC_REFERENCE)
        mean, sd = mean_std(d)
        headline.update({f"acc_{name}_minus_float16_pp": mean, f"acc_{name}_minus_float16_std_pp": sd,
                         f"acc_{name}_minus_float16_abs_pp": None if mean is None else abs(mean),
                         f"paired_{name}_minus_float16_pp": d})
    for name, (a, b) in METHOD_PAIRS.items():  # the methods study: mean and sample std of paired differences
        d = paired(a, b)
        if d:
            mean, sd = mean_std(d)
            headline.update({f"acc_{name}_pp": mean, f"acc_{name}_std_pp": sd, f"paired_{name}_pp": d})
    return headline


def _codec_table(runs: dict[str, dict]) -> dict | None:
    """The codec study, per variant: seeds, final val top-1 per seed, mean +- std, and the paired
    differences to ``kd_cache`` (float16 top-10) per seed with their mean +- std. None when no
    codec variant ran."""
    if not any(v in runs for v in CODEC_VARIANTS) or CODEC_REFERENCE not in runs:
        return None
    table = {}
    for v, r in runs.items():
        row = {"label": r["label"], "seeds": r["seeds"], "top1": r["top1"], "mean": r["mean"], "std": r["std"]}
        if v != CODEC_REFERENCE:
            seeds, d = paired_values(runs, v, CODEC_REFERENCE)
            mean, sd = mean_std(d)
            row.update(paired_seeds=seeds, minus_float16_pp=d, minus_float16_mean_pp=mean, minus_float16_std_pp=sd)
        table[v] = row
    return {"reference": CODEC_REFERENCE, "sampled_draws": SAMPLED_N, "variants": table,
            "note": "minus_float16: this variant's final val top-1 minus kd_cache's (top-10 float16 cache), same "
                    "seed (same init, batch order and views); mean and sample std (ddof=1) over seeds, pp"}


def _checks(headline: dict, runs: dict[str, dict], n_seeds: int, caches: dict) -> dict:
    checks = {}
    if headline["acc_kd_minus_ce_pp"] is not None and n_seeds > 1 and headline["acc_kd_std_pp"] is not None:
        ce_std, kd_std = runs["ce"]["std"], runs["kd_cache"]["std"]
        checks["kd_beats_ce_by_more_than_ce_std"] = headline["acc_kd_minus_ce_pp"] > ce_std
        checks["kd_beats_ce_by_more_than_max_std"] = headline["acc_kd_minus_ce_pp"] > max(ce_std, kd_std)
    if headline["acc_cache_minus_online_pp"] is not None:
        checks["cache_online_within_0p5pp"] = abs(headline["acc_cache_minus_online_pp"]) <= 0.5
    if headline.get("acc_gap8_minus_float16_abs_pp") is not None:
        checks["gap8_float16_within_0p5pp"] = headline["acc_gap8_minus_float16_abs_pp"] <= 0.5
    digests = {c.get("views_digest") for c in caches.values()}
    if len(caches) > 1 and None not in digests:  # every cache holds the same views (same recipe and seeds)
        checks["caches_same_views"] = len(digests) == 1
    return checks


def _dataset_info(name: str, data: Path) -> dict:
    from logitcache.data.source import open_source

    return {"name": name, "root": str(data), "num_classes": open_source(str(data), "train").num_classes,
            "train": len(open_source(str(data), "train")), "val": len(open_source(str(data), "val"))}


def summarise(name: str, plan: DatasetPlan, data: Path, layout: dict, done: dict, limit_batches) -> dict:
    """One dataset's part of accuracy.json."""
    variants, sweep, ks = layout["variants"], layout["sweep"], layout["ks"]
    teacher = done[("teacher", name)]
    caches = {str(k): done[("cache", name, k)] for k in ks}
    runs = _variant_runs(name, plan, variants, done)
    k_sweep = {k: {"variant": v, "top1": runs[v]["top1"], "mean": runs[v]["mean"], "std": runs[v]["std"]}
               for k, v in sweep.items()}
    headline = _headline(runs)
    seed0 = plan.seeds[0]
    curves = {}
    for v in CURVE_VARIANTS + CODEC_VARIANTS + METHOD_VARIANTS:
        r = done.get(("student", name, v, seed0), {})
        if "curve_top1" in r:
            curves[v] = r["curve_top1"]
    student_keys = [k for k in done if k[0] == "student" and k[1] == name]
    return {
        "dataset": _dataset_info(name, data),
        "settings": {**asdict(plan), "variants": variants, "student": STUDENT, "batch_size": 128, "lr": 2e-3,
                     "opt": "adamw", "weight_decay": 0.05, "sched": "cosine", "warmup_epochs": 1, "recipe": RECIPE,
                     "limit_batches": limit_batches, "teacher": TEACHER, "main_k": MAIN_K,
                     "std": "sample std over seeds (ddof=1)"},
        "teacher": teacher,
        "caches": caches,
        "variants": runs,
        "k_sweep": k_sweep,
        "headline": headline,
        **({"codecs": codecs} if (codecs := _codec_table(runs)) else {}),
        "checks": _checks(headline, runs, len(plan.seeds), caches),
        "fidelity": fidelity_rows(runs),  # paired differences with 95% intervals and their verdicts
        "intervals": method_rows(runs),  # every variant's mean and its difference to CE, with 95% intervals
        "curves_seed0": curves,
        "time": {
            "teacher_wall_s": teacher.get("wall_s", 0.0),
            "caches_wall_s": sum(c.get("wall_s", 0.0) for c in caches.values()),
            "students_wall_s": sum(done[k].get("wall_s", 0.0) for k in student_keys),
            "students_cpu_s": sum(done[k].get("cpu_main_s", 0.0) + done[k].get("cpu_workers_s", 0.0)
                                  for k in student_keys),
        },
    }


def summarise_datasets(plans: dict[str, DatasetPlan], datas: dict, layout: dict, done: dict,
                       limit_batches: int | None) -> dict:
    """Every dataset's summary, or its error when its teacher or main cache failed."""
    out = {}
    for name, plan in plans.items():
        if "error" in done[("teacher", name)] or "error" in done[("cache", name, MAIN_K)]:
            out[name] = {"error": done[("teacher", name)].get("error") or done[("cache", name, MAIN_K)].get("error")}
            continue
        out[name] = summarise(name, plan, datas[name], layout[name], done, limit_batches)
    return out


def runtime(total: dict, done: dict) -> dict:
    """This invocation's wall and CPU seconds (``total``, a Clock reading) and the tasks' own."""
    cpu = total["cpu_main_s"] + total["cpu_workers_s"]
    out = {
        "wall_s": total["wall_s"], "cpu_total_s": cpu,
        "note": "wall_s, cpu_total_s: this invocation, on the machine in environment (shared when load_avg "
                "exceeds cpu_count); cpu counts this process and every descendant (pool processes, DataLoader "
                "workers). tasks_*: summed over all tasks, reused ones with their stored times",
    }
    # The work itself, summed over every task, reused ones included (their stored times):
    # independent of interruptions and --resume.
    ran = [r for r in done.values() if "error" not in r]
    out["tasks_wall_s"] = sum(r.get("wall_s", 0.0) for r in ran)
    out["tasks_cpu_s"] = sum(r.get("cpu_main_s", 0.0) + r.get("cpu_workers_s", 0.0) for r in ran)
    out["tasks_reused"] = sum(bool(r.get("reused")) for r in ran)
    out["tasks"] = len(done)
    # a quiet 2-core machine does that work with both cores busy (2 jobs)
    out["quiet_2core_estimate_s"] = out["tasks_cpu_s"] / 2
    return out


def add_flat_keys(results: dict) -> None:
    """Copy each dataset's headline figures and checks to the top level (synth unprefixed,
    others as ``<dataset>_<key>``): summary.json and README read them there. Figures a subset
    of variants (--variants) cannot give are left out; the codec study's (CODEC_KEYS) are added
    when its variants ran."""
    for name, d in results["datasets"].items():
        if "headline" not in d:
            continue
        prefix = "" if name == "synth" else f"{name}_"
        for key in HEADLINE_KEYS + CODEC_KEYS + METHOD_KEYS:
            if d["headline"].get(key) is not None:
                results[prefix + key] = d["headline"][key]
        for key, value in d["checks"].items():
            results.setdefault("checks", {})[prefix + key] = value
