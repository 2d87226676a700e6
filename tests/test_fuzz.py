"""Fuzzing what a node reads from others: archives, thin packs, messages.

Whatever the bytes, the reader refuses them with an ``EnvshipError`` (or, for
a message, a ``ValueError``) and leaves nothing behind; it never crashes with
another exception, never writes outside its folder. Bounded here; set
``ENVSHIP_FUZZ_EXAMPLES`` (say 20000) to fuzz for longer by hand.
"""

from __future__ import annotations

import io
import os
import re
import tarfile

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envship.archive_reader import ForwardReader, read_members
from envship.errors import EnvshipError
from envship.manifest import Manifest, ThinManifest
from envship.node.cache import EnvCache
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
    from envship.archive_reader import CorruptArchive

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
@given(
    msg=st.dictionaries(
        st.sampled_from(
            [
                "id",
                "name",
                "names",
                "offer",
                "nanny",
                "complete",
                "site",
                "node",
                "owner",
                "client",
                "nannies",
                "holders",
                "conflicts",
                "allowed",
                "contact",
                "ok",
                "error",
                "seconds",
                "running",
                "since",
                "default",
                "worker",
                "cache",
                "transfers",
                "x",
            ]
        ),
        json_values | st.sampled_from(["0" * 32, "tcp://a:1"]),
        max_size=10,
    )
)
def test_registry_and_status_messages_are_checked_or_refused(msg):
    """Requests and answers of the registry, the policy, a nanny's status."""
    from envship import registry_messages as messages
    from envship.messages import NannyStatus
    from envship.policy import Policy

    parsers = [NannyStatus.from_msg, Policy.from_msg]
    parsers += [getattr(messages, name).from_msg for name in MESSAGES]
    for parse in parsers:
        try:
            parse(msg)
        except ValueError:
            pass
        except TypeError as e:  # only as a call with wrong arguments is
            assert re.search("required positional|unexpected keyword", str(e))


#: The registry's typed requests and answers (envship.registry_messages).
MESSAGES = [
    "Publish", "Desire", "Where", "Hold", "Runs", "Claim", "Release",
    "Holder", "WhereAnswer", "ClaimRecord", "Conflict", "ClaimAnswer",
]  # fmt: skip


@FUZZ
@given(
    msg=st.dictionaries(
        st.sampled_from(
            [
                "artifact_id",
                "via",
                "base",
                "keys",
                "cache",
                "id",
                "name",
                "pid",
                "node",
                "site",
                "platform",
                "installed",
                "archive",
                "seconds",
                "written",
                "linked",
                "evicted",
                "size",
                "python",
                "environ",
                "script",
                "offer",
                "peers",
                "seed_site",
                "digest",
                "index",
                "data",
                "timeout",
                "piece_size",
                "known",
                "complete",
                "have",
                "count",
                "received",
                "rejected",
                "dropped",
                "unavailable",
                "error",
                "busy",
                "missing",
                "x",
            ]
        ),  # fmt: skip
        json_values
        | st.binary(max_size=30)
        | st.sampled_from(["0" * 32, "tcp://a:1", 65536, -1]),
        max_size=10,
    )
)
def test_nanny_and_transfer_messages_are_checked_or_refused(msg):
    """Requests and answers of a nanny's handlers and of its transfer handlers."""
    from envship import messages
    from envship.node import messages as node_messages
    from envship.transfer import messages as transfer_messages

    parsers = [messages.Status.from_msg]
    parsers += [getattr(node_messages, name).from_msg for name in NODE_MESSAGES]
    parsers += [getattr(transfer_messages, n).from_msg for n in TRANSFER_MESSAGES]
    for parse in parsers:
        try:
            parse(msg)
        except ValueError:
            pass
        except TypeError as e:  # only as a call with wrong arguments is
            assert re.search("required positional|unexpected keyword", str(e))


#: The typed requests and answers of a nanny (envship.node.messages) and of its
#: transfer handlers (envship.transfer.messages).
NODE_MESSAGES = [
    "Info", "Lacks", "Install", "Foreign", "InfoAnswer", "InstallAnswer",
    "GcAnswer", "ForeignAnswer", "Wanted",
]  # fmt: skip
TRANSFER_MESSAGES = [
    "OfferRequest", "Put", "Wait", "PieceRequest", "Have", "OfferAnswer",
    "WaitAnswer", "PieceAnswer", "HaveAnswer",
]  # fmt: skip


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


