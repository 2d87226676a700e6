"""A client of the scheduler at an address, or one line saying why there is none.

``envship use``, ``status`` and ``cache gc --scheduler`` connect through
:func:`connect_scheduler`: it checks the address before any connection, then
connects within dask's ``distributed.comm.timeouts.connect``, and turns every
way of failing (a malformed address, nothing listening, a name that does not
resolve, no answer, something that is not a scheduler) into an
:class:`~envship.errors.EnvshipError` naming the address and the fix. It
never starts a cluster: an empty address is an error, not a ``LocalCluster``.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed import Client
from distributed.comm import connect
from distributed.comm.addressing import parse_address, parse_host_port
from distributed.comm.registry import backends, get_backend
from distributed.security import Security

from envship.errors import EnvshipError

#: The form of an address, for fixes.
EXAMPLE = "tcp://HOST:8786"

#: Protocols whose location is ``host:port``.
HOST_PORT_SCHEMES = ("tcp", "tls", "ws", "wss")

_CHECK_ADDRESS = f"give the address `dask scheduler` printed, e.g. {EXAMPLE}"


def _malformed(address: str, problem: str, fix: str = _CHECK_ADDRESS) -> EnvshipError:
    return EnvshipError(
        address, f"not a valid address: {problem}", fix, subject="scheduler"
    )


def check_address(address: str | None) -> str:
    """``address`` with its protocol (``tcp://`` unless it says another one).

    Raises an :class:`~envship.errors.EnvshipError` for an address no
    scheduler can have, before any connection is tried.

    Examples
    --------
    >>> check_address("127.0.0.1:8786")
    'tcp://127.0.0.1:8786'
    >>> check_address("127.0.0.1:8799x")
    Traceback (most recent call last):
    ...
    envship.errors.EnvshipError: scheduler '127.0.0.1:8799x': not a valid address: port '8799x' is not a number
    Fix: give the address `dask scheduler` printed, e.g. tcp://HOST:8786
    """
    address = (address or "").strip()
    if not address:
        raise _malformed("", "none was given (--scheduler, DASK_SCHEDULER_ADDRESS)")
    scheme, location = parse_address(address)
    if scheme in ("http", "https"):
        raise _malformed(
            address,
            f"{scheme}:// is a web address (the dashboard's?)",
            f"the scheduler's own address starts with tcp://, e.g. {EXAMPLE} "
            "(the dashboard is on 8787, the scheduler on 8786 by default)",
        )
    try:
        get_backend(scheme)
    except (ValueError, ImportError):
        known = ", ".join(sorted(backends))
        raise _malformed(
            address, f"unknown protocol {scheme!r} (dask knows {known})"
        ) from None
    if scheme not in HOST_PORT_SCHEMES:
        return f"{scheme}://{location}"
    try:
        host, port = parse_host_port(location)
    except ValueError as e:
        if "missing port" in str(e):
            problem = "it has no port"
        elif "brackets" in str(e):
            problem = "an IPv6 address needs brackets, as in tcp://[::1]:8786"
        else:
            problem = f"port {location.rpartition(':')[2]!r} is not a number"
        raise _malformed(address, problem) from None
    if not host:
        raise _malformed(address, "it has no host")
    if not 0 < port < 65536:
        raise _malformed(address, f"port {port} is not between 1 and 65535")
    return f"{scheme}://{location}"


def _unreachable(address: str, problem: str, fix: str) -> EnvshipError:
    return EnvshipError(
        address, f"cannot reach it: {problem}", fix, subject="scheduler"
    )


def _chain(e: BaseException | None):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


def _unresolved(address: str, host: str) -> EnvshipError:
    return _unreachable(
        address,
        f"the host name {host!r} does not resolve",
        f"check the host name (`getent hosts {host}`), or give the address "
        f"`dask scheduler` printed, e.g. {EXAMPLE}",
    )


def _connect_failure(address: str, error: BaseException, seconds: float):
    """The EnvshipError for a connection to ``address`` that could not be made."""
    host = address.partition("://")[2].rpartition(":")[0].strip("[]")
    timeout = (
        f"raise distributed.comm.timeouts.connect (now {seconds:g} s) for a slow "
        "network, e.g. DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=60s"
    )
    for e in _chain(error):
        if isinstance(e, ConnectionRefusedError):
            return _unreachable(
                address,
                "connection refused (nothing listens there)",
                "start the scheduler, or check the address `dask scheduler` "
                f"printed, e.g. {EXAMPLE}",
            )
        if isinstance(e, socket.gaierror):
            return _unresolved(address, host)
        if isinstance(e, ssl.SSLError):
            return _unreachable(
                address,
                f"TLS failed ({e.reason or e})",
                "set the cluster's certificates in distributed.comm.tls "
                "(ca-file, client.cert, client.key)",
            )
        if isinstance(e, TimeoutError | asyncio.TimeoutError):
            break
        if isinstance(e, OSError) and e.errno is not None:
            return _unreachable(
                address,
                f"{e.strerror or e}",
                f"check the address `dask scheduler` printed; {timeout}",
            )
    return _unreachable(
        address,
        f"no answer within {seconds:g} s",
        f"check the address `dask scheduler` printed and that this machine "
        f"reaches it (a firewall?); {timeout}",
    )


_OTHER = "something listens there but does not speak as a Dask scheduler"


def _not_a_scheduler(address: str, problem: str) -> EnvshipError:
    return EnvshipError(
        address,
        problem,
        "give the scheduler's address (`dask scheduler` printed it, e.g. "
        f"{EXAMPLE}), not a worker's or the dashboard's; a TLS scheduler's "
        "starts with tls://",
        subject="scheduler",
    )


async def _why_not(location: str, seconds: float) -> OSError | None:
    """Why a TCP connection to ``location`` fails at once (refused...), if it does."""
    host, port = parse_host_port(location)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), seconds)
    except (TimeoutError, asyncio.TimeoutError):
        return None
    except OSError as e:
        return e
    writer.close()  # it listens now: the scheduler has just started
    return None


async def _probe(address: str, seconds: float, args: dict[str, Any]) -> None:
    """Connect, handshake and ask ``identity``: an EnvshipError if any fails."""
    scheme, location = parse_address(address)
    if scheme in HOST_PORT_SCHEMES:
        # A name that does not exist is known at once; connect() would retry
        # it, each try cut short at a fifth of the timeout, and end up
        # reporting a timeout instead. Other lookup failures (EAI_AGAIN) are
        # left to connect(), which retries them.
        host, port = parse_host_port(location)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port), seconds
            )
        except socket.gaierror as e:
            if e.errno == socket.EAI_NONAME:
                raise _unresolved(address, host) from None
        except (TimeoutError, asyncio.TimeoutError):
            pass
    # connect() retries a refused connection until its timeout, and its last
    # try, cut short by the deadline, then reads as a timeout: a moment is
    # kept to ask once more why.
    last_look = min(1.0, seconds / 5) if scheme in HOST_PORT_SCHEMES else 0.0
    try:
        # connect() gives up on its own while nothing accepts; the outer
        # bound is for a peer that accepts and then says nothing (its
        # handshake read has no timeout).
        comm = await asyncio.wait_for(
            connect(address, timeout=seconds - last_look, **args), seconds + 1
        )
    except (TimeoutError, asyncio.TimeoutError):
        raise _not_a_scheduler(
            address,
            "something listens there but did not answer as a Dask scheduler "
            f"within {seconds:g} s",
        ) from None
    except TypeError as e:  # distributed's word for a missing TLS context
        if "TLS" not in str(e):
            raise
        raise _unreachable(
            address,
            f"a {address.partition('://')[0]}:// address needs the cluster's TLS "
            "certificates, and the dask config has none",
            "set the cluster's certificates in distributed.comm.tls "
            "(ca-file, client.cert, client.key)",
        ) from None
    except OSError as e:
        if str(e).startswith("Timed out trying to connect"):
            if last_look:
                e = await _why_not(location, last_look) or e
            raise _connect_failure(address, e, seconds) from None
        raise _not_a_scheduler(address, _OTHER) from None
    except Exception:  # a web server's reply read as frame sizes, ...
        raise _not_a_scheduler(address, _OTHER) from None
    try:
        await comm.write({"op": "identity", "reply": True})
        identity = await asyncio.wait_for(comm.read(), seconds)
    except Exception:
        raise _not_a_scheduler(address, _OTHER) from None
    finally:
        comm.abort()
    kind = identity.get("type") if isinstance(identity, dict) else None
    if kind in ("Worker", "Nanny"):
        raise _not_a_scheduler(
            address, f"a Dask {kind.lower()} listens there, not the scheduler"
        )


def _run(coroutine) -> None:
    """Run ``coroutine`` to its end in a thread of its own (a notebook has a loop)."""
    outcome: list[BaseException] = []

    def target():
        try:
            asyncio.run(coroutine)
        except BaseException as e:
            outcome.append(e)

    thread = threading.Thread(target=target, name="envship-connect", daemon=True)
    thread.start()
    thread.join()
    if outcome:
        raise outcome[0]


def connect_scheduler(
    address: str,
    *,
    timeout: str | float | None = None,
    security: Security | None = None,
) -> Client:
    """A :class:`distributed.Client` of the scheduler at ``address``.

    Parameters
    ----------
    address : str
        The scheduler's address, as ``dask scheduler`` printed it
        (``tcp://HOST:8786``; without a protocol, ``tcp://``).
    timeout : str or float, optional
        How long to try (seconds, or ``"30s"``). Default: dask's
        ``distributed.comm.timeouts.connect``.
    security : distributed.security.Security, optional
        TLS settings. Default: those of the dask config.

    Raises
    ------
    EnvshipError
        The address is malformed, nothing answers there in time, or what
        answers is not a Dask scheduler; the message names the address and
        the fix.

    Examples
    --------
    >>> with connect_scheduler("tcp://scheduler:8786") as client:  # doctest: +SKIP
    ...     print(envship.status(client))
    >>> connect_scheduler("tcp://scheduler:87x6")
    Traceback (most recent call last):
    ...
    envship.errors.EnvshipError: scheduler 'tcp://scheduler:87x6': not a valid address: port '87x6' is not a number
    Fix: ...
    """
    address = check_address(address)
    seconds = parse_timedelta(
        timeout
        if timeout is not None
        else dask.config.get("distributed.comm.timeouts.connect"),
        "s",
    )
    security = security or Security()
    _run(_probe(address, seconds, security.get_connection_args("client")))
    try:
        return Client(address, timeout=seconds, security=security)
    except OSError as e:  # the scheduler went away since the probe
        raise _connect_failure(address, e, seconds) from None
