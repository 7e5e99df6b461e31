"""docs/FORMAT.md is true: a cache read with zarr + numpy alone, following that page, gives
exactly what logitcache's own reader and decoder give; commit records and view seeds
recompute as documented; the example in the page runs.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import math
import re
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

FORMAT_MD = Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md"

# =========================================================================================
# A reader written from docs/FORMAT.md alone: zarr, numpy and the standard library only.
# =========================================================================================

DOC_ARRAYS = ("sample_index", "view_seed", "label", "partner_index", "mix_lam", "topk_ids", "topk_logits", "tail_lse")


def doc_crc32(a: np.ndarray) -> int:
    return zlib.crc32(a.astype(a.dtype.newbyteorder("<")).tobytes(order="C"))


class DocReader:
    def __init__(self, url: str):
        self.root = zarr.open_group(url, mode="r")
        self.manifest = self.root.attrs["logitcache"]
        assert self.manifest["format_version"] == 2
        self.C = self.manifest["num_classes"]
        self.k = self.manifest["codec"]["k"]
        self.N = self.manifest["dataset"]["num_samples"]
        self.shard_sizes = self.manifest["dataset"]["shard_sizes"]
        self.num_shards = len(self.manifest["dataset"]["shards"])

    def unit(self, epoch: int, shard: int):
        return self.root[f"epochs/{epoch:04d}/units/{shard:05d}"]

    def committed_units(self, epoch: int) -> list[int]:
        path = f"epochs/{epoch:04d}/commits"
        return sorted(int(s) for s in self.root[path].group_keys()) if path in self.root else []

    def commit(self, epoch: int, shard: int) -> dict | None:
        if shard not in self.committed_units(epoch):
            return None
        return self.root[f"epochs/{epoch:04d}/commits/{shard:05d}"].attrs["commit"]

    def readable_epochs(self) -> list[int]:
        if "epochs" not in self.root:
            return []
        names = sorted(self.root["epochs"].group_keys())
        return [int(e) for e in names if self.committed_units(int(e)) == list(range(self.num_shards))]

    def read_unit(self, epoch: int, shard: int) -> dict[str, np.ndarray]:
        commit = self.commit(epoch, shard)
        assert commit is not None
        group = self.unit(epoch, shard)
        out = {}
        for name in DOC_ARRAYS:
            arr = group[name]
            out[name] = arr[...] if commit["n"] else np.zeros((0,) + arr.shape[1:], arr.dtype)
            assert doc_crc32(out[name]) == commit["crc32"][name], (epoch, shard, name)
        return out

    def load_epoch(self, epoch: int) -> dict[str, np.ndarray]:
        units = [self.read_unit(epoch, s) for s in range(self.num_shards)]
        cat = {name: np.concatenate([u[name] for u in units]) for name in DOC_ARRAYS}
        order = np.argsort(cat["sample_index"], kind="stable")
        assert np.array_equal(cat["sample_index"][order], np.arange(self.N))
        return {name: a[order] for name, a in cat.items()}

    def full_logits(self, ids: np.ndarray, values: np.ndarray, tail_lse: np.ndarray) -> np.ndarray:
        n = len(tail_lse)
        z = np.empty((n, self.C), np.float32)
        if self.k < self.C:
            z[:] = (tail_lse.astype(np.float32) - np.float32(math.log(self.C - self.k)))[:, None]
        rows = np.arange(n)[:, None]
        z[rows, ids.astype(np.int64)] = values.astype(np.float32)
        return z


def doc_view_seed(cache_seed: int, epoch: int, key: str) -> int:
    text = "/".join(str(p) for p in (cache_seed, epoch, key)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def dataset_keys(root: str, split: str = "train") -> list[str]:
    """Sample keys in global index order (shard order, then member order) from the tar shards."""
    meta = json.loads((Path(root) / "dataset.json").read_text())
    keys: list[str] = []
    for shard in meta["splits"][split]["shards"]:
        with tarfile.open(Path(root) / shard) as tar:
            for member in tar:
                key = member.name.split(".", 1)[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


# =========================================================================================
# Tests
# =========================================================================================


@pytest.fixture(scope="module", params=["built_cache", "built_cache_mix"])
def cache_url(request) -> str:
    return request.getfixturevalue(request.param)


def test_doc_reader_agrees_exactly_with_logitcache(cache_url):
    from logitcache.codec import decode
    from logitcache.store import CacheReader

    doc = DocReader(cache_url)
    reader = CacheReader(cache_url)
    assert doc.manifest == reader.manifest.to_dict()
    assert doc.readable_epochs() == reader.epochs() == [0, 1]
    mine = doc.load_epoch(0)
    theirs = reader.load_epoch(0)
    assert np.array_equal(mine["sample_index"], np.arange(doc.N))
    for name in DOC_ARRAYS[1:]:
        a, b = mine[name], getattr(theirs, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    z_doc = doc.full_logits(mine["topk_ids"], mine["topk_logits"], mine["tail_lse"])
    z_lib = decode(torch.from_numpy(theirs.topk_ids.astype(np.int64)), torch.from_numpy(theirs.topk_logits),
                   torch.from_numpy(theirs.tail_lse), reader.manifest.num_classes)
    assert np.array_equal(z_doc, z_lib.numpy())  # bit for bit


def test_arrays_have_the_documented_dtypes_shapes_and_order(cache_url):
    doc = DocReader(cache_url)
    codec = doc.manifest["codec"]
    k, C = codec["k"], doc.C
    expected = {"sample_index": "int64", "view_seed": "uint64", "label": "int32", "partner_index": "int64",
                "mix_lam": "float32", "topk_ids": codec["id_dtype"], "topk_logits": codec["value_dtype"],
                "tail_lse": "float32"}
    assert codec["id_dtype"] == "uint8"  # 16 classes
    start = 0
    for s, size in enumerate(doc.shard_sizes):
        group = doc.unit(0, s)
        assert sorted(group.array_keys()) == sorted(DOC_ARRAYS)
        u = doc.read_unit(0, s)
        for name, dtype in expected.items():
            assert u[name].dtype == np.dtype(dtype), name
            assert u[name].shape == ((size, k) if name.startswith("topk_") else (size,)), name
        assert sorted(u["sample_index"]) == list(range(start, start + size))  # the shard's samples, once
        assert np.all(np.diff(u["topk_logits"].astype(np.float32), axis=1) <= 0)  # descending
        assert np.all(u["topk_ids"] < C)
        assert np.all((u["mix_lam"] > 0) & (u["mix_lam"] <= 1))
        unmixed = u["partner_index"] == u["sample_index"]
        assert np.all(u["mix_lam"][unmixed] == 1.0)
        start += size
    assert start == doc.N


def test_commit_crc32_recompute(cache_url):
    doc = DocReader(cache_url)
    for epoch in doc.readable_epochs():
        for s in range(doc.num_shards):
            commit = doc.commit(epoch, s)
            u = doc.read_unit(epoch, s)
            assert set(commit) == {"n", "crc32", "canary"} and set(commit["crc32"]) == set(DOC_ARRAYS)
            assert commit["n"] == doc.shard_sizes[s]
            for name in DOC_ARRAYS:
                assert len(u[name]) == commit["n"]
                assert doc_crc32(u[name]) == commit["crc32"][name], (epoch, s, name)
                # the simpler form given for little-endian machines
                assert zlib.crc32(u[name].tobytes()) == commit["crc32"][name]


def test_view_seeds_follow_the_documented_formula(cache_url, synth_data):
    doc = DocReader(cache_url)
    keys = dataset_keys(synth_data)
    assert len(keys) == doc.N
    cache_seed = doc.manifest["recipe"]["cache_seed"]
    for epoch in (0, 1):
        ep = doc.load_epoch(epoch)
        expected = np.array([doc_view_seed(cache_seed, epoch, key) for key in keys], dtype=np.uint64)
        assert np.array_equal(ep["view_seed"], expected)
    assert doc_view_seed(0, 3, "s0000001") == 1094866549171520790  # the value quoted in FORMAT.md
    assert "1094866549171520790" in FORMAT_MD.read_text()


def test_recipe_digest_as_documented(cache_url):
    m = DocReader(cache_url).manifest
    assert hashlib.sha256(json.dumps(m["recipe"], sort_keys=True).encode()).hexdigest() == m["recipe_sha256"]


def test_only_committed_units_count(tmp_path, built_cache):
    from logitcache.store import CacheReader

    url = str(tmp_path / "copy.zarr")
    shutil.copytree(built_cache, url)
    del zarr.open_group(url, mode="a")["epochs/0001/commits"]["00001"]  # as if killed before committing
    assert DocReader(url).readable_epochs() == CacheReader(url).epochs() == [0]
    assert CacheReader(url).committed_units(1) == [0, 2]


def test_documented_fields_match_a_real_cache(built_cache):
    text = FORMAT_MD.read_text()
    manifest_section = text.split("## Root attributes", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", manifest_section, re.M))
    assert documented == set(DocReader(built_cache).manifest)
    units_section = text.split("## Units", 1)[1].split("### Commit", 1)[0]
    rows = dict(re.findall(r"^\| `(\w+)` \| `?([\w.]+)`? \|", units_section, re.M))
    assert tuple(rows) == DOC_ARRAYS
    from logitcache.store import UNIT_ARRAYS

    assert tuple(UNIT_ARRAYS) == DOC_ARRAYS


def _example_snippet() -> str:
    text = FORMAT_MD.read_text()
    section = text.split("## Example", 1)[1]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_example_snippet_uses_only_zarr_and_numpy():
    tree = ast.parse(_example_snippet())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"zarr", "numpy", "zlib", "hashlib", "math", "json"}, imported


def test_example_snippet_runs(cache_url):
    code = _example_snippet()
    code, count = re.subn(r"^CACHE = .*$", f"CACHE = {cache_url!r}", code, flags=re.M)
    assert count == 1, "the example must set CACHE on one line"
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(FORMAT_MD), "exec"), namespace)
    assert "readable epochs: [0, 1]" in out.getvalue()
    doc = DocReader(cache_url)
    ep = doc.load_epoch(0)
    assert np.array_equal(namespace["z"], doc.full_logits(ep["topk_ids"], ep["topk_logits"], ep["tail_lse"]))
    p = namespace["p_T"]
    assert p.shape == (doc.N, doc.C) and np.allclose(p.sum(1), 1.0)


# -- empty shards: a documented case the library cannot produce ---------------------------


def _empty_unit_arrays(k: int) -> dict[str, np.ndarray]:
    return {"sample_index": np.zeros(0, np.int64), "view_seed": np.zeros(0, np.uint64),
            "label": np.zeros(0, np.int32), "partner_index": np.zeros(0, np.int64),
            "mix_lam": np.zeros(0, np.float32), "topk_ids": np.zeros((0, k), np.uint8),
            "topk_logits": np.zeros((0, k), np.float16), "tail_lse": np.zeros(0, np.float32)}


def test_empty_unit_can_be_written_and_read(tmp_path):
    from logitcache.codec import create_codec
    from logitcache.manifest import DatasetInfo, Manifest
    from logitcache.store import CacheReader
    from logitcache.writer import CacheWriter
    from logitcache.views import create_recipe

    manifest = Manifest(teacher="t", teacher_weights="w", teacher_weights_sha256=None,
                        recipe=create_recipe("demo32"), codec=create_codec("topk", 4, k=2), num_classes=4,
                        dataset=DatasetInfo("d", "train", "fp", 0, ["a.tar"], [0]))
    url = str(tmp_path / "empty.zarr")
    writer = CacheWriter(url, manifest)
    writer.write_unit(0, 0, _empty_unit_arrays(2))
    unit = CacheReader(url).read_unit(0, 0)
    assert unit["topk_ids"].shape == (0, 2)
    assert CacheReader(url).load_epoch(0).topk_ids.shape == (0, 2)  # an empty epoch loads as empty arrays
    assert DocReader(url).readable_epochs() == [0]


def test_build_with_an_empty_shard_makes_a_readable_epoch(tmp_path, tiny_teacher):
    from logitcache.build import build
    from logitcache.codec import create_codec
    from logitcache.data.source import open_source
    from logitcache.data.synth import generate_synth
    from logitcache.store import CacheReader
    from logitcache.teacher import Teacher
    from logitcache.views import create_recipe

    root = tmp_path / "data"
    generate_synth(root, num_classes=16, train_per_class=1, val_per_class=1, image_size=32, seed=1, shard_size=16)
    tarfile.open(root / "train-000001.tar", "w").close()  # a valid tar shard without samples
    meta = json.loads((root / "dataset.json").read_text())
    meta["splits"]["train"]["shards"].append("train-000001.tar")
    (root / "dataset.json").write_text(json.dumps(meta))
    source = open_source(str(root), "train")
    assert [len(s) for s in source.shards] == [16, 0]
    url = str(tmp_path / "cache.zarr")
    build(source, dataset_name="synth", teacher=Teacher("test_resnet", weights=tiny_teacher, num_classes=16),
          recipe=create_recipe("demo32"), codec=create_codec("topk", 16, k=5), url=url, epochs=[0],
          batch_size=16, num_workers=0, progress=False)
    assert CacheReader(url).epochs() == [0]


def _unit_with_indices(index: list[int], k: int = 2) -> dict[str, np.ndarray]:
    n = len(index)
    return {"sample_index": np.array(index, np.int64), "view_seed": np.arange(n, dtype=np.uint64) + 100,
            "label": np.array(index, np.int32) % 4, "partner_index": np.array(index, np.int64),
            "mix_lam": np.ones(n, np.float32), "topk_ids": np.tile(np.arange(k, dtype=np.uint8), (n, 1)),
            "topk_logits": np.array(index, np.float16)[:, None].repeat(k, 1), "tail_lse": np.array(index, np.float32)}


@pytest.mark.parametrize("units, ok", [
    ([[3, 0], [2, 1]], True),          # a permutation across two units: reordered by sample index
    ([[0, 1], [1, 3]], False),         # sample 1 twice, sample 2 missing
    ([[0, 1], [2]], False),            # sample 3 missing
    ([[0, 1], [2, 4]], False),         # an index past the dataset
    ([[0, 1], [2, -1]], False),        # a negative index
])
def test_load_epoch_checks_every_sample_is_covered_exactly_once(tmp_path, units, ok):
    from logitcache.codec import create_codec
    from logitcache.errors import CorruptCacheError
    from logitcache.manifest import DatasetInfo, Manifest
    from logitcache.store import CacheReader
    from logitcache.writer import CacheWriter
    from logitcache.views import create_recipe

    manifest = Manifest(teacher="t", teacher_weights="w", teacher_weights_sha256=None,
                        recipe=create_recipe("demo32"), codec=create_codec("topk", 4, k=2), num_classes=4,
                        dataset=DatasetInfo("d", "train", "fp", 4, ["a.tar", "b.tar"], [2, 2]))
    url = str(tmp_path / "c.zarr")
    writer = CacheWriter(url, manifest)
    writer.prepare_epochs([0])
    for shard, index in enumerate(units):
        writer.write_unit(0, shard, _unit_with_indices(index))
    if ok:
        arrays = CacheReader(url).load_epoch(0)
        np.testing.assert_array_equal(arrays.tail_lse, [0, 1, 2, 3])
        np.testing.assert_array_equal(arrays.topk_logits[:, 0], [0, 1, 2, 3])
        np.testing.assert_array_equal(arrays.view_seed, [101, 101, 100, 100])
    else:
        with pytest.raises(CorruptCacheError, match="exactly once"):
            CacheReader(url).load_epoch(0)
