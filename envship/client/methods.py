"""The methods envship adds to ``distributed.Client``, all in one place.

``client.use_environment(...)`` and ``client.prepare_environment(...)`` are
the functions of :mod:`envship.client.use`, bound to the client, with all
their arguments (an environment, or a package list: ``pip=``,
``requirements=``, ``lock=``, ``base=``, ``file=``). Importing
``envship`` adds them (see ``envship/__init__.py``); nothing else patches
``Client``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from distributed import Client

from .use import prepare_environment, use_environment


class ClientMethod(NamedTuple):
    """A function of envship that a ``Client`` gets as a method of that name."""

    name: str
    function: Callable[..., Any]


CLIENT_METHODS = (
    ClientMethod("use_environment", use_environment),
    ClientMethod("prepare_environment", prepare_environment),
)


def add_client_methods() -> None:
    """Make each of ``CLIENT_METHODS`` a method of ``distributed.Client``.

    ``setattr`` because ``Client`` declares no such attributes: adding them
    to a class of another package is what this is.

    Examples
    --------
    >>> from distributed import Client
    >>> add_client_methods()
    >>> Client.use_environment is use_environment
    True
    """
    for method in CLIENT_METHODS:
        setattr(Client, method.name, method.function)
