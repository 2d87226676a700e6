"""What a nanny's own ``envship_*`` handlers take and answer, typed and checked.

Each request is the keyword arguments of one handler of
:class:`envship.node.nanny.NannySide` (``envship_install(artifact_id=...,
via=...)``), made into a frozen dataclass by ``from_msg``, which checks every
value once (ValueError) and refuses missing or unknown arguments as a Python
call would (TypeError, see :func:`envship.messages.call_arguments`). Each
answer has a ``to_msg``, the dict on the wire, and a ``from_msg`` for the
clients that read it (ValueError whatever is wrong). The wire format is the
one the handlers always had. ``envship_status`` takes
:class:`envship.messages.Status` and answers
:class:`envship.messages.NannyStatus`, which live on the bottom floor since
the dashboard reads them too; ``envship_lacks`` answers bytes (one bit per
file, :func:`envship.table.encode_bits`).

Examples
--------
>>> Install.from_msg({"artifact_id": "5f0c" * 8})
Install(artifact_id='5f0c5f0c5f0c5f0c5f0c5f0c5f0c5f0c', via=None)
>>> Install.from_msg({"artifact_id": "../etc"})
Traceback (most recent call last):
...
ValueError: not a content id: '../etc'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from envship.ids import EnvId, ThinId, check_id, check_text, check_thin_id
from envship.messages import (
    MAX_ERROR,
    call_arguments,
    check_bool,
    check_count,
    check_error,
    check_list,
    check_seconds,
    optional,
    reply_fields,
)

#: The most variables a foreign environment's worker may be given.
MAX_ENVIRON = 10_000
#: The longest value of one such variable (a PATH can be long).
MAX_ENV_VALUE = 128 * 1024
#: The largest pid Linux hands out (``/proc/sys/kernel/pid_max``'s ceiling).
MAX_PID = 1 << 22


# -- requests ---------------------------------------------------------------------


@dataclass(frozen=True)
class Info:
    """``envship_info(artifact_id)``: this nanny's node and site; holds it ``artifact_id``?"""

    artifact_id: EnvId | None = None

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Info:
        return cls(optional(check_id, call_arguments(cls, msg)["artifact_id"]))

    def to_msg(self) -> dict:
        return {"artifact_id": self.artifact_id}


@dataclass(frozen=True)
class Lacks:
    """``envship_lacks(keys)``: which of these store keys the node's file store lacks.

    ``keys`` are the records of :func:`envship.table.encode_keys`, decoded
    (and checked) by the handler. ``own_only``: count as held only the files
    of the nanny's own environment (a thin pack without a base: a node that
    joins later can fill it only from its own environment, not from what
    this node's store happens to hold).
    """

    keys: bytes
    own_only: bool = False

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Lacks:
        m = call_arguments(cls, msg)
        keys, own_only = m["keys"], m["own_only"]
        if not isinstance(keys, bytes):
            raise ValueError(f"keys must be bytes, not {type(keys).__name__}")
        if not isinstance(own_only, bool):
            raise ValueError(f"own_only must be a bool, not {type(own_only).__name__}")
        return cls(keys, own_only)

    def to_msg(self) -> dict:
        return {"keys": self.keys, "own_only": self.own_only}


@dataclass(frozen=True)
class Install:
    """``envship_install``: unpack held archive ``artifact_id`` (or thin pack ``via``)."""

    artifact_id: EnvId
    via: ThinId | None = None

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Install:
        m = call_arguments(cls, msg)
        return cls(check_id(m["artifact_id"]), optional(check_thin_id, m["via"]))

    def to_msg(self) -> dict:
        return {"artifact_id": self.artifact_id, "via": self.via}


@dataclass(frozen=True)
class Foreign:
    """``envship_foreign``: hold ``id`` for a bridge of this nanny's worker ``pid``."""

    id: EnvId
    name: str
    pid: int

    @classmethod
    def from_msg(cls, msg: dict[str, Any]) -> Foreign:
        m = call_arguments(cls, msg)
        return cls(
            check_id(m["id"]),
            check_text(m["name"], "a name"),
            check_count(m["pid"], "a pid", MAX_PID),
        )

    def to_msg(self) -> dict:
        return {"id": self.id, "name": self.name, "pid": self.pid}


# -- answers ----------------------------------------------------------------------


@dataclass(frozen=True)
class InfoAnswer:
    """What ``envship_info`` answers: node, site, platform; holds it the environment?

    ``installed`` and ``archive`` are None when no environment was asked about.

    Examples
    --------
    >>> answer = InfoAnswer("host:2049:1", None, {"os": "linux"}, True, False)
    >>> InfoAnswer.from_msg(answer.to_msg()) == answer
    True
    """

    node: str
    site: str | None
    platform: dict[str, str]
    installed: bool | None = None
    archive: bool | None = None

    def to_msg(self) -> dict:
        held = {}
        if self.installed is not None:
            held = {"installed": self.installed, "archive": bool(self.archive)}
        return {
            "node": self.node,
            "site": self.site,
            "platform": dict(self.platform),
            **held,
        }

    @classmethod
    def from_msg(cls, msg: object) -> InfoAnswer:
        m = reply_fields(msg, "a nanny's info", ("node", "platform"))
        platform = m["platform"]
        if not isinstance(platform, dict) or len(platform) > 100:
            raise ValueError("a platform must be a small dict")
        return cls(
            node=check_text(m["node"], "a node"),
            site=optional(lambda s: check_text(s, "a site"), m.get("site")),
            platform={
                check_text(k, "a platform key"): check_text(v, "a platform value")
                for k, v in platform.items()
            },
            installed=optional(
                lambda b: check_bool(b, "installed"), m.get("installed")
            ),
            archive=optional(lambda b: check_bool(b, "archive"), m.get("archive")),
        )


