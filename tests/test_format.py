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

DOC_ARRAYS = {"topk": ("ids", "values", "tail"), "topk_gap": ("ids", "values"), "full": ("values",),
              "sampled": ("unique", "ids", "counts")}


def doc_sha256_json(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def doc_crc32(a: np.ndarray) -> int:
    return zlib.crc32(a.astype(a.dtype.newbyteorder("<")).tobytes(order="C"))


def doc_unpack(stream: np.ndarray, m: int, b: int) -> np.ndarray:
    if m * b == 0:
        return np.zeros(m, np.int64)
    bits = np.unpackbits(stream, count=m * b).reshape(m, b)
    return (bits.astype(np.uint32) << np.arange(b - 1, -1, -1, dtype=np.uint32)).sum(axis=1).astype(np.int64)


class DocReader:
    def __init__(self, url: str):
        self.root = zarr.open_group(url, mode="r")
        self.manifest = self.root.attrs["logitcache"]
        assert self.manifest["format_version"] == 5
        digested = {k: v for k, v in self.manifest.items() if k not in ("manifest_sha256", "created")}
        assert doc_sha256_json(digested) == self.manifest["manifest_sha256"]
        self.codec = self.manifest["codec"]
        self.C = self.manifest["num_classes"]
        self.k = self.codec["k"]
        self.N = self.manifest["dataset"]["num_samples"]
        self.shard_sizes = self.manifest["dataset"]["shard_sizes"]
        self.num_shards = len(self.manifest["dataset"]["shards"])
        gap = self.codec["name"] == "topk" and self.codec["values"].startswith("gap")
        self.arrays = DOC_ARRAYS["topk_gap" if gap else self.codec["name"]]

    def unit(self, epoch: int, shard: int):
        return self.root[f"epochs/{epoch:04d}/units/{shard:05d}"]

    def committed_units(self, epoch: int) -> list[int]:
        path = f"epochs/{epoch:04d}/commits"
        return sorted(int(s) for s in self.root[path].group_keys()) if path in self.root else []

    def commit(self, epoch: int, shard: int) -> dict | None:
        if shard not in self.committed_units(epoch):
            return None
        record = self.root[f"epochs/{epoch:04d}/commits/{shard:05d}"].attrs["commit"]
        assert record["manifest"] == self.manifest["manifest_sha256"]
        return record

    def sealed(self) -> list[int]:
        return sorted(int(e) for e in self.root["seals"].group_keys()) if "seals" in self.root else []

    def readable_epochs(self) -> list[int]:
        names = sorted(int(e) for e in self.root["epochs"].group_keys()) if "epochs" in self.root else []
        complete = [e for e in names if self.committed_units(e) == list(range(self.num_shards))]
        for e in self.sealed():  # a sealed epoch is complete, its records the ones it names
            assert e in complete, f"epoch {e} is damaged"
            seal = self.root[f"seals/{e:04d}"].attrs["seal"]
            assert seal["manifest"] == self.manifest["manifest_sha256"] and seal["units"] == self.num_shards
            assert seal["commits"] == [doc_sha256_json(self.commit(e, s)) for s in range(self.num_shards)]
        return complete

    def read_unit(self, epoch: int, shard: int) -> dict[str, np.ndarray]:
        commit = self.commit(epoch, shard)
        assert commit is not None and commit["n"] == self.shard_sizes[shard]
        group = self.unit(epoch, shard)
        out = {}
        for name in self.arrays:
            arr = group[name]
            out[name] = arr[...] if commit["n"] and arr.size else np.zeros((0,) + arr.shape[1:], arr.dtype)
            assert doc_crc32(out[name]) == commit["crc32"][name], (epoch, shard, name)
        return out

    def unit_logits(self, epoch: int, shard: int) -> np.ndarray:
        """(n, C) float32 logits of a topk/full unit; sampled: (n, C) probabilities counts / N."""
        u, n, C, k, c = self.read_unit(epoch, shard), self.shard_sizes[shard], self.C, self.k, self.codec
        if c["name"] == "sampled":
            m = int(u["unique"].astype(np.int64).sum())
            ids = doc_unpack(u["ids"], m, c["id_bits"])
            counts = doc_unpack(u["counts"], m, max(0, (k - 1).bit_length())) + 1
            rows = np.repeat(np.arange(n), u["unique"].astype(np.int64))
            p = np.zeros((n, C))
            p[rows, ids] = counts / k
            return p
        if c["values"].startswith("gap"):
            b, step = int(c["values"][3:]), np.float32(c["gap_step"])
            if c["name"] == "full":
                return -(doc_unpack(u["values"], n * C, b).reshape(n, C).astype(np.float32) * step)
            codes = np.concatenate([np.zeros((n, 1), np.int64),
                                    np.cumsum(doc_unpack(u["values"], n * k, b).reshape(n, k), axis=1)], axis=1)
            gaps = -(codes.astype(np.float32) * step)
            kept, fill = gaps[:, :k], gaps[:, k]
        else:
            if c["name"] == "full":
                return u["values"].astype(np.float32)
            kept = u["values"].astype(np.float32)
            fill = u["tail"].astype(np.float32) - np.float32(math.log(C - k))
        z = np.repeat(fill[:, None], C, axis=1)
        ids = doc_unpack(u["ids"], n * k, c["id_bits"]).reshape(n, k)
        np.put_along_axis(z, ids, kept, axis=1)
        return z

    def load_epoch(self, epoch: int) -> np.ndarray:
        """(N, C): row i is sample i."""
        return np.concatenate([self.unit_logits(epoch, s) for s in range(self.num_shards)])


def doc_derive_seed(*parts) -> int:
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def doc_view_seed(cache_seed: int, epoch: int, key: str) -> int:
    return doc_derive_seed(cache_seed, epoch, key)


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


@pytest.fixture(scope="module")
def codec_caches(tmp_path_factory, synth_data, tiny_teacher) -> dict[str, str]:
    """One small cache (1 epoch, demo32_mix) per codec that the default build does not cover."""
    from logitcache.build.loop import build
    from logitcache.build.teacher import Teacher
    from logitcache.codecs.logits import create_codec
    from logitcache.data.source import open_source
    from logitcache.views.augment import create_recipe

    source = open_source(synth_data, "train")
    teacher = Teacher("test_resnet", weights=tiny_teacher, num_classes=16)
    root = tmp_path_factory.mktemp("codecs")
    out = {}
    for name, codec in {"topk_float16": create_codec("topk", 16, 5, "float16"),
                        "topk_gap5": create_codec("topk", 16, 4, "gap5"),
                        "full_gap8": create_codec("full", 16), "full_float32": create_codec("full", 16, None, "float32"),
                        "sampled": create_codec("sampled", 16, 20)}.items():
        out[name] = str(root / f"{name}.zarr")
        build(source, dataset_name="synth", teacher=teacher, recipe=create_recipe("demo32_mix"), codec=codec,
              url=out[name], epochs=[0], batch_size=32, num_workers=0, progress=False)
    return out


def _library_rows(reader, epoch: int) -> np.ndarray:
    from logitcache.codecs.logits import decode

    spec = reader.manifest.codec
    ep = reader.load_epoch(epoch)
    z = decode(spec, torch.from_numpy(ep.ids.astype(np.int64)), torch.from_numpy(ep.values),
               torch.from_numpy(ep.tail))
    return torch.softmax(z.double(), 1).numpy() if spec.name == "sampled" else z.numpy()


def _check_doc_reader(url: str) -> None:
    from logitcache.storage.reader import CacheReader

    doc = DocReader(url)
    reader = CacheReader(url)
    assert doc.manifest == reader.manifest.to_dict()
    assert doc.readable_epochs() == reader.epochs()
    for epoch in doc.readable_epochs():
        mine, theirs = doc.load_epoch(epoch), _library_rows(reader, epoch)
        if doc.codec["name"] == "sampled":
            np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-6)  # float32 log and softmax
        else:
            assert mine.dtype == theirs.dtype and np.array_equal(mine, theirs)  # bit for bit


