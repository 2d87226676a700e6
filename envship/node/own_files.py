"""The nanny's own environment as a source of files for the node's store.

An environment built on the one the nannies run in (``use_environment(pip=
[...])`` with the client's own environment as base, on a cluster that runs
that same environment) shares most of its files with it: same bytes, mode
and mtime, as a clone by hard links keeps them. The node lists the files of
its nanny's environment under their store keys once (hashing them: about a
second per few hundred MB) and reports them as held; the client then sends a
thin pack that refers to them, and the node copies each one it needs into
its store, hashing it again on the way: a file changed since it was listed
is not used (the node then asks for the whole archive, as for any file its
store lost). Nothing is ever written into the nanny's environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time

import xxhash

from envship.archive import READ_SIZE
from envship.table import entry_mode, store_key

logger = logging.getLogger(__name__)


#: Opened without following a symlink swapped in, nor blocking on a FIFO.
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


class OwnFiles:
    """The regular files under ``prefix``, found by store key.

    Listed (one ``lstat`` each, one path per inode; a conda installation's
    ``pkgs/`` and ``envs/`` left out) on first use and grouped by mode and
    mtime; a file is hashed only when a key with its mode and mtime is asked
    about, and only once, so that an unrelated environment costs the listing
    alone.

    Examples
    --------
    >>> own = OwnFiles(sys.prefix, skip=cache_root)  # doctest: +SKIP
    >>> own.held([key])  # doctest: +SKIP
    [True]
    >>> own.copy(key, f"{tree}/lib/python3.11/site-packages/six.py")  # doctest: +SKIP
    True
    """

    def __init__(self, prefix: str | os.PathLike, skip: str | os.PathLike = ""):
        self.prefix = os.path.realpath(prefix)
        self.skip = os.path.realpath(skip) if skip else ""
        self._by_stamp: dict[str, list[str]] | None = None  # "mode-mtime" -> paths
        self._paths: dict[str, str] = {}  # store key -> path, of files hashed
        self._lock = threading.Lock()

    def held(self, keys: list[str]) -> list[bool]:
        """For each store key, whether a file of the environment has it."""
        with self._lock:
            if self._by_stamp is None:
                self._by_stamp = self._list()
            started, hashed = time.perf_counter(), 0
            found = []
            for key in keys:
                if key not in self._paths:
                    stamp = key.partition("-")[2]
                    for path in self._by_stamp.pop(stamp, ()):
                        digest = _read(path)
                        if digest is not None:
                            self._paths[f"{digest}-{stamp}"] = path
                            hashed += 1
                found.append(key in self._paths)
            if hashed:
                logger.info(
                    "envship: hashed %d files of this nanny's environment %s in "
                    "%.1f s, to copy from instead of fetching",
                    hashed,
                    self.prefix,
                    time.perf_counter() - started,
                )
            return found

    def _list(self) -> dict[str, list[str]]:
        by_stamp: dict[str, list[str]] = {}
        seen: set[tuple[int, int]] = set()
        conda_root = os.path.isdir(os.path.join(self.prefix, "conda-meta"))
        for folder, dirs, files in os.walk(self.prefix):
            if self.skip and (folder + os.sep).startswith(self.skip + os.sep):
                dirs.clear()
                continue
            if conda_root and folder == self.prefix:
                dirs[:] = [d for d in dirs if d not in ("pkgs", "envs")]
            for name in files:
                path = os.path.join(folder, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    stamp = store_key("", entry_mode(st), int(st.st_mtime))[1:]
                    by_stamp.setdefault(stamp, []).append(path)
        return by_stamp

    def copy(self, key: str, dest: str) -> bool:
        """Copy the file found under ``key`` to ``dest`` (a new file) as its key says.

        Its bytes are hashed on the way; mode and mtime are the key's. False
        (and nothing at ``dest``) if no file was found under it, or it changed
        since.
        """
        source = self._paths.get(key)  # no lock for the common case
        if source is None:
            if not self.held([key])[0]:  # hashes its candidates, if not yet
                return False
            source = self._paths.get(key)  # None if a failed copy just dropped it
            if source is None:
                return False
        digest, mode, mtime = key.split("-")
        try:
            with open(dest, "xb") as out:
                if _read(source, out.write) != digest:
                    raise ValueError("changed since it was hashed")
            os.chmod(dest, int(mode, 8))
            os.utime(dest, ns=(int(mtime), int(mtime)))
        except FileExistsError:
            return False  # not ours to remove
        except (OSError, ValueError) as e:
            with contextlib.suppress(OSError):
                os.unlink(dest)
            logger.info(
                "envship: not copying %s from this nanny's environment: %s", source, e
            )
            with self._lock:
                self._paths.pop(key, None)
            return False
        return True


def _read(path: str, write=None) -> str | None:
    """The digest of the regular file at ``path`` (its bytes also to ``write``).

    None if it is not a regular file now (a symlink or FIFO swapped in), or
    cannot be read. At most the size it had when opened is read.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError:
        return None
    h = xxhash.xxh3_128()
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        left = st.st_size
        with os.fdopen(fd, "rb", closefd=False) as f:
            while left > 0 and (chunk := f.read(min(READ_SIZE, left))):
                h.update(chunk)
                if write is not None:
                    write(chunk)
                left -= len(chunk)
    except OSError:
        return None
    finally:
        os.close(fd)
    return h.hexdigest()
