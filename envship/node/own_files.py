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
    """The regular files under ``prefix``, by store key, listed on first use.

    Examples
    --------
    >>> own = OwnFiles(sys.prefix)  # doctest: +SKIP
    >>> own.has(key)  # doctest: +SKIP
    True
    >>> own.copy(key, "/cache/files/ab/abc...tmp")  # doctest: +SKIP
    True
    """

    def __init__(self, prefix: str | os.PathLike, skip: str | os.PathLike = ""):
        self.prefix = os.path.realpath(prefix)
        self.skip = os.path.realpath(skip) if skip else ""
        self._paths: dict[str, str] | None = None
        self._lock = threading.Lock()

    def has(self, key: str) -> bool:
        return key in self.paths()

    def paths(self) -> dict[str, str]:
        """Store key -> path, listed once (in the first caller's thread)."""
        with self._lock:
            if self._paths is None:
                started = time.perf_counter()
                self._paths = dict(self._walk())
                logger.info(
                    "envship: listed %d files of this nanny's environment %s in "
                    "%.1f s, to copy from instead of fetching",
                    len(self._paths),
                    self.prefix,
                    time.perf_counter() - started,
                )
            return self._paths

    def _walk(self):
        for folder, dirs, files in os.walk(self.prefix):
            if self.skip and (folder + os.sep).startswith(self.skip + os.sep):
                dirs.clear()
                continue
            for name in files:
                path = os.path.join(folder, name)
                try:
                    st = os.lstat(path)
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    digest = path_digest(path)
                except OSError:
                    continue  # unreadable or gone: not a source
                yield store_key(digest, entry_mode(st), int(st.st_mtime)), path

    def copy(self, key: str, dest: str) -> bool:
        """Copy the file listed under ``key`` to ``dest`` (a new file) as its key says.

        Its bytes are hashed on the way; mode and mtime are the key's. False
        (and nothing at ``dest``) if it is not listed, or changed since.
        """
        source = self.paths().get(key)
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
                raise ValueError("changed since it was listed")
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
                if self._paths is not None:
                    self._paths.pop(key, None)
            return False
        return True
