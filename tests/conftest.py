"""Shared session fixtures: a tiny synthetic dataset, a tiny random teacher, and built caches.

Everything is small enough to build in a few seconds on 2 CPU cores:

* ``synth_data``: 16 classes, 96 train images in 3 tar shards (40, 40, 16) -> 3 units per
  epoch, 32 val images; 32x32 pixels.
* ``tiny_teacher``: a random-init timm ``test_resnet`` (16 classes) saved as safetensors
  with logitcache metadata (what ``--teacher-weights`` reads).
* ``built_cache`` / ``built_cache_mix``: the URL of a 2-epoch cache built with the real
  ``logitcache.build.loop.build`` (recipes demo32 / demo32_mix, top-5 float16, batch 16,
  no workers). ``built_cache_record`` / ``built_cache_mix_record`` give the same build as a
  :class:`BuildRecord`, which also holds every tensor the teacher was called with during
  the build (in call order) and what it returned.

All fixtures are session-scoped and must be treated as read-only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

#: Parameters of the built caches (tests may rely on them).
BUILD_EPOCHS = [0, 1]
BUILD_BATCH_SIZE = 16
BUILD_K = 5
BUILD_VALUES = "gap8"  # the default codec: top-k gaps below the top logit, 8 bits
NUM_CLASSES = 16


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> str:
    """Root of a synthetic dataset: 16 classes, train 96 samples in shards of 40/40/16, val 32."""
    from logitcache.data.synth import generate_synth

    root = tmp_path_factory.mktemp("synth")
    generate_synth(root, num_classes=NUM_CLASSES, train_per_class=6, val_per_class=2, image_size=32, seed=0,
                   shard_size=40)
    return str(root)


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, synth_data) -> str:
    """Path of a random-init ``test_resnet`` (16 classes) saved with ``save_student`` (recipe demo32)."""
    import timm
    from logitcache.trainer.checkpoint import save_student

    from logitcache.views.augment import create_recipe

    path = tmp_path_factory.mktemp("teacher") / "tiny_teacher.safetensors"
    with torch.random.fork_rng(devices=[]):  # leave the global RNG of the test session alone
        torch.manual_seed(0)
        model = timm.create_model("test_resnet", pretrained=False, num_classes=NUM_CLASSES)
    save_student(model, path, "test_resnet", NUM_CLASSES, create_recipe("demo32"))
    return str(path)


@dataclass
class BuildRecord:
    """One build of a session cache, and what its teacher saw.

    ``teacher_inputs[j]`` is the ``views`` tensor of the j-th teacher call (the images of
    one batch, in the order the build fed them), ``teacher_outputs[j]`` the logits returned.
    """

    url: str
    recipe: str
    epochs: list[int]
    batch_size: int
    teacher_inputs: list[torch.Tensor] = field(default_factory=list)
    teacher_outputs: list[torch.Tensor] = field(default_factory=list)


def _recording_teacher(weights: str, record: BuildRecord):
    """A real :class:`logitcache.build.teacher.Teacher` that records its calls into ``record``."""
    from logitcache.build.teacher import Teacher

    class RecordingTeacher(Teacher):
        def __call__(self, views, src_mean, src_std):
            record.teacher_inputs.append(views.detach().clone())
            logits = super().__call__(views, src_mean, src_std)
            record.teacher_outputs.append(logits.detach().clone())
            return logits

    return RecordingTeacher("test_resnet", weights=weights, num_classes=NUM_CLASSES, device="cpu")


def recipe_of(spec: str):
    """A recipe from a test spec: a recipe name, or ``name@R`` for it with ``aug_repeats=R``."""
    from logitcache.views.augment import create_recipe

    name, _, repeats = spec.partition("@")
    return create_recipe(name, aug_repeats=int(repeats or 1))


def _build(tmp_path_factory, synth_data: str, tiny_teacher: str, recipe_name: str) -> BuildRecord:
    from logitcache.build.loop import build
    from logitcache.codecs.logits import create_codec
    from logitcache.data.source import open_source

    url = str(tmp_path_factory.mktemp("caches") / f"{recipe_name.replace('@', '_ra')}.zarr")
    record = BuildRecord(url=url, recipe=recipe_name, epochs=list(BUILD_EPOCHS), batch_size=BUILD_BATCH_SIZE)
    source = open_source(synth_data, "train")
    build(
        source,
        dataset_name="synth",
        teacher=_recording_teacher(tiny_teacher, record),
        recipe=recipe_of(recipe_name),
        codec=create_codec("topk", source.num_classes, k=BUILD_K, values=BUILD_VALUES),
        url=url,
        epochs=list(BUILD_EPOCHS),
        batch_size=BUILD_BATCH_SIZE,
        num_workers=0,
        progress=False,
    )
    return record


@pytest.fixture(scope="session")
def built_cache_record(tmp_path_factory, synth_data, tiny_teacher) -> BuildRecord:
    """The demo32 build (2 epochs, top-5, 8-bit gaps) with the teacher's recorded inputs/outputs."""
    return _build(tmp_path_factory, synth_data, tiny_teacher, "demo32")


@pytest.fixture(scope="session")
def built_cache_mix_record(tmp_path_factory, synth_data, tiny_teacher) -> BuildRecord:
    """The demo32_mix build (mixup/cutmix pairs), otherwise as ``built_cache_record``."""
    return _build(tmp_path_factory, synth_data, tiny_teacher, "demo32_mix")


@pytest.fixture(scope="session")
def built_cache_repeats_record(tmp_path_factory, synth_data, tiny_teacher) -> BuildRecord:
    """demo32_mix with repeated augmentation (``aug_repeats=3``), otherwise as ``built_cache_record``."""
    return _build(tmp_path_factory, synth_data, tiny_teacher, "demo32_mix@3")


@pytest.fixture(scope="session")
def built_cache(built_cache_record) -> str:
    """URL (local path) of a committed 2-epoch demo32 cache of ``synth_data``'s train split."""
    return built_cache_record.url


@pytest.fixture(scope="session")
def built_cache_mix(built_cache_mix_record) -> str:
    """URL (local path) of a committed 2-epoch demo32_mix cache of ``synth_data``'s train split."""
    return built_cache_mix_record.url


@pytest.fixture(scope="session")
def small_feature_cache(tmp_path_factory, synth_data, tiny_teacher) -> str:
    """URL of a committed 2-epoch demo32 cache with PCA int8 features (8 components), top-3
    float16 logits: the feature arrays, the basis and the features entry, for damage tests."""
    from logitcache.cli.main import app
    from typer.testing import CliRunner

    url = str(tmp_path_factory.mktemp("feature_cache") / "pca.zarr")
    result = CliRunner().invoke(app, [
        "build", "--data", synth_data, "--teacher", "test_resnet", "--teacher-weights", tiny_teacher, "--recipe",
        "demo32", "--epochs", "2", "--topk", "3", "--value-dtype", "float16", "--out", url, "--batch-size", "16",
        "--workers", "0", "--no-progress", "--device", "cpu", "--features", "--feature-dims", "8",
        "--feature-fit-views", "32"])
    assert result.exit_code == 0, result.output
    return url
