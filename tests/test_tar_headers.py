"""The read check's header walk (``tar_index._plain_members``) lists exactly what Python's
tarfile lists, on archives of every tar format, any slice of them and damaged headers; where
it cannot decide, it says so (None) and tarfile decides. ``check_read`` gives the same answer
either way."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from logitcache.data.tar_index import _plain_members, _tarfile_members, check_read, index_tar
from logitcache.errors import BadShardError

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
names = st.one_of(
    st.from_regex(r"[a-z0-9_]{1,12}(/[a-z0-9_]{1,12})?\.(png|cls|jpg|json)", fullmatch=True),
    st.from_regex(r"[a-z]{90,140}\.png", fullmatch=True),  # past 100 bytes: prefix, GNU long name or pax
    st.from_regex(r"d[a-z]{0,8}/", fullmatch=True),  # a directory member
)


def _archive(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    """A tar of ``members`` in format ``fmt``; ValueError where the format cannot hold a name."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _walk(data: bytes):
    try:
        return _tarfile_members(data)
    except tarfile.TarError:
        return "error"


@settings(max_examples=100, deadline=None)
@given(members=st.lists(st.tuples(names, st.binary(max_size=1500)), min_size=1, max_size=6),
       fmt=st.sampled_from(sorted(FORMATS)), cut=st.tuples(st.integers(0, 40), st.integers(0, 40)),
       flip=st.one_of(st.none(), st.tuples(st.integers(0, 10_000), st.integers(1, 255))))
def test_the_header_walk_lists_what_tarfile_lists(members, fmt, cut, flip):
    try:
        data = _archive(members, FORMATS[fmt])
    except ValueError:  # ustar: a name past 100 bytes with no '/' to split at
        assume(False)
    blocks = len(data) // 512
    start = min(cut[0], blocks) * 512  # read ranges start at a member boundary or anywhere in blocks
    data = data[start:len(data) - cut[1] * 37]
    if flip is not None and data:
        at, bits = flip[0] % len(data), flip[1]
        data = data[:at] + bytes([data[at] ^ bits]) + data[at + 1:]
    fast = _plain_members(data)
    if fast is not None:
        assert fast == _walk(data)


def test_plain_archives_take_the_header_walk():
    """What the project's writer (and webdataset) produce for short names never falls back."""
    data = _archive([("a/x001.png", b"p" * 700), ("a/x001.cls", b"3"), ("a/x002.png", b"q" * 5)],
                    tarfile.PAX_FORMAT)
    assert _plain_members(data) == _walk(data) == [("a/x001.png", 512, 700), ("a/x001.cls", 2048, 1),
                                                   ("a/x002.png", 3072, 5)]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("long_names", [False, True])
def test_check_read_serves_every_sample_of_every_format(fmt, long_names, tmp_path):
    stem = ("d" * 60 + "/" + "k" * 60) if long_names else "k"  # past 100 bytes: ustar's prefix field too
    members = []
    for i in range(4):
        members += [(f"{stem}{i}.png", bytes([i]) * (300 + 600 * i)), (f"{stem}{i}.cls", str(i).encode())]
    path = tmp_path / "s.tar"
    path.write_bytes(_archive(members, FORMATS[fmt]))
    index = index_tar(str(path), None)
    raw = path.read_bytes()
    for key, label, offset, size, start, stop in zip(index.keys, index.labels, index.offsets, index.sizes,
                                                     index.starts, index.stops):
        got = check_read(raw[start:stop], start, key=key, label=label, offset=offset, size=size, shard="s.tar")
        assert got == raw[offset:offset + size]
        with pytest.raises(BadShardError, match="changed after it was indexed"):
            check_read(raw[start:stop], start, key=key, label=label + 1, offset=offset, size=size, shard="s.tar")
        with pytest.raises(BadShardError, match="changed after it was indexed"):
            check_read(raw[start:stop], start, key=key + "x", label=label, offset=offset, size=size, shard="s.tar")