# -- the handlers of a live nanny and of the scheduler's registry ---------------

#: What a node's and the registry's handlers take, for any arguments.
HANDLERS = {
    "nanny": {
        "info": ["artifact_id"],
        "lacks": ["keys"],
        "install": ["artifact_id", "via"],
        "status": ["cache"],
        "offer": ["offer", "peers", "seed_site"],
        "put": ["id", "digest", "index", "data"],
        "wait": ["id", "digest", "timeout"],
        "piece": ["id", "digest", "piece_size", "index"],
        "have": ["id", "digest", "piece_size", "known"],
        "gc": [],
        "foreign": ["id", "name", "pid"],
    },
    "scheduler": {
        "publish": ["offer"],
        "desire": ["id", "names"],
        "where": ["id", "name"],
        "hold": ["nanny", "id", "complete", "site", "node"],
        "runs": ["nanny", "id", "name"],
        "claim": ["owner", "client", "nannies", "name"],
        "release": ["owner"],
        "policy": [],
    },
}
#: What a handler may answer junk with (raised again in the caller).
REFUSALS = (ValueError, TypeError, EnvshipError)


def test_live_handlers_survive_any_arguments(tmp_path, env_prefix):
    # Values of every shape, and now and then a true id, digest or offer, so
    # that calls also get past the first check.
    import envship
    from envship.scheduler.registry import Registry
    from fixtures.cluster import local_cluster, wait_until

    artifact = envship.pack(env_prefix("base"), store=tmp_path / "store")
    offer = Offer.of_artifact(artifact).to_msg()
    truths = [
        artifact.id,
        offer["table"]["digest"],
        offer["table"]["piece_size"],
        offer,
    ]
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**63 - 1)  # what msgpack can send
        | st.floats()
        | st.text(max_size=40)
        | st.binary(max_size=64)
        | st.sampled_from(truths)
    )
    values = st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.sampled_from([*offer, "x"]), inner, max_size=5)
        ),
        max_leaves=12,
    )

    @st.composite
    def calls(draw):
        side = draw(st.sampled_from(sorted(HANDLERS)))
        op = draw(st.sampled_from(sorted(HANDLERS[side])))
        params = HANDLERS[side][op]
        names = draw(st.lists(st.sampled_from(params), unique=True)) if params else []
        return side, op, {name: draw(values) for name in names}

    with local_cluster(tmp_path / "c", {"solo": 1}) as (client, caches):
        client.register_plugin(Registry(), name=Registry.name)
        nanny = next(iter(client.scheduler_info()["workers"].values()))["nanny"]
        rpcs = {"nanny": client.rpc(nanny), "scheduler": client.scheduler}
        seen: dict[str, int] = {}

        # The same cases on every CI run (a cluster's timing varies enough);
        # fresh ones when fuzzing longer by hand.
        @settings(FUZZ, max_examples=EXAMPLES * 4, derandomize=EXAMPLES <= 150)
        @given(calls())
        def call_anything(call):
            side, op, kwargs = call
            handler = getattr(rpcs[side], f"envship_{op}")
            try:
                client.sync(handler, **kwargs)
            except REFUSALS as e:
                seen[type(e).__name__] = seen.get(type(e).__name__, 0) + 1
                # A TypeError only for arguments missing or unknown: every
                # value is checked before it is used.
                if isinstance(e, TypeError):
                    assert re.search("required positional|unexpected keyword", str(e))

        call_anything()
        assert seen.get("ValueError", 0) > EXAMPLES  # most of it was refused
        # Both still serve, the worker computes, and nothing is left behind.
        assert client.submit(sum, [1, 2]).result() == 3
        assert client.sync(rpcs["nanny"].envship_status)["ok"]
        assert client.sync(client.scheduler.envship_registry)["default"] is None
        cache = EnvCache(caches["solo"])
        wait_until(lambda: not cache.installs())
        assert not [p for p in (caches["solo"] / "tmp").iterdir()]
