"""``python -m bench.accuracy.teachers``: two different teachers on the same views, alone and
together, paired by seed (issue 21).

On the synth dataset (128 classes, 32 px): a CNN teacher (the accuracy study's ``resnet18``)
and a ViT teacher (timm's ``test_vit`` at 32 px, patches of 4), each trained with CE on the
``demo32`` views; one build renders every view once and writes both caches
(``logitcache.build.loop.build_many``). Students ``test_resnet``, vanilla KD at T = 1 (weights
1 and 1, the study's ``kd_cache``): CE alone, each teacher alone, and both with
``--teachers-mode`` ``mean-probs``, ``per-teacher`` (equal weights, T = 1 for the CNN and 4 for
the ViT: at one shared T its gradient is mean-probs') and ``ca-mkd``.

Each variant runs once per seed (the student's init and batch order); differences are paired
by seed (mean +- std over seeds). Writes ``bench/results/accuracy_teachers.json`` (default)
and prints a Markdown table.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from .jobs import log, obtain_teacher, prepare_dataset
from .paired import paired, parse_args, run_variants, save_result, tables
from .plan import RECIPE, STUDENT

VIT = "test_vit"
VIT_KWARGS = {"img_size": 32, "patch_size": 4}
PER_TEACHER_T = [1.0, 4.0]  # CNN, ViT
PAIRS = [  # (what, variant, reference)
    ("CNN teacher alone - CE", "kd_cnn", "ce"),
    ("ViT teacher alone - CE", "kd_vit", "ce"),
    ("mean-probs - best single teacher", "mean_probs", "best_single"),
    ("per-teacher - best single teacher", "per_teacher", "best_single"),
    ("ca-mkd - best single teacher", "ca_mkd", "best_single"),
    ("ca-mkd - mean-probs", "ca_mkd", "mean_probs"),
    ("mean-probs - CE", "mean_probs", "ce"),
]


def _vit_teacher(data: Path, work: Path, epochs: int, workers: int) -> dict:
    """The ViT teacher: ``test_vit`` at 32 px trained with CE (once; found on disk afterwards)."""
    from logitcache.trainer.config import TrainConfig
    from logitcache.trainer.losses import LossConfig
    from logitcache.trainer.train import train

    out = work / "synth" / f"teacher-{VIT}-e{epochs}"
    done = out / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    log(f"training teacher {VIT} {VIT_KWARGS} for {epochs} epochs -> {out}")
    t0 = time.perf_counter()
    summary = train(TrainConfig(data=str(data), student=VIT, model_kwargs=VIT_KWARGS, out=str(out), recipe=RECIPE,
                                epochs=epochs, batch_size=128, loss=LossConfig(kind="none"), num_workers=workers,
                                seed=0, tensorboard=False, progress=False))
    info = {"model": VIT, "model_kwargs": VIT_KWARGS, "epochs": epochs, "dir": str(out),
            "weights": str(out / "model.safetensors"), "val_top1": summary["final_top1"],
            "seconds": time.perf_counter() - t0}
    done.write_text(json.dumps(info, indent=2))
    return info


def _caches(data: Path, work: Path, teachers: dict[str, dict], epochs: int, workers: int) -> dict:
    """Both teachers' caches of ``epochs`` epochs, built in one rendering pass; its reports."""
    from logitcache.build.loop import BuildTarget, build_many
    from logitcache.build.teacher import Teacher
    from logitcache.codecs.logits import create_codec
    from logitcache.data.source import open_source
    from logitcache.views.augment import create_recipe

    source = open_source(str(data), "train")
    codec = create_codec("topk", source.num_classes, 10)
    urls = {name: str(work / "synth" / "caches" / f"{Path(t['dir']).name}-{RECIPE}-top10-e{epochs}.zarr")
            for name, t in teachers.items()}
    log(f"building both caches in one pass ({epochs} epochs): {list(urls.values())}")
    targets = [BuildTarget(Teacher(t["model"], weights=t["weights"]), codec, urls[name])
               for name, t in teachers.items()]
    reports = build_many(source, dataset_name="synth", targets=targets, recipe=create_recipe(RECIPE),
                         epochs=list(range(epochs)), batch_size=128, num_workers=workers, progress=False)
    return {"urls": urls, "views": [r.views for r in reports], "seconds": reports[0].seconds}


