"""Which environments the administrators of a cluster let its users run.

``envship.allowed`` in dask config: a list of environment names or ids, or
null (anyone may ship their own). ``envship.contact``: who users should ask,
shown when something is refused. Read where the config is the
administrators': on the scheduler (its registry tells clients before they
ship anything) and on every nanny (no worker starts in anything else).

A name is a label chosen by whoever packed the environment; an id is the
hash of its content. List ids for a policy that names cannot get around. This
keeps users to vetted software; it is no sandbox: any client of a Dask
cluster can run code on its workers.
"""

from __future__ import annotations

from envship import config
from envship.errors import EnvshipError


class NotAllowedError(EnvshipError):
    """The cluster's administrators do not allow this environment."""


def current() -> dict:
    """This process's policy: ``{"allowed": list or None, "contact": str or None}``.

    Examples
    --------
    >>> import dask.config
    >>> with dask.config.set({"envship.allowed": ["sklearn-dev"]}):
    ...     current()["allowed"]
    ['sklearn-dev']
    """
    allowed = config.get("allowed")
    if allowed is not None:
        if isinstance(allowed, str):  # DASK_ENVSHIP__ALLOWED="a,b"
            allowed = [a.strip() for a in allowed.split(",") if a.strip()]
        allowed = [str(a) for a in allowed]
    contact = config.get("contact")
    return {"allowed": allowed, "contact": None if contact is None else str(contact)}


def check(name: str, artifact_id: str, policy: dict | None = None) -> None:
    """Raise ``NotAllowedError`` unless ``policy`` (default: this process's) allows it.

    An environment is allowed if its name or its id (or a prefix of 12 or
    more characters of the id) is listed.

    Examples
    --------
    >>> check("sklearn-dev", "5f0c" * 8, {"allowed": ["sklearn-dev"], "contact": None})
    >>> check("mine", "5f0c" * 8, {"allowed": ["sklearn-dev"], "contact": "hpc@uni.edu"})
    Traceback (most recent call last):
    ...
    envship.policy.NotAllowedError: environment 'mine': the administrators of this cluster allow only these environments: sklearn-dev
    Fix: ask hpc@uni.edu to allow it (its id is 5f0c5f0c5f0c5f0c5f0c5f0c5f0c5f0c), or use one of those
    """
    policy = current() if policy is None else policy
    allowed = policy.get("allowed")
    if allowed is None or name in allowed or artifact_id in allowed:
        return
    if any(len(a) >= 12 and artifact_id.startswith(a) for a in allowed):
        return
    who = policy.get("contact") or "the cluster's administrators"
    listed = ", ".join(allowed) if allowed else "none"
    raise NotAllowedError(
        name,
        f"the administrators of this cluster allow only these environments: {listed}",
        f"ask {who} to allow it (its id is {artifact_id}), or use one of those",
    )
