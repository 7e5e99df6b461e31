"""The build at scale: several processes (torchrun, --procs), resume after SIGKILL, S3,
extending a cache while it is read, and views that do not depend on batch size.

Every build here runs with one intra-op thread per process (OMP_NUM_THREADS=1 and
torch.set_num_threads(1) in this process): CPU convolutions split their reductions by
thread count, so the teacher's float32 logits may differ in the last bit between, say, a
2-thread and a 1-thread process. With equal thread counts per process, 1-, 2-process and
resumed builds are byte-identical.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from s3_server import count_requests, free_port, s3_server

from logitcache.build.loop import build
from logitcache.build.teacher import Teacher
from logitcache.build.units import UnitBatches
from logitcache.codecs.logits import create_codec
from logitcache.data.source import open_source
from logitcache.storage.layout import open_group
from logitcache.storage.reader import CacheReader
from logitcache.views.augment import create_recipe
from logitcache.views.loader import BatchDataset, create_batch_loader

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NUM_SHARDS = 5  # 96 train samples in shards of 20
TIMEOUT = 300


# -- fixtures and helpers --------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 16-class dataset in 5 train shards and a random-init test_resnet teacher file."""
    import timm
    from logitcache.trainer.checkpoint import save_student

    from logitcache.data.synth import generate_synth

    root = tmp_path_factory.mktemp("scale")
    data = generate_synth(root / "data", num_classes=16, train_per_class=6, val_per_class=2, image_size=32, seed=0,
                          shard_size=20)
    torch.manual_seed(0)
    weights = root / "teacher.safetensors"
    save_student(timm.create_model("test_resnet", num_classes=16), weights, "test_resnet", 16, create_recipe("demo32"))
    return {"root": root, "data": str(data), "weights": str(weights)}


def build_here(tiny, url, *, recipe="demo32", epochs=(0, 1, 2), batch_size=8, data=None, storage_options=None,
               num_workers=0, aug_repeats=1):
    """A one-process build in this process, with the CLI's defaults (top-10, 8-bit gaps)."""
    source = open_source(data or tiny["data"], "train")
    teacher = Teacher("test_resnet", weights=tiny["weights"])
    return build(source, dataset_name="synth", teacher=teacher, recipe=create_recipe(recipe, aug_repeats=aug_repeats),
                 codec=create_codec("topk", source.num_classes, 10, "gap8"), url=str(url), epochs=list(epochs),
                 batch_size=batch_size, num_workers=num_workers, progress=False, storage_options=storage_options)


def cli_args(tiny, out, *, recipe="demo32", epochs="3", batch_size=8, workers=0, data=None, aug_repeats=1):
    return ["build", "--data", data or tiny["data"], "--teacher", "test_resnet", "--teacher-weights", tiny["weights"],
            "--recipe", recipe, "--epochs", epochs, "--workers", str(workers), "--batch-size", str(batch_size),
            "--aug-repeats", str(aug_repeats), "--no-progress", "--out", str(out)]


def logitcache_cmd() -> list[str]:
    script = BIN / "logitcache"
    return [str(script)] if script.exists() else [sys.executable, "-m", "logitcache.cli.main"]


