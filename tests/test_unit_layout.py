"""Tests for logitcache/storage/unit_layout.py: format 3 arrays of every codec (round trip, sizes)
and the format 1/2 reader (:func:`legacy_rows`).

Property tests use hypothesis with ``deadline=None`` and at most 50 examples each.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.codecs.bitpack import packed_size, unpack_bits
from logitcache.codecs.logits import CodecSpec, create_codec, decode, encode
from logitcache.storage.unit_layout import (
    LEGACY_ARRAYS,
    legacy_rows,
    pack_unit,
    stored_arrays,
    unpack_unit,
)
from logitcache.views.plan import plan_digest

SETTINGS = settings(max_examples=50, deadline=None)

CODECS = [("topk", "gap2"), ("topk", "gap8"), ("topk", "gap12"), ("topk", "gap16"), ("topk", "float16"),
          ("topk", "float32"), ("full", "gap2"), ("full", "gap8"), ("full", "gap16"), ("full", "float32"),
          ("sampled", 1), ("sampled", 7), ("sampled", 32), ("sampled", 300)]


@st.composite
def unit(draw, name, param):
    """(spec, teacher rows of n rows from encode); n may be 0."""
    c = draw(st.integers(1 if name == "full" else 2, 300), label="C")
    n = draw(st.integers(0, 12), label="n")
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
    z = rng.standard_normal((n, c)).astype(np.float32) * scale
    if n and draw(st.booleans()):  # ties
        z[:, : c // 2] = z[:, :1]
    if name == "sampled":
        spec = create_codec("sampled", c, k=param)
    elif name == "full":
        spec = create_codec("full", c, values=param)
    else:
        spec = create_codec("topk", c, k=draw(st.integers(1, c - 1), label="k"), values=param)
    assert spec.name == name
    seeds = rng.integers(0, 2**63, size=n, dtype=np.uint64)
    return spec, encode(spec, torch.from_numpy(z), seeds=seeds)


def _expected_nbytes(spec: CodecSpec, rows: dict[str, np.ndarray]) -> dict[str, int]:
    """The sizes the module docstring documents, per array: topk ids n * k * id_bits bits;
    gap values n * k * b bits (topk: k - 1 kept gaps and the fill, as increases) or
    n * C * b bits (full); float values n * k of the dtype, and topk float's tail_lse."""
    n, c, k = len(rows["ids"]), spec.num_classes, spec.k
    if spec.name == "sampled":
        u = int((rows["values"] > 0).sum())
        return {"unique": n * rows["values"].dtype.itemsize, "ids": packed_size(u, spec.id_bits),
                "counts": packed_size(u, spec.count_bits)}
    if spec.quantised:
        values = packed_size(n * (k if spec.name == "topk" else c), spec.value_bits)
        id_bits = n * k * spec.id_bits if spec.name == "topk" else 0
        assert values == (n * spec.payload_bits_per_view - id_bits + 7) // 8
    else:
        values = n * k * np.dtype(spec.values).itemsize
    if spec.name == "full":
        return {"values": values}
    if spec.quantised:
        return {"ids": packed_size(n * k, spec.id_bits), "values": values}
    return {"ids": packed_size(n * k, spec.id_bits), "values": values, "tail": n * 4}


def _decode(spec: CodecSpec, rows: dict[str, np.ndarray]) -> torch.Tensor:
    return decode(spec, *(torch.from_numpy(np.ascontiguousarray(rows[key])) for key in ("ids", "values", "tail")))


