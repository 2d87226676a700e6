"""Fuzzing what a node reads from others: archives, thin packs, messages.

Whatever the bytes, the reader refuses them with an ``EnvshipError`` (or, for
a message, a ``ValueError``) and leaves nothing behind; it never crashes with
another exception, never writes outside its folder. Bounded here; set
``ENVSHIP_FUZZ_EXAMPLES`` (say 20000) to fuzz for longer by hand.
"""

from __future__ import annotations

import io
import os
import tarfile

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envship.archive import ForwardReader, read_members
from envship.errors import EnvshipError
from envship.manifest import Manifest, ThinManifest
from envship.node.extract import extract_archive, remove_tree
from envship.node.filestore import FileStore
from envship.table import decode_bits, decode_keys
from envship.thin import THIN_MAGIC, read_thin_pack
from envship.transfer import Offer
from envship.transfer.pieces import PieceTable

EXAMPLES = int(os.environ.get("ENVSHIP_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def small_tar() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("bin/tool", b"#!/bin/sh\n"), ("lib/a.py", b"x = 1\n")]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("lib/b.py")
        link.type, link.linkname = tarfile.SYMTYPE, "a.py"
        tar.addfile(link)
    return raw.getvalue()


def small_thin() -> bytes:
    rows = (
        b'[["d","lib",493,0,0,"","",false],'
        b'["f","lib/a.py",420,0,6,"","",true],'
        b'["l","lib/b.py",0,0,0,"","a.py",false]]'
    )
    return THIN_MAGIC + len(rows).to_bytes(8, "big") + rows + b"x = 1\n"


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for where, value in edits:
        out[where % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


def extract(tmp_path, payload: bytes) -> None:
    """Extract ``payload`` (compressed here) as a node would; only refusals allowed."""
    work = tmp_path / "work"
    remove_tree(work) if work.exists() else None
    work.mkdir()
    archive = tmp_path / "fuzzed.tar.zst"
    archive.write_bytes(zstandard.ZstdCompressor().compress(payload))
    try:
        extract_archive(
            archive,
            work / "dest",
            expected_id="0" * 32,  # nothing fuzzed hashes to it
            max_unpacked_bytes=1 << 20,
            env="fuzzed",
            files=FileStore(work),
        )
    except EnvshipError:
        pass  # refused: the only acceptable outcome
    else:
        raise AssertionError("a fuzzed archive was accepted")
    assert sorted(os.listdir(work)) == ["files"]
    assert sorted(os.listdir(tmp_path)) == ["fuzzed.tar.zst", "work"]


edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8)
cuts = st.none() | st.integers(0, 4096)


@FUZZ
@given(edits=edits, cut=cuts)
def test_mutated_tar_archives_are_refused_cleanly(tmp_path, edits, cut):
    extract(tmp_path, mutate(small_tar(), edits, cut))


@FUZZ
@given(edits=edits, cut=cuts)
def test_mutated_thin_packs_are_refused_cleanly(tmp_path, edits, cut):
    data = small_thin()
    # Keep the magic most of the time, so the thin reader itself is exercised.
    edits = [(len(THIN_MAGIC) + w % (len(data) - len(THIN_MAGIC)), v) for w, v in edits]
    extract(tmp_path, mutate(data, edits, cut))


@FUZZ
@given(payload=st.binary(max_size=4096))
def test_random_bytes_are_refused_cleanly(tmp_path, payload):
    extract(tmp_path, payload)


@FUZZ
@given(payload=st.binary(max_size=2048))
def test_the_readers_raise_only_their_own_errors(payload):
    from envship.archive import CorruptArchive

    for reader in (read_members, read_thin_pack):
        try:
            for _ in reader(ForwardReader(io.BytesIO(payload))):
                pass
        except (CorruptArchive, EOFError):
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=30,
)


@FUZZ
@given(
    msg=st.dictionaries(
        st.sampled_from(
            [
                "id",
                "name",
                "kind",
                "python",
                "file_count",
                "unpacked_size",
                "packages",
                "platform",
                "thin_of",
                "base",
                "env",
                "packed_size",
                "files",
                "refs",
                "size",
                "piece_size",
                "digests",
                "manifest",
                "table",
                "digest",
            ]
        ),  # fmt: skip
        json_values,
        max_size=12,
    )
)
def test_messages_from_others_are_checked_or_refused(msg):
    """Manifests, offers, piece tables: parsed into checked objects or ValueError."""
    for parse in (Manifest.from_dict, ThinManifest.from_dict, Offer.from_msg,
                  PieceTable.from_msg):  # fmt: skip
        try:
            parse(msg)
        except ValueError:
            pass


@FUZZ
@given(data=st.binary(max_size=600), count=st.integers(-5, 5000))
def test_store_key_and_bit_messages_are_checked(data, count):
    for call in (lambda: decode_keys(data), lambda: decode_bits(data, count)):
        try:
            call()
        except ValueError:
            pass


@pytest.fixture(autouse=True)
def _no_escape():
    yield
    assert not os.path.lexists("/tmp/evil-envship")
