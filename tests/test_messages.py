"""The typed messages between clients, nannies and the scheduler's registry.

Unit tests, no cluster: every message goes to the wire and back unchanged,
and refuses each lie (a wrong type, a value out of bounds, a missing or
unknown argument) with the error its handler's callers expect. The registry
itself is driven through its comm handlers with no scheduler behind it.
"""

from __future__ import annotations

import asyncio
import pickle
import re
import time
from dataclasses import MISSING, fields

import pytest
from distributed.protocol.serialize import Serialize

from envship import policy
from envship.errors import EnvshipError
from envship.ids import (
    check_address,
    check_digest,
    check_id,
    check_site,
    check_text,
    check_thin_id,
    is_id,
)
from envship.manifest import Manifest, ThinManifest
from envship.messages import NannyStatus, Status, TransferState, ZygoteState, serve
from envship.node.messages import (
    Foreign,
    ForeignAnswer,
    GcAnswer,
    Info,
    InfoAnswer,
    Install,
    InstallAnswer,
    Lacks,
    Wanted,
)
from envship.policy import NotAllowedError, Policy
from envship.registry_messages import (
    Claim,
    ClaimAnswer,
    Conflict,
    Desire,
    Hold,
    Holder,
    Publish,
    Release,
    Running,
    Runs,
    Where,
    WhereAnswer,
)
from envship.scheduler.registry import Registry
from envship.survey import EMPTY_REGISTRY, survey
from envship.transfer.messages import (
    Have,
    HaveAnswer,
    OfferAnswer,
    OfferRequest,
    PieceAnswer,
    PieceRequest,
    Put,
    Wait,
    WaitAnswer,
)
from envship.transfer.pieces import Offer, Peer, PieceTable

ID, OTHER, BASE = "a" * 32, "b" * 32, "c" * 32
#: What the fuzz test accepts as a TypeError: only a call with wrong arguments.
CALL_ERROR = re.compile("required positional|unexpected keyword")


def manifest(id: str = ID, name: str = "sklearn-dev") -> Manifest:
    return Manifest(
        id=id, name=name, kind="conda", python="3.11.7", file_count=1, unpacked_size=3
    )


def offer(id: str = ID, name: str = "sklearn-dev") -> Offer:
    table = PieceTable.of_bytes(b"x" * 100_000, piece_size=65536)
    return Offer(id, name, manifest(id, name), table)


def thin_offer() -> Offer:
    thin = ThinManifest(
        id=OTHER, thin_of=ID, base=BASE, env=manifest(), packed_size=9, files=1, refs=0
    )
    return Offer(OTHER, "sklearn-dev", thin, PieceTable.of_bytes(b"t", 65536))


# -- ids ----------------------------------------------------------------------------


def test_ids_are_checked_once_from_text():
    assert check_id(ID) == ID and check_thin_id(ID) == ID and is_id(ID)
    assert check_digest("0" * 32) == "0" * 32
    assert check_address("tcp://10.0.0.1:4000") == "tcp://10.0.0.1:4000"
    assert check_site(None) is None and check_site("east") == "east"
    for lie in (ID.upper(), ID + "\n", ID[:-1], 5, None, b"a" * 32, "../" + ID[3:]):
        for check in (check_id, check_thin_id, check_digest):
            with pytest.raises(ValueError):
                check(lie)
    for lie in ("", "x" * 1025, 5, None, ["a"]):
        with pytest.raises(ValueError, match="a nanny address"):
            check_address(lie, "a nanny address")
        with pytest.raises(ValueError):
            check_text(lie, "a name")


def test_old_homes_of_the_id_checks_still_import():
    from envship.archive import ID_PATTERN, check_id, is_id

    assert check_id(ID) == ID and is_id(ID) and ID_PATTERN.fullmatch(ID)


# -- requests of the registry's handlers ----------------------------------------------

REQUESTS = [
    Publish(offer()),
    Publish(thin_offer()),
    Desire(ID, ("worker-0", "7")),
    Desire(None, None),
    Desire(ID, None),
    Where(id=ID),
    Where(name="worker-0"),
    Where(),
    Hold("tcp://a:1", ID, True, "east", "host:1:2"),
    Hold("tcp://a:1", ID, None),
    Runs("tcp://a:1", ID, "sklearn-dev"),
    Runs("tcp://a:1", None),
    Claim("me/1", "client-1", ("tcp://a:1", "tcp://b:2"), "sklearn-dev"),
    Claim("me/1", "client-1", (), "x"),
    Release("me/1"),
]


