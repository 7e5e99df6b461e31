"""The cache's own metadata is as checked as its arrays (issue 22): an edit of any manifest
field that changes what is served is refused, even when the editor recomputed the digests;
a sealed epoch that lost a commit record or its folder is damage, an unfinished build's epoch
is unfinished; commit records, seals and array metadata are checked; all of it one line
through ``train``, ``inspect`` and ``verify``. Old formats (3) still read, as documented."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zarr
from cache_edit import as_format, edit_commit, edit_manifest
from main_entry import one_error_line, run_main, run_main_output

from logitcache.errors import CorruptCacheError, LogitcacheError
from logitcache.storage.layout import commit_path, unit_path
from logitcache.storage.manifest_schema import manifest_digest
from logitcache.storage.reader import CacheReader


def _copy(src: str, tmp_path: Path, name: str = "cache.zarr") -> str:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return str(dst)


def _train(url: str, synth_data: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--data", synth_data, "--cache", url, "--student", "test_resnet", "--epochs", "1",
            "--limit-batches", "1", "--batch-size", "16", "--workers", "0", "--no-progress", "--no-tensorboard",
            "--device", "cpu", "--reuse-epochs", "--out", str(tmp_path / "run"), *extra]


def _refused_everywhere(url: str, synth_data: str, tiny_teacher: str, tmp_path: Path, capsys, *names: str) -> None:
    """``train``, ``inspect --data`` and ``verify`` each stop with exit 2 and one line naming
    the cache and ``names``."""
    for args in (_train(url, synth_data, tmp_path), ["inspect", url, "--data", synth_data],
                 ["verify", url, "--data", synth_data, "--teacher-weights", tiny_teacher, "--sample", "8",
                  "--device", "cpu"]):
        line = one_error_line(*run_main(args, capsys))
        assert url in line and all(n in line for n in names), (args[0], line)


def _set(doc: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for p in parents:
        doc = doc[p]
    doc[last] = value


#: Manifest edits that would change what is served: (cache, field, new value).
SERVED_EDITS = [
    ("plain", "codec.k", 4),
    ("plain", "codec.values", "gap7"),
    ("plain", "teacher_input_size", 48),
    ("plain", "dataset.shard_sizes", None),  # two shards' sizes swapped
    ("features", "features.spec.dtype", "float16"),
    ("features", "features.spec.rank", 7),
]


def _edited(doc: dict, field: str, value) -> None:
    if field == "dataset.shard_sizes":
        sizes = doc["dataset"]["shard_sizes"]
        sizes[0], sizes[1] = sizes[1] + 1, sizes[0] - 1
        return
    _set(doc, field, value)
    if field == "codec.values":
        doc["codec"]["gap_step"] = 16 / 2 ** int(value[3:])
    if field == "features.spec.dtype":
        doc["features"]["label"] = f"pca{doc['features']['spec']['rank']}/{value}"
    if field == "features.spec.rank":
        doc["features"]["label"] = f"pca{value}/{doc['features']['spec']['dtype']}"


@pytest.fixture
def caches(built_cache, small_feature_cache) -> dict[str, str]:
    return {"plain": built_cache, "features": small_feature_cache}


@pytest.mark.parametrize("which, field, value", SERVED_EDITS, ids=[f"{f}={v}" for _, f, v in SERVED_EDITS])
def test_a_manifest_edit_that_changes_what_is_served_is_refused(which, field, value, caches, synth_data,
                                                                tiny_teacher, tmp_path, capsys):
    """A careless edit fails the manifest's own digest; a careful one (digest recomputed) fails
    the digest every commit record names."""
    url = _copy(caches[which], tmp_path)
    root = Path(url) / "zarr.json"
    doc = json.loads(root.read_text())
    _edited(doc["attributes"]["logitcache"], field, value)
    root.write_text(json.dumps(doc))
    _refused_everywhere(url, synth_data, tiny_teacher, tmp_path, capsys, "manifest")

    m = doc["attributes"]["logitcache"]
    m["manifest_sha256"] = manifest_digest(m)
    root.write_text(json.dumps(doc))
    with pytest.raises(CorruptCacheError, match=r"epoch 0(: seal seals/0000:|, unit 0 ).*another manifest"):
        CacheReader(url).load_epoch(0)
    _refused_everywhere(url, synth_data, tiny_teacher, tmp_path, capsys, "manifest")


def test_a_recipe_edit_with_both_digests_recomputed_is_refused(built_cache, synth_data, tiny_teacher, tmp_path,
                                                               capsys):
    import hashlib

    url = _copy(built_cache, tmp_path)

    def edit(m):
        m["recipe"]["re_prob"] = 0.25
        m["recipe_sha256"] = hashlib.sha256(json.dumps(m["recipe"], sort_keys=True).encode()).hexdigest()
        m["manifest_sha256"] = manifest_digest(m)

    root = zarr.open_group(url, mode="a")
    doc = dict(root.attrs["logitcache"])
    edit(doc)
    root.attrs["logitcache"] = doc
    _refused_everywhere(url, synth_data, tiny_teacher, tmp_path, capsys, "another manifest")


def test_an_edit_of_created_alone_serves_the_same_cache(built_cache, tmp_path):
    url = _copy(built_cache, tmp_path)
    edit_manifest(url, lambda m: m.__setitem__("created", "2020-01-01T00:00:00+00:00"))
    a, b = CacheReader(url).load_epoch(1), CacheReader(built_cache).load_epoch(1)
    assert (a.ids == b.ids).all() and (a.values == b.values).all() and a.plans == b.plans


# -- sealed, unfinished and damaged epochs -----------------------------------------------------


def test_every_finished_epoch_is_sealed_with_its_commit_records(built_cache):
    from logitcache.storage.seals import commit_digest

    reader = CacheReader(built_cache)
    root = zarr.open_group(built_cache, mode="r")
    for e in (0, 1):
        seal = root[f"seals/{e:04d}"].attrs["seal"]
        assert seal == {"manifest": reader.manifest_digest, "units": 3,
                        "commits": [commit_digest(reader.commit(e, s)) for s in range(3)]}
    status = reader.epoch_status()
    assert status.complete == [0, 1] and not status.unfinished and not status.damaged


@pytest.mark.parametrize("lost", ["commit record", "epoch folder"])
def test_a_sealed_epoch_that_lost_data_is_damage_and_can_be_skipped(lost, built_cache, synth_data, tiny_teacher,
                                                                    tmp_path, capsys):
    url = _copy(built_cache, tmp_path)
    shutil.rmtree(Path(url) / (commit_path(1, 2) if lost == "commit record" else "epochs/0001"))
    status = CacheReader(url).epoch_status()
    assert status.complete == [0] and list(status.damaged) == [1] and not status.unfinished
    what = "commit records are missing for unit 2" if lost == "commit record" else "folder epochs/0001 is missing"
    _refused_everywhere(url, synth_data, tiny_teacher, tmp_path, capsys, "epoch 1", "sealed", what, "--recheck")
    line = one_error_line(*run_main(_train(url, synth_data, tmp_path), capsys))
    assert "--skip-damaged-epochs" in line
    with pytest.warns(UserWarning, match="epoch 1 was finished and sealed"):  # which epoch and why
        code, out, err = run_main_output(_train(url, synth_data, tmp_path, "--skip-damaged-epochs"), capsys)
    assert code == 0, err
    assert "training on cached epochs 0 " in out and "damaged epochs 1 are left out" in out, out


def test_rebuilding_repairs_a_damaged_epoch_and_seals_it_again(built_cache, synth_data, tiny_teacher, tmp_path,
                                                               capsys):
    url = _copy(built_cache, tmp_path)
    before = zarr.open_group(url, mode="r")["seals/0001"].attrs["seal"]
    shutil.rmtree(Path(url) / commit_path(1, 2))
    code, _, err = run_main_output(
        ["build", "--data", synth_data, "--teacher", "test_resnet", "--teacher-weights", tiny_teacher, "--recipe",
         "demo32", "--epochs", "2", "--topk", "5", "--out", url, "--batch-size", "16", "--workers", "0",
         "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    status = CacheReader(url).epoch_status()
    assert status.complete == [0, 1] and not status.damaged
    assert zarr.open_group(url, mode="r")["seals/0001"].attrs["seal"] == before  # the same unit, rebuilt


def test_an_unfinished_epoch_is_reported_unfinished(built_cache, synth_data, tmp_path, capsys):
    url = _copy(built_cache, tmp_path)
    shutil.rmtree(Path(url) / commit_path(1, 2))  # what a build killed before its last unit leaves:
    shutil.rmtree(Path(url) / "seals" / "0001")  # no seal either
    assert CacheReader(url).epoch_status().unfinished == [1]
    code, out, err = run_main_output(_train(url, synth_data, tmp_path), capsys)
    assert code == 0, err
    assert "epochs 1 are unfinished" in out and "a build has not finished them" in out, out
    code, out, _ = run_main_output(["inspect", url], capsys)
    assert code == 0 and "unfinished (a build has not finished them): 1" in out


def test_a_deleted_seal_alone_leaves_a_complete_readable_epoch(built_cache, tmp_path):
    url = _copy(built_cache, tmp_path)
    shutil.rmtree(Path(url) / "seals" / "0000")
    assert CacheReader(url).epochs() == [0, 1]
    from logitcache.storage.stats import inspect_cache

    assert inspect_cache(url).checks["seals"] == "1 complete epoch against its seal"  # epoch 1's; 0 has none
    assert (CacheReader(url).load_epoch(0).ids == CacheReader(built_cache).load_epoch(0).ids).all()


def test_a_unit_copied_from_another_epoch_fails_the_seal(built_cache, synth_data, tiny_teacher, tmp_path, capsys):
    url = _copy(built_cache, tmp_path)
    for path in (unit_path, commit_path):
        shutil.rmtree(Path(url) / path(0, 1))
        shutil.copytree(Path(url) / path(1, 1), Path(url) / path(0, 1))
    with pytest.raises(CorruptCacheError, match="epoch 0, unit 1: its commit record is not the one the epoch was "
                                                "sealed with"):
        CacheReader(url).load_epoch(0)
    _refused_everywhere(url, synth_data, tiny_teacher, tmp_path, capsys, "epoch 0, unit 1", "sealed with")


def test_a_damaged_seal_is_one_line(built_cache, tmp_path):
    url = _copy(built_cache, tmp_path)
    meta = Path(url) / "seals" / "0000" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["seal"]["units"] = 2 ** 62
    meta.write_text(json.dumps(doc))
    with pytest.raises(CorruptCacheError, match=r"epoch 0: seal seals/0000: fields units and commits"):
        CacheReader(url).load_epoch(0)
    meta.write_text("{not json")
    with pytest.raises(CorruptCacheError, match=r"epoch 0: seal seals/0000 is unreadable"):
        CacheReader(url).load_epoch(0)


# -- commit records and array metadata ---------------------------------------------------------


def test_a_commit_record_past_the_shard_count_is_damage(built_cache, synth_data, tiny_teacher, tmp_path, capsys):
    url = _copy(built_cache, tmp_path)
    shutil.copytree(Path(url) / commit_path(0, 0), Path(url) / commit_path(0, 7))
    with pytest.raises(CorruptCacheError, match=r"epoch 0: commit record epochs/0000/commits/00007 names unit 7, "
                                                r"past the manifest's 3 shards"):
        CacheReader(url).epochs()
    _refused_everywhere(url, synth_data, tiny_teacher, tmp_path, capsys, "epoch 0", "00007")


@pytest.mark.parametrize("change", ["no canary", "an extra field", "manifest of another cache"])
def test_a_commit_record_of_the_wrong_form_is_damage(change, built_cache, synth_data, tiny_teacher, tmp_path,
                                                     capsys):
    url = _copy(built_cache, tmp_path)
    edits = {"no canary": lambda c: c.pop("canary"), "an extra field": lambda c: c.__setitem__("note", 1),
             "manifest of another cache": lambda c: c.__setitem__("manifest", "0" * 64)}
    edit_commit(url, 0, 1, edits[change])  # resealed: the record itself is what is wrong
    names = {"no canary": "canary is missing", "an extra field": "'note' is not a field",
             "manifest of another cache": "another manifest"}[change]
    _refused_everywhere(url, synth_data, tiny_teacher, tmp_path, capsys, "epoch 0, unit 1", names)


def test_an_edited_array_dtype_is_damage_though_its_bytes_pass(small_feature_cache, tmp_path):
    url = _copy(small_feature_cache, tmp_path)
    for array, dtype in (("values", "int16"), ("feat", "uint8")):
        meta = Path(url) / unit_path(0, 1) / array / "zarr.json"
        original = meta.read_text()
        doc = json.loads(original)
        doc["data_type"] = dtype
        doc["fill_value"] = 0
        meta.write_text(json.dumps(doc))
        with pytest.raises(CorruptCacheError, match=rf"epoch 0, unit 1 .*array {array}: is {dtype} of shape .* the "
                                                    rf"format stores"):
            CacheReader(url).load_epoch(0, features=True)
        meta.write_text(original)


def test_the_features_entry_is_checked(small_feature_cache, tmp_path):
    url = _copy(small_feature_cache, tmp_path)
    for field, value, names in (("features.spec.dtype", "int4", "features.spec.dtype"),
                                ("features.spec.dim", 2 ** 40, "features.spec.dim"),
                                ("features.basis_sha256", None, "features.basis_sha256"),
                                ("features.label", "pca9/int8", "features.label"),
                                ("features.fit_views", "32", "features.fit_views")):
        edit_manifest(url, lambda m: _set(m, field, value))
        with pytest.raises(LogitcacheError, match=names):
            CacheReader(url)
        shutil.rmtree(url)
        shutil.copytree(small_feature_cache, url)


# -- format 3: read as before, checked as documented ---------------------------------------------


def test_a_format_3_cache_reads_and_trains_and_says_what_it_cannot_check(built_cache, synth_data, tmp_path, capsys):
    url = _copy(built_cache, tmp_path)
    as_format(url, 3)
    reader = CacheReader(url)
    assert reader.format_version == 3 and reader.manifest_digest is None and reader.epochs() == [0, 1]
    ref = CacheReader(built_cache)
    assert (reader.load_epoch(1).values == ref.load_epoch(1).values).all()
    code, out, err = run_main_output(_train(url, synth_data, tmp_path), capsys)
    assert code == 0, err
    code, out, _ = run_main_output(["inspect", url], capsys)
    assert code == 0 and "format 3 has no manifest digest" in out and "format 3 has no seals" in out
    shutil.rmtree(Path(url) / "epochs" / "0001")  # no seals: a lost epoch cannot be told from an unfinished one
    assert CacheReader(url).epoch_status().complete == [0] and not CacheReader(url).epoch_status().damaged
    edit_commit(url, 0, 0, lambda c: c.__setitem__("manifest", "0" * 64))
    with pytest.raises(CorruptCacheError, match="'manifest' is not a field of a format 3 commit record"):
        CacheReader(url).load_epoch(0)


def test_an_array_claiming_a_huge_shape_is_refused_before_allocating(built_cache, tmp_path):
    url = _copy(built_cache, tmp_path)
    meta = Path(url) / unit_path(0, 2) / "values" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"] = [2 ** 50]  # 1 PiB of uint8: would be allocated by a plain read
    meta.write_text(json.dumps(doc))
    with pytest.raises(CorruptCacheError, match=r"epoch 0, unit 2 .*array values: cannot read it .*claims "
                                                r"1,125,899,906,842,624 bytes"):
        CacheReader(url).load_epoch(0)


def test_a_seal_written_again_replaces_the_old_one_even_a_damaged_one(built_cache, tmp_path):
    from logitcache.storage.seals import write_seal

    url = _copy(built_cache, tmp_path)
    root = zarr.open_group(url, mode="a")
    seal = root["seals/0000"].attrs["seal"]
    write_seal(root, 0, {**seal, "units": 9})  # what a second process finishing the epoch does
    assert zarr.open_group(url, mode="r")["seals/0000"].attrs["seal"]["units"] == 9
    (Path(url) / "seals" / "0000" / "zarr.json").write_text("{garbled")
    write_seal(zarr.open_group(url, mode="a"), 0, seal)
    assert CacheReader(url).load_epoch(0).num_views == CacheReader(built_cache).load_epoch(0).num_views
