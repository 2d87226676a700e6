"""The one family of errors a user of envship can meet.

Every message names the environment, says what is wrong and how to fix it.
"""

from __future__ import annotations


class EnvshipError(Exception):
    """An error caused by the environment or input a user gave envship.

    Parameters
    ----------
    env : str
        The environment concerned (a name, a path or an id).
    problem : str
        What is wrong, in one or a few sentences.
    fix : str, optional
        What the user can do about it.

    Examples
    --------
    >>> raise EnvshipError("sklearn-dev", "no python in it", "install python")
    Traceback (most recent call last):
    ...
    envship.errors.EnvshipError: environment 'sklearn-dev': no python in it
    Fix: install python
    """

    def __init__(self, env: str, problem: str, fix: str | None = None):
        self.env = env
        self.problem = problem
        self.fix = fix
        message = f"environment {env!r}: {problem}"
        if fix:
            message += f"\nFix: {fix}"
        super().__init__(message)

    def __reduce__(self):
        return type(self), (self.env, self.problem, self.fix)


class UnsafeArchiveError(EnvshipError):
    """An archive holds an entry that must never be extracted."""


class IncompatibleEnvironmentError(EnvshipError):
    """An environment cannot run workers of this cluster."""


class MissingStoreFileError(EnvshipError):
    """A thin pack refers to a file that the node's file store no longer holds.

    The client sends that node the whole archive instead.
    """
