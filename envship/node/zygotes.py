"""The zygotes this nanny process uses: one per environment prefix.

:func:`get` returns the running :class:`~envship.node.zygote.Zygote` of an
environment, starting it on first need; later starts in that environment
(restarts, crash restarts, ``restart_workers``, switches back) fork from
it. With ``envship.zygote.per-node`` and an environment of the node cache,
the nannies of the node share it: the first starts it, listening on a
socket in the cache's ``zygotes/`` folder, and the others connect (a lock
file orders them), so the node imports each environment once.

:func:`running` records what each nanny's worker runs in; zygotes of
environments no worker of this process runs in are closed, except the most
recently used within ``envship.zygote.keep`` and ``keep-memory``.
:func:`release` (a nanny closed) closes them all once no nanny of the
process is left; :func:`forget` closes one whose environment left the
node's cache.

A zygote that died, or whose environment's python changed on disk (evicted
and unpacked again), is replaced on the next :func:`get`. Closing a zygote
only stops this process's use of it: it exits once every process that used
it closed it and its last worker has ended.

Config: ``envship.zygote.enabled``, ``per-node``, ``preload``, ``keep`` and
``keep-memory``. Knows nothing of distributed.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import xxhash
from dask.utils import parse_bytes
from filelock import FileLock, Timeout

from envship import config

from .worker_environ import TargetEnvironment
from .zygote import Zygote, ZygoteError, startup_variables

logger = logging.getLogger(__name__)


_lock = threading.Lock()


@dataclass(frozen=True)
class _Entry:
    zygote: Zygote
    #: The stat of its python when it started: changed means unpacked anew.
    stat: tuple
    id: str
    name: str


#: prefix -> its zygote; least recently used first.
_zygotes: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
#: prefix -> lock held while that prefix's zygote starts.
_starting: dict[str, threading.Lock] = {}
#: prefix -> why its zygote refuses to fork (it is not started again).
_refused: dict[str, str] = {}
#: nanny address -> the prefix its worker runs in (None: the nanny's own).
_running: dict[str, str | None] = {}


def enabled() -> bool:
    """Whether workers in environments fork from zygotes (``envship.zygote.enabled``)."""
    return bool(config.get("zygote.enabled"))


def _key(prefix: str | os.PathLike) -> str:
    return str(Path(prefix).resolve())


def _stat(python: Path) -> tuple:
    st = os.stat(python)
    return (st.st_dev, st.st_ino, st.st_mtime_ns)


def get(
    target: TargetEnvironment, environ: Mapping[str, str], timeout: float
) -> Zygote:
    """The zygote of ``target``, started with ``environ`` if none runs. Blocks.

    Start it with the variables a plain start of a worker gets: the
    zygote refuses forks whose start-time variables differ.

    Raises
    ------
    ZygoteError
        It could not start within ``timeout`` seconds or refuses to fork:
        start the worker plainly.

    Examples
    --------
    >>> zygote = get(target, environ, timeout=60)  # doctest: +SKIP
    >>> ForkedWorker(zygote, environ).start(setup)  # doctest: +SKIP
    """
    key = _key(target.prefix)
    with _lock:
        if key in _refused:
            raise ZygoteError(f"the zygote of {key} refuses to fork: {_refused[key]}")
        starting = _starting.setdefault(key, threading.Lock())
    with starting:
        stale = None
        with _lock:
            entry = _zygotes.get(key)
            if entry is not None:
                try:
                    current = _stat(target.python)
                except OSError:
                    current = None
                if entry.zygote.is_alive() and current == entry.stat:
                    _zygotes.move_to_end(key)
                    return entry.zygote
                del _zygotes[key]
                stale = entry.zygote
        if stale is not None:
            logger.info("envship: replacing %r (gone or its python changed)", stale)
            stale.close()
        try:
            stat = _stat(target.python)
        except OSError as e:
            raise ZygoteError(f"cannot read {target.python}: {e}") from e
        zygote = _start_or_join(target, environ, timeout)
        if zygote.refusal:
            with _lock:
                _refused[key] = zygote.refusal
            zygote.close()
            raise ZygoteError(f"{zygote!r} refuses to fork: {zygote.refusal}")
        logger.info(
            "envship: %s %r for %s (preloaded %s)",
            "joined the node's" if zygote.shared else "started",
            zygote,
            target.name,
            ", ".join(zygote.preloaded),
        )
        with _lock:
            _zygotes[key] = _Entry(zygote, stat, target.id, target.name)
    return zygote


def _start_or_join(
    target: TargetEnvironment, environ: Mapping[str, str], timeout: float
) -> Zygote:
    """Connect to the node's zygote of ``target``, or start it for the node.

    Per node when ``target.zygotes`` names a folder (a node cache's) and
    ``envship.zygote.per-node``: the nannies of the node meet at a socket
    there, named by what makes a zygote unfit for a worker (the python's
    file, the start-time variables, the preload list); a lock lets one start
    it while the others wait, then connect. Else this process starts its own.
    """
    preload = config.get("zygote.preload")
    folder = target.zygotes
    if folder is None or not config.get("zygote.per-node"):
        return Zygote.start(target.python, environ, preload, timeout)
    st = os.stat(target.python)
    key = xxhash.xxh3_64_hexdigest(
        json.dumps(
            [
                str(target.python),
                [st.st_dev, st.st_ino, st.st_mtime_ns],
                sorted(startup_variables(environ).items()),
                preload,
            ]
        ).encode()
    )
    socket_path = folder / f"{key}.sock"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = os.stat(folder)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ZygoteError(f"{folder} is not this user's own (mode 0700)")
    # A socket's path must fit in 108 bytes: name it through a descriptor
    # of its folder (the socket file is made in the folder itself).
    folder_fd = os.open(folder, os.O_PATH | os.O_DIRECTORY)
    short = f"/proc/self/fd/{folder_fd}/{key}.sock"
    try:
        with FileLock(folder / f"{key}.lock", timeout=timeout):
            try:
                return Zygote.connect(short, target.python, timeout)
            except (OSError, ZygoteError):
                pass  # none yet, or one that exited: start the node's
            socket_path.unlink(missing_ok=True)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
                try:
                    listener.bind(short)
                    listener.listen(64)
                except OSError as e:  # a filesystem without sockets (NFS)
                    logger.info(
                        "envship: no socket in %s (%s): a zygote per nanny process",
                        folder,
                        e.strerror,
                    )
                    return Zygote.start(target.python, environ, preload, timeout)
                return Zygote.start(
                    target.python, environ, preload, timeout, listener=listener
                )
    except Timeout as e:
        raise ZygoteError(f"another nanny held {e.lock_file} for {timeout:g} s") from e
    finally:
        os.close(folder_fd)


def _unchanged(entry: _Entry) -> bool:
    """Whether the python of ``entry``'s zygote is still the file it started."""
    try:
        return _stat(entry.zygote.python) == entry.stat
    except OSError:
        return False


def running(nanny: str, prefix: str | os.PathLike | None) -> None:
    """Record that ``nanny``'s worker runs in ``prefix`` (None: the nanny's
    own environment), then :func:`trim`."""
    key = None if prefix is None else _key(prefix)
    with _lock:
        _running[nanny] = key
        if key is not None and key in _zygotes:
            _zygotes.move_to_end(key)
    trim()


def trim() -> None:
    """Close the zygotes no worker runs in, but the most recently used ones
    within ``envship.zygote.keep`` (a count) and ``envship.zygote.keep-memory``
    (their resident memory together) whose environment is still there (the
    nanny that evicts one closes its own; the others see it here)."""
    keep = max(0, int(config.get("zygote.keep")))
    budget = parse_bytes(config.get("zygote.keep-memory"))
    with _lock:
        used = set(_running.values())
        others = [key for key in reversed(_zygotes) if key not in used]
        entries = {key: _zygotes[key] for key in others}
    closing, kept, memory = [], 0, 0
    for key in others:  # most recently used first
        rss = entries[key].zygote.rss()
        if not _unchanged(entries[key]):
            closing.append(key)  # evicted by another nanny of the node
        elif kept < keep and memory + rss <= budget:
            kept += 1
            memory += rss
        else:
            closing.append(key)
    with _lock:
        gone = [
            _zygotes.pop(key).zygote
            for key in closing
            if _zygotes.get(key) is entries[key] and key not in _running.values()
        ]
    for zygote in gone:
        logger.info("envship: closing %r (no worker runs in it)", zygote)
        zygote.close()


def release(nanny: str) -> None:
    """``nanny`` closed: close every zygote once no nanny of this process is left."""
    with _lock:
        _running.pop(nanny, None)
        last = not _running
    if last:
        close_all()
    else:
        trim()


def forget(prefix: str | os.PathLike) -> None:
    """Close the zygote of ``prefix`` (its environment left the cache), if any."""
    with _lock:
        entry = _zygotes.pop(_key(prefix), None)
    if entry is not None:
        logger.info("envship: closing %r (its environment was evicted)", entry.zygote)
        entry.zygote.close()


def close_all() -> None:
    """Close every zygote of this process."""
    with _lock:
        zygotes = [entry.zygote for entry in _zygotes.values()]
        _zygotes.clear()
        _refused.clear()
    for zygote in zygotes:
        zygote.close()


def zygotes() -> dict[str, Zygote]:
    """The running zygotes of this process, by environment prefix."""
    with _lock:
        return {key: entry.zygote for key, entry in _zygotes.items()}


def states() -> list[dict]:
    """The zygotes of this process for a status: ``id`` and ``name`` of the
    environment, ``pid`` and ``rss`` (bytes), least recently used first.

    Examples
    --------
    >>> states()  # doctest: +SKIP
    [{'id': '3f9a...', 'name': 'sklearn-dev', 'pid': 4242, 'rss': 52428800}]
    """
    with _lock:
        entries = list(_zygotes.values())
    return [
        {"id": e.id, "name": e.name, "pid": e.zygote.pid, "rss": e.zygote.rss()}
        for e in entries
        if e.zygote.is_alive()
    ]
