"""Which environments the administrators of a cluster let its users run.

``envship.allowed`` in dask config: a list of environment names or ids, or
null (anyone may ship their own). ``envship.contact``: who users should ask,
shown when something is refused. Read where the config is the
administrators': on the scheduler (its registry tells clients before they
ship anything) and on every nanny (no worker starts in anything else).

A name is a label chosen by whoever packed the environment; an id is the
hash of its content. List ids for a policy that names cannot get around: an
entry of 12 to 32 hex digits is an id or an id's prefix, and matches ids
only (an environment packed under the name ``5f0c...`` is not allowed by
the id ``5f0c...``); any other entry is a name. This
keeps users to vetted software; it is no sandbox: any client of a Dask
cluster can run code on its workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from envship import config
from envship.errors import EnvshipError

#: The most names or ids a policy sent by another process may list.
MAX_ALLOWED = 100_000


class NotAllowedError(EnvshipError):
    """The cluster's administrators do not allow this environment."""


@dataclass(frozen=True)
class Policy:
    """What the administrators allow: names or ids (None: anything), and whom to ask.

    Examples
    --------
    >>> rules = Policy(allowed=("sklearn-dev",), contact="hpc@uni.edu")
    >>> rules.allows("sklearn-dev", "5f0c" * 8), rules.allows("mine", "5f0c" * 8)
    (True, False)
    >>> Policy.from_msg(rules.to_msg()) == rules
    True
    """

    allowed: tuple[str, ...] | None = None
    contact: str | None = None

    def allows(self, name: str, artifact_id: str) -> bool:
        """Whether ``artifact_id`` or a prefix of it (12 or more hex digits)
        is listed, or ``name``. An entry that looks like an id matches ids
        only: a name is whatever its packer chose, so an environment packed
        under the name of an allowed id is not allowed by it.

        Examples
        --------
        >>> rules = Policy(allowed=("5f0c5f0c5f0c",))
        >>> rules.allows("any", "5f0c" * 8), rules.allows("5f0c5f0c5f0c", "ab" * 16)
        (True, False)
        """
        allowed = self.allowed
        if allowed is None:
            return True
        for entry in allowed:
            if looks_like_id(entry):
                if artifact_id.startswith(entry):
                    return True
            elif entry == name:
                return True
        return False

    def to_msg(self) -> dict:
        """``{"allowed": list or None, "contact": str or None}``: the wire's form."""
        allowed = None if self.allowed is None else list(self.allowed)
        return {"allowed": allowed, "contact": self.contact}

    @classmethod
    def from_msg(cls, msg: object) -> Policy:
        """A policy another process sent; ValueError if it is not one."""
        if not isinstance(msg, dict):
            raise ValueError(f"a policy must be a dict, not {type(msg).__name__}")
        allowed, contact = msg.get("allowed"), msg.get("contact")
        if allowed is not None and (
            not isinstance(allowed, list | tuple)
            or len(allowed) > MAX_ALLOWED
            or not all(isinstance(a, str) for a in allowed)
        ):
            raise ValueError(f"allowed must be a list of names or ids, not {allowed!r}")
        if contact is not None and not isinstance(contact, str):
            raise ValueError(f"contact must be a string, not {contact!r}")
        return cls(None if allowed is None else tuple(allowed), contact)


def looks_like_id(entry: str) -> bool:
    """Whether a policy entry names an id (or a prefix of one): 12 to 32 hex digits.

    Examples
    --------
    >>> looks_like_id("5f0c5f0c5f0c"), looks_like_id("sklearn-dev"), looks_like_id("cafe")
    (True, False, False)
    """
    return 12 <= len(entry) <= 32 and all(c in "0123456789abcdef" for c in entry)


def current() -> Policy:
    """This process's policy, from its dask config.

    Examples
    --------
    >>> import dask.config
    >>> with dask.config.set({"envship.allowed": ["sklearn-dev"]}):
    ...     current().allowed
    ('sklearn-dev',)
    """
    allowed = config.get("allowed")
    if allowed is not None:
        if isinstance(allowed, str):  # DASK_ENVSHIP__ALLOWED="a,b"
            allowed = [a.strip() for a in allowed.split(",") if a.strip()]
        allowed = tuple(str(a) for a in allowed)
    contact = config.get("contact")
    return Policy(allowed, None if contact is None else str(contact))


def check(name: str, artifact_id: str, policy: Policy | dict | None = None) -> None:
    """Raise ``NotAllowedError`` unless ``policy`` (default: this process's) allows it.

    An environment is allowed if its id (or a prefix of it of 12 or more hex
    digits) or its name is listed; an entry that looks like an id matches
    ids only. ``policy`` may be the wire's form
    (:meth:`Policy.to_msg`), as the registry's ``envship_policy`` answers.

    Examples
    --------
    >>> check("sklearn-dev", "5f0c" * 8, Policy(allowed=("sklearn-dev",)))
    >>> check("mine", "5f0c" * 8, {"allowed": ["sklearn-dev"], "contact": "hpc@uni.edu"})
    Traceback (most recent call last):
    ...
    envship.policy.NotAllowedError: environment 'mine': the administrators of this cluster allow only these environments: sklearn-dev
    Fix: ask hpc@uni.edu to allow it (its id is 5f0c5f0c5f0c5f0c5f0c5f0c5f0c5f0c), or use one of those
    """
    if policy is None:
        policy = current()
    elif isinstance(policy, dict):
        policy = Policy.from_msg(policy)
    if policy.allows(name, artifact_id):
        return
    who = policy.contact or "the cluster's administrators"
    listed = ", ".join(policy.allowed or ()) or "none"
    raise NotAllowedError(
        name,
        f"the administrators of this cluster allow only these environments: {listed}",
        f"ask {who} to allow it (its id is {artifact_id}), or use one of those",
    )
