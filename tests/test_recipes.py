"""The papers' recipes and configs equal their published commands, field by field.

Each command below is copied verbatim from the paper's public repository; every flag it sets
is mapped to the recipe field (the views, fixed in the cache) or the TrainConfig field (the
student side) that expresses it, and compared. Flags a command leaves out take its training
script's defaults, listed per script with where they come from, and are compared too. Where
logitcache differs on purpose, the difference is listed (``DELIBERATE``) and asserted as such.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

import pytest
from logitcache.trainer.config import load_config, make_config

from logitcache.views.augment import RECIPES, create_recipe

REPO = Path(__file__).resolve().parents[1]

#: Hao840/vanillaKD readme.md, "ResNet-50" under strategies A2 and A1 (8 GPUs).
VANILLAKD_A2 = (
    "python -m torch.distributed.launch --nproc_per_node=8 train-kd.py /path/to/imagenet --model resnet50 "
    "--teacher beitv2_base_patch16_224 --teacher-pretrained /path/to/teacher_checkpoint --kd-loss kd --amp "
    "--epochs 300 --batch-size 256 --lr 5e-3 --opt lamb --sched cosine --weight-decay 0.02 --warmup-epochs 5 "
    "--warmup-lr 1e-6 --smoothing 0.0 --drop 0 --drop-path 0.05 --aug-repeats 3 --aa rand-m7-mstd0.5 --mixup 0.1 "
    "--cutmix 1.0 --color-jitter 0 --crop-pct 0.95 --bce-loss 1"
)
VANILLAKD_A1 = (
    "python -m torch.distributed.launch --nproc_per_node=8 train-kd.py /path/to/imagenet --model resnet50 "
    "--teacher beitv2_base_patch16_224 --teacher-pretrained /path/to/teacher_checkpoint --kd-loss kd --amp "
    "--epochs 600 --batch-size 256 --lr 5e-3 --opt lamb --sched cosine --weight-decay 0.01 --warmup-epochs 5 "
    "--warmup-lr 1e-6 --smoothing 0.1 --drop 0 --drop-path 0.05 --aug-repeats 3 --aa rand-m7-mstd0.5 --mixup 0.2 "
    "--cutmix 1.0 --color-jitter 0 --crop-pct 0.95 --bce-loss 1"
)
#: facebookresearch/deit README_deit.md: "DeiT-tiny" training (4 GPUs x 256), with the
#: distillation flags of its distilled training command (--distillation-type hard
#: --teacher-model regnety_160).
DEIT_TINY_DISTILLED = (
    "python -m torch.distributed.launch --nproc_per_node=4 --use_env main.py --model deit_tiny_distilled_patch16_224 "
    "--batch-size 256 --data-path /path/to/imagenet --output_dir /path/to/save --distillation-type hard "
    "--teacher-model regnety_160 --teacher-path https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth"
)

#: Defaults of Hao840/vanillaKD train-kd.py (its argparse, timm 0.6.5) for what the command leaves out.
VANILLAKD_DEFAULTS = {
    "--train-interpolation": "random", "--scale": [0.08, 1.0], "--ratio": [3 / 4, 4 / 3], "--hflip": 0.5,
    "--vflip": 0.0, "--reprob": 0.0, "--remode": "pixel", "--recount": 1, "--mixup-prob": 1.0,
    "--mixup-switch-prob": 0.5, "--mixup-mode": "batch", "--min-lr": 1e-6, "--momentum": 0.9,
    "--temperature": 1.0, "--kd-loss-weight": 1.0, "--ori-loss-weight": 1.0, "--clip-grad": None,
    "--model-ema": False, "--cooldown-epochs": 0, "--sched-on-updates": False,  # timm 0.6.5: schedules step per epoch
    "--mean": "model", "--std": "model", "--input-size": "model",  # resnet50: ImageNet mean/std, 224 px
}
#: Defaults of facebookresearch/deit main.py (its argparse) for what the command leaves out.
DEIT_DEFAULTS = {
    "--epochs": 300, "--input-size": 224, "--drop": 0.0, "--drop-path": 0.1, "--model-ema": True,
    "--model-ema-decay": 0.99996, "--opt": "adamw", "--momentum": 0.9, "--weight-decay": 0.05, "--sched": "cosine",
    "--lr": 5e-4, "--warmup-lr": 1e-6, "--min-lr": 1e-5, "--warmup-epochs": 5, "--color-jitter": 0.3,
    "--aa": "rand-m9-mstd0.5-inc1", "--smoothing": 0.1, "--train-interpolation": "bicubic", "--repeated-aug": True,
    "--reprob": 0.25, "--remode": "pixel", "--recount": 1, "--mixup": 0.8, "--cutmix": 1.0, "--mixup-prob": 1.0,
    "--mixup-switch-prob": 0.5, "--mixup-mode": "batch", "--distillation-alpha": 0.5, "--distillation-tau": 1.0,
    "--eval-crop-ratio": 0.875, "--clip-grad": None, "--bce-loss": False, "--unscale-lr": False,
    "--sched-on-updates": False,  # main.py calls lr_scheduler.step(epoch) once per epoch
    "--mean": "imagenet", "--std": "imagenet", "--scale": [0.08, 1.0], "--ratio": [3 / 4, 4 / 3], "--hflip": 0.5,
}

#: What logitcache does otherwise, on purpose: flag -> (the papers' value, logitcache's, why).
DELIBERATE = {
    "--mixup-mode": ("batch", "pair", "a cache fixes each view's mixing partner when the teacher sees it, before "
                                      "any student batch exists: each pair draws its own lambda and switch"),
}


def parse_command(command: str) -> dict:
    """``--flag value`` pairs of a command line (a flag without a value is True; the first
    positional arguments, the launcher's, are dropped)."""
    words = shlex.split(command)
    out, i = {}, 0
    while i < len(words):
        w = words[i]
        if w.startswith("--"):
            if i + 1 < len(words) and not words[i + 1].startswith("--"):
                out[w], i = words[i + 1], i + 2
            else:
                out[w], i = True, i + 1
        else:
            i += 1
    return out


def _num(v):
    return float(v) if isinstance(v, str) else v


def _views_expected(flags: dict, defaults: dict) -> dict:
    """The recipe fields the command (over its script's defaults) sets."""
    f = {**defaults, **flags}
    repeats = f.get("--aug-repeats", 3 if f.get("--repeated-aug") else 0)
    return {
        "input_size": 224, "scale": tuple(f["--scale"]), "ratio": tuple(f["--ratio"]), "hflip": _num(f["--hflip"]),
        "color_jitter": _num(f.get("--color-jitter", 0.4)), "auto_augment": f["--aa"],
        "interpolation": f["--train-interpolation"], "re_prob": _num(f["--reprob"]), "re_mode": f["--remode"],
        "re_count": int(f["--recount"]), "mixup_alpha": _num(f["--mixup"]), "cutmix_alpha": _num(f["--cutmix"]),
        "mix_prob": _num(f["--mixup-prob"]), "switch_prob": _num(f["--mixup-switch-prob"]),
        "aug_repeats": int(float(repeats)) or 1,
        "crop_pct": _num(f.get("--crop-pct", f.get("--eval-crop-ratio"))),
    }


def _assert_fields(got, expected: dict, what: str) -> None:
    for name, want in expected.items():
        have = getattr(got, name)
        if isinstance(want, float) or isinstance(want, tuple) and want and isinstance(want[0], float):
            assert have == pytest.approx(want, rel=1e-12), f"{what}.{name}: {have!r}, the paper's {want!r}"
        else:
            assert have == want, f"{what}.{name}: {have!r}, the paper's {want!r}"


@pytest.mark.parametrize("recipe, command", [("vanillakd_a2", VANILLAKD_A2), ("vanillakd_a1", VANILLAKD_A1)])
def test_vanillakd_recipe_and_config_equal_the_published_command(recipe, command):
    flags = parse_command(command)
    assert {**VANILLAKD_DEFAULTS, **flags}["--mixup-mode"] == DELIBERATE["--mixup-mode"][0]  # the one difference
    _assert_fields(RECIPES[recipe], _views_expected(flags, VANILLAKD_DEFAULTS), recipe)
    assert RECIPES[recipe].mean == pytest.approx((0.485, 0.456, 0.406)) and RECIPES[recipe].std == pytest.approx(
        (0.229, 0.224, 0.225))  # resnet50's pretrained_cfg: ImageNet's
    f = {**VANILLAKD_DEFAULTS, **flags}
    gpus = int(parse_command(command.replace("--nproc_per_node=", "--nproc_per_node "))["--nproc_per_node"])
    cfg = make_config({**load_config(REPO / "configs" / f"{recipe}_resnet50.yaml"), "data": "unused"})
    expected = {
        "student": f["--model"], "recipe": recipe, "epochs": int(f["--epochs"]),
        "batch_size": int(f["--batch-size"]) * gpus, "opt": f["--opt"], "lr": _num(f["--lr"]), "lr_base_size": None,
        "weight_decay": _num(f["--weight-decay"]), "momentum": f["--momentum"], "sched": f["--sched"],
        "sched_on_updates": f["--sched-on-updates"], "warmup_epochs": int(f["--warmup-epochs"]),
        "warmup_lr": _num(f["--warmup-lr"]), "min_lr": f["--min-lr"], "label_smoothing": _num(f["--smoothing"]),
        "drop": _num(f["--drop"]), "drop_path": _num(f["--drop-path"]), "clip_grad": f["--clip-grad"],
        "model_ema": f["--model-ema"], "amp": bool(f["--amp"]),
    }
    _assert_fields(cfg, expected, f"configs/{recipe}_resnet50.yaml")
    loss = {"kind": f["--kd-loss"], "temperature": f["--temperature"], "kd_weight": f["--kd-loss-weight"],
            "hard_weight": f["--ori-loss-weight"], "hard_kind": "bce" if int(f["--bce-loss"]) else "ce"}
    _assert_fields(cfg.loss, loss, "loss")
    assert cfg.peak_lr == pytest.approx(5e-3)  # --lr is given, so train-kd.py does not scale it


def test_deit_recipe_and_config_equal_the_published_command():
    flags = parse_command(DEIT_TINY_DISTILLED)
    f = {**DEIT_DEFAULTS, **flags}
    _assert_fields(RECIPES["deit"], _views_expected(flags, DEIT_DEFAULTS), "deit")
    cfg = make_config({**load_config(REPO / "configs" / "deit_tiny_distilled.yaml"), "data": "unused"})
    gpus = 4
    expected = {
        "student": f["--model"], "recipe": "deit", "epochs": f["--epochs"],
        "batch_size": int(f["--batch-size"]) * gpus, "opt": f["--opt"], "lr": f["--lr"],
        "lr_base_size": 512,  # main.py: lr x batch-size x world size / 512.0, unless --unscale-lr
        "weight_decay": f["--weight-decay"], "momentum": f["--momentum"], "sched": f["--sched"],
        "sched_on_updates": f["--sched-on-updates"], "warmup_epochs": f["--warmup-epochs"],
        "warmup_lr": f["--warmup-lr"], "min_lr": f["--min-lr"], "label_smoothing": f["--smoothing"],
        "drop": f["--drop"], "drop_path": f["--drop-path"], "clip_grad": f["--clip-grad"],
        "model_ema": f["--model-ema"], "model_ema_decay": f["--model-ema-decay"],
    }
    _assert_fields(cfg, expected, "configs/deit_tiny_distilled.yaml")
    alpha = f["--distillation-alpha"]  # loss = (1 - alpha) base + alpha distillation
    loss = {"kind": f"deit-{f['--distillation-type']}", "temperature": f["--distillation-tau"],
            "kd_weight": alpha, "hard_weight": 1 - alpha, "hard_kind": "ce"}
    _assert_fields(cfg.loss, loss, "loss")
    assert cfg.peak_lr == pytest.approx(5e-4 * 1024 / 512)


def test_the_deliberate_differences_are_what_the_code_does():
    """Mixing per pair, not per batch: two pairs of one batch draw their own lambdas."""
    from logitcache.views.augment import mix_params

    recipe = create_recipe("deit")
    lams = {round(mix_params(recipe, seed).lam, 12) for seed in range(40)}
    assert len(lams) > 20  # per pair: (almost) every pair its own lambda; per batch there would be one
    assert DELIBERATE["--mixup-mode"][:2] == ("batch", "pair")


def test_a_cache_of_the_old_vanillakd_a2_keeps_its_recipe_under_another_name():
    """Caches built before `vanillakd_a2` gained repeats keep their recipe digest: it is
    `vanillakd_a2_norepeat` now (what `inspect` and `train` name)."""
    old = RECIPES["vanillakd_a2_norepeat"]
    # the recipe `vanillakd_a2` was until this change, field for field (and so its digest)
    assert old.to_dict() == {
        "input_size": 224, "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "hflip": 0.5, "color_jitter": 0.0,
        "auto_augment": "rand-m7-mstd0.5", "interpolation": "bicubic", "re_prob": 0.0, "re_mode": "pixel",
        "re_count": 1, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.95,
        "mixup_alpha": 0.1, "cutmix_alpha": 1.0, "mix_prob": 1.0, "switch_prob": 0.5, "cache_seed": 0,
    }
    assert RECIPES["vanillakd_a2"] != old and math.isclose(RECIPES["vanillakd_a2"].mixup_alpha, old.mixup_alpha)