def test_worker_names_are_kept_as_text():
    # Dask allows any worker name (ints too): the registry keys rules by str.
    assert Desire.from_msg({"id": None, "names": [0, "w"]}).names == ("0", "w")
    assert Where.from_msg({"name": 3}).name == "3"


LIES = [
    (Publish, {"offer": {**offer().to_msg(), "id": ID + "\n"}}),
    (Publish, {"offer": {**offer().to_msg(), "id": OTHER}}),  # not its manifest's
    (Publish, {"offer": "not a dict"}),
    (Desire, {"id": "0" * 31}),
    (Desire, {"id": None, "names": "worker-0"}),  # not a list
    (Desire, {"id": None, "names": ["x" * 2000]}),
    (Desire, {"names": list(range(100_001))}),
    (Where, {"id": ["not", "an", "id"]}),
    (Where, {"name": "x" * 2000}),
    (Hold, {"nanny": 5, "id": ID, "complete": True}),
    (Hold, {"nanny": "x" * 5000, "id": ID, "complete": True}),
    (Hold, {"nanny": "tcp://a:1", "id": ID, "complete": True, "site": 7}),
    (Hold, {"nanny": "tcp://a:1", "id": ID, "complete": True, "node": ""}),
    (Hold, {"nanny": "tcp://a:1", "id": ID, "complete": 1}),
    (Hold, {"nanny": "tcp://a:1", "id": None, "complete": None}),
    (Runs, {"nanny": "tcp://a:1", "id": 5}),
    (Runs, {"nanny": "tcp://a:1", "id": None, "name": 5}),
    (Claim, {"owner": "o", "client": "c", "nannies": "tcp://a:1", "name": "x"}),
    (Claim, {"owner": "o", "client": "c", "nannies": [7], "name": "x"}),
    (Claim, {"owner": "", "client": "c", "nannies": [], "name": "x"}),
    (Claim, {"owner": "o", "client": None, "nannies": [], "name": "x"}),
    (Release, {"owner": None}),
]


# -- answers --------------------------------------------------------------------------


def test_answers_go_to_the_wire_and_back():
    where = WhereAnswer(
        offer(),
        (Holder(Peer("tcp://a:1", "east"), True), Holder(Peer("tcp://b:2"), False)),
    )
    assert WhereAnswer.from_msg(where.to_msg()) == where
    assert where.to_msg()["holders"][0] == {
        "address": "tcp://a:1",
        "site": "east",
        "complete": True,
    }
    assert WhereAnswer.from_msg({"offer": None, "holders": []}) == WhereAnswer(None)
    claim = ClaimAnswer({"tcp://a:1": Conflict("c", "sklearn-dev", 1.5e9)})
    assert ClaimAnswer.from_msg(claim.to_msg()) == claim


@pytest.mark.parametrize(
    "parse, msg",
    [
        (WhereAnswer.from_msg, None),
        (WhereAnswer.from_msg, {"offer": None}),
        (WhereAnswer.from_msg, {"offer": {"id": ID}, "holders": []}),
        (WhereAnswer.from_msg, {"offer": None, "holders": [{"address": 5}]}),
        (WhereAnswer.from_msg, {"offer": None, "holders": [{"address": "a"}]}),
        (
            WhereAnswer.from_msg,
            {"offer": None, "holders": [{"address": "a", "complete": "yes"}]},
        ),
        (ClaimAnswer.from_msg, {"conflicts": []}),
        (ClaimAnswer.from_msg, {"conflicts": {"tcp://a:1": {"client": "c"}}}),
        (
            ClaimAnswer.from_msg,
            {
                "conflicts": {
                    "tcp://a:1": {
                        "client": "c",
                        "name": "n",
                        "since": float("nan"),
                    }
                }
            },
        ),
    ],
)
def test_answers_refuse_lies(parse, msg):
    with pytest.raises(ValueError):
        parse(msg)


# -- the registry, through its handlers, with no scheduler ----------------------------


