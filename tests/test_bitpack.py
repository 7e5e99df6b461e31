"""Tests for logitcache/codecs/bitpack.py: fixed-width MSB-first bit streams.

Property tests use hypothesis with ``deadline=None`` and at most 50 examples each.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.codecs.bitpack import bits_for, pack_bits, packed_size, unpack_bits

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def values_and_bits(draw, min_bits=0, max_bits=32, max_m=200):
    """(values (m,) uint64 < 2**bits, bits); m may be 0."""
    bits = draw(st.integers(min_bits, max_bits))
    m = draw(st.integers(0, max_m))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    hi = 1 << bits
    values = rng.integers(0, hi, size=m, dtype=np.uint64) if bits else np.zeros(m, np.uint64)
    if m and bits and draw(st.booleans()):  # the extremes of the range
        values[0] = hi - 1
        values[-1] = 0
    return values, bits


@SETTINGS
@given(values_and_bits())
def test_round_trip_and_size(vb):
    values, bits = vb
    m = len(values)
    stream = pack_bits(values, bits)
    assert stream.dtype == np.uint8 and stream.ndim == 1
    assert stream.size == packed_size(m, bits) == -(-m * bits // 8)
    out = unpack_bits(stream, m, bits)
    assert out.dtype == np.uint32 and out.shape == (m,)
    assert np.array_equal(out.astype(np.uint64), values)
    # the padding bits of the last byte are zero
    total = m * bits
    if total % 8:
        assert int(stream[-1]) & ((1 << (8 - total % 8)) - 1) == 0


@SETTINGS
@given(values_and_bits(min_bits=1))
def test_layout_matches_the_documented_numpy_reader(vb):
    """The module docstring's plain-numpy reader reads the stream back."""
    values, bits = vb
    m = len(values)
    stream = pack_bits(values, bits)
    b = np.unpackbits(stream, count=m * bits).reshape(m, bits)
    read = (b.astype(np.uint64) << np.arange(bits - 1, -1, -1, dtype=np.uint64)).sum(1)
    assert np.array_equal(read, values)


@SETTINGS
@given(values_and_bits(min_bits=1, max_bits=31), st.data())
def test_a_value_that_does_not_fit_raises(vb, data):
    values, bits = vb
    values = np.append(values, np.uint64(0))
    i = data.draw(st.integers(0, len(values) - 1))
    values[i] = data.draw(st.integers(1 << bits, 2**32 - 1))
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(values, bits)


@SETTINGS
@given(values_and_bits(min_bits=1), st.data())
def test_a_too_short_stream_raises(vb, data):
    values, bits = vb
    values = np.append(values, np.uint64(1))
    m = len(values)
    stream = pack_bits(values, bits)
    cut = data.draw(st.integers(0, stream.size - 1))
    with pytest.raises(ValueError, match="fewer than"):
        unpack_bits(stream[:cut], m, bits)
    # a longer stream is fine: the extra bytes are ignored
    longer = np.concatenate([stream, np.full(3, 0xFF, np.uint8)])
    assert np.array_equal(unpack_bits(longer, m, bits).astype(np.uint64), values)


def test_hand_computed_layout():
    # 1, 2, 3 at 3 bits: 001 010 011 -> 00101001 1(0000000)
    assert pack_bits(np.array([1, 2, 3]), 3).tolist() == [0b00101001, 0b10000000]
    assert unpack_bits(np.array([0b00101001, 0b10000000], np.uint8), 3, 3).tolist() == [1, 2, 3]
    # MSB first across byte boundaries: 0x123 at 12 bits, then 0xABC
    assert pack_bits(np.array([0x123, 0xABC]), 12).tolist() == [0x12, 0x3A, 0xBC]
    assert pack_bits(np.array([1]), 1).tolist() == [0b10000000]
    assert pack_bits(np.array([2**32 - 1, 1]), 32).tolist() == [255, 255, 255, 255, 0, 0, 0, 1]


def test_zero_bits_and_zero_values():
    assert pack_bits(np.zeros(5, np.uint32), 0).size == 0
    assert unpack_bits(np.zeros(0, np.uint8), 5, 0).tolist() == [0] * 5
    assert pack_bits(np.zeros(0, np.uint32), 7).size == 0
    assert unpack_bits(np.zeros(0, np.uint8), 0, 7).shape == (0,)
    assert packed_size(0, 7) == 0 and packed_size(5, 0) == 0


def test_bits_out_of_range_raise():
    for bits in (-1, 33):
        with pytest.raises(ValueError, match="bits"):
            pack_bits(np.array([1]), bits)


@pytest.mark.parametrize(("count", "bits"), [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (255, 8), (256, 8),
                                             (257, 9), (1000, 10), (65536, 16), (65537, 17)])
def test_bits_for(count, bits):
    assert bits_for(count) == bits
    if count > 1:  # count - 1 fits, and no fewer bits would do
        assert (count - 1) >> bits == 0 and (count - 1) >> (bits - 1) == 1


def test_values_beyond_uint32_raise():
    with pytest.raises(ValueError):
        pack_bits(np.array([2**32 + 1], dtype=np.uint64), 8)


@pytest.mark.parametrize("bits", [0, 1, 7, 16, 32])
def test_negative_values_raise(bits):
    """A negative value does not fit unsigned bits; it is refused, not wrapped."""
    for values in (np.array([-1]), np.array([0, 1, -5, 0], np.int64), np.array([-(2**31)], np.int32)):
        with pytest.raises(ValueError, match="does not fit"):
            pack_bits(values, bits)


def test_nonzero_value_at_zero_bits_raises():
    with pytest.raises(ValueError, match="does not fit 0 unsigned bits"):
        pack_bits(np.array([5]), 0)
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(np.array([0, 0, 1], np.uint8), 0)
    assert pack_bits(np.zeros(3, np.int64), 0).size == 0  # zeros are fine


@pytest.mark.parametrize("bits", [1, 8, 16, 31, 32])
def test_the_largest_value_fits_and_one_more_raises(bits):
    top = np.array([2**bits - 1], np.uint64)
    assert unpack_bits(pack_bits(top, bits), 1, bits).tolist() == [2**bits - 1]
    with pytest.raises(ValueError, match="does not fit"):
        pack_bits(top + 1, bits)


def test_bits_for_zero_is_zero():
    assert bits_for(0) == 0


@SETTINGS
@given(values_and_bits(min_bits=1, max_bits=25), st.integers(0, 255), st.integers(0, 4))
def test_unpack_ignores_padding_bits_and_bytes_past_the_stream(vb, junk, extra):
    """Whatever the last byte's padding bits and any bytes past the stream hold, the values
    read are those packed (the word-wise reader must mask them off)."""
    values, bits = vb
    m = len(values)
    stream = pack_bits(values, bits)
    pad = (-m * bits) % 8
    dirty = np.concatenate([stream, np.full(extra, junk, np.uint8)])
    if pad and stream.size:
        dirty[stream.size - 1] |= junk & ((1 << pad) - 1)
    assert np.array_equal(unpack_bits(dirty, m, bits).astype(np.uint64), values)
