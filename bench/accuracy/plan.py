"""What the accuracy study runs: its models, the per-dataset plans, the variants and how each
variant configures a student run."""

from __future__ import annotations

from dataclasses import dataclass, field

from logitcache.cli.demo_teacher import DEMO_EPOCHS

TEACHER, STUDENT, RECIPE = "resnet18", "test_resnet", "demo32"
MAIN_K = 10
SWEEP_K = (1, 5, 10, "full")
CURVE_VARIANTS = ("ce", "kd_cache", "kd_online")
#: draws per view of the sampled cache (``kd_sampled``)
SAMPLED_N = 32
#: the codec study's variants: the same top-10 cache with the library's default gap8 values,
#: and a sampled N = 32 cache; paired against ``kd_cache`` (float16 top-10). Not in the full
#: study's default runs: ``--variants ce,kd_cache,kd_gap8,kd_sampled`` runs them.
CODEC_VARIANTS = ("kd_gap8", "kd_sampled")
CODEC_REFERENCE = "kd_cache"
#: the methods that need more than cached logits (issue 12): projector feature distillation from a
#: top-10 float16 cache with int8 PCA-256 features (``projector_cache``) and from the online teacher
#: on the same views (``projector_online``), and ProKT (online only; its recipe's views are the
#: caches' views). ``--variants ce,kd_cache,projector_cache,projector_online,prokt`` runs them.
METHOD_VARIANTS = ("projector_cache", "projector_online", "prokt")
FEATURE_DIMS = 256

VARIANT_LABELS = {
    "ce": "CE only",
    "kd_cache": "vanilla KD, cache (top-10, float16)",
    "kd_online": "vanilla KD, online teacher",
    "mkd": "MKD (learned T), cache (top-10)",
    "dkd": "DKD, cache (top-10)",
    "dist": "DIST (kd_weight 2), cache (top-10)",
    "kd_top1": "vanilla KD, cache top-1",
    "kd_top5": "vanilla KD, cache top-5",
    "kd_full": "vanilla KD, cache full logits",
    "kd_gap8": "vanilla KD, cache (top-10, gap8)",
    "kd_sampled": f"vanilla KD T=1, cache (sampled, N={SAMPLED_N})",
    "projector_cache": f"projector + KD, cache (top-10 float16, features pca{FEATURE_DIMS}/int8)",
    "projector_online": "projector + KD, online teacher",
    "prokt": "ProKT (teacher trained along, online)",
}
MAIN_VARIANTS = ("ce", "kd_cache", "kd_online", "mkd", "dkd", "dist")
SWEEP_VARIANTS = ("kd_top1", "kd_top5", "kd_full")
ALL_VARIANTS = MAIN_VARIANTS + SWEEP_VARIANTS + CODEC_VARIANTS + METHOD_VARIANTS

# (teacher epochs, student epochs) of the full study; --quick trains both for QUICK_EPOCHS. synth's
# teacher is make demo's, shipped (its epochs are in its record: logitcache/cli/demo_teacher.py), and its
# students train as long as make demo's.
FULL_EPOCHS = {"synth": (0, DEMO_EPOCHS), "digits": (15, 15)}
#: the temperature of every vanilla-KD variant (and the projector's KD term): make demo's CNN's
KD_TEMPERATURE = 4.0
QUICK_EPOCHS = 2


@dataclass
class DatasetPlan:
    """Settings of one dataset's part of the study."""

    name: str  # "synth" | "digits"
    teacher_epochs: int
    student_epochs: int  # also the cache's epochs
    seeds: list[int]
    sweep: bool  # the top-k sweep
    variants: list[str] = field(default_factory=list)  # only these (--variants); empty: the study's default


def dataset_plans(seeds: int, quick: bool = False) -> dict[str, DatasetPlan]:
    """Every dataset's plan: the full study's, or the quick one (short, no k sweep)."""
    s = list(range(seeds))
    if quick:
        return {n: DatasetPlan(n, QUICK_EPOCHS, QUICK_EPOCHS, seeds=s, sweep=False) for n in FULL_EPOCHS}
    return {n: DatasetPlan(n, t, e, seeds=s, sweep=True) for n, (t, e) in FULL_EPOCHS.items()}