def handlers(registry: Registry) -> dict:
    """The comm handlers, as ``Registry.start`` registers them."""
    return {
        "publish": serve(registry.publish, Publish),
        "desire": serve(registry.desire, Desire),
        "where": serve(registry.where, Where),
        "hold": serve(registry.hold, Hold),
        "runs": serve(registry.runs, Runs),
        "claim": serve(registry.claim, Claim),
        "release": serve(registry.release, Release),
        "registry": serve(registry.snapshot),
        "policy": serve(registry.get_policy),
    }


def test_the_registry_answers_on_the_wire_as_before():
    call = handlers(Registry())
    assert call["where"](name="worker-0") == {"offer": None, "holders": []}
    assert call["policy"]() == {"allowed": None, "contact": None}
    with pytest.raises(TypeError, match=CALL_ERROR):
        call["policy"](extra=1)
    with pytest.raises(TypeError, match=CALL_ERROR):
        call["hold"](id=ID, complete=True)
    assert call["publish"](offer=offer().to_msg()) == "OK"
    with pytest.raises(ValueError, match="publish the offer"):
        call["desire"](id=OTHER)
    assert call["desire"](id=ID, names=["worker-0"]) == "OK"
    assert call["hold"](nanny="tcp://a:1", id=ID, complete=False, site="east") == "OK"
    assert call["hold"](nanny="tcp://b:2", id=ID, complete=True) == "OK"
    assert call["hold"](nanny="tcp://b:2", id=OTHER, complete=True) == "unknown"
    where = call["where"](name="worker-0")
    assert where["offer"] == offer().to_msg()
    assert where["holders"] == [  # whole holders first
        {"address": "tcp://b:2", "site": None, "complete": True},
        {"address": "tcp://a:1", "site": "east", "complete": False},
    ]
    assert call["where"](name="worker-1")["offer"] is None  # no default
    assert call["runs"](nanny="tcp://a:1", id=ID, name="sklearn-dev") == "OK"
    snapshot = call["registry"]()
    assert snapshot["default"] is None and snapshot["by_name"] == {"worker-0": ID}
    assert snapshot["offers"] == {
        ID: {"name": "sklearn-dev", "size": 100_000, "thin_of": None}
    }
    assert snapshot["holders"] == {ID: []}  # no worker: none live without grace
    assert snapshot["running"]["tcp://a:1"]["id"] == ID
    assert set(snapshot["running"]["tcp://a:1"]) == {"id", "name", "since"}
    # Gone again: no longer listed.
    assert call["hold"](nanny="tcp://a:1", id=ID, complete=None) == "OK"
    assert len(call["where"](id=ID)["holders"]) == 1


def test_a_thin_pack_stands_in_for_its_environment():
    call = handlers(Registry())
    assert call["publish"](offer=thin_offer().to_msg()) == "OK"
    assert call["desire"](id=ID) == "OK"  # known through its thin pack
    assert call["where"](name="any")["offer"]["id"] == OTHER
    assert call["registry"]()["offers"][OTHER]["thin_of"] == ID


def test_claims_are_all_or_nothing():
    registry = Registry()
    call = handlers(registry)
    registry.scheduler = type("Scheduler", (), {"clients": {"c1": 0, "c2": 0}})()
    mine = {"owner": "c1/1", "client": "c1", "name": "env"}
    assert call["claim"](**mine, nannies=["tcp://a:1"]) == {"conflicts": {}}
    other = {"owner": "c2/1", "client": "c2", "name": "other"}
    answer = call["claim"](**other, nannies=["tcp://b:2", "tcp://a:1"])
    assert list(answer["conflicts"]) == ["tcp://a:1"]
    # Who holds it and to what, never the owner token that would release it.
    conflict = answer["conflicts"]["tcp://a:1"]
    assert (conflict["client"], conflict["name"]) == ("c1", "env")
    assert "c1/1" not in repr(answer)
    assert "tcp://b:2" not in registry.claims  # nothing claimed
    assert call["release"](owner="c1/1") == "OK"
    assert call["claim"](**other, nannies=["tcp://a:1"]) == {"conflicts": {}}


def test_the_registry_refuses_what_its_policy_does_not_allow():
    registry = Registry()
    registry.policy = Policy(allowed=("vetted",), contact="hpc@uni.edu")
    call = handlers(registry)
    call["publish"](offer=offer().to_msg())
    with pytest.raises(NotAllowedError, match="hpc@uni.edu"):
        call["desire"](id=ID)
    assert call["policy"]() == {"allowed": ["vetted"], "contact": "hpc@uni.edu"}


