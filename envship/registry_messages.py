"""What the registry's ``envship_*`` handlers take and answer, typed and checked.

Each request is the keyword arguments of one handler (``envship_hold(nanny=...,
id=..., complete=...)``), made into a frozen dataclass by ``from_msg``, which
checks every value's type and bounds once (ValueError), and refuses missing
or unknown arguments as a Python call would (TypeError). Each answer has a
``to_msg``, the dict on the wire, and a ``from_msg`` for those who read it
(nannies, clients). The wire format is the one the handlers always had.

Besides them, the registry's own records (who holds what, who runs what,
who claimed which nannies) are typed here, since its snapshot sends them.

This module sits between :mod:`envship.transfer` (an offer is a
:class:`envship.transfer.pieces.Offer`) and the three sides above it: the
registry (:mod:`envship.scheduler.registry`) answers these messages, the
nannies (:mod:`envship.node.nanny`) and clients send them and read the
answers, and none of those imports another sideways to do so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from envship.ids import (
    Address,
    EnvId,
    check_address,
    check_id,
    check_site,
    check_text,
)
from envship.messages import (
    call_arguments,
    check_bool,
    check_list,
    check_seconds,
    optional,
    reply_fields,
)
from envship.transfer.pieces import Offer, Peer

# -- requests ---------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    """``envship_publish(offer)``: keep an environment's offer."""

    offer: Offer

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Publish:
        return cls(Offer.from_msg(call_arguments(cls, msg)["offer"]))

    def to_msg(self) -> dict:
        return {"offer": self.offer.to_msg()}


@dataclass(frozen=True)
class Desire:
    """``envship_desire(id, names)``: workers ``names`` (None: all) should run ``id``.

    ``id`` None: the nannies' own environment. ``names`` are worker
    identities (:mod:`envship.identity`): a worker's name, or for a worker
    started without one, its nanny's address. A worker name may be any
    value (Dask allows ints); it is kept as its ``str``.
    """

    id: EnvId | None = None
    names: tuple[str, ...] | None = None

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Desire:
        m = call_arguments(cls, msg)
        id, names = optional(_id, m["id"]), m["names"]
        if names is not None:
            if not isinstance(names, list | tuple) or len(names) > 100_000:
                raise ValueError("names must be a list of worker names")
            names = tuple(_worker_name(n) for n in names)
        return cls(id, names)

    def to_msg(self) -> dict:
        names = None if self.names is None else list(self.names)
        return {"id": self.id, "names": names}


@dataclass(frozen=True)
class Where:
    """``envship_where(id=...)``: blob ``id``; or ``name=...``: what that worker should run.

    ``name`` is the worker's identity (:mod:`envship.identity`).
    """

    id: EnvId | None = None
    name: str | None = None

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Where:
        m = call_arguments(cls, msg)
        if m["id"] is not None:  # then the name is not looked at
            return cls(id=_id(m["id"]))
        return cls(name=optional(_worker_name, m["name"]))

    def to_msg(self) -> dict:
        return {"id": self.id, "name": self.name}


@dataclass(frozen=True)
class Hold:
    """``envship_hold``: ``nanny`` holds blob ``id`` (``complete``, or fetching it).

    ``complete`` None: it holds it no more.
    """

    nanny: Address
    id: EnvId
    complete: bool | None
    site: str | None = None
    node: str | None = None

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Hold:
        m = call_arguments(cls, msg)
        site = check_site(m["site"])
        node = optional(lambda n: check_text(n, "a node"), m["node"])
        nanny, id = check_address(m["nanny"], "a nanny address"), _id(m["id"])
        complete = m["complete"]
        if complete is not None and not isinstance(complete, bool):
            raise ValueError(f"complete must be true, false or none, not {complete!r}")
        return cls(nanny, id, complete, site, node)

    def to_msg(self) -> dict:
        return {
            "nanny": self.nanny,
            "id": self.id,
            "complete": self.complete,
            "site": self.site,
            "node": self.node,
        }


@dataclass(frozen=True)
class Runs:
    """``envship_runs``: ``nanny``'s worker now runs in ``id`` (None: the nanny's own)."""

    nanny: Address
    id: EnvId | None
    name: str | None = None

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Runs:
        m = call_arguments(cls, msg)
        return cls(
            check_address(m["nanny"], "a nanny address"),
            optional(_id, m["id"]),
            optional(lambda n: check_text(n, "a name"), m["name"]),
        )

    def to_msg(self) -> dict:
        return {"nanny": self.nanny, "id": self.id, "name": self.name}


@dataclass(frozen=True)
class Claim:
    """``envship_claim``: claim ``nannies`` for a switch to ``name`` by ``owner``.

    ``owner`` is one call of ``client`` (a client id): the claim ends when
    that client disconnects.
    """

    owner: str
    client: str
    nannies: tuple[Address, ...]
    name: str

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Claim:
        m = call_arguments(cls, msg)
        owner = check_text(m["owner"], "an owner")
        client = check_text(m["client"], "a client id")
        name = check_text(m["name"], "a name")
        nannies = m["nannies"]
        if not isinstance(nannies, list | tuple) or len(nannies) > 100_000:
            raise ValueError("nannies must be a list of nanny addresses")
        return cls(
            owner,
            client,
            tuple(check_address(n, "a nanny address") for n in nannies),
            name,
        )

    def to_msg(self) -> dict:
        return {
            "owner": self.owner,
            "client": self.client,
            "nannies": list(self.nannies),
            "name": self.name,
        }


@dataclass(frozen=True)
class Release:
    """``envship_release(owner)``: end ``owner``'s claims."""

    owner: str

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Release:
        return cls(check_text(call_arguments(cls, msg)["owner"], "an owner"))

    def to_msg(self) -> dict:
        return {"owner": self.owner}