@dataclass(frozen=True)
class InstallAnswer:
    """What ``envship_install`` answers: seconds, and files written and linked.

    Both counts are 0 when another call (or nanny of the node) unpacked it.
    """

    seconds: float
    written: int
    linked: int

    def to_msg(self) -> dict:
        return {"seconds": self.seconds, "written": self.written, "linked": self.linked}

    @classmethod
    def from_msg(cls, msg: object) -> InstallAnswer:
        m = reply_fields(msg, "an install answer", ("seconds", "written", "linked"))
        return cls(
            check_seconds(m["seconds"], "seconds"),
            check_count(m["written"], "files written"),
            check_count(m["linked"], "files linked"),
        )


@dataclass(frozen=True)
class GcAnswer:
    """What ``envship_gc`` answers: the node, the environments evicted, bytes left."""

    node: str
    evicted: tuple[EnvId, ...]
    size: int

    def to_msg(self) -> dict:
        return {"node": self.node, "evicted": list(self.evicted), "size": self.size}

    @classmethod
    def from_msg(cls, msg: object) -> GcAnswer:
        m = reply_fields(msg, "a gc answer", ("node", "evicted", "size"))
        return cls(
            check_text(m["node"], "a node"),
            tuple(check_id(e) for e in check_list(m["evicted"], "evicted")),
            check_count(m["size"], "a cache size"),
        )


@dataclass(frozen=True)
class ForeignAnswer:
    """What ``envship_foreign`` answers: how to start a bridge into the environment.

    The environment's ``python``, the variables a worker inside it would
    get, and the path of ``bootstrap/bridge.py``.
    """

    python: str
    environ: dict[str, str]
    script: str

    def to_msg(self) -> dict:
        return {
            "python": self.python,
            "environ": dict(self.environ),
            "script": self.script,
        }

    @classmethod
    def from_msg(cls, msg: object) -> ForeignAnswer:
        m = reply_fields(msg, "a foreign answer", ("python", "environ", "script"))
        environ = m["environ"]
        if not isinstance(environ, dict) or len(environ) > MAX_ENVIRON:
            raise ValueError("environ must be a dict of variables")
        for key, value in environ.items():
            check_text(key, "a variable's name")
            if not isinstance(value, str) or len(value) > MAX_ENV_VALUE:
                raise ValueError(f"the value of {key} must be a string")
        return cls(
            check_text(m["python"], "a python"),
            dict(environ),
            check_text(m["script"], "a script"),
        )


@dataclass(frozen=True)
class LastSwitch:
    """How this nanny's last switch went: ok or its error, and how long it took.

    ``seconds`` is None before any switch, and after one that failed before
    restarting anything.
    """

    ok: bool = True
    error: str | None = None
    seconds: float | None = None

    @classmethod
    def failed(cls, error: object) -> LastSwitch:
        """A switch that failed with ``error`` (its text, kept short)."""
        return cls(False, check_error(str(error)[:MAX_ERROR]))


@dataclass(frozen=True)
class Wanted:
    """An environment a nanny's worker should run in, as a switch carries it.

    ``id`` and ``name``; for an environment whose whole archive nobody holds,
    the thin pack to install it from (``via``) and the ``base`` environment
    whose files that refers to (None: files of the node's own environment). It travels in the ``UseEnvironment`` plugin
    as ``to_msg()``'s dict.

    Examples
    --------
    >>> Wanted.from_msg({"id": "5f0c" * 8, "name": "sklearn-dev"}).via is None
    True
    >>> Wanted.from_msg({"id": "5f0c" * 8, "name": "x", "base": "a" * 32})
    Traceback (most recent call last):
    ...
    ValueError: a base needs the thin pack (via) that refers to it
    """

    id: EnvId
    name: str
    via: ThinId | None = None
    base: EnvId | None = None

    def to_msg(self) -> dict:
        msg: dict[str, str | None] = {"id": self.id, "name": self.name}
        if self.via is not None:
            msg.update(via=self.via, base=self.base)
        return msg

    @classmethod
    def from_msg(cls, msg: object) -> Wanted:
        m = reply_fields(msg, "an environment", ("id", "name"))
        wanted = cls(
            check_id(m["id"]),
            check_text(m["name"], "a name"),
            optional(check_thin_id, m.get("via")),
            optional(check_id, m.get("base")),
        )
        if wanted.via is None and wanted.base is not None:
            raise ValueError("a base needs the thin pack (via) that refers to it")
        return wanted