# -- the policy -----------------------------------------------------------------------


def test_the_policy_is_a_small_frozen_value():
    import dask.config

    with dask.config.set({"envship.allowed": "a, b", "envship.contact": "me"}):
        rules = policy.current()
    assert rules == Policy(("a", "b"), "me")
    assert Policy.from_msg(rules.to_msg()) == rules
    with pytest.raises(AttributeError):
        rules.contact = "you"  # type: ignore[misc]  # frozen: that is the point
    # check() takes it, or the wire's dict, as the registry's handler sends it.
    policy.check("a", ID, rules)
    policy.check("b", ID, rules.to_msg())
    policy.check("x", ID, Policy(allowed=(ID[:12],)))  # a long enough prefix
    with pytest.raises(NotAllowedError):
        policy.check("x", ID, Policy(allowed=(ID[:11],)))
    with pytest.raises(NotAllowedError, match="allow only these environments: none"):
        policy.check("x", ID, {"allowed": [], "contact": None})
    for lie in ("x", {"allowed": "a"}, {"allowed": [5]}, {"contact": 5}):
        with pytest.raises(ValueError):
            Policy.from_msg(lie)


def test_an_environment_named_as_an_allowed_id_is_not_allowed_by_it():
    # The review's bypass: `envship pack ENV --name <allowed id or prefix>`.
    for entry in (ID, ID[:12]):
        rules = Policy(allowed=(entry,))
        with pytest.raises(NotAllowedError, match="allow only these environments"):
            policy.check(entry, OTHER, rules)
        policy.check("any-name", ID, rules)  # the id itself still is
    # Names match names: a listed name allows that name, whatever its id.
    policy.check("sklearn-dev", OTHER, Policy(allowed=("sklearn-dev", ID)))


# -- the nanny's status, and a survey that survives a bad one ----------------------


def status(**changes) -> dict:
    good = NannyStatus(
        ok=False,
        error="the administrators of this cluster allow only these environments",
        seconds=1.5,
        running=ID,
        name="sklearn-dev",
        since=1.7e9,
        default=None,
        worker="tcp://10.0.0.1:4001",
        node="host:2049:1234",
        site="east",
        cache_root="/scratch/envship",
        cache_size=123,
        transfers=(
            TransferState(ID, "sklearn-dev", 3, 8, 1 << 20, ("tcp://b:2", "disk")),
        ),
        zygotes=(ZygoteState(ID, "sklearn-dev", 4242, 50 << 20),),
    ).to_msg()
    return {**good, **changes}


def test_the_nanny_status_goes_to_the_wire_and_back():
    parsed = NannyStatus.from_msg(status())
    assert parsed.to_msg() == status()
    assert parsed.transfers[0].sources == ("tcp://b:2", "disk")
    assert parsed.zygotes == (ZygoteState(ID, "sklearn-dev", 4242, 50 << 20),)
    # An older nanny sends no zygotes: it has none to show.
    old = {k: v for k, v in status().items() if k != "zygotes"}
    assert NannyStatus.from_msg(old).zygotes == ()
    # A newer nanny may add keys: they are ignored.
    assert NannyStatus.from_msg(status(gpus=2)) == parsed


@pytest.mark.parametrize(
    "changes",
    [
        {"ok": "yes"},
        {"running": "../../etc"},
        {"since": None},
        {"since": float("inf")},
        {"node": ""},
        {"cache": "/scratch"},
        {"cache": {"size": 5}},
        {"cache": {"root": "/x", "size": -1}},
        {"transfers": {"id": ID}},
        {"transfers": [{"id": ID, "name": "x", "have": 1, "count": 2}]},
        {"transfers": [{**status()["transfers"][0], "have": True}]},
        {"transfers": [{**status()["transfers"][0], "sources": [5]}]},
        {"zygotes": {"id": ID}},
        {"zygotes": [{"id": ID, "name": "x", "pid": 1}]},
        {"zygotes": [{**status()["zygotes"][0], "id": "../../etc"}]},
        {"zygotes": [{**status()["zygotes"][0], "name": ""}]},
        {"zygotes": [{**status()["zygotes"][0], "pid": -1}]},
        {"zygotes": [{**status()["zygotes"][0], "rss": 1.5}]},
        {"zygotes": [{**status()["zygotes"][0], "rss": True}]},
        {"error": 5},
        {"worker": 5},
    ],
)
def test_the_nanny_status_refuses_lies(changes):
    with pytest.raises(ValueError):
        NannyStatus.from_msg(status(**changes))
    with pytest.raises(ValueError):
        NannyStatus.from_msg("not a dict")


