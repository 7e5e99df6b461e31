"""Several teachers on one set of views: one rendering pass writing a cache per teacher,
`build --views-of`, the checks that caches hold the same views, and training from several
caches (the combination modes, resume, two ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_CLASSES
from hypothesis import given, settings
from hypothesis import strategies as st
from logitcache.cli.main import app
from logitcache.trainer.checkpoint import TrainingStopped
from logitcache.trainer.ensemble import TeachersConfig, ca_mkd_weights, multi_teacher_loss
from logitcache.trainer.losses import LossConfig, hard_label_loss, kd_loss
from logitcache.trainer.train import train
from safetensors.torch import load_file
from test_build_scale import assert_same_tree
from test_trainer import SUBPROCESS_ENV, base_config, free_port, read_rows
from typer.testing import CliRunner

import logitcache
from logitcache.errors import CacheMismatchError, LogitcacheError
from logitcache.replay.teachers import mean_logits, mean_probs_logits
from logitcache.storage.reader import CacheReader
from logitcache.storage.views_compat import check_same_plans, check_same_views, views_digest

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}: {result.output}") from result.exception
    return result.output


def cli_refusal(*args: str) -> str:
    """The one-line refusal of a command: a LogitcacheError's message or the usage error's."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    if isinstance(result.exception, LogitcacheError):
        message = str(result.exception)
        assert "\n" not in message, message
        return message
    assert result.exit_code == 2, (result.output, result.exception)
    return " ".join(result.output.split())


def build_args(data: str, *teachers: tuple[str, str], epochs: str | None = "2", recipe: str | None = "demo32_mix",
               extra: tuple = ()) -> list[str]:
    """`build` with one (--teacher, --teacher-weights, --out) triple per teacher."""
    args = ["build", "--data", data, *(["--epochs", epochs] if epochs else []), "--topk", "5", "--batch-size", "16", "--workers", "0",
            "--no-progress", *(["--recipe", recipe] if recipe else []), *extra]
    for weights, out in teachers:
        args += ["--teacher", "test_resnet", "--teacher-weights", weights, "--out", out]
    return args


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory) -> str:
    """Another random-init test_resnet (seed 1): a teacher with other logits than tiny_teacher."""
    import timm
    from logitcache.trainer.checkpoint import save_student

    from logitcache.views.augment import create_recipe

    path = tmp_path_factory.mktemp("teacher_b") / "teacher_b.safetensors"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = timm.create_model("test_resnet", pretrained=False, num_classes=NUM_CLASSES)
    save_student(model, path, "test_resnet", NUM_CLASSES, create_recipe("demo32"))
    return str(path)


@pytest.fixture(scope="module")
def caches(tmp_path_factory, synth_data, tiny_teacher, second_teacher) -> dict[str, Path]:
    """Teacher A's and B's caches built alone (a1, b1) and in one pass (a2, b2), demo32_mix, 2 epochs."""
    root = tmp_path_factory.mktemp("multi")
    urls = {name: root / f"{name}.zarr" for name in ("a1", "b1", "a2", "b2")}
    cli(*build_args(synth_data, (tiny_teacher, urls["a1"])))
    cli(*build_args(synth_data, (second_teacher, urls["b1"])))
    out = cli(*build_args(synth_data, (tiny_teacher, urls["a2"]), (second_teacher, urls["b2"])))
    assert out.count(" units written") == 2, out  # one report per cache
    return urls


def test_one_pass_for_two_teachers_writes_the_caches_of_two_builds(caches):
    assert_same_tree(caches["a1"], caches["a2"])
    assert_same_tree(caches["b1"], caches["b2"])
    a, b = CacheReader(str(caches["a2"])), CacheReader(str(caches["b2"]))
    assert not np.array_equal(a.read_unit(0, 0)["values"], b.read_unit(0, 0)["values"])  # two teachers indeed


def test_a_two_teacher_build_finishes_what_one_teacher_began(tmp_path, synth_data, tiny_teacher, second_teacher,
                                                             caches):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    cli(*build_args(synth_data, (tiny_teacher, a), epochs="1"))  # A has epoch 0; B nothing
    out = cli(*build_args(synth_data, (tiny_teacher, a), (second_teacher, b)))
    assert "3 units written, 3 already committed" in out and "6 units written, 0 already committed" in out, out
    assert_same_tree(caches["a1"], a)
    assert_same_tree(caches["b1"], b)