def _check_round_trip(spec: CodecSpec, rows: dict[str, np.ndarray]) -> None:
    n = len(rows["ids"])
    arrays = pack_unit(spec, rows)
    assert tuple(arrays) == stored_arrays(spec, 3)
    expected = _expected_nbytes(spec, rows)
    assert {key: a.nbytes for key, a in arrays.items()} == expected
    assert sum(a.nbytes for a in arrays.values()) == sum(expected.values())
    for key in arrays:
        if key in ("ids", "counts") or (key == "values" and spec.quantised):
            assert arrays[key].dtype == np.uint8 and arrays[key].ndim == 1, key  # a bit stream
    if spec.name == "topk" and not spec.quantised:
        assert arrays["tail"].dtype == np.float32 and arrays["tail"].shape == (n,)
    if spec.quantised:  # the stream holds what the module docstring says
        width = spec.k if spec.name == "topk" else spec.num_classes
        stored = unpack_bits(arrays["values"], n * width, spec.value_bits).astype(np.int64).reshape(n, width)
        codes = rows["values"].astype(np.int64)
        if spec.name == "topk":  # each code's increase over the previous one: 2nd .. k-th kept, then the fill
            assert np.all(codes[:, 0] == 0)
            codes = np.concatenate([codes, rows["tail"][:, None].astype(np.int64)], axis=1)
            assert np.array_equal(stored, codes[:, 1:] - codes[:, :-1])
        else:  # the codes in class order
            assert np.array_equal(stored, codes)
    back = unpack_unit(spec, arrays, n)
    assert set(back) == {"ids", "values", "tail"}
    if spec.name == "sampled":
        width = int((rows["values"] > 0).sum(axis=1).max()) if n else 0
        for key in ("ids", "values"):
            assert back[key].dtype == rows[key].dtype, key
            assert back[key].shape == (n, width), key
            assert np.array_equal(back[key], rows[key][:, :width]), key
            assert not rows[key][:, width:].any(), key  # only zero padding is dropped
        assert back["tail"].shape == (n,) and not back["tail"].any()
    else:
        for key in ("ids", "values", "tail"):
            assert back[key].dtype == rows[key].dtype, key
            assert back[key].shape == rows[key].shape, key
            assert np.array_equal(back[key], rows[key]), key
    assert torch.equal(_decode(spec, back), _decode(spec, rows))
    # a truncated bit stream is refused, not read as zeros
    for key in ("ids", "values", "counts"):
        a = arrays.get(key)
        if a is not None and a.ndim == 1 and a.dtype == np.uint8 and a.size and (key != "values" or spec.quantised):
            with pytest.raises(ValueError, match="fewer than"):
                unpack_unit(spec, {**arrays, key: a[:-1]}, n)


@pytest.mark.parametrize(("name", "param"), CODECS, ids=[f"{a}-{b}" for a, b in CODECS])
@SETTINGS
@given(data=st.data())
def test_round_trip_through_the_unit_layout(name, param, data):
    spec, rows = data.draw(unit(name, param))
    _check_round_trip(spec, rows)


@pytest.mark.parametrize(("name", "param"), CODECS, ids=[f"{a}-{b}" for a, b in CODECS])
def test_round_trip_of_an_empty_unit(name, param):
    c = 50
    if name == "sampled":
        spec = create_codec("sampled", c, k=param)
    else:
        spec = create_codec(name, c, k=5, values=param)
    rows = encode(spec, torch.zeros(0, c), seeds=np.zeros(0, np.uint64))
    arrays = pack_unit(spec, rows)
    assert sum(a.nbytes for a in arrays.values()) == 0
    back = unpack_unit(spec, arrays, 0)
    assert all(len(back[key]) == 0 for key in ("ids", "values", "tail"))
    assert back["values"].dtype == rows["values"].dtype and back["ids"].dtype == rows["ids"].dtype
    assert _decode(spec, back).shape == (0, c)


def test_sampled_layout_by_hand():
    """Two rows over C = 5 with N = 4: {1: 3, 4: 1} and {2: 4}."""
    spec = CodecSpec("sampled", 4, 5)
    assert spec.id_bits == 3 and spec.count_bits == 2
    rows = {"ids": np.array([[1, 4, 0, 0], [2, 0, 0, 0]], np.uint8),
            "values": np.array([[3, 1, 0, 0], [4, 0, 0, 0]], np.uint8), "tail": np.zeros(2, np.uint8)}
    arrays = pack_unit(spec, rows)
    assert arrays["unique"].tolist() == [2, 1]
    # ids 1, 4, 2 at 3 bits: 001 100 010 -> 00110001 0(0000000)
    assert arrays["ids"].tolist() == [0b00110001, 0]
    # counts - 1 = 2, 0, 3 at 2 bits: 10 00 11 -> 10001100
    assert arrays["counts"].tolist() == [0b10001100]
    back = unpack_unit(spec, arrays, 2)
    assert back["ids"].tolist() == [[1, 4], [2, 0]] and back["values"].tolist() == [[3, 1], [4, 0]]