def survey_of(replies: dict, registry: dict) -> dict:
    """``survey`` of nannies that answer ``replies[address]``, one worker each."""

    class Nanny:
        def __init__(self, address):
            self.address = address

        async def envship_status(self, cache):
            return replies[self.address]

    identity = {
        "workers": {
            f"tcp://worker-of-{n}": {"nanny": n, "name": n.split("//")[1]}
            for n in replies
        }
    }
    return asyncio.run(survey(Nanny, identity, registry, timeout=5))


def test_a_bad_status_reply_makes_one_nanny_unreachable_not_the_survey():
    replies = {
        "tcp://good:1": status(),
        "tcp://liar:1": status(running=5),
        "tcp://old:1": {"ok": True},  # an older nanny, or no envship at all
        "tcp://junk:1": ["not", "a", "dict"],
    }
    registry = {
        "offers": {ID: {"name": "sklearn-dev", "size": 1 << 20, "thin_of": None}},
        "holders": {},
        "running": {},
    }
    found = survey_of(replies, registry)
    rows = {w["nanny"]: w for w in found["workers"]}
    assert rows["tcp://good:1"]["environment"] == "sklearn-dev"
    assert rows["tcp://good:1"]["unreachable"] is None
    for nanny in ("tcp://liar:1", "tcp://old:1", "tcp://junk:1"):
        assert rows[nanny]["unreachable"].startswith("invalid status reply")
        assert rows[nanny]["node"] is None
    assert [n["node"] for n in found["nodes"]] == ["host:2049:1234"]
    transfers = found["blobs"][0]["transfers"]
    assert [t["nanny"] for t in transfers] == ["tcp://good:1"]
    assert transfers[0]["have"] == 3


def test_a_node_lists_the_zygotes_of_its_nannies_once_each_by_name():
    dev = ZygoteState(ID, "sklearn-dev", 4242, 50 << 20).to_msg()
    base = ZygoteState(OTHER, "base", 4343, 40 << 20).to_msg()
    other_process = ZygoteState(ID, "sklearn-dev", 5151, 51 << 20).to_msg()
    replies = {
        # Two nannies of one process report its zygotes alike.
        "tcp://a:1": status(zygotes=[dev, base]),
        "tcp://a:2": status(zygotes=[dev, base]),
        # A nanny process of its own on the same node has zygotes of its own.
        "tcp://a:3": status(zygotes=[other_process]),
        "tcp://b:1": status(node="other:2049:1", zygotes=[]),
    }
    found = survey_of(replies, EMPTY_REGISTRY)
    nodes = {n["node"]: n for n in found["nodes"]}
    assert nodes["host:2049:1234"]["nannies"] == 3
    assert nodes["host:2049:1234"]["zygotes"] == [base, dev, other_process]
    assert nodes["other:2049:1"]["zygotes"] == []


# -- the nanny's own handlers and its transfer handlers ----------------------------

DIGEST = offer().table.digest
NANNY_REQUESTS = [
    Info(),
    Info(ID),
    Lacks(bytes(26)),
    Install(ID),
    Install(ID, OTHER),
    Status(),
    Status(cache=True),
    Foreign(ID, "py2-legacy", 4242),
    OfferRequest(offer()),
    OfferRequest(thin_offer(), (Peer("tcp://a:1", "east"), Peer("tcp://b:2")), "east"),
    Put(ID, DIGEST, 0, b"piece"),
    Wait(ID, DIGEST),
    Wait(ID, DIGEST, 0.0),
    PieceRequest(ID, DIGEST, 65536, 1),
    Have(ID, DIGEST, 65536),
    Have(ID, DIGEST, 65536, 3),
]