def _variants(urls: dict) -> dict[str, dict]:
    from logitcache.trainer.ensemble import TeachersConfig
    from logitcache.trainer.losses import LossConfig

    both = [urls["cnn"], urls["vit"]]
    kd = LossConfig(kind="kd")
    return {
        "ce": {"cache": urls["cnn"], "loss": LossConfig(kind="none")},
        "kd_cnn": {"cache": urls["cnn"], "loss": kd},
        "kd_vit": {"cache": urls["vit"], "loss": kd},
        "mean_probs": {"cache": both, "loss": kd, "teachers": TeachersConfig("mean-probs")},
        # at one shared temperature per-teacher has mean-probs' gradient (trainer/ensemble.py): its own temperatures
        "per_teacher": {"cache": both, "loss": kd,
                        "teachers": TeachersConfig("per-teacher", temperatures=PER_TEACHER_T)},
        "ca_mkd": {"cache": both, "loss": kd, "teachers": TeachersConfig("ca-mkd")},
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args("python -m bench.accuracy.teachers", __doc__, argv, epochs=10, teacher_epochs=30,
                   output="bench/results/accuracy_teachers.json")
    work = Path(a.workdir)
    data = prepare_dataset("synth", work)
    cnn = obtain_teacher("synth", data, work, a.teacher_epochs, a.workers, prefer_epochs=None)
    teachers = {"cnn": cnn, "vit": _vit_teacher(data, work, a.teacher_epochs, a.workers)}
    built = _caches(data, work, teachers, a.epochs, a.workers)
    runs = run_variants(data, work / "synth" / "teachers_study" / f"e{a.epochs}", _variants(built["urls"]), a.seeds,
                        a.epochs, {"student": STUDENT, "batch_size": 128, "lr": 2e-3, "num_workers": 2})
    top1 = {name: [r["top1"] for r in rs] for name, rs in runs.items()}
    best = "kd_cnn" if statistics.mean(top1["kd_cnn"]) >= statistics.mean(top1["kd_vit"]) else "kd_vit"
    top1_with_best = {**top1, "best_single": top1[best]}
    differences = paired(top1_with_best, PAIRS)
    settings = {"dataset": "synth", "recipe": RECIPE, "student": STUDENT, "epochs": a.epochs,
                "seeds": a.seeds, "best_single": best, "per_teacher_temperatures": PER_TEACHER_T,
                "teachers": {n: {"model": t["model"], "model_kwargs": t.get("model_kwargs", {}),
                                 "epochs": t["epochs"], "val_top1": t["val_top1"]} for n, t in teachers.items()},
                "build": {"views_per_cache": built["views"], "seconds": built["seconds"]},
                "command": "python -m bench.accuracy.teachers " + " ".join(argv or [])}
    print(markdown(save_result(a.output, settings, top1, differences, runs)))
    return 0


def markdown(result: dict) -> str:
    s = result["settings"]
    t = s["teachers"]
    lines = [f"Synth (128 classes, 32 px), recipe `{s['recipe']}`, student `{s['student']}`, {s['epochs']} student "
             f"epochs = cached epochs, {s['seeds']} seeds; teachers: CNN `{t['cnn']['model']}` "
             f"({t['cnn']['val_top1']:.2f}% val top-1), ViT `{t['vit']['model']}` {t['vit']['model_kwargs']} "
             f"({t['vit']['val_top1']:.2f}%), {t['cnn']['epochs']} CE epochs each; both caches from one rendering "
             f"pass. Val top-1 %, mean +- std over seeds.", "",
             *tables(result, f"paired by seed (best single teacher: {s['best_single']})")]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