def sub_env(**extra) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def run_ok(cmd, env=None, timeout=TIMEOUT) -> str:
    r = subprocess.run(cmd, cwd=REPO, env=env or sub_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    return r.stdout


def assert_same_units(url_a, url_b, epochs, shards=NUM_SHARDS):
    """Every array of every unit equal (values and dtype), and the commit records equal."""
    a, b = CacheReader(str(url_a)), CacheReader(str(url_b))
    for e in epochs:
        for s in range(shards):
            ua, ub = a.read_unit(e, s), b.read_unit(e, s)
            assert set(ua) == set(ub) == set(a.array_names)
            for key in a.array_names:
                assert ua[key].dtype == ub[key].dtype, (e, s, key)
                assert np.array_equal(ua[key], ub[key]), (e, s, key)
            assert a.commit(e, s) == b.commit(e, s)


def tree_bytes(path: Path) -> dict[str, bytes]:
    """Every file of a local cache (relative path -> bytes), zarr's leftover ``*.partial``
    temp files outside units excepted; the root manifest without its creation time."""
    out = {}
    for p in sorted(path.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(path).as_posix()
        if rel.endswith(".partial"):
            # a kill between zarr's temp-file write and its rename; harmless, ignored by zarr
            assert rel.count("/") < 4, f"temp file left inside a unit: {rel}"
            continue
        data = p.read_bytes()
        if rel == "zarr.json":
            meta = json.loads(data)
            meta["attributes"]["logitcache"].pop("created")
            data = json.dumps(meta, sort_keys=True).encode()
        out[rel] = data
    return out


def assert_same_tree(a: Path, b: Path):
    ta, tb = tree_bytes(a), tree_bytes(b)
    assert sorted(ta) == sorted(tb), set(ta) ^ set(tb)
    for rel in ta:
        assert ta[rel] == tb[rel], rel


@pytest.fixture(scope="module")
def ref(tiny):
    """The reference: an uninterrupted one-process build of epochs 0..2 (demo32, batch 8)."""
    url = tiny["root"] / "ref.zarr"
    report = build_here(tiny, url)
    assert report.units_written == 3 * NUM_SHARDS
    return url


# -- resume after SIGKILL --------------------------------------------------------------


def _is_committed(unit: Path) -> bool:
    """Whether a unit folder ``epochs/<EEEE>/units/<SSSSS>`` has its commit record (format 2)."""
    meta = unit.parent.parent / "commits" / unit.name / "zarr.json"
    try:
        return "commit" in json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False


def _committed(cache: Path) -> int:
    return sum(_is_committed(u) for u in cache.glob("epochs/*/units/*"))


def _state(cache: Path) -> str:
    """What the cache looked like when the build was killed (for the log)."""
    if not (cache / "zarr.json").exists():
        return "no cache yet"
    units = list(cache.glob("epochs/*/units/*"))
    partial = [u.relative_to(cache).as_posix() for u in units if u.is_dir() and not _is_committed(u)]
    return f"{_committed(cache)} units committed, half-written: {partial or 'none'}"


class Launcher:
    """tests/build_launcher.py: forks preloaded `logitcache` processes (no import cost)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "build_launcher.py")], cwd=REPO,
                                     env=sub_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, args: list[str], write_delay: float = 0.0, env: dict | None = None) -> int:
        self.proc.stdin.write(json.dumps({"args": args, "write_delay": write_delay, "env": env or {}}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline().split()[1])

    def status(self) -> int:
        return int(self.proc.stdout.readline().split()[1])

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def launcher():
    launcher = Launcher()
    yield launcher
    launcher.close()


def alive(pid: int) -> bool:
    """Whether a launcher child still runs (the launcher reaps it as soon as it ends)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _wait_for(cond, pid, deadline):
    while not cond() and alive(pid):
        assert time.monotonic() < deadline, "timed out waiting for the build"
        time.sleep(0.002)


def _writing(cache: Path) -> bool:
    """Whether some unit is being written (its folder exists, its commit does not)."""
    return any(d.is_dir() and not _is_committed(d) for d in cache.glob("epochs/*/units/*"))


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(tiny, ref, launcher):
    """SIGKILL `logitcache build` at random moments (while importing, at startup, right after
    the root is created, between units, inside a unit's writes), run it again to the end,
    and compare every unit, array and file byte for byte with the uninterrupted build."""
    rng = random.Random(1234)
    trials = [("importing", rng.uniform(0.3, 2.5)), ("startup", rng.uniform(0.0, 0.8)),
              ("root-created", rng.uniform(0.0, 0.05)), ("between-units", rng.randint(1, 13)),
              ("mid-unit", rng.randint(0, 13)), ("mid-unit", rng.randint(0, 13))]
    log = []
    for i, (phase, arg) in enumerate(trials):
        cache = tiny["root"] / f"killed{i}.zarr"
        deadline = time.monotonic() + TIMEOUT
        if phase == "importing":  # the real console script, killed before or while it starts
            proc = subprocess.Popen(logitcache_cmd() + cli_args(tiny, cache), cwd=REPO, env=sub_env(),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(arg)
            proc.send_signal(signal.SIGKILL)
            status = proc.wait(timeout=30)
        else:
            pid = launcher.start(cli_args(tiny, cache), write_delay=0.01 if phase == "mid-unit" else 0.0)
            if phase == "startup":
                time.sleep(arg)
            elif phase == "root-created":
                _wait_for(lambda: (cache / "zarr.json").exists(), pid, deadline)
                time.sleep(arg)
            elif phase == "between-units":
                _wait_for(lambda: _committed(cache) >= arg, pid, deadline)
            else:  # a unit's writes take 18 x 10 ms here: kill somewhere inside them
                _wait_for(lambda: _committed(cache) >= arg and _writing(cache), pid, deadline)
                time.sleep(rng.uniform(0.0, 0.12))
            os.kill(pid, signal.SIGKILL)
            status = launcher.status()
        assert status == -signal.SIGKILL, f"trial {i} ({phase}): the build ended before the kill ({status})"
        log.append(f"trial {i} ({phase} {arg:.2f}): killed with {_state(cache)}")
        # Run it again to the end: the last trial through the CLI, the others through build().
        if i == len(trials) - 1:
            launcher.start(cli_args(tiny, cache))
            assert launcher.status() == 0
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zarr warns about a folder left without zarr.json
                report = build_here(tiny, cache)
            assert report.units_written + report.units_skipped == 3 * NUM_SHARDS
        assert CacheReader(str(cache)).epochs() == [0, 1, 2]
        assert_same_units(ref, cache, [0, 1, 2])
        assert_same_tree(ref, cache)
        shutil.rmtree(cache)
    print("\n".join(log))
    assert "no cache yet" in log[0], log  # the import phase writes nothing
    assert any("half-written: none" not in line for line in log), log  # some kill landed inside a unit


@pytest.mark.slow
def test_resume_after_sigkill_with_repeats_is_byte_identical(tiny, launcher):
    """Repeated augmentation (demo32_mix, --aug-repeats 3): SIGKILL between units and inside a
    unit's writes, build again to the end: every file equals the uninterrupted build's."""
    ref_repeats = tiny["root"] / "ref_repeats.zarr"
    build_here(tiny, ref_repeats, recipe="demo32_mix", aug_repeats=3)
    args = dict(recipe="demo32_mix", aug_repeats=3)
    rng = random.Random(77)
    for i, phase in enumerate(("between-units", "mid-unit")):
        cache = tiny["root"] / f"killed_repeats{i}.zarr"
        deadline = time.monotonic() + TIMEOUT
        after = rng.randint(2, 10)
        pid = launcher.start(cli_args(tiny, cache, **args), write_delay=0.01 if phase == "mid-unit" else 0.0)
        if phase == "between-units":
            _wait_for(lambda: _committed(cache) >= after, pid, deadline)
        else:
            _wait_for(lambda: _committed(cache) >= after and _writing(cache), pid, deadline)
            time.sleep(rng.uniform(0.0, 0.1))
        os.kill(pid, signal.SIGKILL)
        assert launcher.status() == -signal.SIGKILL, f"{phase}: the build ended before the kill"
        assert _committed(cache) < 3 * NUM_SHARDS
        launcher.start(cli_args(tiny, cache, **args))
        assert launcher.status() == 0
        assert CacheReader(str(cache)).manifest.recipe.aug_repeats == 3
        assert_same_units(ref_repeats, cache, [0, 1, 2])
        assert_same_tree(ref_repeats, cache)
        shutil.rmtree(cache)


def test_resume_repairs_epoch_group_without_parent(tiny, ref):
    """zarr writes a new group's metadata and its parents' concurrently: a kill in between
    can leave epochs/0001/units without epochs/0001. The next build must repair it."""
    cache = tiny["root"] / "orphan.zarr"
    build_here(tiny, cache, epochs=[0])
    root = open_group(str(cache), "a")
    root.require_group("epochs/0001/units")  # what the killed build got to write...
    (cache / "epochs" / "0001" / "zarr.json").unlink()  # ...without the parent
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert CacheReader(str(cache)).epochs() == [0]
        build_here(tiny, cache)
    assert CacheReader(str(cache)).epochs() == [0, 1, 2]
    assert_same_tree(ref, cache)


# -- several processes ----------------------------------------------------------------


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(tiny, ref):
    cache = tiny["root"] / "torchrun.zarr"
    out = run_ok([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
                  str(free_port()), "-m", "logitcache.cli.main"] + cli_args(tiny, cache))
    assert "rank 0/2" in out and "rank 1/2" in out, out
    assert_same_units(ref, cache, [0, 1, 2])
    assert_same_tree(ref, cache)


@pytest.fixture(scope="module")
def mix_one(tiny):
    """One-process builds of demo32_mix, epochs 0..1, at batch sizes 2, 8 and 32."""
    out = {}
    for bs in (2, 8, 32):
        url = tiny["root"] / f"mix-b{bs}.zarr"
        build_here(tiny, url, recipe="demo32_mix", epochs=[0, 1], batch_size=bs)
        out[bs] = url
    return out


@pytest.mark.slow
def test_procs_two_equals_one_process(tiny, mix_one):
    """--procs 2 (each rank with its own DataLoader worker) == one process, byte for byte."""
    cache = tiny["root"] / "mix-procs2.zarr"
    out = run_ok(logitcache_cmd() + cli_args(tiny, cache, recipe="demo32_mix", epochs="2", workers=1)
                 + ["--procs", "2"])
    assert "rank 0/2" in out and "rank 1/2" in out, out
    assert_same_units(mix_one[8], cache, [0, 1])
    assert_same_tree(mix_one[8], cache)


def test_mixed_views_do_not_depend_on_batch_size(tiny, mix_one):
    """Views (seeds, pairs: the plan digests) are equal across batch sizes; logits equal up to
    the float rounding of differently sized teacher batches (a gap code may move by one step)."""
    readers = {bs: CacheReader(str(url)) for bs, url in mix_one.items()}
    spec = readers[8].manifest.codec
    assert spec.values == "gap8"
    for e in (0, 1):
        base = readers[8].load_epoch(e)
        for bs in (2, 32):
            other = readers[bs].load_epoch(e)
            assert base.plans == other.plans, (e, bs)
            # top-k ids may swap only between near-tied logits
            same = (base.ids == other.ids).all(axis=1)
            assert same.mean() > 0.95, (e, bs, same.mean())
            codes = np.abs(base.values[same].astype(np.int32) - other.values[same].astype(np.int32))
            assert codes.max() <= 1, (e, bs)
            assert np.abs(base.tail.astype(np.int32) - other.tail.astype(np.int32)).max() <= 1, (e, bs)


def test_rendered_views_byte_equal_across_batch_sizes_and_workers(tiny):
    """The tensors the teacher sees: rendered through the build's own DataLoader plumbing
    with batch sizes 2, 8, 32 and 0 or 2 workers, every view is byte-identical."""
    recipe = create_recipe("demo32_mix")
    source = open_source(tiny["data"], "train")
    bounds = np.array([(s.start, s.stop) for s in source.shards])
    rendered = {}
    for bs, workers in ((2, 0), (8, 0), (32, 0), (8, 2)):
        units = UnitBatches(recipe, bounds, np.zeros(len(bounds), np.int64), np.arange(len(bounds)), bs)
        views = {}
        for batch in create_batch_loader(BatchDataset(source, recipe), units, num_workers=workers):
            assert not batch["errors"]
            for idx, img in zip(batch["index"].tolist(), batch["images"]):
                views[idx] = img.numpy().tobytes()
        assert sorted(views) == list(range(len(source)))
        rendered[(bs, workers)] = views
    first = rendered[(2, 0)]
    for key, views in rendered.items():
        assert views == first, key


# -- object storage --------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tiny):
    """A moto S3 server; bucket/data holds a 2-shard dataset (writing a unit to S3 costs
    about 170 requests, so this test keeps units few), with its local copy and a local
    reference build of epochs 0-1."""
    from logitcache.data.synth import generate_synth

    data = generate_synth(tiny["root"] / "data2", num_classes=16, train_per_class=6, val_per_class=2, image_size=32,
                          seed=0, shard_size=48)
    local = tiny["root"] / "ref2.zarr"
    build_here(tiny, local, epochs=[0, 1], data=str(data))
    with s3_server() as env, pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("bucket")
        fs.put(str(data) + "/", "bucket/data/", recursive=True)  # tar shards + dataset.json
        yield {"env": env, "data": str(data), "ref": local}


@pytest.mark.slow
def test_s3_build_and_read(tiny, s3, launcher):
    """`logitcache build` into s3:// (endpoint from AWS_ENDPOINT_URL) from a local folder; then
    an extension built here from the dataset read over s3://, which a reader opened before
    it sees; both equal to a local build."""
    url = "s3://bucket/cache.zarr"
    launcher.start(cli_args(tiny, url, epochs="1", data=s3["data"]), env=s3["env"])
    assert launcher.status() == 0
    reader = CacheReader(url)
    assert reader.epochs() == [0]
    # Data read from S3, written through a separate filesystem instance (as another process would).
    report = build_here(tiny, url, epochs=[1], data="s3://bucket/data", storage_options={"skip_instance_cache": True})
    assert report.units_written == 2
    with count_requests() as requests:
        assert reader.epochs() == [0, 1]  # no stale listing in a reader that was already open
    assert requests.count == 4, requests.lines  # one listing of epochs/, one of seals/, one of each epoch's commits/
    local = CacheReader(str(s3["ref"]))
    assert reader.manifest.dataset.fingerprint == local.manifest.dataset.fingerprint
    for e in (0, 1):
        a, b = local.load_epoch(e), reader.load_epoch(e)
        for key in ("ids", "values", "tail", "plans"):
            x, y = np.asarray(getattr(a, key)), np.asarray(getattr(b, key))
            assert x.dtype == y.dtype and np.array_equal(x, y), (e, key)
    assert_same_units(s3["ref"], url, [0, 1], shards=2)


# -- extension while a reader runs -----------------------------------------------------


@pytest.mark.slow
def test_extend_while_reading(tiny, ref, launcher):
    """build --epochs 2:4 in another process while a reader polls: the reader only ever sees
    complete epochs, never fails, ends with [0, 1, 2, 3], and epochs 0-1 never change."""
    cache = tiny["root"] / "extend.zarr"
    build_here(tiny, cache, epochs=[0, 1])
    reader = CacheReader(str(cache))
    assert reader.epochs() == [0, 1]
    before = {e: reader.load_epoch(e) for e in (0, 1)}
    # `logitcache build` in another process, its file writes slowed to widen the race window
    pid = launcher.start(cli_args(tiny, cache, epochs="2:4"), write_delay=0.005)
    seen, polls, status = set(), 0, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a folder listed before its zarr.json lands: zarr warns, skips it
            while True:
                done = not alive(pid)
                eps = reader.epochs()
                assert set(eps) >= {0, 1} and eps == sorted(eps)
                for e in eps:
                    arrays = reader.load_epoch(e)  # raises if any unit is incomplete
                    assert arrays.num_views == 96
                    if e in before:
                        for key in ("ids", "values", "tail", "plans"):
                            assert np.array_equal(getattr(arrays, key), getattr(before[e], key))
                seen.add(tuple(eps))
                polls += 1
                if done:
                    break
                time.sleep(0.05)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
        status = launcher.status()
    assert status == 0
    assert reader.epochs() == [0, 1, 2, 3]
    assert len(seen) >= 2, seen  # it did read while the build ran
    assert_same_units(ref, cache, [0, 1, 2])
    print(f"{polls} polls, states seen: {sorted(seen)}")
