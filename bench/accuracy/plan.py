"""What the accuracy study runs: its models, the per-dataset plans, the variants and how each
variant configures a student run."""

from __future__ import annotations

from dataclasses import dataclass, field

TEACHER, STUDENT, RECIPE = "resnet18", "test_resnet", "demo32"
MAIN_K = 10
SWEEP_K = (1, 5, 10, "full")
CURVE_VARIANTS = ("ce", "kd_cache", "kd_online")

VARIANT_LABELS = {
    "ce": "CE only",
    "kd_cache": "vanilla KD, cache (top-10)",
    "kd_online": "vanilla KD, online teacher",
    "mkd": "MKD (learned T), cache (top-10)",
    "dkd": "DKD, cache (top-10)",
    "dist": "DIST (kd_weight 2), cache (top-10)",
    "kd_top1": "vanilla KD, cache top-1",
    "kd_top5": "vanilla KD, cache top-5",
    "kd_full": "vanilla KD, cache full logits",
}
MAIN_VARIANTS = ("ce", "kd_cache", "kd_online", "mkd", "dkd", "dist")

# (teacher epochs, student epochs) of the full study; --quick trains both for QUICK_EPOCHS
FULL_EPOCHS = {"synth": (20, 10), "digits": (15, 15)}
QUICK_EPOCHS = 2


@dataclass
class DatasetPlan:
    """Settings of one dataset's part of the study."""

    name: str  # "synth" | "digits"
    teacher_epochs: int
    student_epochs: int  # also the cache's epochs
    seeds: list[int]
    sweep: bool  # the top-k sweep
    variants: list[str] = field(default_factory=list)


def dataset_plans(seeds: int, quick: bool = False) -> dict[str, DatasetPlan]:
    """Every dataset's plan: the full study's, or the quick one (short, no k sweep)."""
    s = list(range(seeds))
    if quick:
        return {n: DatasetPlan(n, QUICK_EPOCHS, QUICK_EPOCHS, seeds=s, sweep=False) for n in FULL_EPOCHS}
    return {n: DatasetPlan(n, t, e, seeds=s, sweep=True) for n, (t, e) in FULL_EPOCHS.items()}


def select_plans(quick: bool, datasets: list[str] | None, seeds: int | None, *, synth_epochs: int | None = None,
                 digits_epochs: int | None = None, teacher_epochs: dict | None = None) -> dict[str, DatasetPlan]:
    """The plans of ``datasets`` (default: synth when quick, else both) with the overrides applied."""
    if datasets is None:
        datasets = ["synth"] if quick else ["synth", "digits"]
    seeds = seeds if seeds is not None else (1 if quick else 3)
    plans = dataset_plans(seeds, quick)
    unknown = set(datasets) - set(plans)
    if unknown:
        raise ValueError(f"unknown datasets {sorted(unknown)}; use synth, digits")
    if synth_epochs:
        plans["synth"].student_epochs = synth_epochs
    if digits_epochs:
        plans["digits"].student_epochs = digits_epochs
    for name, e in (teacher_epochs or {}).items():
        plans[name].teacher_epochs = e
    return {n: plans[n] for n in datasets}


def variants_for(plan: DatasetPlan, num_classes: int) -> tuple[list[str], dict, list]:
    """The runs to make, which variant answers each k of the sweep, and the caches to build."""
    variants = list(MAIN_VARIANTS)
    sweep = {}
    if plan.sweep:
        for k in SWEEP_K:
            if k == MAIN_K or (k == "full" and num_classes <= MAIN_K):
                sweep[str(k)] = "kd_cache"  # digits: top-10 of 10 classes *is* the full cache
            else:
                v = "kd_full" if k == "full" else f"kd_top{k}"
                sweep[str(k)] = v
                variants.append(v)
    ks = [MAIN_K] + [k for k in SWEEP_K if plan.sweep and k != MAIN_K and not (k == "full" and num_classes <= MAIN_K)]
    return variants, sweep, ks


def cache_k(variant: str) -> int | str:
    """The k of the cache ``variant`` learns from."""
    if variant == "kd_full":
        return "full"
    if variant.startswith("kd_top"):
        return int(variant.removeprefix("kd_top"))
    return MAIN_K


def variant_config(variant: str, caches: dict, teacher: dict) -> dict:
    """TrainConfig keyword arguments that make ``variant`` (besides the shared ones)."""
    from logitcache.trainer.losses import LossConfig
    from logitcache.trainer.mkd import MKDConfig

    main = caches[MAIN_K]["url"]
    if variant == "ce":
        return {"cache": main, "loss": LossConfig(kind="none")}
    if variant == "kd_cache":
        return {"cache": main, "loss": LossConfig(kind="kd")}
    if variant == "kd_online":
        return {"cache": main, "loss": LossConfig(kind="kd"), "online_teacher": True, "teacher": TEACHER,
                "teacher_weights": teacher["weights"]}
    if variant == "mkd":
        return {"cache": main, "loss": LossConfig(kind="kd"), "mkd": MKDConfig()}
    if variant == "dkd":
        return {"cache": main, "loss": LossConfig(kind="dkd")}
    if variant == "dist":
        return {"cache": main, "loss": LossConfig(kind="dist", kd_weight=2.0)}
    if variant.startswith("kd_top") or variant == "kd_full":
        return {"cache": caches[cache_k(variant)]["url"], "loss": LossConfig(kind="kd")}
    raise ValueError(f"unknown variant {variant!r}")