def test_recheck_rebuilds_the_damaged_unit_of_one_teachers_cache(tmp_path, synth_data, tiny_teacher,
                                                                  second_teacher, caches):
    import shutil

    from logitcache.storage.layout import unit_path

    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    shutil.copytree(caches["a1"], a)
    shutil.copytree(caches["b1"], b)
    (chunk,) = [p for p in (b / unit_path(1, 2) / "values" / "c").rglob("*") if p.is_file()]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x40
    chunk.write_bytes(bytes(data))
    out = cli(*build_args(synth_data, (tiny_teacher, a), (second_teacher, b), extra=("--recheck",)))
    assert "rebuilding damaged unit" in out and f"cache {b}: 1 units written, 5 already committed" in out, out
    assert f"cache {a}: 0 units written, 6 already committed" in out, out
    assert_same_tree(caches["a1"], a)
    assert_same_tree(caches["b1"], b)


@pytest.mark.slow
def test_two_processes_build_both_caches_as_one(tmp_path, synth_data, tiny_teacher, second_teacher, caches):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    proc = subprocess.run([sys.executable, "-m", "logitcache.cli.main",
                           *build_args(synth_data, (tiny_teacher, a), (second_teacher, b)), "--procs", "2"],
                          capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("rank 0/2: cache") == proc.stdout.count("rank 1/2: cache") == 2, proc.stdout
    assert_same_tree(caches["a1"], a)
    assert_same_tree(caches["b1"], b)


@pytest.mark.slow
def test_two_teachers_to_object_storage_and_a_run_from_there(tmp_path, synth_data, tiny_teacher, second_teacher,
                                                             caches, monkeypatch):
    from s3_server import s3_server
    from test_build_scale import assert_same_units

    with s3_server() as env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        import s3fs

        s3fs.S3FileSystem(skip_instance_cache=True).mkdir("two-teachers")
        a, b = "s3://two-teachers/a.zarr", "s3://two-teachers/b.zarr"
        cli(*build_args(synth_data, (tiny_teacher, a), (second_teacher, b), epochs="1"))
        assert_same_units(caches["a1"], a, [0], shards=3)
        assert_same_units(caches["b1"], b, [0], shards=3)
        cli("train", "--data", synth_data, "--cache", a, "--cache", b, "--student", "test_resnet", "--epochs", "1",
            "--batch-size", "16", "--limit-batches", "2", "--workers", "0", "--no-tensorboard", "--no-progress",
            "--device", "cpu", "--out", tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["cache"] == [a, b] and summary["config"]["teachers"]["mode"] == "mean-probs"


def test_views_of_builds_on_exactly_the_views_of_a_cache(tmp_path, synth_data, second_teacher, caches):
    c = tmp_path / "c.zarr"
    # no --recipe, no --epochs: the cache's recipe and complete epochs
    cli(*build_args(synth_data, (second_teacher, c), epochs=None, recipe=None, extra=("--views-of", caches["a1"])))
    a, cc = CacheReader(str(caches["a1"])), CacheReader(str(c))
    assert cc.epochs() == a.epochs() == [0, 1] and cc.manifest.recipe == a.manifest.recipe
    for e in a.epochs():
        for s in range(a.num_shards):
            assert cc.commit(e, s)["plan"] == a.commit(e, s)["plan"], (e, s)
    assert_same_tree(caches["b1"], c)  # the same views, the same teacher: the same cache
    message = cli_refusal(*build_args(synth_data, (second_teacher, tmp_path / "d.zarr"),
                                      extra=("--views-of", caches["a1"])))
    assert "--views-of takes the recipe and cache seed from" in message and "drop --recipe" in message


def test_views_digest_names_shared_views(caches, built_cache):
    a, b, other = (CacheReader(str(u)).manifest for u in (caches["a1"], caches["b1"], built_cache))
    assert views_digest(a) == views_digest(b) != views_digest(other)
    listing = cli("ls", "--cache-root", str(caches["a1"].parent))
    assert listing.count(views_digest(a)) == 4, listing  # a1, b1, a2, b2
    assert views_digest(a) in cli("inspect", str(caches["a1"]))


def test_caches_on_other_views_are_refused_in_one_line(tmp_path, synth_data, tiny_teacher, caches, built_cache):
    run = ["train", "--data", synth_data, "--student", "test_resnet", "--epochs", "1", "--batch-size", "16",
           "--limit-batches", "1", "--workers", "0", "--no-tensorboard", "--no-progress", "--device", "cpu",
           "--out", str(tmp_path / "run")]
    message = cli_refusal(*run, "--cache", caches["a1"], "--cache", built_cache)
    assert "hold different views: recipe field mixup_alpha" in message and str(caches["a1"]) in message
    seeded = tmp_path / "seed1.zarr"
    cli(*build_args(synth_data, (tiny_teacher, seeded), epochs="1", extra=("--cache-seed", "1")))
    message = cli_refusal(*run, "--cache", caches["a1"], "--cache", seeded)
    assert "recipe field cache_seed is 0 and 1" in message
    manifest = CacheReader(str(caches["a1"])).manifest
    with pytest.raises(CacheMismatchError, match="different data"):
        check_same_views([manifest, replace(manifest, dataset=replace(manifest.dataset, fingerprint="0" * 64))],
                         ["a", "b"])
    with pytest.raises(CacheMismatchError, match="have 16 and 10 classes"):
        check_same_views([manifest, replace(manifest, num_classes=10)], ["a", "b"])
    with pytest.raises(CacheMismatchError, match="epoch 3, unit 1 has plan digests bbbbbbbbbbbb and aaaaaaaaaaaa"):
        check_same_plans(3, [["x" * 64, "b" * 64], ["x" * 64, "a" * 64]], ["one.zarr", "two.zarr"])
    assert cli_refusal(*run, "--cache", caches["a1"], "--cache", caches["a1"]).startswith("--cache names one cache twice")
    assert "learns a pair of temperatures per teacher: use --teachers-mode per-teacher" in cli_refusal(
        *run, "--cache", caches["a1"], "--cache", caches["b1"], "--kd", "mkd")
    assert "distils from one teacher" in cli_refusal(*run, "--cache", caches["a1"], "--cache", caches["b1"],
                                                     "--kd", "projector")
    assert "per-sample KD terms" in cli_refusal(*run, "--cache", caches["a1"], "--cache", caches["b1"],
                                                "--kd", "dkd", "--teachers-mode", "ca-mkd")
    assert "combine several caches" in cli_refusal(*run, "--cache", caches["a1"], "--teacher-mix", "1,2")
    assert "3 teacher temperatures for 2 caches" in cli_refusal(
        *run, "--cache", caches["a1"], "--cache", caches["b1"], "--teachers-mode", "per-teacher",
        "--teacher-temperatures", "2,3,4")


def test_api_gives_each_teachers_rows_and_their_mean(tmp_path, synth_data, second_teacher, caches):
    c = tmp_path / "c_k3.zarr"  # B on A's views with another k: caches may differ in codec
    cli("build", "--data", synth_data, "--teacher", "test_resnet", "--teacher-weights", second_teacher,
        "--views-of", caches["a1"], "--out", c, "--topk", "3", "--value-dtype", "float32", "--workers", "0",
        "--batch-size", "16", "--no-progress")
    both = logitcache.CachedTrainData(synth_data, [str(caches["a1"]), str(c)])
    assert both.epochs == [0, 1] and [s.k for s in both.codecs] == [5, 3]
    batch = next(iter(both.loader(1, batch_size=16, seed=4)))
    alone = [next(iter(logitcache.CachedTrainData(synth_data, str(u)).loader(1, batch_size=16, seed=4)))
             for u in (caches["a1"], c)]
    for i, one in enumerate(alone):
        assert torch.equal(batch["images"], one["images"])
        assert torch.equal(logitcache.teacher_logits(batch, both.codecs[i], teacher=i),
                           logitcache.teacher_logits(one, both.codecs[i]))
    t = 2.0
    pa, pb = (logitcache.teacher_probs(batch, both.codecs[i], t, teacher=i) for i in (0, 1))
    mean = logitcache.ensemble_probs(batch, both.codecs, t)
    assert torch.allclose(mean, (pa + pb) / 2, atol=1e-6, rtol=0) and not torch.allclose(pa, pb, atol=1e-3)
    weighted = logitcache.ensemble_probs(batch, both.codecs, t, weights=[3, 1])
    assert torch.allclose(weighted, 0.75 * pa + 0.25 * pb, atol=1e-6, rtol=0)
    # the trainer's mean-probs target is that mixture exactly: softmax(combined / T)
    logits = [logitcache.teacher_logits(batch, both.codecs[i], teacher=i) for i in (0, 1)]
    assert torch.allclose(F.softmax(mean_probs_logits(logits, [0.5, 0.5], t) / t, dim=-1), mean, atol=1e-6, rtol=0)
    with pytest.raises(LogitcacheError, match="no rows of teacher 2"):
        logitcache.teacher_logits(batch, both.codecs[0], teacher=2)


# --- the combination modes, as pure functions -------------------------------------------------------------


def _logits(seed: int, b: int = 6, c: int = 7, k: int = 2):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, c, generator=g, dtype=torch.float64) * 2
    teachers = [torch.randn(b, c, generator=g, dtype=torch.float64) * 3 for _ in range(k)]
    target = F.softmax(torch.randn(b, c, generator=g, dtype=torch.float64) * 4, dim=-1)
    return student, teachers, target


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_modes_equal_their_definitions(seed):
    s, (ta, tb), y = _logits(seed)
    cfg = LossConfig(kind="kd", temperature=2.0, kd_weight=0.7, hard_weight=0.3)
    hard = hard_label_loss(s, y)

    def kl_to(p, temperature):  # T^2 KL(p || softmax(s / T)), batch mean
        return ((p * (p.log() - F.log_softmax(s / temperature, -1))).sum(-1)).mean() * temperature ** 2

    total, terms = multi_teacher_loss(cfg, TeachersConfig("mean-probs", mix=[1, 3]), s, [ta, tb], y)
    mixture = 0.25 * F.softmax(ta / 2, -1) + 0.75 * F.softmax(tb / 2, -1)
    assert torch.allclose(terms["kd"], kl_to(mixture, 2.0), rtol=1e-10)
    assert torch.allclose(total, 0.3 * hard + 0.7 * kl_to(mixture, 2.0), rtol=1e-10)
    _, terms = multi_teacher_loss(cfg, TeachersConfig("mean-logits"), s, [ta, tb], y)
    assert torch.allclose(terms["kd"], kd_loss(s, mean_logits([ta, tb], [0.5, 0.5]), 2.0), rtol=1e-10)
    _, terms = multi_teacher_loss(cfg, TeachersConfig("per-teacher", mix=[2, 1], temperatures=[4.0, 1.0]), s,
                                  [ta, tb], y)
    assert torch.allclose(terms["kd"], 2 / 3 * kd_loss(s, ta, 4.0) + 1 / 3 * kd_loss(s, tb, 1.0), rtol=1e-10)
    _, terms = multi_teacher_loss(cfg, TeachersConfig("ca-mkd"), s, [ta, tb], y)
    ce = torch.stack([-(y * F.log_softmax(t, -1)).sum(-1) for t in (ta, tb)])
    w = (1 - F.softmax(ce, 0)) / 1
    by_sample = torch.stack([(F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1)
                             * 4 for t in (ta, tb)])
    assert torch.allclose(terms["kd"], (w * by_sample).sum(0).mean(), rtol=1e-10)


def test_per_teacher_at_one_temperature_has_the_gradient_of_mean_probs():
    s, teachers, y = _logits(7, k=3)
    cfg = LossConfig(kind="kd", temperature=3.0)
    grads = []
    for mode in ("mean-probs", "per-teacher"):
        student = s.clone().requires_grad_(True)
        multi_teacher_loss(cfg, TeachersConfig(mode, mix=[1, 2, 3]), student, teachers, y)[0].backward()
        grads.append(student.grad)
    assert torch.allclose(grads[0], grads[1], rtol=1e-9, atol=1e-12)
    _, per = multi_teacher_loss(cfg, TeachersConfig("per-teacher", mix=[1, 2, 3]), s, teachers, y)
    _, mean = multi_teacher_loss(cfg, TeachersConfig("mean-probs", mix=[1, 2, 3]), s, teachers, y)
    assert per["kd"] > mean["kd"]  # the losses differ (by the teachers' spread), the gradients do not


@settings(max_examples=60, deadline=None)
@given(k=st.integers(2, 5), b=st.integers(1, 8), seed=st.integers(0, 2 ** 16))
def test_ca_mkd_weights_sum_to_one_and_favour_the_teacher_nearer_the_label(k, b, seed):
    _, teachers, y = _logits(seed, b=b, c=5, k=k)
    w = ca_mkd_weights(teachers, y)
    assert w.shape == (k, b)
    assert torch.allclose(w.sum(0), torch.ones(b, dtype=w.dtype), atol=1e-12)
    assert bool((w >= 0).all()) and bool((w <= 1 / (k - 1) + 1e-12).all())
    ce = torch.stack([-(y * F.log_softmax(t, -1)).sum(-1) for t in teachers])
    for col in range(b):  # a lower cross-entropy never gets a lower weight
        order = torch.argsort(ce[:, col])
        assert bool((w[order, col][:-1] >= w[order, col][1:] - 1e-12).all())


# --- training from two caches ---------------------------------------------------------------------------


def _stop_at_step_then_resume(cfg, tmp_path: Path, step: int) -> None:
    """``cfg`` run into tmp_path/run, SIGTERM after ``step`` steps, resumed: its final weights
    are those of the uninterrupted run in tmp_path/ref."""
    def sigterm(info):
        if info["step"] == step:
            os.kill(os.getpid(), signal.SIGTERM)

    stopped = replace(cfg, out=str(tmp_path / "run"))
    with pytest.raises(TrainingStopped):
        train(stopped, on_step=sigterm)
    train(replace(stopped, resume=True))
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    run = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.equal(ref[k], run[k]) for k in ref)


