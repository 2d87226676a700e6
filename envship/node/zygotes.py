"""The zygotes of this nanny process: one per environment prefix.

:func:`get` returns the running :class:`~envship.node.zygote.Zygote` of an
environment, starting it on first need; later starts in that environment
(restarts, crash restarts, ``restart_workers``, switches back) fork from
it. :func:`running` records what each nanny's worker runs in; zygotes of
environments no worker of this process runs in are closed, except the last
``envship.zygote.keep`` others. :func:`release` (a nanny closed) closes them
all once no nanny of the process is left; :func:`forget` closes one whose
environment left the node's cache.

A zygote that died, or whose environment's python changed on disk (evicted
and unpacked again), is replaced on the next :func:`get`. Closing a zygote
only stops its forking: it exits once its last worker has ended.

Config: ``envship.zygote.enabled``, ``envship.zygote.preload`` and
``envship.zygote.keep``. Knows nothing of distributed.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path

from envship import config

from .worker_environ import TargetEnvironment
from .zygote import Zygote, ZygoteError

logger = logging.getLogger(__name__)

_lock = threading.Lock()
#: prefix -> (zygote, the stat of its python when it started); least
#: recently used first.
_zygotes: collections.OrderedDict[str, tuple[Zygote, tuple]] = collections.OrderedDict()
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
                zygote, stat = entry
                try:
                    current = _stat(target.python)
                except OSError:
                    current = None
                if zygote.is_alive() and current == stat:
                    _zygotes.move_to_end(key)
                    return zygote
                del _zygotes[key]
                stale = zygote
        if stale is not None:
            logger.info("envship: replacing %r (gone or its python changed)", stale)
            stale.close()
        try:
            stat = _stat(target.python)
        except OSError as e:
            raise ZygoteError(f"cannot read {target.python}: {e}") from e
        zygote = Zygote.start(
            target.python, environ, config.get("zygote.preload"), timeout
        )
        if zygote.refusal:
            with _lock:
                _refused[key] = zygote.refusal
            zygote.close()
            raise ZygoteError(f"{zygote!r} refuses to fork: {zygote.refusal}")
        logger.info(
            "envship: started %r for %s (preloaded %s)",
            zygote,
            target.name,
            ", ".join(zygote.preloaded),
        )
        with _lock:
            _zygotes[key] = (zygote, stat)
    return zygote


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
    """Close the zygotes no worker runs in but the last ``envship.zygote.keep``."""
    keep = max(0, int(config.get("zygote.keep")))
    with _lock:
        used = set(_running.values())
        others = [key for key in _zygotes if key not in used]
        closing = others[: max(0, len(others) - keep)]
        zygotes = [_zygotes.pop(key)[0] for key in closing]
    for zygote in zygotes:
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
        logger.info("envship: closing %r (its environment was evicted)", entry[0])
        entry[0].close()


def close_all() -> None:
    """Close every zygote of this process."""
    with _lock:
        zygotes = [zygote for zygote, _ in _zygotes.values()]
        _zygotes.clear()
        _refused.clear()
    for zygote in zygotes:
        zygote.close()


def zygotes() -> dict[str, Zygote]:
    """The running zygotes of this process, by environment prefix."""
    with _lock:
        return {key: zygote for key, (zygote, _) in _zygotes.items()}
