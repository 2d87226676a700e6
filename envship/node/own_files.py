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

from envship.archive import READ_SIZE, path_digest
from envship.table import entry_mode, store_key

logger = logging.getLogger(__name__)


class OwnFiles:
    """The regular files under ``prefix``, found by store key.

    Listed (one ``lstat`` each) on first use and grouped by mode and mtime;
    a file is hashed only when a key with its mode and mtime is asked about,
    and only once, so that an unrelated environment costs the listing alone.

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
                        try:
                            self._paths[f"{path_digest(path)}-{stamp}"] = path
                        except OSError:
                            continue  # unreadable or gone: not a source
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
        for folder, dirs, files in os.walk(self.prefix):
            if self.skip and (folder + os.sep).startswith(self.skip + os.sep):
                dirs.clear()
                continue
            for name in files:
                path = os.path.join(folder, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    stamp = store_key("", entry_mode(st), int(st.st_mtime))[1:]
                    by_stamp.setdefault(stamp, []).append(path)
        return by_stamp

    def copy(self, key: str, dest: str) -> bool:
        """Copy the file found under ``key`` to ``dest`` (a new file) as its key says.

        Its bytes are hashed on the way; mode and mtime are the key's. False
        (and nothing at ``dest``) if no file was found under it, or it changed
        since.
        """
        if not self.held([key])[0]:  # hashes its candidates, if not yet
            return False
        with self._lock:
            source = self._paths.get(key)  # None if a failed copy just dropped it
        if source is None:
            return False
        digest, mode, mtime = key.split("-")
        h = xxhash.xxh3_128()
        try:
            with open(source, "rb") as src, open(dest, "xb") as out:
                while chunk := src.read(READ_SIZE):
                    h.update(chunk)
                    out.write(chunk)
            if h.hexdigest() != digest:
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