def test_stopped_and_resumed_run_from_two_caches_equals_uninterrupted(tmp_path, synth_data, caches):
    cfg = base_config(synth_data, [str(caches["a1"]), str(caches["b1"])], tmp_path / "ref", epochs=2,
                      batch_size=8, limit_batches=4, deterministic=True,
                      teachers=TeachersConfig("ca-mkd"), loss=LossConfig(temperature=2.0))
    summary = train(cfg)
    assert summary["cache"] == [str(caches["a1"]), str(caches["b1"])]
    _stop_at_step_then_resume(cfg, tmp_path, 4)
    assert [r["loss"] for r in read_rows(tmp_path / "run" / "steps.jsonl")] == \
        [r["loss"] for r in read_rows(tmp_path / "ref" / "steps.jsonl")]
    # the two teachers matter: one cache alone trains another student
    alone = train(replace(cfg, cache=str(caches["a1"]), teachers=TeachersConfig(), out=str(tmp_path / "alone")))
    assert alone["final_top1"] != summary["final_top1"] or [r["kd"] for r in read_rows(
        tmp_path / "alone" / "steps.jsonl")] != [r["kd"] for r in read_rows(tmp_path / "ref" / "steps.jsonl")]


@pytest.mark.slow
def test_two_rank_ddp_from_two_caches_matches_one_process(tmp_path, synth_data, caches):
    args = ["--data", synth_data, "--cache", str(caches["a1"]), "--cache", str(caches["b1"]), "--student",
            "test_vit", "--epochs", "1", "--batch-size", "16", "--limit-batches", "4", "--workers", "0",
            "--teachers-mode", "per-teacher", "--teacher-temperatures", "2,1", "--teacher-mix", "0.7,0.3",
            "--deterministic", "--no-tensorboard", "--no-progress", "--device", "cpu"]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), "-m", "logitcache.cli.main", "train", *args, "--out",
         str(tmp_path / "ddp")], capture_output=True, text=True, timeout=300, env=SUBPROCESS_ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cli("train", *args, "--out", tmp_path / "one")
    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp_summary["world_size"] == 2 and ddp_summary["config"]["teachers"]["mode"] == "per-teacher"
    ddp, one = read_rows(tmp_path / "ddp" / "steps.jsonl"), read_rows(tmp_path / "one" / "steps.jsonl")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [1, 2, 3, 4]
    worst = max(abs(d[k] - o[k]) / abs(o[k]) for d, o in zip(ddp, one) for k in ("loss", "hard", "kd"))
    assert worst <= 1e-5, (worst, ddp, one)