def select_plans(quick: bool, datasets: list[str] | None, seeds: int | None, *, synth_epochs: int | None = None,
                 digits_epochs: int | None = None, teacher_epochs: dict | None = None,
                 variants: list[str] | None = None) -> dict[str, DatasetPlan]:
    """The plans of ``datasets`` (default: synth when quick, else both) with the overrides applied;
    ``variants``: run only these (the k sweep then runs only as far as they ask for it)."""
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
    if variants:
        unknown = [v for v in variants if v not in ALL_VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; use {', '.join(ALL_VARIANTS)}")
        variants = list(dict.fromkeys(variants))
        for plan in plans.values():
            plan.variants = list(variants)
            plan.sweep = any(v in SWEEP_VARIANTS for v in variants)
    return {n: plans[n] for n in datasets}


def variants_for(plan: DatasetPlan, num_classes: int) -> tuple[list[str], dict, list]:
    """The runs to make, which variant answers each k of the sweep, and the caches to build
    (:func:`cache_id` of each; the main top-10 float16 cache first: every run takes its views)."""
    if plan.variants:  # --variants: exactly these; the k sweep has the ks they cover
        variants = list(plan.variants)
        if num_classes <= MAIN_K:  # digits: top-10 of 10 classes *is* the full cache
            variants = list(dict.fromkeys("kd_cache" if v == "kd_full" else v for v in variants))
        sweep = {}
        for k in SWEEP_K:
            v = ("kd_cache" if k == MAIN_K or (k == "full" and num_classes <= MAIN_K) else
                 "kd_full" if k == "full" else f"kd_top{k}")
            if plan.sweep and v in variants:
                sweep[str(k)] = v
        ks = list(dict.fromkeys([MAIN_K] + [cache_id(v) for v in variants]))
        return variants, sweep, ks
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
    """The k of the cache ``variant`` learns from (draws per view for ``kd_sampled``)."""
    if variant == "kd_full":
        return "full"
    if variant.startswith("kd_top"):
        return int(variant.removeprefix("kd_top"))
    if variant == "kd_sampled":
        return SAMPLED_N
    return MAIN_K


def cache_values(variant: str) -> str:
    """How the cache ``variant`` learns from stores its values: "float16" (the study's caches),
    "gap8" (``kd_gap8``: the library's default), "counts" (``kd_sampled``), or "float16" with
    features ("feat256", ``projector_cache``)."""
    return {"kd_gap8": "gap8", "kd_sampled": "counts", "projector_cache": f"feat{FEATURE_DIMS}"}.get(variant, "float16")


def cache_id(variant: str) -> int | str:
    """The study's name of the cache ``variant`` learns from: its k (1, 5, 10, "full") for the
    float16 caches, as ever; "top10-gap8" and "sampled32" for the codec study's."""
    k, values = cache_k(variant), cache_values(variant)
    if values == "float16":
        return k
    return f"sampled{k}" if values == "counts" else f"top{k}-{values}"


def cache_features(cid: int | str):
    """The FeatureRequest of the cache :func:`cache_id` names ("top10-feat256"), else None."""
    from logitcache.build.features import FeatureRequest

    if isinstance(cid, str) and "-feat" in cid:
        return FeatureRequest(dims=int(cid.split("-feat", 1)[1]))
    return None


def cache_codec(cid: int | str, num_classes: int):
    """The CodecSpec of the cache :func:`cache_id` names (topk keeps k >= C as the full codec)."""
    from logitcache.codecs.logits import create_codec

    from ..common import codec_for_k

    if isinstance(cid, str) and cid.startswith("sampled"):
        return create_codec("sampled", num_classes, int(cid.removeprefix("sampled")))
    if isinstance(cid, str) and cid.startswith("top"):
        k, values = cid.removeprefix("top").split("-", 1)
        return codec_for_k(int(k), num_classes, values="float16" if values.startswith("feat") else values)
    return codec_for_k(cid, num_classes)


def variant_config(variant: str, caches: dict, teacher: dict) -> dict:
    """TrainConfig keyword arguments that make ``variant`` (besides the shared ones)."""
    from logitcache.trainer.config import MKDConfig
    from logitcache.trainer.losses import LossConfig

    main = caches[MAIN_K]["url"]  # caches: cache_id -> build_cache's result
    if variant == "ce":
        return {"cache": main, "loss": LossConfig(kind="none")}
    kd = LossConfig(kind="kd", temperature=KD_TEMPERATURE)
    if variant == "kd_cache":
        return {"cache": main, "loss": kd}
    if variant == "kd_online":
        return {"cache": main, "loss": kd, "online_teacher": True, "teacher": TEACHER,
                "teacher_weights": teacher["weights"]}
    if variant == "mkd":
        return {"cache": main, "loss": LossConfig(kind="kd"), "mkd": MKDConfig()}
    if variant == "dkd":
        return {"cache": main, "loss": LossConfig(kind="dkd")}
    if variant == "dist":
        return {"cache": main, "loss": LossConfig(kind="dist", kd_weight=2.0)}
    if variant.startswith("kd_top") or variant == "kd_full" or variant == "kd_gap8":
        return {"cache": caches[cache_id(variant)]["url"], "loss": kd}
    if variant == "kd_sampled":  # counts / N estimate the teacher at T = 1 only: the trainer refuses other T
        return {"cache": caches[cache_id(variant)]["url"], "loss": LossConfig(kind="kd", temperature=1.0)}
    online = {"online_teacher": True, "teacher": TEACHER, "teacher_weights": teacher["weights"]}
    projector = LossConfig(kind="projector", temperature=KD_TEMPERATURE)
    if variant == "projector_cache":
        return {"cache": caches[cache_id(variant)]["url"], "loss": projector}
    if variant == "projector_online":
        return {"cache": main, "loss": projector, **online}
    if variant == "prokt":  # no cache (ProKT refuses one): the recipe's views are the caches' views
        from logitcache.trainer.config import ProKTConfig

        return {"recipe": RECIPE, "loss": kd, "prokt": ProKTConfig(), **online}
    raise ValueError(f"unknown variant {variant!r}")