def test_topk_gap_layout_by_hand():
    """Two rows, C = 4, k = 3, gap2 (2 bits). Row 0: ids 3, 0, 2, codes 0, 1, 4 and the fill's
    6 -> increases 1, 3, 2 (code 4 is past 2**2 - 1: only increases must fit); row 1: ids
    1, 2, 3, codes 0, 0, 0, fill 3 -> increases 0, 0, 3. The top's 0 is not stored; no tail array."""
    spec = CodecSpec("topk", 3, 4, "gap2")
    rows = {"ids": np.array([[3, 0, 2], [1, 2, 3]], np.uint8), "values": np.array([[0, 1, 4], [0, 0, 0]], np.uint16),
            "tail": np.array([6, 3], np.uint16)}
    arrays = pack_unit(spec, rows)
    assert tuple(arrays) == ("ids", "values")
    # ids 11 00 10 | 01 10 11
    assert arrays["ids"].tolist() == [0b11001001, 0b10110000]
    # increases 01 11 10 | 00 00 11
    assert arrays["values"].tolist() == [0b01111000, 0b00110000]
    back = unpack_unit(spec, arrays, 2)
    for key in rows:
        assert np.array_equal(back[key], rows[key]) and back[key].dtype == rows[key].dtype, key
    # an increase past 2**b - 1 cannot be stored
    with pytest.raises(ValueError, match="does not fit"):
        pack_unit(spec, {**rows, "tail": np.array([8, 3], np.uint16)})


def test_full_gap_layout_by_hand():
    """One row, C = 3, gap2: codes 2, 0, 3 in class order -> 10 00 11."""
    spec = CodecSpec("full", 3, 3, "gap2")
    rows = {"ids": np.zeros((1, 0), np.uint8), "values": np.array([[2, 0, 3]], np.uint16),
            "tail": np.zeros(1, np.uint8)}
    arrays = pack_unit(spec, rows)
    assert tuple(arrays) == ("values",) and arrays["values"].tolist() == [0b10001100]
    back = unpack_unit(spec, arrays, 1)
    assert back["values"].tolist() == [[2, 0, 3]] and back["values"].dtype == np.uint16


def test_stored_arrays_names():
    topk, full, sampled = create_codec("topk", 10, k=3), create_codec("full", 10), create_codec("sampled", 10)
    topk_fp, full_fp = create_codec("topk", 10, k=3, values="float16"), create_codec("full", 10, values="float32")
    for spec in (topk, full, sampled, topk_fp, full_fp):
        assert stored_arrays(spec, 1) == stored_arrays(spec, 2) == LEGACY_ARRAYS
    assert stored_arrays(topk, 3) == ("ids", "values")  # the fill's code is the last increase in values
    assert stored_arrays(topk_fp, 3) == ("ids", "values", "tail")
    assert stored_arrays(full, 3) == stored_arrays(full_fp, 3) == ("values",)
    assert stored_arrays(sampled, 3) == ("unique", "ids", "counts")


# -- formats 1 and 2 -----------------------------------------------------------------------------


