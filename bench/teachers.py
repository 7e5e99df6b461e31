"""Two teachers, one rendering pass: ``build --teacher A --teacher B`` against two builds of
one teacher each, on the same views.

The fast-teacher setting of bench/build_fast.py (recipe ``demo32_mix``, 48 px JPEGs in tar
shards, batch 64, the default workers), where rendering is most of a build's cost: teacher A
a ResNet-18 at 32 px, teacher B a ResNet-34 at 32 px (random weights). Each round builds
one epoch three times, into fresh caches: A alone, B alone, A and B in one pass (the order
rotating between rounds); wall time of each ``build``/``build_many`` call.

Key figure ``two_teacher_build_speedup`` = (seconds of A alone + seconds of B alone) /
seconds of A and B in one pass, the median over rounds of the ratio within a round (>= 1:
the pass renders each view once; its ceiling is (2 R + T_A + T_B) / (R + T_A + T_B) for
rendering cost R per view and teacher costs T). The caches of the pass equal those of the
single builds (tests/test_multi_teacher.py).
"""

from __future__ import annotations

import statistics
import time

import torch

from .common import Ctx

NUM_CLASSES = 20
TEACHERS = ("resnet18", "resnet34")


def settings(ctx: Ctx) -> dict:
    return {
        "teachers": list(TEACHERS), "recipe": "demo32_mix", "input_size": 32, "image_size": 48,
        "num_classes": NUM_CLASSES, "codec": "topk", "k": 10,
        "images": ctx.pick(quick_cpu=1600, full_cpu=3200, quick_cuda=8192, full_cuda=16384, tiny=32),
        "batch_size": ctx.pick(quick_cpu=64, full_cpu=64, quick_cuda=256, full_cuda=256, tiny=8),
        "rounds": ctx.pick(quick_cpu=3, full_cpu=5, tiny=1),
        "num_workers": None,  # the build's default: CPU 1, CUDA up to 8
    }


def _teacher(ctx: Ctx, name: str, path, recipe):
    import timm
    from logitcache.trainer.checkpoint import save_student

    from logitcache.build.teacher import Teacher

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    save_student(model, path, name, NUM_CLASSES, recipe)  # saved at the recipe's 32 px: no resize
    return Teacher(name, weights=str(path), num_classes=NUM_CLASSES, device=ctx.device)


def run(ctx: Ctx) -> dict:
    from logitcache.build.loop import BuildTarget, build_many
    from logitcache.codecs.logits import create_codec
    from logitcache.data.source import open_source
    from logitcache.views.augment import create_recipe

    from .replay import make_images, make_shards

    s = settings(ctx)
    folder = make_images(ctx.workdir / "folder", s["images"], s["image_size"])
    source = open_source(make_shards(folder, ctx.workdir / "shards"), "train")
    recipe = create_recipe(s["recipe"])
    codec = create_codec(s["codec"], NUM_CLASSES, s["k"])
    teachers = [_teacher(ctx, n, ctx.workdir / f"{n}.safetensors", recipe) for n in TEACHERS]

    def timed(which: list[int], tag: str) -> tuple[float, int]:
        targets = [BuildTarget(teachers[i], codec, str(ctx.workdir / f"{tag}-{TEACHERS[i]}.zarr")) for i in which]
        t0 = time.perf_counter()
        reports = build_many(source, dataset_name="fast32", targets=targets, recipe=recipe, epochs=[0],
                             batch_size=s["batch_size"], num_workers=s["num_workers"], progress=False)
        return time.perf_counter() - t0, reports[0].workers

    timed([0, 1], "warmup")
    variants = {"a_alone": [0], "b_alone": [1], "both": [0, 1]}
    names = list(variants)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    workers = 0
    for r in range(s["rounds"]):
        for name in names[r % 3:] + names[:r % 3]:  # rotate the order between rounds
            t, workers = timed(variants[name], f"r{r}-{name}")
            seconds[name].append(t)
    ratios = [(a + b) / ab for a, b, ab in zip(seconds["a_alone"], seconds["b_alone"], seconds["both"])]
    views = len(source)
    med = {n: statistics.median(v) for n, v in seconds.items()}
    return {"settings": {**s, "views": views, "workers": workers},
            "results": {"seconds": seconds, "ratios": ratios,
                        "views_per_s": {n: views * len(variants[n]) / med[n] for n in names}},
            "summary": {"two_teacher_build_speedup": statistics.median(ratios),
                        "two_teacher_build_s": med["both"], "single_builds_s": med["a_alone"] + med["b_alone"]}}


def markdown(data: dict) -> str:
    s, r = data["settings"], data["results"]
    vps = r["views_per_s"]
    lines = [
        f"Teachers `{s['teachers'][0]}` (A) and `{s['teachers'][1]}` (B) at {s['input_size']} px (random weights), "
        f"recipe `{s['recipe']}`, {s['views']} views of {s['image_size']} px JPEGs in tar shards, batch "
        f"{s['batch_size']}, {s['workers']} worker(s); {s['rounds']} rounds of three one-epoch builds, order "
        f"rotating; medians.",
        "",
        "| build | median s | teacher-views/s (views x teachers / s) |",
        "|---|---:|---:|",
    ]
    labels = {"a_alone": "A alone", "b_alone": "B alone", "both": "A and B, one pass"}
    for name, label in labels.items():
        lines.append(f"| {label} | {statistics.median(r['seconds'][name]):.2f} | {vps[name]:,.0f} |")
    sm = data["summary"]
    lines += ["", f"- `two_teacher_build_speedup` = (A alone + B alone) / one pass = "
                  f"**{sm['two_teacher_build_speedup']:.2f}** (median of the per-round ratios "
                  f"{', '.join(f'{x:.2f}' for x in r['ratios'])})"]
    return "\n".join(lines)


def plot(data: dict, outdir) -> list[str]:
    return []
