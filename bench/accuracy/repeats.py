"""``python -m bench.accuracy.repeats``: what repeated augmentation and DeiT's distillation token
do on the embedded data, paired by seed (issue 20).

On the synth dataset (128 classes, 32 px) with the accuracy study's ResNet-18 teacher:

* **repeats**: vanilla KD from a cache of ``demo32_mix`` views against the same student from a
  cache of the same recipe with ``aug_repeats 3`` (the same epochs, so the same number of views
  per epoch, a third of the samples each epoch); student ``test_resnet``;
* **token**: a small distilled DeiT (``deit_tiny_distilled_patch16_224`` at 32 px, patches of 8,
  depth 4) with ``--kd deit-hard`` and ``deit-soft`` (alpha 0.5, T = 1) from the cache and with
  the teacher online on the same views, and CE alone (on the averaged heads, timm's forward of a
  distilled model outside distilled training).

Each variant runs once per seed (the student's init and batch order); differences are paired
by seed (mean +- std over seeds). Writes ``bench/results/accuracy_repeats.json`` (default) and
prints a Markdown table.
"""

from __future__ import annotations

from pathlib import Path

from .jobs import log, obtain_teacher, prepare_dataset
from .paired import paired, parse_args, run_variants, save_result, tables
from .plan import TEACHER

DEIT = "deit_tiny_distilled_patch16_224"
DEIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 4}
PAIRS = [  # (what, variant, reference)
    ("repeats 3 - none (vanilla KD, test_resnet)", "kd_repeats3", "kd_norepeat"),
    ("deit-hard: cache - online", "deit_hard_cache", "deit_hard_online"),
    ("deit-soft: cache - online", "deit_soft_cache", "deit_soft_online"),
    ("deit-hard (cache) - CE", "deit_hard_cache", "deit_ce"),
    ("deit-soft (cache) - CE", "deit_soft_cache", "deit_ce"),
]


def _cache(data: Path, work: Path, teacher: dict, repeats: int, epochs: int, workers: int) -> str:
    from logitcache.build.loop import build
    from logitcache.build.teacher import Teacher
    from logitcache.codecs.logits import create_codec
    from logitcache.data.source import open_source
    from logitcache.storage.reader import CacheReader
    from logitcache.views.augment import create_recipe

    url = str(work / "synth" / "caches" / f"{Path(teacher['dir']).name}-demo32_mix-ra{repeats}-top10.zarr")
    if Path(url, "zarr.json").exists() and set(range(epochs)) <= set(CacheReader(url).epochs()):
        return url
    source = open_source(str(data), "train")
    log(f"building cache demo32_mix aug_repeats {repeats} ({epochs} epochs) -> {url}")
    build(source, dataset_name="synth", teacher=Teacher(TEACHER, weights=teacher["weights"]),
          recipe=create_recipe("demo32_mix", aug_repeats=repeats), codec=create_codec("topk", source.num_classes, 10),
          url=url, epochs=list(range(epochs)), batch_size=128, num_workers=workers, progress=False)
    return url


def _variants(caches: dict, teacher: dict) -> dict[str, dict]:
    from logitcache.trainer.losses import LossConfig

    online = {"online_teacher": True, "teacher": TEACHER, "teacher_weights": teacher["weights"]}
    deit = {"student": DEIT, "model_kwargs": DEIT_KWARGS, "cache": caches[1], "lr": 1e-3}
    token = {k: LossConfig(kind=k.replace("_", "-"), kd_weight=0.5, hard_weight=0.5) for k in ("deit_hard", "deit_soft")}
    return {
        "kd_norepeat": {"student": "test_resnet", "cache": caches[1], "loss": LossConfig(kind="kd")},
        "kd_repeats3": {"student": "test_resnet", "cache": caches[3], "loss": LossConfig(kind="kd")},
        "deit_ce": {**deit, "loss": LossConfig(kind="none")},
        "deit_hard_cache": {**deit, "loss": token["deit_hard"]},
        "deit_hard_online": {**deit, "loss": token["deit_hard"], **online},
        "deit_soft_cache": {**deit, "loss": token["deit_soft"]},
        "deit_soft_online": {**deit, "loss": token["deit_soft"], **online},
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args("python -m bench.accuracy.repeats", __doc__, argv, epochs=6, teacher_epochs=20,
                   output="bench/results/accuracy_repeats.json")
    work = Path(a.workdir)
    data = prepare_dataset("synth", work)
    teacher = obtain_teacher("synth", data, work, a.teacher_epochs, a.workers, prefer_epochs=None)
    caches = {r: _cache(data, work, teacher, r, a.epochs, a.workers) for r in (1, 3)}
    runs = run_variants(data, work / "synth" / "repeats_study" / f"e{a.epochs}", _variants(caches, teacher), a.seeds,
                        a.epochs, {"batch_size": 120, "num_workers": 2})
    top1 = {name: [r["top1"] for r in rs] for name, rs in runs.items()}
    differences = paired(top1, PAIRS)
    settings = {"dataset": "synth", "teacher": TEACHER, "teacher_top1": teacher.get("val_top1"),
                "epochs": a.epochs, "seeds": a.seeds, "deit": DEIT, "deit_kwargs": DEIT_KWARGS,
                "command": "python -m bench.accuracy.repeats " + " ".join(argv or [])}
    print(markdown(save_result(a.output, settings, top1, differences, runs)))
    return 0


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"Synth (128 classes, 32 px), teacher `{s['teacher']}` ({s['teacher_top1']:.2f}% val top-1), "
             f"{s['epochs']} student epochs, {s['seeds']} seeds; val top-1 %, mean +- std over seeds.", "",
             *tables(result)]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