NANNY_LIES = [
    (Info, {"artifact_id": "../etc"}),
    (Info, {"artifact_id": 5}),
    (Lacks, {"keys": "text"}),
    (Lacks, {"keys": [1, 2]}),
    (Lacks, {"keys": bytes(26), "own_only": "yes"}),
    (Install, {"artifact_id": ID, "via": "../x"}),
    (Install, {"artifact_id": ID + "\n"}),
    (Status, {"cache": "yes"}),
    (Status, {"cache": 1}),
    (Foreign, {"id": ID, "name": "x", "pid": True}),
    (Foreign, {"id": ID, "name": "x", "pid": -1}),
    (Foreign, {"id": ID, "name": "", "pid": 1}),
    (OfferRequest, {"offer": {**offer().to_msg(), "id": OTHER}}),
    (OfferRequest, {"offer": offer().to_msg(), "peers": [{"address": 5}]}),
    (OfferRequest, {"offer": offer().to_msg(), "peers": "tcp://a:1"}),
    (OfferRequest, {"offer": offer().to_msg(), "seed_site": 7}),
    (Put, {"id": ID, "digest": "z" * 32, "index": 0, "data": b""}),
    (Put, {"id": ID, "digest": DIGEST, "index": -1, "data": b""}),
    (Put, {"id": ID, "digest": DIGEST, "index": True, "data": b""}),
    (Put, {"id": ID, "digest": DIGEST, "index": "0", "data": b""}),
    (Put, {"id": ID, "digest": DIGEST, "index": 2**62, "data": b""}),
    (Put, {"id": ID, "digest": DIGEST, "index": 0, "data": "text"}),
    (Wait, {"id": ID, "digest": DIGEST, "timeout": -1}),
    (Wait, {"id": ID, "digest": DIGEST, "timeout": 1e9}),
    (Wait, {"id": ID, "digest": DIGEST, "timeout": "1"}),
    (Wait, {"id": ID, "digest": DIGEST, "timeout": float("nan")}),
    (PieceRequest, {"id": ID, "digest": DIGEST, "piece_size": 10, "index": 0}),
    (PieceRequest, {"id": ID, "digest": DIGEST, "piece_size": 65536, "index": -1}),
    (Have, {"id": ID, "digest": DIGEST, "piece_size": 65536, "known": -2}),
    (Have, {"id": ID, "digest": DIGEST, "piece_size": 65536, "known": -1.0}),
    (Have, {"id": ID, "digest": DIGEST, "piece_size": 1 << 40}),
]


# Every request of the registry, the nanny and transfer: the same three rules.
ALL_REQUESTS = REQUESTS + NANNY_REQUESTS


@pytest.mark.parametrize("request_", ALL_REQUESTS, ids=lambda r: type(r).__name__)
def test_requests_go_to_the_wire_and_back(request_):
    assert type(request_).from_msg(request_.to_msg()) == request_


@pytest.mark.parametrize(
    "message, msg", LIES + NANNY_LIES, ids=lambda v: getattr(v, "__name__", "")
)
def test_requests_refuse_lies(message, msg):
    with pytest.raises(ValueError):
        message.from_msg(msg)


@pytest.mark.parametrize("message", sorted({type(r) for r in ALL_REQUESTS}, key=str))
def test_requests_refuse_wrong_arguments_as_a_call_would(message):
    good = next(r for r in ALL_REQUESTS if type(r) is message).to_msg()
    with pytest.raises(TypeError, match=CALL_ERROR):
        message.from_msg({**good, "extra": 1})
    required = [f.name for f in fields(message) if f.default is MISSING]
    for key in required:
        with pytest.raises(TypeError, match=CALL_ERROR):
            message.from_msg({k: v for k, v in good.items() if k != key})


NANNY_ANSWERS = [
    InfoAnswer("host:2049:1", "east", {"os": "linux", "machine": "x86_64"}),
    InfoAnswer("host:2049:1", None, {"os": "linux"}, installed=False, archive=True),
    InstallAnswer(1.5, 10, 90),
    GcAnswer("host:2049:1", (ID, OTHER), 1 << 30),
    ForeignAnswer("/env/bin/python", {"PATH": "/env/bin"}, "/b/bridge.py"),
    Wanted(ID, "sklearn-dev"),
    Wanted(ID, "sklearn-dev", via=OTHER, base=BASE),
    OfferAnswer(False, 0),
    WaitAnswer(True),
    WaitAnswer(False, "its disk is full"),
    WaitAnswer(False, "its bytes are another id's", not_its_id=True),
    WaitAnswer(False, None, 3, 64, polled=24),
    WaitAnswer(False, None, 1, 2, {"client": 65536}, {}, {"tcp://b:2": "gone"}, (1,)),
    PieceAnswer(busy=True),
    PieceAnswer(missing=True),
    HaveAnswer(False, b"\1\0"),
    HaveAnswer(True),
]


