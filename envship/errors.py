"""The one family of errors a user of envship can meet.

Every message names the environment (or the node cache, the scheduler... that
is concerned, and says which), says what is wrong and how to fix it.
"""

from __future__ import annotations

from typing import Any


class EnvshipError(Exception):
    """An error caused by the environment or input a user gave envship.

    Parameters
    ----------
    env : str
        What is concerned: an environment (a name, a path or an id), or
        whatever ``subject`` says it is.
    problem : str
        What is wrong, in one or a few sentences.
    fix : str, optional
        What the user can do about it.
    subject : str, optional
        What ``env`` is, when it is not an environment: ``"node cache"``
        (and ``env`` its folder), ``"scheduler"`` (and ``env`` its address).

    Examples
    --------
    >>> raise EnvshipError("sklearn-dev", "no python in it", "install python")
    Traceback (most recent call last):
    ...
    envship.errors.EnvshipError: environment 'sklearn-dev': no python in it
    Fix: install python
    >>> raise EnvshipError("/tmp/cache", "not ours", subject="node cache")
    Traceback (most recent call last):
    ...
    envship.errors.EnvshipError: node cache '/tmp/cache': not ours
    """

    def __init__(
        self,
        env: str,
        problem: str,
        fix: str | None = None,
        subject: str = "environment",
    ):
        self.env = env
        self.problem = problem
        self.fix = fix
        self.subject = subject
        message = f"{subject} {env!r}: {problem}"
        if fix:
            message += f"\nFix: {fix}"
        super().__init__(message)

    def __reduce__(self) -> tuple[type[EnvshipError], tuple[Any, ...]]:
        return type(self), (self.env, self.problem, self.fix, self.subject)


class UnsafeArchiveError(EnvshipError):
    """An archive holds an entry that must never be extracted."""


class IncompatibleEnvironmentError(EnvshipError):
    """An environment cannot run workers of this cluster."""


class MissingStoreFileError(EnvshipError):
    """A thin pack refers to a file that the node's file store no longer holds.

    The client sends that node the whole archive instead.
    """


class CorruptArchiveError(EnvshipError):
    """An archive does not read as what it claims to be: damaged bytes.

    A node raises it; the client then checks its own copy to say which side
    is damaged.
    """


class UnpublishedError(ValueError):
    """The scheduler's registry knows no offer of an environment a switch wants.

    A scheduler that restarted since the environment was shipped, or one that
    only knows a thin pack's offer: the client publishes the whole archive's
    offer, then asks again.
    """
