"""The demo's teacher, trained once by ``make teacher`` and shipped in ``cli/assets``.

A big teacher earns its place in distillation by what it knows that a small student
cannot learn from the student's own data in its own budget. Here that is:

- more data: the teacher trains on its own synthetic images (``TEACHER_DATA``: the same
  64 classes, other seed, 300 images per class), never on the demo's training or
  validation images;
- a finer view: the demo's 32 px views upsampled to 64 px (recipe ``demo_teacher``), so
  the ResNet-18's stride-4 stem keeps the textures;
- a longer schedule: ``TEACHER_EPOCHS`` epochs.

The weights are stored as float16 safetensors with the metadata ``logitcache train``
writes (model name, class count, input size 64): ``--teacher-weights`` takes the file as it
is, and the build upsamples its 32 px views for it. ``demo_teacher.json`` records the
command, the file's sha256 and its top-1 on the demo's validation split (measured as the
demo measures it: :func:`teacher_val_top1`); ``tests/test_demo.py`` checks both.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
WEIGHTS = ASSETS / "demo_teacher.safetensors"
RECORD = ASSETS / "demo_teacher.json"
TEACHER, TEACHER_RECIPE = "resnet18", "demo_teacher"
#: the demo's dataset (``generate_synth`` arguments): the teacher's record is measured on its val split
DEMO_DATA = {"num_classes": 64, "train_per_class": 40, "val_per_class": 10, "seed": 0}
#: the demo's student epochs, and its cache's (one view per image and epoch)
DEMO_EPOCHS = 30
#: the teacher's own training images: the demo's classes, another seed (no image in common)
TEACHER_DATA = {"num_classes": 64, "train_per_class": 300, "val_per_class": 10, "seed": 1}
TEACHER_EPOCHS = 12


def teacher_val_top1(weights: str | Path, data: str | Path, *, num_workers: int = 0) -> float:
    """Top-1 (%) of the teacher ``weights`` on the val split of the dataset at ``data``, on the
    32 px evaluation views of recipe ``demo32`` handed to it as the build hands it views."""
    from logitcache.trainer.data import create_eval_loader

    from logitcache.build.teacher import Teacher
    from logitcache.data.source import open_source
    from logitcache.views.augment import create_recipe

    recipe = create_recipe("demo32")
    source = open_source(str(data), "val")
    teacher = Teacher(TEACHER, weights=str(weights), num_classes=source.num_classes)
    right = total = 0
    for images, labels in create_eval_loader(source, recipe, num_workers=num_workers):
        right += int((teacher(images, recipe.mean, recipe.std).argmax(1) == labels).sum())
        total += len(labels)
    return 100.0 * right / total


def half_precision(src: Path, dst: Path) -> None:
    """Copy safetensors weights ``src`` to ``dst`` with float32 tensors stored as float16
    (half the bytes in the repository), keeping the metadata."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}
    state = {k: v.half() if v.dtype == torch.float32 else v for k, v in state.items()}
    save_file(state, str(dst), metadata=meta)


def train_demo_teacher(work: Path, *, epochs: int = TEACHER_EPOCHS, install: bool = True,
                       num_workers: int = 2) -> dict:
    """Train the teacher under ``work`` (its data, its run), measure it on the demo's val split,
    and with ``install`` copy it into ``cli/assets`` with its record; returns the record."""
    from logitcache.trainer.config import TrainConfig
    from logitcache.trainer.losses import LossConfig
    from logitcache.trainer.train import train

    from logitcache.build.teacher import file_sha256
    from logitcache.data.synth import generate_synth

    work.mkdir(parents=True, exist_ok=True)
    data, demo = work / "teacher_data", work / "demo_data"
    for root, spec in ((data, TEACHER_DATA), (demo, DEMO_DATA)):
        if not (root / "dataset.json").exists():
            generate_synth(root, **spec)
    cfg = TrainConfig(data=str(data), student=TEACHER, out=str(work / "run"), recipe=TEACHER_RECIPE, epochs=epochs,
                      batch_size=128, loss=LossConfig(kind="none"), num_workers=num_workers, seed=0)
    summary = train(cfg)
    weights = work / "demo_teacher.safetensors"
    half_precision(work / "run" / "model.safetensors", weights)
    record = {
        "model": TEACHER, "recipe": TEACHER_RECIPE, "epochs": epochs, "batch_size": 128, "opt": cfg.opt, "lr": cfg.lr,
        "teacher_data": TEACHER_DATA, "demo_data": DEMO_DATA, "command": "make teacher",
        "sha256": file_sha256(weights), "bytes": weights.stat().st_size,
        "val_top1_own_split": summary["final_top1"], "val_top1": teacher_val_top1(weights, demo),
    }
    if install:
        ASSETS.mkdir(exist_ok=True)
        shutil.copyfile(weights, WEIGHTS)
        RECORD.write_text(json.dumps(record, indent=2) + "\n")
    return record