@pytest.mark.parametrize("answer", NANNY_ANSWERS, ids=lambda a: type(a).__name__)
def test_nanny_answers_go_to_the_wire_and_back(answer):
    assert type(answer).from_msg(answer.to_msg()) == answer


def test_nanny_answers_keep_their_wire_format():
    assert InfoAnswer("n", None, {}).to_msg() == {
        "node": "n",
        "site": None,
        "platform": {},
    }
    assert WaitAnswer(True).to_msg() == {"complete": True, "error": None}
    assert PieceAnswer(busy=True).to_msg() == {"busy": True}
    assert PieceAnswer(missing=True).to_msg() == {"missing": True}
    # A piece goes as a serialized frame, and comes back as its bytes.
    data = PieceAnswer(b"piece").to_msg()["data"]
    assert isinstance(data, Serialize) and data.data == b"piece"
    assert PieceAnswer.from_msg({"data": data}).data == b"piece"
    assert Put.from_msg(Put(ID, DIGEST, 0, b"x").to_msg()).data == b"x"
    assert Wanted(ID, "x").to_msg() == {"id": ID, "name": "x"}


@pytest.mark.parametrize(
    "parse, msg",
    [
        (InfoAnswer.from_msg, None),
        (InfoAnswer.from_msg, {"node": "n"}),
        (InfoAnswer.from_msg, {"node": "n", "platform": {"os": 5}}),
        (InfoAnswer.from_msg, {"node": "n", "platform": {}, "installed": "yes"}),
        (InstallAnswer.from_msg, {"seconds": 1, "written": -1, "linked": 0}),
        (InstallAnswer.from_msg, {"seconds": "1", "written": 0, "linked": 0}),
        (GcAnswer.from_msg, {"node": "n", "evicted": ["../x"], "size": 0}),
        (GcAnswer.from_msg, {"node": "n", "evicted": [], "size": None}),
        (ForeignAnswer.from_msg, {"python": "p", "environ": {"A": 5}, "script": "s"}),
        (ForeignAnswer.from_msg, {"python": "p", "environ": [], "script": "s"}),
        (ForeignAnswer.from_msg, {"python": "", "environ": {}, "script": "s"}),
        (Wanted.from_msg, {"id": "../x", "name": "x"}),
        (Wanted.from_msg, {"id": ID, "name": "x", "base": BASE}),
        (Wanted.from_msg, {"id": ID}),
        (OfferAnswer.from_msg, {"complete": 1, "have": 0}),
        (OfferAnswer.from_msg, {"complete": False, "have": -1}),
        (WaitAnswer.from_msg, {"error": None}),
        (WaitAnswer.from_msg, {"complete": False, "have": "all"}),
        (WaitAnswer.from_msg, {"complete": False, "received": {"client": -1}}),
        (WaitAnswer.from_msg, {"complete": False, "unavailable": [-1]}),
        (WaitAnswer.from_msg, {"complete": False, "not_its_id": "yes"}),
        (WaitAnswer.from_msg, {"complete": False, "polled": -1}),
        (WaitAnswer.from_msg, {"complete": False, "dropped": {"a": 5}}),
        (PieceAnswer.from_msg, "nonsense"),
        (PieceAnswer.from_msg, {}),
        (PieceAnswer.from_msg, {"data": 5}),
        (HaveAnswer.from_msg, {"complete": None}),
        (HaveAnswer.from_msg, {"complete": False, "have": [1, 0]}),
    ],
)
def test_nanny_answers_refuse_lies(parse, msg):
    with pytest.raises(ValueError):
        parse(msg)


