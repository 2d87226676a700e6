"""What the transfer handlers of a nanny take and answer, typed and checked.

The handlers of :class:`envship.transfer.server.BlobServer` (``envship_offer``,
``envship_put``, ``envship_wait``, ``envship_piece``, ``envship_have``) take
their keyword arguments as one of the requests here, checked once by
``from_msg`` (ValueError for a wrong value; TypeError, as a Python call
would, for a missing or unknown argument: see
:func:`envship.messages.call_arguments`), and answer one of the answers
here; the client (:mod:`.seed`) and peers (:mod:`.fetch`) build the
requests and read the answers with ``from_msg`` (ValueError whatever is
wrong). Bytes of a piece travel as ``to_serialize``'d frames both ways. The
wire format is the one the handlers always had.

A piece index is checked here for its type and a bound; whether the blob
has that piece is the handler's to check, against its table.

Examples
--------
>>> Wait.from_msg({"id": "5f0c" * 8, "digest": "0" * 32, "timeout": 1e9})
Traceback (most recent call last):
...
ValueError: timeout out of bounds: 1000000000.0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distributed.protocol import to_serialize
from distributed.protocol.serialize import Serialize

from envship.ids import Digest, EnvId, check_digest, check_id, check_site
from envship.messages import (
    call_arguments,
    check_bool,
    check_count,
    check_error,
    check_list,
    optional,
    reply_fields,
)

from .pieces import MAX_PIECE_SIZE, MIN_PIECE_SIZE, Offer, Peer, int_in

#: The most pieces a blob may have (a 1 TiB blob of 64 KiB pieces).
MAX_PIECES = 1 << 24
#: The longest a ``wait`` may wait, in seconds.
MAX_WAIT = 60.0


# -- requests ---------------------------------------------------------------------


@dataclass(frozen=True)
class OfferRequest:
    """``envship_offer``: start (or join) fetching ``offer`` from ``peers``.

    ``seed_site``: the site whose nodes the client seeds, if only one.
    """

    offer: Offer
    peers: tuple[Peer, ...] = ()
    seed_site: str | None = None

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> OfferRequest:
        m = call_arguments(cls, msg)
        offer = Offer.from_msg(m["offer"])
        peers = check_list(m["peers"] or (), "peers")
        return cls(
            offer, tuple(Peer.from_msg(p) for p in peers), check_site(m["seed_site"])
        )

    def to_msg(self) -> dict:
        return {
            "offer": self.offer.to_msg(),
            "peers": [p.to_msg() for p in self.peers],
            "seed_site": self.seed_site,
        }


@dataclass(frozen=True)
class Put:
    """``envship_put``: piece ``index`` of blob ``id`` (table ``digest``), pushed."""

    id: EnvId
    digest: Digest
    index: int
    data: bytes = field(repr=False)

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Put:
        m = call_arguments(cls, msg)
        return cls(
            check_id(m["id"]),
            check_digest(m["digest"]),
            _index(m["index"]),
            _bytes(m["data"], "a piece"),
        )

    def to_msg(self) -> dict:
        return {
            "id": self.id,
            "digest": self.digest,
            "index": self.index,
            "data": to_serialize(self.data),
        }


@dataclass(frozen=True)
class Wait:
    """``envship_wait``: a download's state, once complete or after ``timeout`` s."""

    id: EnvId
    digest: Digest
    timeout: float = 1.0

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Wait:
        m = call_arguments(cls, msg)
        id, digest, timeout = check_id(m["id"]), check_digest(m["digest"]), m["timeout"]
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0 <= timeout <= MAX_WAIT
        ):
            raise ValueError(f"timeout out of bounds: {timeout!r}")
        return cls(id, digest, float(timeout))

    def to_msg(self) -> dict:
        return {"id": self.id, "digest": self.digest, "timeout": self.timeout}


@dataclass(frozen=True)
class PieceRequest:
    """``envship_piece``: piece ``index`` of blob ``id``, cut in ``piece_size`` pieces."""

    id: EnvId
    digest: Digest
    piece_size: int
    index: int

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> PieceRequest:
        m = call_arguments(cls, msg)
        return cls(
            check_id(m["id"]),
            check_digest(m["digest"]),
            _piece_size(m["piece_size"]),
            _index(m["index"]),
        )

    def to_msg(self) -> dict:
        return {
            "id": self.id,
            "digest": self.digest,
            "piece_size": self.piece_size,
            "index": self.index,
        }


@dataclass(frozen=True)
class Have:
    """``envship_have``: which pieces a nanny holds; waits for more than ``known``."""

    id: EnvId
    digest: Digest
    piece_size: int
    known: int = -1

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Have:
        m = call_arguments(cls, msg)
        known = m["known"]
        if not (type(known) is int and known == -1):
            known = check_count(known, "known", MAX_PIECES)
        return cls(
            check_id(m["id"]),
            check_digest(m["digest"]),
            _piece_size(m["piece_size"]),
            known,
        )

    def to_msg(self) -> dict:
        return {
            "id": self.id,
            "digest": self.digest,
            "piece_size": self.piece_size,
            "known": self.known,
        }


# -- answers ----------------------------------------------------------------------


@dataclass(frozen=True)
class OfferAnswer:
    """What ``envship_offer`` answers: whether the nanny holds the blob, how many pieces."""

    complete: bool
    have: int

    def to_msg(self) -> dict:
        return {"complete": self.complete, "have": self.have}

    @classmethod
    def from_msg(cls, msg: object) -> OfferAnswer:
        m = reply_fields(msg, "an offer answer", ("complete", "have"))
        return cls(
            check_bool(m["complete"], "complete"),
            check_count(m["have"], "pieces held", MAX_PIECES),
        )


