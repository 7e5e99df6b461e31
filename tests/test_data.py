"""Tests of logitcache.data: shard writing, SampleSource over tars / folders / fsspec, generators.

Real files in tmp_path, no mocks.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import pickle
import shutil
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from logitcache.data import generate_digits, generate_synth, open_source, write_dataset
from logitcache.data.shards import png_bytes
from logitcache.data.source import SampleSource
from logitcache.errors import BadSampleError, BadShardError, LogitcacheError

SMALL_SYNTH = dict(num_classes=16, train_per_class=4, val_per_class=2, shard_size=20)


def _random_image(rng: np.random.Generator, size: int = 12) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), "RGB")


def _samples(n: int, num_classes: int, seed: int = 0) -> list[tuple[str, Image.Image, int]]:
    rng = np.random.default_rng(seed)
    return [(f"k{i:04d}", _random_image(rng), int(rng.integers(num_classes))) for i in range(n)]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture()
def small_root(tmp_path: Path) -> tuple[Path, list[tuple[str, Image.Image, int]]]:
    """A 3-class dataset: 7 train samples in shards of 3, 2 val samples."""
    train = _samples(7, 3, seed=1)
    val = _samples(2, 3, seed=2)
    val = [(f"v{i}", im, y) for i, (_, im, y) in enumerate(val)]
    root = write_dataset(tmp_path / "ds", "small", ["a", "b", "c"], {"train": train, "val": val}, shard_size=3)
    return root, train


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synth(tmp_path_factory.mktemp("synth") / "ds", **SMALL_SYNTH)


# -- write_dataset / open_source round trip -------------------------------------------------


def test_round_trip_keys_labels_images(small_root):
    root, train = small_root
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["num_classes"] == 3 and meta["classes"] == ["a", "b", "c"]
    assert meta["splits"]["train"] == {"shards": ["train-000000.tar", "train-000001.tar", "train-000002.tar"], "num_samples": 7}

    source = open_source(str(root), "train")
    assert len(source) == 7 and source.num_classes == 3 and source.classes == ["a", "b", "c"]
    assert [(s.start, s.stop) for s in source.shards] == [(0, 3), (3, 6), (6, 7)]
    assert source.shards[1].name.endswith("train-000001.tar")
    assert [source.shard_of(i) for i in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert [source.key(i) for i in range(7)] == [k for k, _, _ in train]
    assert source.labels().dtype == np.int64
    assert source.labels().tolist() == [y for _, _, y in train]
    for i, (_, image, label) in enumerate(train):
        assert source.label(i) == label
        loaded = source.load_image(i)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(_pixels(loaded), _pixels(image))
    with pytest.raises(IndexError):
        source.key(7)


def test_write_accepts_png_bytes_and_rejects_bad_keys(tmp_path):
    image = _random_image(np.random.default_rng(0))
    root = write_dataset(tmp_path / "ds", "b", ["x", "y"], {"train": [("a/b", png_bytes(image), 1)]})
    source = open_source(root, "train")
    assert source.key(0) == "a/b"  # keys may contain '/'
    np.testing.assert_array_equal(_pixels(source.load_image(0)), _pixels(image))
    with pytest.raises(ValueError, match="no dots"):
        write_dataset(tmp_path / "ds2", "b", ["x"], {"train": [("a.b", image, 0)]})
    with pytest.raises(ValueError, match="label 2"):
        write_dataset(tmp_path / "ds3", "b", ["x", "y"], {"train": [("a", image, 2)]})


def test_write_is_deterministic(tmp_path):
    samples = _samples(5, 4)
    a = write_dataset(tmp_path / "a", "d", list("wxyz"), {"train": samples}, shard_size=2)
    b = write_dataset(tmp_path / "b", "d", list("wxyz"), {"train": samples}, shard_size=2)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


# -- generators ------------------------------------------------------------------------------


def test_synth_is_deterministic_and_balanced(synth_root, tmp_path):
    again = generate_synth(tmp_path / "again", **SMALL_SYNTH)
    names = sorted(p.name for p in synth_root.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (synth_root / name).read_bytes() == (again / name).read_bytes(), name
    other = generate_synth(tmp_path / "other", **{**SMALL_SYNTH, "seed": 1})
    assert (other / "train-000000.tar").read_bytes() != (synth_root / "train-000000.tar").read_bytes()

    train, val = open_source(synth_root, "train"), open_source(synth_root, "val")
    assert train.classes[:3] == ["circle-red-solid", "circle-red-stripes", "circle-red-dots"]
    assert train.num_classes == 16 and len(train) == 64 and len(val) == 32
    assert np.bincount(train.labels(), minlength=16).tolist() == [4] * 16
    assert train.key(0) == "s0000000" and val.key(0) == "s0000064"  # unique over the dataset
    image = train.load_image(5)
    assert image.size == (32, 32) and image.mode == "RGB"


def test_digits(tmp_path):
    root = generate_digits(tmp_path / "digits", val_fraction=0.2, image_size=16)
    train, val = open_source(root, "train"), open_source(root, "val")
    assert train.classes == [str(d) for d in range(10)]
    assert len(train) + len(val) == 1797
    assert abs(len(val) - 0.2 * 1797) < 10
    assert not set(train.keys()) & set(val.keys())
    assert set(np.unique(val.labels())) == set(range(10))  # stratified
    image = val.load_image(0)
    assert image.size == (16, 16) and image.mode == "RGB"
    from sklearn.datasets import load_digits

    digits = load_digits()
    original = digits.images[int(val.key(0)[1:])]  # key "d1234" = index in load_digits()
    assert val.label(0) == digits.target[int(val.key(0)[1:])]
    small = np.asarray(image.convert("L").resize((8, 8), Image.BOX), dtype=np.float64)
    assert np.corrcoef(small.ravel(), original.ravel())[0, 1] > 0.9


# -- other inputs -------------------------------------------------------------------------


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    images = {}
    for cls_name, files in {"dog": ["b.png", "a.PNG", "x.y.png"], "cat": ["z.jpg", "sub/q.png"], "emu": []}.items():
        (tmp_path / "imgs" / cls_name / "sub").mkdir(parents=True)
        for f in files:
            image = _random_image(rng)
            image.save(tmp_path / "imgs" / cls_name / f)
            images[f"{cls_name}/{f}"] = image
    (tmp_path / "imgs" / "dog" / "notes.txt").write_text("not an image")

    source = open_source(str(tmp_path / "imgs"), shard_size=2)
    assert source.classes == ["cat", "dog", "emu"] and source.num_classes == 3
    label_of = {"cat/sub/q": 0, "cat/z": 0, "dog/a": 1, "dog/b": 1, "dog/x_y": 1}
    # Order: the 8-byte little-endian blake2b of the key, ties by key.
    order = sorted(label_of, key=lambda k: (int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little"),
                                            k))
    assert source.keys() == order
    assert source.labels().tolist() == [label_of[k] for k in order]
    assert [s.name for s in source.shards] == [f"{tmp_path / 'imgs'}#h{i:05d}" for i in range(3)]
    assert [(s.start, s.stop) for s in source.shards] == [(0, 2), (2, 4), (4, 5)]
    at = {k: i for i, k in enumerate(order)}
    np.testing.assert_array_equal(_pixels(source.load_image(at["dog/a"])), _pixels(images["dog/a.PNG"]))
    np.testing.assert_array_equal(_pixels(source.load_image(at["dog/x_y"])), _pixels(images["dog/x.y.png"]))
    assert source.load_image(at["cat/z"]).size == (12, 12)  # the jpg decodes (lossy, so no equality)

    with pytest.raises(LogitcacheError, match="3 class directories, not 2"):
        open_source(str(tmp_path / "imgs"), num_classes=2)
    with pytest.raises(LogitcacheError, match="train"):
        open_source(str(tmp_path / "imgs"), "train")
    (tmp_path / "imgs" / "dog" / "a.PNG").write_bytes(b"garbage")
    with pytest.raises(BadSampleError, match="dog/a") as info:
        source.load_image(at["dog/a"])
    assert info.value.shard == source.shards[source.shard_of(at["dog/a"])].name


def _class_folder(path: Path, num_classes: int, per_class: int) -> Path:
    """``<path>/c<NN>/<file>.png``: tiny images, ``per_class`` per class."""
    rng = np.random.default_rng(0)
    for c in range(num_classes):
        (path / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            _random_image(rng, size=4).save(path / f"c{c:02d}" / f"img_{c}_{i}.png")
    return path


def test_image_folder_shards_mix_classes(tmp_path):
    """Mixup/cutmix pairs samples within a shard: hashed shards make same-class pairs rare."""
    from logitcache.views.augment import create_recipe
    from logitcache.views.plan import plan_epoch

    num_classes = 20
    folder = _class_folder(tmp_path / "imgs", num_classes, 30)
    source = open_source(str(folder), shard_size=50)
    assert len(source) == 600 and [len(s) for s in source.shards] == [50] * 12
    labels = source.labels()
    assert all(len(np.unique(labels[s.start : s.stop])) >= 10 for s in source.shards)
    recipe = create_recipe("demo32_mix")
    same = pairs = 0
    for epoch in range(3):
        groups = plan_epoch(recipe, epoch, [(s.start, s.stop) for s in source.shards])
        mixed = groups.second >= 0
        pairs += int(mixed.sum())
        same += int((labels[groups.first[mixed]] == labels[groups.second[mixed]]).sum())
    assert pairs == 900 and same / pairs <= 2 / num_classes, (same, pairs)

    # The same shards wherever the folder lives (and whatever order a listing gives).
    copy = shutil.copytree(folder, tmp_path / "elsewhere" / "imgs")
    assert open_source(str(copy), shard_size=50).fingerprint() == source.fingerprint()
    assert open_source(str(folder), shard_size=60).fingerprint() != source.fingerprint()


def test_cache_of_an_old_image_folder_layout_is_refused_saying_why():
    from logitcache.codecs.logits import create_codec
    from logitcache.errors import CacheMismatchError
    from logitcache.storage.manifest import DatasetInfo, Manifest, check_serves
    from logitcache.views.augment import create_recipe

    def manifest(shards: list[str]) -> Manifest:
        info = DatasetInfo("imgs", None, "0" * 64, 2000, shards, [1000] * len(shards), url="/data/imgs")
        return Manifest(teacher="t", teacher_weights="w", teacher_weights_sha256=None, recipe=create_recipe("demo32"),
                        dataset=info, codec=create_codec("topk", 10, 5), num_classes=10)

    with pytest.raises(CacheMismatchError, match=r"sharded across classes by a hash of each file's key.*rebuilt"):
        check_serves(manifest(["imgs[0:1000]", "imgs[1000:2000]"]), fingerprint="1" * 64, num_classes=10, where="c")
    with pytest.raises(CacheMismatchError, match="another dataset") as info:
        check_serves(manifest(["imgs#h00000", "imgs#h00001"]), fingerprint="1" * 64, num_classes=10, where="c")
    assert "hash" not in str(info.value)
    check_serves(manifest(["imgs[0:1000]"]), fingerprint="0" * 64, num_classes=10, where="c")  # same data: fine


def test_tar_urls_with_braces(small_root):
    root, train = small_root
    source = open_source(f"{root}/train-{{000000..000001}}.tar", num_classes=3)
    assert len(source) == 6 and source.classes == ["0", "1", "2"]
    assert source.key(5) == train[5][0]
    with pytest.raises(LogitcacheError, match="num_classes"):
        open_source(f"{root}/train-000000.tar")


def test_fingerprint_copy_and_changed_label(small_root, tmp_path):
    root, train = small_root
    fp = open_source(root, "train").fingerprint()
    assert len(fp) == 64
    copy = shutil.copytree(root, tmp_path / "elsewhere" / "copy")
    assert open_source(copy, "train").fingerprint() == fp
    assert open_source(root, "val").fingerprint() != fp

    changed = list(train)
    key, image, label = changed[4]
    changed[4] = (key, image, (label + 1) % 3)
    other = write_dataset(tmp_path / "changed", "small", ["a", "b", "c"], {"train": changed}, shard_size=3)
    assert open_source(other, "train").fingerprint() != fp


def test_memory_url(small_root):
    root, train = small_root
    fs = fsspec.filesystem("memory")
    for path in root.iterdir():
        fs.pipe(f"/test-data/{path.name}", path.read_bytes())
    try:
        source = open_source("memory://test-data", "train")
        assert source.shards[0].name == "memory://test-data/train-000000.tar"
        assert [source.key(i) for i in range(len(source))] == [k for k, _, _ in train]
        np.testing.assert_array_equal(_pixels(source.load_image(6)), _pixels(train[6][1]))
        assert source.fingerprint() == open_source(root, "train").fingerprint()
    finally:
        fs.rm("/test-data", recursive=True)


# -- pickling and processes -------------------------------------------------------------------


def _load_in_child(source: SampleSource, index: int) -> bytes:
    return np.asarray(source.load_image(index)).tobytes()


_INHERITED: SampleSource | None = None


def _load_inherited(queue: multiprocessing.Queue, index: int) -> None:
    assert _INHERITED is not None
    queue.put(np.asarray(_INHERITED.load_image(index)).tobytes())


def test_pickle_and_fork(small_root):
    global _INHERITED
    root, train = small_root
    source = open_source(root, "train")
    source.load_image(0)  # opens a handle in this process
    state = pickle.loads(pickle.dumps(source))
    assert np.array_equal(_pixels(state.load_image(4)), _pixels(train[4][1]))
    assert state.fingerprint() == source.fingerprint()

    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:  # the source travels pickled
        got = pool.apply(_load_in_child, (source, 5))
    assert got == _pixels(train[5][1]).tobytes()

    _INHERITED = source  # the source is inherited with its open handle
    try:
        queue = ctx.Queue()
        child = ctx.Process(target=_load_inherited, args=(queue, 1))
        child.start()
        got = queue.get(timeout=30)
        child.join(timeout=30)
        assert child.exitcode == 0 and got == _pixels(train[1][1]).tobytes()
    finally:
        _INHERITED = None
    # The parent's handle still reads correctly after the child used the same file.
    np.testing.assert_array_equal(_pixels(source.load_image(2)), _pixels(train[2][1]))


# -- bad input -------------------------------------------------------------------------------


def test_truncated_tar(small_root):
    root, _ = small_root
    shard = root / "train-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadShardError, match="train-000001.tar"):
        open_source(root, "train")


def test_tar_cut_at_member_boundary(small_root):
    root, _ = small_root
    shard = root / "train-000000.tar"
    with tarfile.open(shard) as tar:
        third = tar.getmembers()[4]  # members: k.cls, k.png per sample; cut before sample 3
    shard.write_bytes(shard.read_bytes()[: third.offset])
    with pytest.raises(BadShardError, match="train-000000.tar"):
        open_source(root, "train")


def test_missing_shard_file(small_root):
    root, _ = small_root
    (root / "train-000002.tar").unlink()
    with pytest.raises(BadShardError, match="train-000002.tar"):
        open_source(root, "train")


def test_corrupt_image_member(tmp_path):
    samples: list[tuple[str, Image.Image | bytes, int]] = list(_samples(3, 2))
    samples[1] = ("bad", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, 1)
    root = write_dataset(tmp_path / "ds", "c", ["a", "b"], {"train": samples})
    source = open_source(root, "train")  # indexing reads no image bytes
    source.load_image(0)
    with pytest.raises(BadSampleError, match=r"train-000000\.tar.*bad") as info:
        source.load_image(1)
    assert info.value.key == "bad" and info.value.shard.endswith("train-000000.tar")


def test_label_out_of_range(small_root):
    root, train = small_root
    meta = json.loads((root / "dataset.json").read_text())
    meta["num_classes"], meta["classes"] = 1, ["a"]
    (root / "dataset.json").write_text(json.dumps(meta))
    bad_index = next(i for i, (_, _, y) in enumerate(train) if y >= 1)
    shard = f"train-{bad_index // 3:06d}.tar"
    first_bad_in_shard = next(k for k, _, y in train[(bad_index // 3) * 3 :] if y >= 1)
    with pytest.raises(BadSampleError, match=rf"label \d out of range.*{shard}.*{first_bad_in_shard}") as info:
        open_source(root, "train")
    assert info.value.key == first_bad_in_shard


def _raw_tar(path: Path, members: dict[str, bytes]) -> None:
    with wds.TarWriter(str(path), encoder=False) as writer:
        for name, data in members.items():
            key, ext = name.split(".", 1)
            writer.write({"__key__": key, ext: data})


def test_bad_cls_and_missing_members(tmp_path):
    png = png_bytes(_random_image(np.random.default_rng(0)))
    _raw_tar(tmp_path / "a.tar", {"x.png": png, "x.cls": b"one"})
    with pytest.raises(BadSampleError, match=r"not a decimal integer: b'one'.*a\.tar.*key x"):
        open_source(str(tmp_path / "a.tar"), num_classes=2)
    _raw_tar(tmp_path / "b.tar", {"x.png": png, "x.cls": b"1", "y.png": png})
    with pytest.raises(BadSampleError, match=r"no \.cls.*b\.tar.*key y"):
        open_source(str(tmp_path / "b.tar"), num_classes=2)
    _raw_tar(tmp_path / "c.tar", {"z.cls": b"0"})
    with pytest.raises(BadSampleError, match=r"no image.*c\.tar.*key z"):
        open_source(str(tmp_path / "c.tar"), num_classes=2)
    # Other members (here a pickle) are skipped unread.
    _raw_tar(tmp_path / "d.tar", {"w.png": png, "w.cls": b" 1\n", "w.pyd": b"\x80\x04not read"})
    assert open_source(str(tmp_path / "d.tar"), num_classes=2).label(0) == 1


def test_missing_split_and_bad_paths(small_root, tmp_path):
    root, _ = small_root
    with pytest.raises(LogitcacheError, match=r"no split 'test'.*train, val"):
        open_source(root, "test")
    with pytest.raises(LogitcacheError, match=r"no split given.*train, val"):
        open_source(root)
    with pytest.raises(LogitcacheError, match="3 classes"):
        open_source(root, "train", num_classes=4)
    with pytest.raises(LogitcacheError, match="nowhere"):
        open_source(str(tmp_path / "nowhere"), "train")


def test_duplicate_keys_across_shards(tmp_path):
    png = png_bytes(_random_image(np.random.default_rng(0)))
    _raw_tar(tmp_path / "p-0.tar", {"x.png": png, "x.cls": b"0"})
    _raw_tar(tmp_path / "p-1.tar", {"x.png": png, "x.cls": b"1"})
    with pytest.raises(BadSampleError, match="duplicate key"):
        open_source(str(tmp_path / "p-{0..1}.tar"), num_classes=2)


def test_tar_header_not_gnu_pax(small_root):
    # Integer mtime: plain ustar headers, no PAX record per member (smaller, faster to index).
    root, _ = small_root
    with tarfile.open(root / "train-000000.tar") as tar:
        assert all(m.pax_headers == {} and m.mtime == 0 for m in tar.getmembers())


def test_generate_synth_once_reuses_only_what_it_wrote_with_the_same_arguments(tmp_path):
    import json

    from logitcache.data.synth import RENDERING, SPEC_FILE, generate_synth_once

    root, args = tmp_path / "d", {"num_classes": 2, "train_per_class": 1, "val_per_class": 1}
    assert generate_synth_once(root, **args) is False
    assert json.loads((root / SPEC_FILE).read_text()) == {**args, "rendering": RENDERING}
    assert generate_synth_once(root, **args) is True
    assert generate_synth_once(root, **{**args, "val_per_class": 2}) is False  # other arguments: generated again
    assert len(open_source(str(root), "val")) == 4 and not (tmp_path / "d.tmp").exists()
    (root / SPEC_FILE).write_text(json.dumps({**args, "val_per_class": 2, "rendering": RENDERING - 1}))
    assert generate_synth_once(root, **{**args, "val_per_class": 2}) is False  # another rendering's data