def test_mkd_learns_a_temperature_pair_per_teacher_and_resumes_exactly(tmp_path, synth_data, caches):
    from logitcache.trainer.config import MKDConfig

    cfg = base_config(synth_data, [str(caches["a1"]), str(caches["b1"])], tmp_path / "ref", student="test_vit",
                      batch_size=8, limit_batches=6, deterministic=True, meta_fraction=0.3,
                      mkd=MKDConfig(meta_every=2, meta_lr=0.1), teachers=TeachersConfig("per-teacher", mix=[3, 1]))
    summary = train(cfg)
    steps = read_rows(tmp_path / "ref" / "steps.jsonl")
    pairs = [(r["t_teacher"], r["t_student"], r["t_teacher_1"], r["t_student_1"]) for r in steps]
    assert all(t > 0 for p in pairs for t in p) and pairs[0] != pairs[-1]
    assert {r["t_teacher"] for r in steps} != {r["t_teacher_1"] for r in steps}  # each teacher its own
    assert {"t_teacher", "t_student", "t_teacher_1", "t_student_1"} <= set(summary)
    _stop_at_step_then_resume(cfg, tmp_path, 3)
    assert [(r["t_teacher_1"], r.get("meta_loss")) for r in read_rows(tmp_path / "run" / "steps.jsonl")] == \
        [(r["t_teacher_1"], r.get("meta_loss")) for r in steps]
