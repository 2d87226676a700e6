"""Which name a worker goes by in envship: one that survives its restarts.

A worker started without a name (``dask worker SCHEDULER --nworkers 2``, no
``--name``) takes its own address as its name, and a switch restarts it on a
new port: its name of the moment is gone a second later. Its nanny stays, at
the same address, for as long as it runs (and across its own restarts when
started with a fixed ``--nanny-port``). So envship identifies such a worker by
its nanny's address, and every other worker by the name it was given
(LocalCluster's ``0``, ``1``, ... kept as ``"0"``, ``"1"``).

The switch report, ``status``, ``workers=[...]`` and the scheduler registry's
per-worker desired environment all use this identity; the client computes it
from what the scheduler knows of a worker, the nanny from its own name and
address, and both must agree: this module is the one place that decides.
It knows nothing of Dask's objects, only names and addresses.
"""

from __future__ import annotations


def worker_identity(name: object, address: str, nanny: str | None) -> str:
    """The identity of the worker at ``address`` named ``name``, with ``nanny``.

    Its name as text, unless it has none of its own (None, or its own
    address, which Dask gives a worker started without a name): then its
    nanny's address.

    Examples
    --------
    >>> worker_identity("node-a-0", "tcp://127.0.0.1:4001", "tcp://127.0.0.1:4000")
    'node-a-0'
    >>> worker_identity(0, "tcp://127.0.0.1:4001", "tcp://127.0.0.1:4000")
    '0'
    >>> worker_identity("tcp://127.0.0.1:4001", "tcp://127.0.0.1:4001",
    ...                 "tcp://127.0.0.1:4000")
    'tcp://127.0.0.1:4000'
    >>> worker_identity(None, "tcp://127.0.0.1:4001", None)  # no nanny: nothing stabler
    'tcp://127.0.0.1:4001'
    """
    if name is None or str(name) == address:
        return nanny or address
    return str(name)


def nanny_identity(name: object, address: str) -> str:
    """The identity of the worker of the nanny at ``address`` named ``name``.

    The same as :func:`worker_identity` gives for its worker: a nanny started
    without a name gives its worker none, so the worker takes its address.

    Examples
    --------
    >>> nanny_identity("node-a-0", "tcp://127.0.0.1:4000")
    'node-a-0'
    >>> nanny_identity(None, "tcp://127.0.0.1:4000")
    'tcp://127.0.0.1:4000'
    """
    return address if name is None else str(name)


def same_address(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are one address, written with or without ``tcp://``.

    Examples
    --------
    >>> same_address("127.0.0.1:4000", "tcp://127.0.0.1:4000")
    True
    >>> same_address("tls://127.0.0.1:4000", "tcp://127.0.0.1:4000")
    False
    """
    return _with_protocol(a) == _with_protocol(b)


def _with_protocol(address: str) -> str:
    return address if "://" in address else f"tcp://{address}"