def test_handlers_are_served_typed_sync_or_async():
    reply = status()

    async def status_of(request: Status) -> NannyStatus:
        return NannyStatus.from_msg(reply)

    handler = serve(status_of, Status)
    assert handler.__name__ == "envship_status_of"
    assert asyncio.run(handler(cache=True)) == reply
    with pytest.raises(TypeError, match=CALL_ERROR):
        asyncio.run(handler(cash=True))
    with pytest.raises(ValueError):
        asyncio.run(handler(cache="yes"))
    assert serve(lambda request: True, Status)(cache=False) is True  # a bool: as is


# -- errors travel between processes too ---------------------------------------------


def test_errors_say_what_their_subject_is_and_pickle():
    assert str(EnvshipError("x", "broken")) == "environment 'x': broken"
    cache = EnvshipError("/tmp/cache", "not ours", "chown it", subject="node cache")
    assert str(cache) == "node cache '/tmp/cache': not ours\nFix: chown it"
    for error in (cache, NotAllowedError("mine", "not allowed", "ask")):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)
        assert again.subject == error.subject


def test_the_registry_records_stay_bounded_as_nannies_and_names_come_and_go():
    # The review: 100k rules made the scheduler 96 MB bigger, and the records
    # of nannies that left stayed for good.
    from dataclasses import replace

    from envship.scheduler import registry as registry_module

    registry = Registry()
    call = handlers(registry)
    live = [f"tcp://live:{i}" for i in range(10)]
    workers = {a: type("W", (), {"nanny": a})() for a in live}
    registry.scheduler = type("Scheduler", (), {"workers": workers, "clients": {}})()
    call["publish"](offer=offer().to_msg())
    long_ago = time.time() - 2 * registry_module.HOLDER_GRACE
    for i in range(1_000):  # nannies that came and went, each at a new address
        gone = f"tcp://gone:{i}"
        registry.running[gone] = Running(ID, "sklearn-dev", long_ago)
        call["hold"](nanny=gone, id=ID, complete=True)
        registry.holders[ID][gone] = replace(registry.holders[ID][gone], time=long_ago)
    for nanny in live:
        call["runs"](nanny=nanny, id=ID, name="sklearn-dev")
        call["hold"](nanny=nanny, id=ID, complete=True)
    assert len(registry.running) <= 2 * len(live) + registry_module.RECORD_SLACK
    assert len(registry.holders[ID]) <= 2 * len(live) + registry_module.RECORD_SLACK
    assert set(live) <= set(registry.running) and set(live) <= set(registry.holders[ID])

    for i in range(25):  # 25 switches of 1,000 new worker names each
        call["desire"](id=ID, names=[f"w-{i}-{j}" for j in range(1_000)])
    assert len(registry.by_name) == registry_module.MAX_RULES
    assert "w-24-999" in registry.by_name and "w-0-0" not in registry.by_name


def test_a_second_piece_table_for_an_id_nodes_hold_does_not_replace_the_first():
    # The review: another client could publish another table for an id nodes
    # hold, so that every node fetching it from them failed.
    registry = Registry()
    call = handlers(registry)
    registry.scheduler = type(
        "Scheduler", (), {"workers": {"w": type("W", (), {"nanny": "tcp://a:1"})()}}
    )()
    first = offer()
    other = Offer(ID, "sklearn-dev", manifest(), PieceTable.of_bytes(b"y" * 9, 65536))
    assert call["publish"](offer=first.to_msg()) == "OK"
    assert call["publish"](offer=other.to_msg()) == "OK"  # nobody holds it yet
    assert call["publish"](offer=first.to_msg()) == "OK"
    call["hold"](nanny="tcp://a:1", id=ID, complete=True)
    assert call["publish"](offer=other.to_msg()) == "kept"
    assert call["where"](id=ID)["offer"]["table"]["digest"] == first.table.digest
    assert call["publish"](offer=first.to_msg()) == "OK"  # the same table again


def test_a_survey_from_the_scheduler_is_checked_before_it_is_shown():
    from envship.survey import Surveyed

    good = {"workers": [], "nodes": [{"node": "h"}], "blobs": []}
    assert Surveyed.from_msg(good).found == good
    for lie in (
        None,
        [],
        {"workers": []},
        {**good, "blobs": [1]},
        {**good, "nodes": {}},
    ):
        with pytest.raises(ValueError, match="survey"):
            Surveyed.from_msg(lie)
