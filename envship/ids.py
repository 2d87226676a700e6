"""The names things have on the wire, and the checks that make them from text.

A content id, a piece table's digest, a thin pack's id and a comm address are
all short strings, and easy to swap by mistake: each has its own ``NewType``
here, as ``distributed.shuffle`` has its ``ShuffleId``. A value of one of these
types has been checked once, by the function that made it from another
process's text (``check_id``, ``check_digest``, ``check_address``...), and is
trusted from then on.

This is the bottom floor of the package: it imports nothing of envship, so
every other module (formats, transfer, nodes, scheduler, client) may use it.
"""

from __future__ import annotations

import re
from typing import NewType, TypeGuard

#: The content id of an environment (xxh3-128 of what it unpacks to) or of
#: any blob: 32 lowercase hex digits.
EnvId = NewType("EnvId", str)
#: The id of a thin pack: a blob of its own, named by its content id like any.
ThinId = NewType("ThinId", EnvId)
#: The xxh3-128 of a piece table, which binds it to its blob.
Digest = NewType("Digest", str)
#: A comm address: a nanny's, a worker's, the scheduler's (``tcp://host:port``).
Address = NewType("Address", str)

ID_PATTERN = re.compile(r"[0-9a-f]{32}")
#: The longest name, address or label another process may send.
MAX_TEXT = 1024


def is_id(text: object) -> TypeGuard[str]:
    r"""Whether ``text`` is a content id: the whole string, no trailing newline.

    Examples
    --------
    >>> is_id("0" * 32), is_id("0" * 32 + "\n"), is_id("0" * 31)
    (True, False, False)
    """
    return isinstance(text, str) and ID_PATTERN.fullmatch(text) is not None


def check_id(id: object) -> EnvId:
    """``id`` if it is a content id (see :func:`is_id`); ValueError if not.

    Examples
    --------
    >>> check_id("5f0c" * 8)
    '5f0c5f0c5f0c5f0c5f0c5f0c5f0c5f0c'
    >>> check_id("../etc")
    Traceback (most recent call last):
    ...
    ValueError: not a content id: '../etc'
    """
    if not is_id(id):
        raise ValueError(f"not a content id: {id!r}")
    return EnvId(id)


def check_thin_id(id: object) -> ThinId:
    """``id`` if it is a thin pack's id (a content id); ValueError if not."""
    return ThinId(check_id(id))


def check_digest(digest: object) -> Digest:
    """``digest`` if it is a piece table's digest (32 hex digits); ValueError if not.

    Examples
    --------
    >>> check_digest(7)
    Traceback (most recent call last):
    ...
    ValueError: not a piece table digest: 7
    """
    if not isinstance(digest, str) or not ID_PATTERN.fullmatch(digest):
        raise ValueError(f"not a piece table digest: {digest!r}")
    return Digest(digest)


def check_text(value: object, what: str) -> str:
    """``value`` if it is a short, non-empty string; ValueError naming ``what`` if not.

    Examples
    --------
    >>> check_text("worker-0", "a worker name")
    'worker-0'
    >>> check_text(5, "a worker name")
    Traceback (most recent call last):
    ...
    ValueError: a worker name must be a short string, not 5
    """
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
        raise ValueError(f"{what} must be a short string, not {value!r}")
    return value


def check_site(site: object) -> str | None:
    """``site`` if it is a site label (a short string) or None; ValueError if not."""
    return None if site is None else check_text(site, "a site")


def check_address(value: object, what: str = "an address") -> Address:
    """``value`` if it may be a comm address (a short string); ValueError if not.

    Only its shape is checked: whether anything listens there is the
    caller's business.

    Examples
    --------
    >>> check_address("tcp://10.0.0.1:4000", "a nanny address")
    'tcp://10.0.0.1:4000'
    """
    return Address(check_text(value, what))