@dataclass(frozen=True)
class WaitAnswer:
    """What ``envship_wait`` answers: a download's state.

    ``complete`` once the blob is in the node cache; ``error`` if it failed,
    and ``not_its_id`` if it failed because the blob, complete, was not the id
    it was offered as (its sender's copy is to check).
    For a download under way (or just ended), also the pieces it holds
    (``have``) of ``count``, bytes ``received`` per source, pieces
    ``rejected`` per source, peers ``dropped`` and why, and the pieces no
    live peer holds (``unavailable``). None: not said (a nanny that holds
    the blob, or no download of it).

    Examples
    --------
    >>> WaitAnswer.from_msg({"complete": True, "error": None})
    WaitAnswer(complete=True, error=None, have=None, count=None, received=None, rejected=None, dropped=None, unavailable=None, not_its_id=None, polled=None)
    """

    complete: bool
    error: str | None = None
    have: int | None = None
    count: int | None = None
    received: dict[str, int] | None = None
    rejected: dict[str, int] | None = None
    dropped: dict[str, str] | None = None
    unavailable: tuple[int, ...] | None = None
    not_its_id: bool | None = None
    #: Peers it asked what they hold (``envship.transfer.peers-polled``).
    polled: int | None = None

    def to_msg(self) -> dict:
        msg: dict[str, Any] = {"complete": self.complete}
        for name in (
            "not_its_id",
            "have",
            "count",
            "received",
            "rejected",
            "dropped",
            "polled",
        ):
            if getattr(self, name) is not None:
                msg[name] = getattr(self, name)
        if self.unavailable is not None:
            msg["unavailable"] = list(self.unavailable)
        msg["error"] = self.error
        return msg

    @classmethod
    def from_msg(cls, msg: object) -> WaitAnswer:
        m = reply_fields(msg, "a wait answer", ("complete",))
        unavailable = m.get("unavailable")
        return cls(
            complete=check_bool(m["complete"], "complete"),
            error=optional(check_error, m.get("error")),
            not_its_id=optional(
                lambda b: check_bool(b, "not_its_id"), m.get("not_its_id")
            ),
            polled=optional(lambda n: check_count(n, "peers polled"), m.get("polled")),
            have=optional(lambda n: check_count(n, "pieces held"), m.get("have")),
            count=optional(lambda n: check_count(n, "a piece count"), m.get("count")),
            received=optional(lambda d: _counts(d, "received"), m.get("received")),
            rejected=optional(lambda d: _counts(d, "rejected"), m.get("rejected")),
            dropped=optional(_reasons, m.get("dropped")),
            unavailable=None
            if unavailable is None
            else tuple(_index(i) for i in check_list(unavailable, "unavailable")),
        )


@dataclass(frozen=True)
class PieceAnswer:
    """What ``envship_piece`` answers: the piece's bytes, or that it is ``missing``
    there, or that the nanny is ``busy`` (ask again later).

    Examples
    --------
    >>> PieceAnswer.from_msg({"busy": True})
    PieceAnswer(missing=False, busy=True)
    >>> PieceAnswer.from_msg({"data": 5})
    Traceback (most recent call last):
    ...
    ValueError: a piece must be bytes, not int
    """

    data: bytes | None = field(default=None, repr=False)
    missing: bool = False
    busy: bool = False

    def to_msg(self) -> dict:
        if self.busy:
            return {"busy": True}
        if self.missing or self.data is None:
            return {"missing": True}
        return {"data": to_serialize(self.data)}

    @classmethod
    def from_msg(cls, msg: object) -> PieceAnswer:
        m = reply_fields(msg, "a piece answer", ())
        if m.get("busy"):
            return cls(busy=True)
        if m.get("missing"):
            return cls(missing=True)
        return cls(_bytes(m.get("data"), "a piece"))


@dataclass(frozen=True)
class HaveAnswer:
    """What ``envship_have`` answers: the whole blob, or one byte per piece held.

    ``have`` None: the nanny tells no pieces (it holds none yet, or all).
    """

    complete: bool
    have: bytes | None = None

    def to_msg(self) -> dict:
        return {"complete": self.complete, "have": self.have}

    @classmethod
    def from_msg(cls, msg: object) -> HaveAnswer:
        m = reply_fields(msg, "a have answer", ("complete",))
        have = m.get("have")
        return cls(
            check_bool(m["complete"], "complete"),
            None if have is None else _bytes(have, "a bitmap"),
        )


# -- checks -----------------------------------------------------------------------


def _index(value: object) -> int:
    if not int_in(value, 0, MAX_PIECES - 1):
        raise ValueError(f"piece index out of bounds: {value!r}")
    return value


def _piece_size(value: object) -> int:
    if not int_in(value, MIN_PIECE_SIZE, MAX_PIECE_SIZE):
        raise ValueError(f"piece size out of bounds: {value!r}")
    return value


def _bytes(value: object, what: str) -> bytes:
    """``value``'s bytes if it is bytes (a ``to_serialize``'d frame too); ValueError if not."""
    if isinstance(value, Serialize):
        value = value.data
    if isinstance(value, bytearray | memoryview):
        value = bytes(value)
    if not isinstance(value, bytes) or len(value) > MAX_PIECE_SIZE:
        raise ValueError(f"{what} must be bytes, not {type(value).__name__}")
    return value


def _counts(value: object, what: str) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > 100_000:
        raise ValueError(f"{what} must be a dict")
    return {str(k): check_count(v, what) for k, v in value.items()}


def _reasons(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or len(value) > 100_000:
        raise ValueError("dropped must be a dict")
    return {str(k): check_error(v) for k, v in value.items()}