# -- records and answers ------------------------------------------------------------


@dataclass(frozen=True)
class Holding:
    """What the registry knows of a nanny holding a blob: whole or not, where, when."""

    complete: bool
    site: str | None
    node: str | None
    time: float

    def to_msg(self) -> dict:
        return {
            "complete": self.complete,
            "site": self.site,
            "node": self.node,
            "time": self.time,
        }


@dataclass(frozen=True)
class Holder:
    """A nanny to fetch a blob from, and whether it holds the whole blob."""

    peer: Peer
    complete: bool

    def to_msg(self) -> dict:
        return {**self.peer.to_msg(), "complete": self.complete}

    @classmethod
    def from_msg(cls, msg: object) -> Holder:
        m = reply_fields(msg, "a holder", ("address", "complete"))
        return cls(Peer.from_msg(m), check_bool(m["complete"], "complete"))


@dataclass(frozen=True)
class WhereAnswer:
    """What ``envship_where`` answers: the offer (None: none known) and its holders.

    Examples
    --------
    >>> WhereAnswer.from_msg({"offer": None, "holders": []})
    WhereAnswer(offer=None, holders=())
    """

    offer: Offer | None
    holders: tuple[Holder, ...] = ()

    def to_msg(self) -> dict:
        return {
            "offer": None if self.offer is None else self.offer.to_msg(),
            "holders": [h.to_msg() for h in self.holders],
        }

    @classmethod
    def from_msg(cls, msg: object) -> WhereAnswer:
        m = reply_fields(msg, "a where answer", ("offer", "holders"))
        holders = check_list(m["holders"], "holders")
        return cls(
            optional(Offer.from_msg, m["offer"]),
            tuple(Holder.from_msg(h) for h in holders),
        )


@dataclass(frozen=True)
class ClaimRecord:
    """A switch under way: whose (``owner``, of ``client``), to what, since when."""

    owner: str
    client: str
    name: str
    since: float

    def to_msg(self) -> dict:
        return {
            "owner": self.owner,
            "client": self.client,
            "name": self.name,
            "since": self.since,
        }

    @classmethod
    def from_msg(cls, msg: object) -> ClaimRecord:
        m = reply_fields(msg, "a claim", ("owner", "client", "name", "since"))
        return cls(
            check_text(m["owner"], "an owner"),
            check_text(m["client"], "a client id"),
            check_text(m["name"], "a name"),
            check_seconds(m["since"], "since"),
        )


@dataclass(frozen=True)
class Conflict:
    """Another switch's claim in the way, as its answer tells it: whose
    client, to what, since when; never its owner token, which releases it.

    Examples
    --------
    >>> record = ClaimRecord("c1/secret", "c1", "sklearn-dev", 1.5e9)
    >>> Conflict.of(record).to_msg()
    {'client': 'c1', 'name': 'sklearn-dev', 'since': 1500000000.0}
    """

    client: str
    name: str
    since: float

    @classmethod
    def of(cls, record: ClaimRecord) -> Conflict:
        return cls(record.client, record.name, record.since)

    def to_msg(self) -> dict:
        return {"client": self.client, "name": self.name, "since": self.since}

    @classmethod
    def from_msg(cls, msg: object) -> Conflict:
        m = reply_fields(msg, "a conflicting claim", ("client", "name", "since"))
        return cls(
            check_text(m["client"], "a client id"),
            check_text(m["name"], "a name"),
            check_seconds(m["since"], "since"),
        )


@dataclass(frozen=True)
class ClaimAnswer:
    """What ``envship_claim`` answers: the claims in the way (none: all claimed).

    Examples
    --------
    >>> ClaimAnswer.from_msg({"conflicts": {}}).conflicts
    {}
    """

    conflicts: dict[Address, Conflict]

    def to_msg(self) -> dict:
        return {"conflicts": {n: c.to_msg() for n, c in self.conflicts.items()}}

    @classmethod
    def from_msg(cls, msg: object) -> ClaimAnswer:
        m = reply_fields(msg, "a claim answer", ("conflicts",))
        if not isinstance(m["conflicts"], dict):
            raise ValueError("conflicts must be a dict")
        return cls(
            {
                check_address(n, "a nanny address"): Conflict.from_msg(c)
                for n, c in m["conflicts"].items()
            }
        )


@dataclass(frozen=True)
class Running:
    """What a nanny's worker runs in (None: the nanny's own), and since when."""

    id: EnvId | None
    name: str | None
    since: float

    def to_msg(self) -> dict:
        return {"id": self.id, "name": self.name, "since": self.since}


def _id(value: object) -> EnvId:
    try:
        return check_id(value)
    except ValueError:
        raise ValueError(f"not an environment id: {value!r}") from None


def _worker_name(value: object) -> str:
    return check_text(str(value), "a worker name")


@dataclass(frozen=True)
class Snapshot:
    """What ``envship_registry`` answers: the registry's whole state, for status pages.

    Offers are summed up (name, size, ``thin_of``), holders listed per blob
    with their nanny, whole holders first.
    """

    default: EnvId | None
    by_name: dict[str, EnvId | None]
    offers: dict[EnvId, Offer]
    holders: dict[EnvId, dict[Address, Holding]]
    running: dict[Address, Running]

    def to_msg(self) -> dict:
        return {
            "default": self.default,
            "by_name": dict(self.by_name),
            "offers": {
                id: {
                    "name": o.name,
                    "size": o.table.size,
                    "thin_of": getattr(o.manifest, "thin_of", None),
                }
                for id, o in self.offers.items()
            },
            "holders": {
                id: [{"nanny": nanny, **h.to_msg()} for nanny, h in held.items()]
                for id, held in self.holders.items()
            },
            "running": {n: r.to_msg() for n, r in self.running.items()},
        }