def _legacy_unit(spec: CodecSpec, start: int, n: int, seed: int):
    """A format-2 style unit in build order, and what it holds in sample order:
    (arrays, expected rows, expected digest)."""
    rng = np.random.default_rng(seed)
    c, k = spec.num_classes, spec.k
    z = rng.standard_normal((n, c)).astype(np.float32) * 4
    ids = np.argsort(-z, axis=1, kind="stable")[:, :k]
    logits = np.take_along_axis(z, ids, axis=1).astype(np.float16)
    if spec.name == "full":
        tail = np.full(n, -np.inf, np.float32)
    else:
        rest = np.ones_like(z, dtype=bool)
        np.put_along_axis(rest, ids, False, axis=1)
        tail = np.array([np.logaddexp.reduce(z[r][rest[r]].astype(np.float64)) for r in range(n)], np.float32)
    seeds = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    partner = np.arange(n)  # positions in sample order; pair up a few
    pairs = rng.permutation(n)[: 2 * (n // 3)].reshape(-1, 2)
    partner[pairs[:, 0]], partner[pairs[:, 1]] = pairs[:, 1], pairs[:, 0]
    labels = rng.integers(0, c, size=n)
    lam = rng.random(n).astype(np.float32)
    order = rng.permutation(n)  # build order: row i holds sample start + order[i]
    while n > 1 and np.array_equal(order, np.arange(n)):
        order = rng.permutation(n)
    arrays = {"sample_index": (start + order).astype(np.int64), "view_seed": seeds[order],
              "label": labels[order].astype(np.int64), "partner_index": (start + partner[order]).astype(np.int64),
              "mix_lam": lam[order], "topk_ids": ids[order].astype(spec.id_dtype), "topk_logits": logits[order],
              "tail_lse": tail[order]}
    assert tuple(arrays) == LEGACY_ARRAYS
    return arrays, {"z": z, "ids": ids, "logits": logits, "tail": tail}, plan_digest(seeds, partner)


@pytest.mark.parametrize("n", [1, 2, 9, 40])
@pytest.mark.parametrize("start", [0, 1000])
def test_legacy_topk_rows(n, start):
    spec = CodecSpec.from_dict({"name": "topk", "k": 3, "num_classes": 8, "value_dtype": "float16",
                                "id_dtype": "uint8"})
    arrays, want, digest = _legacy_unit(spec, start, n, seed=n + start)
    rows, got_digest = legacy_rows(spec, arrays, start)
    assert np.array_equal(rows["ids"], want["ids"]) and rows["ids"].dtype == np.uint8
    assert np.array_equal(rows["values"], want["logits"]) and rows["values"].dtype == np.float16
    assert np.array_equal(rows["tail"], want["tail"]) and rows["tail"].dtype == np.float32
    assert got_digest == digest
    if n > 1:  # the digest is of sample order, not build order
        assert got_digest != plan_digest(arrays["view_seed"], arrays["partner_index"] - start)
    # the rows decode as the teacher rows of a float16 topk codec
    out = decode(spec, *(torch.from_numpy(rows[key]) for key in ("ids", "values", "tail")))
    ids = torch.from_numpy(want["ids"])
    assert torch.equal(out.gather(1, ids), torch.from_numpy(want["logits"]).float())
    rest = torch.ones(n, 8, dtype=torch.bool).scatter(1, ids, False)
    fill = torch.from_numpy(want["tail"]) - math.log(8 - 3)
    assert torch.allclose(out[rest].view(n, 5), fill[:, None].expand(n, 5))


@pytest.mark.parametrize("n", [1, 7])
def test_legacy_full_rows_come_back_in_class_order(n):
    spec = CodecSpec.from_dict({"name": "full", "k": 6, "num_classes": 6, "value_dtype": "float16",
                                "id_dtype": "uint8"})
    arrays, want, digest = _legacy_unit(spec, 50, n, seed=n)
    assert not np.all(arrays["topk_ids"] == np.arange(6))  # stored by descending logit, not class order
    rows, got_digest = legacy_rows(spec, arrays, 50)
    assert rows["ids"].shape == (n, 0)
    assert rows["values"].dtype == np.float16
    assert np.array_equal(rows["values"], want["z"].astype(np.float16))
    assert got_digest == digest
    out = decode(spec, *(torch.from_numpy(rows[key]) for key in ("ids", "values", "tail")))
    assert torch.equal(out, torch.from_numpy(want["z"].astype(np.float16)).float())