def test_doc_reader_agrees_exactly_with_logitcache(cache_url):
    _check_doc_reader(cache_url)
    assert DocReader(cache_url).readable_epochs() == [0, 1]


@pytest.mark.parametrize("name", ["topk_float16", "topk_gap5", "full_gap8", "full_float32", "sampled"])
def test_doc_reader_agrees_for_every_codec(codec_caches, name):
    _check_doc_reader(codec_caches[name])


def test_arrays_have_the_documented_dtypes_shapes_and_order(cache_url):
    doc = DocReader(cache_url)
    codec = doc.manifest["codec"]
    k, C = codec["k"], doc.C
    assert codec["values"] == "gap8" and codec["id_bits"] == 4 and codec["gap_step"] == 1 / 16  # 16 classes
    for s, size in enumerate(doc.shard_sizes):
        group = doc.unit(0, s)
        assert sorted(group.array_keys()) == ["ids", "values"]
        u = doc.read_unit(0, s)
        assert u["ids"].dtype == u["values"].dtype == np.uint8
        assert u["ids"].shape == ((size * k * 4 + 7) // 8,) and u["values"].shape == (size * k,)  # 8-bit increases
        ids = doc_unpack(u["ids"], size * k, 4).reshape(size, k)
        assert all(len(set(r)) == k for r in ids.tolist())  # distinct classes per row
        increases = doc_unpack(u["values"], size * k, 8).reshape(size, k)
        assert increases.sum() > 0 and increases.max() < 255  # gaps grow, none clipped here
    assert sum(doc.shard_sizes) == doc.N


def test_commit_crc32_and_plan_recompute(cache_url, synth_data):
    doc = DocReader(cache_url)
    keys = dataset_keys(synth_data)
    recipe = doc.manifest["recipe"]
    for epoch in doc.readable_epochs():
        start = 0
        for s in range(doc.num_shards):
            commit = doc.commit(epoch, s)
            u = doc.read_unit(epoch, s)
            assert set(commit) == {"n", "crc32", "plan", "manifest", "canary"}
            assert set(commit["crc32"]) == set(doc.arrays)
            assert commit["n"] == doc.shard_sizes[s]
            for name in doc.arrays:
                assert doc_crc32(u[name]) == commit["crc32"][name], (epoch, s, name)
                assert zlib.crc32(u[name].tobytes()) == commit["crc32"][name]  # the form for little-endian machines
            n = commit["n"]
            seeds = np.array([doc_view_seed(recipe["cache_seed"], epoch, key) for key in keys[start:start + n]],
                             dtype=np.uint64)
            partner = np.arange(n)
            if recipe["mixup_alpha"] > 0 or recipe["cutmix_alpha"] > 0:
                order = np.random.default_rng(doc_derive_seed(recipe["cache_seed"], epoch, "pairing", s)).permutation(n)
                for j in range(n // 2):
                    a, b = order[2 * j], order[2 * j + 1]
                    partner[a], partner[b] = b, a
            digest = hashlib.sha256(seeds.astype("<u8").tobytes() + partner.astype("<i4").tobytes()).hexdigest()
            assert commit["plan"] == digest, (epoch, s)
            start += n


def test_view_seed_formula_as_documented():
    assert doc_view_seed(0, 3, "s0000001") == 1094866549171520790  # the value quoted in FORMAT.md
    assert "1094866549171520790" in FORMAT_MD.read_text()


def test_recipe_digest_as_documented(cache_url):
    m = DocReader(cache_url).manifest
    assert hashlib.sha256(json.dumps(m["recipe"], sort_keys=True).encode()).hexdigest() == m["recipe_sha256"]


def test_only_committed_units_count(tmp_path, built_cache):
    from logitcache.storage.reader import CacheReader

    url = str(tmp_path / "copy.zarr")
    shutil.copytree(built_cache, url)
    del zarr.open_group(url, mode="a")["epochs/0001/commits"]["00001"]  # as if killed before committing
    del zarr.open_group(url, mode="a")["seals"]["0001"]  # (and so before sealing)
    assert DocReader(url).readable_epochs() == CacheReader(url).epochs() == [0]
    assert CacheReader(url).epoch_status().unfinished == [1]
    assert CacheReader(url).committed_units(1) == [0, 2]


def test_documented_fields_match_a_real_cache(built_cache):
    text = FORMAT_MD.read_text()
    manifest_section = text.split("## Root attributes", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", manifest_section, re.M))
    # features: feature caches only; teacher_input_size: builds with --teacher-input-size only
    assert documented == set(DocReader(built_cache).manifest) | {"features", "teacher_input_size"}
    units_section = text.split("## Units", 1)[1].split("### Commit", 1)[0]
    rows = re.findall(r"^\| (\w+)[^|]* \| `(\w+)` \|", units_section, re.M)
    from logitcache.codecs.logits import create_codec
    from logitcache.storage.unit_layout import stored_arrays

    documented = {}
    for codec, array in rows:
        documented.setdefault(codec, []).append(array)
    assert tuple(dict.fromkeys(documented["topk"])) == ("ids", "values", "tail")  # gap rows name ids, values
    assert stored_arrays(create_codec("topk", 16), 3) == DOC_ARRAYS["topk_gap"]
    assert stored_arrays(create_codec("topk", 16, values="float16"), 3) == DOC_ARRAYS["topk"]
    for name in ("full", "sampled"):
        assert tuple(dict.fromkeys(documented[name])) == DOC_ARRAYS[name], name
        assert stored_arrays(create_codec(name, 16), 3) == DOC_ARRAYS[name]
    from logitcache.codecs.features import create_feature_spec

    feature_rows = text.split("### Teacher features", 1)[1].split("The basis is", 1)[0]
    assert set(re.findall(r"^\| [^|]+ \| `(\w+)` \|", feature_rows, re.M)) == {"feat", "feat_scale"}
    assert stored_arrays(create_codec("topk", 16), 3, create_feature_spec(96, 24))[-2:] == ("feat", "feat_scale")
    assert stored_arrays(create_codec("topk", 16), 3, create_feature_spec(96, "full"))[-1:] == ("feat",)


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
    assert np.array_equal(namespace["z"], doc.load_epoch(0))
    p = namespace["p_T"]
    assert p.shape == (doc.N, doc.C) and np.allclose(p.sum(1), 1.0)


# -- empty shards: a documented case the library cannot produce ---------------------------


def _manifest(shard_sizes: list[int], k: int = 2):
    from logitcache.codecs.logits import create_codec
    from logitcache.storage.manifest import DatasetInfo, Manifest
    from logitcache.views.augment import create_recipe

    return Manifest(teacher="t", teacher_weights="w", teacher_weights_sha256=None,
                    recipe=create_recipe("demo32"), codec=create_codec("topk", 4, k=k), num_classes=4,
                    dataset=DatasetInfo("d", "train", "fp", sum(shard_sizes), [f"{i}.tar" for i in range(len(shard_sizes))],
                                        shard_sizes))


def test_empty_unit_can_be_written_and_read(tmp_path):
    from logitcache.codecs.logits import encode
    from logitcache.storage.reader import CacheReader
    from logitcache.storage.writer import CacheWriter
    from logitcache.views.plan import plan_digest

    manifest = _manifest([0])
    url = str(tmp_path / "empty.zarr")
    writer = CacheWriter(url, manifest)
    writer.write_unit(0, 0, encode(manifest.codec, torch.zeros(0, 4)), plan_digest(np.zeros(0), np.zeros(0)))
    assert CacheReader(url).read_unit(0, 0)["ids"].shape == (0,)
    assert CacheReader(url).load_epoch(0).ids.shape == (0, 2)  # an empty epoch loads as empty arrays
    assert DocReader(url).readable_epochs() == [0]
    assert DocReader(url).load_epoch(0).shape == (0, 4)


def test_build_with_an_empty_shard_makes_a_readable_epoch(tmp_path, tiny_teacher):
    from logitcache.build.loop import build
    from logitcache.build.teacher import Teacher
    from logitcache.codecs.logits import create_codec
    from logitcache.data.source import open_source
    from logitcache.data.synth import generate_synth
    from logitcache.storage.reader import CacheReader
    from logitcache.views.augment import create_recipe

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


def test_a_unit_must_hold_one_row_per_sample_of_its_shard(tmp_path):
    """Rows are implicit sample indices: a writer refuses a unit of the wrong size, and a
    reader refuses a committed unit whose record says another row count."""
    from logitcache.codecs.logits import encode
    from logitcache.errors import CorruptCacheError
    from logitcache.storage.layout import commit_path
    from logitcache.storage.reader import CacheReader
    from logitcache.storage.writer import CacheWriter
    from logitcache.views.plan import plan_digest

    manifest = _manifest([2, 2])
    url = str(tmp_path / "c.zarr")
    writer = CacheWriter(url, manifest)
    writer.prepare_epochs([0])
    rows = encode(manifest.codec, torch.arange(12.0).reshape(3, 4))
    with pytest.raises(ValueError, match="needs 2 rows"):
        writer.write_unit(0, 0, rows, "p")
    two = {k: v[:2] for k, v in rows.items()}
    for shard in (0, 1):
        writer.write_unit(0, shard, two, plan_digest(np.zeros(2), np.zeros(2)),
                          canary={"index": [2 * shard], "sha256": ["0" * 64]})
    assert CacheReader(url).load_epoch(0).num_views == 4
    record = zarr.open_group(url, mode="a")[commit_path(0, 1)]
    commit = record.attrs["commit"]
    commit["n"] = 3
    record.attrs["commit"] = commit
    with pytest.raises(CorruptCacheError, match="epoch 0, unit 1 .*holds 3 rows for a shard of 2"):
        CacheReader(url).load_epoch(0)
