"""The node's store of file contents: environments made of hard links.

Many environments of a node share most of their files (conda itself installs
every environment by hard-linking from its package cache). The node cache
keeps one read-only copy of each file content in ``<cache>/files/`` and
installs an environment by linking the files the store holds already; only
the others are written (and then enter the store). A link costs about an
eighth of writing the file.

A file is keyed by what a process inside an environment can observe of it:
its bytes (the xxh3-128 digest that the content id uses), its permission bits
without write bits (installed trees are sealed read-only) and its mtime,
which a hard link shares: a ``.py`` whose mtime differs from what its ``.pyc``
records would make every import recompile.

Store files are never changed in place: whatever rewrites a file of an
environment (the prefix fix-ups) first replaces a file that has other links
by a private copy (:func:`unshare`). Where hard links fail (another
filesystem, a filesystem without them), files are written in full and the
log says so once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import shutil
import stat
import time
from pathlib import Path

from envship.table import store_key

from .own_files import OwnFiles

logger = logging.getLogger("envship.cache")

#: errno values that mean "this filesystem will not link here": stop trying.
_NO_LINKS = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


class FileStore:
    """Read-only file contents under ``<root>/files``, shared by hard links.

    Parameters
    ----------
    root : path
        The node cache's root; the store is its ``files/`` folder.
    links : bool
        False writes every file in full (``envship.cache.hard-links``).
    own : OwnFiles, optional
        The nanny's own environment: its files count as held, and are copied
        into the store when a thin pack refers to them.

    Examples
    --------
    >>> store = FileStore("/tmp/envship-cache")  # doctest: +SKIP
    >>> key = store.key(digest, 0o644, 1700000000)  # doctest: +SKIP
    >>> store.link(key, "/tmp/envship-cache/tmp/x/lib/a.py") or write_it()  # doctest: +SKIP
    """

    def __init__(
        self, root: str | os.PathLike, links: bool = True, own: OwnFiles | None = None
    ):
        self.root = Path(root) / "files"
        self.own = own
        self.root.mkdir(mode=0o700, exist_ok=True)
        self._root = str(self.root)
        self.links = links
        self._usage: dict[str, tuple[int, int, int]] = {}  # see usage()

    key = staticmethod(store_key)

    def path(self, key: str) -> str:
        # A string, not a Path: called for every file of every install.
        return f"{self._root}/{key[:2]}/{key}"

    def link(self, key: str, dest: str) -> bool:
        """Make ``dest`` a link to the stored file ``key``; False if not stored."""
        if not self.links:
            return False
        try:
            os.link(self.path(key), dest)
        except FileNotFoundError:
            return False  # not stored (or removed by a concurrent gc)
        except OSError as e:
            self._links_failed(e)
            return False
        return True

    def fill(self, key: str, dest: str, size: int | None = None) -> bool:
        """Make ``dest`` the stored file ``key``: a link, else a copy; False if
        not stored (or, with ``size``, stored at another size).

        For references in thin packs, which carry no data: where links fail,
        the stored file is copied (with its mode and mtime); a stored file
        with as many links as the filesystem allows (``EMLINK``) is copied
        once and the copy stored in its place, so that the next references
        link again. A file that only the nanny's own environment has is
        copied from there, then stored.
        """
        source = self.path(key)
        if size is not None:
            try:
                if os.stat(source).st_size != size:
                    return False  # the reference lies about its size
            except FileNotFoundError:
                pass  # not stored: maybe in the nanny's own environment
        full = False
        if self.links:
            try:
                os.link(source, dest)
                return True
            except FileNotFoundError:
                pass
            except OSError as e:
                full = e.errno == errno.EMLINK
                self._links_failed(e)
        if self.own is not None and self.own.copy(key, dest):
            if size is not None and os.stat(dest).st_size != size:
                os.unlink(dest)
                return False
            self.add(key, dest)
            return True
        try:
            shutil.copy2(source, dest, follow_symlinks=False)
        except FileNotFoundError:
            if os.path.lexists(dest):  # the store file went during the copy
                os.unlink(dest)
            return False
        if full:
            self._share(dest, source)  # the copy becomes the stored file
        return True

    def lacking(self, keys: list[str], own_only: bool = False) -> list[bool]:
        """For each key, whether the store lacks it (all, if links are off).

        With links off nothing is stored, so a node without links is sent
        whole files. ``own_only``: whether the nanny's own environment lacks it.
        """
        if not self.links or (own_only and self.own is None):
            return [True] * len(keys)
        if own_only:
            assert self.own is not None
            return [not held for held in self.own.held(keys)]
        lacking = [not os.path.isfile(self.path(key)) for key in keys]
        if self.own is not None:
            asked = [key for key, lacks in zip(keys, lacking, strict=True) if lacks]
            held = iter(self.own.held(asked))
            lacking = [lacks and not next(held) for lacks in lacking]
        return lacking

    def add(self, key: str, path: str) -> None:
        """Enter a just-written, complete file: made read-only, linked from the store."""
        if not self.links:
            return
        st = os.stat(path)
        if stat.S_IMODE(st.st_mode) & 0o222:
            os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o222)
        target = self.path(key)
        for attempt in (1, 2):
            try:
                os.link(path, target)
            except FileNotFoundError:
                # The folder is missing: make it and try once more. If it went
                # again, a concurrent failed link removed it: links fail here.
                if attempt == 2:
                    return
                os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
                continue
            except FileExistsError:
                # Another writer stored the same content meanwhile (a parallel
                # batch of this install, or another install): share its copy.
                self._share(target, path)
            except OSError as e:
                self._links_failed(e)
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(target))  # if made here and still empty
            return

    def _share(self, stored: str, path: str) -> None:
        """Replace ``path`` by a link to ``stored``, its twin; as it was if that fails."""
        tmp = f"{path}.{secrets.token_hex(4)}.stored"
        try:
            os.link(stored, tmp)
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

    def _links_failed(self, e: OSError) -> None:
        if e.errno == errno.EMLINK:
            return  # that one file has too many links: write it, go on
        if e.errno in _NO_LINKS and self.links:
            self.links = False
            logger.warning(
                "hard links fail in %s (%s): environments are written in full, "
                "without sharing files",
                self.root,
                e.strerror,
            )

    def gc(self) -> int:
        """Remove stored files that no environment links any more; bytes freed."""
        freed = 0
        for folder in os.scandir(self.root):
            if not folder.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(folder.path):
                st = entry.stat(follow_symlinks=False)
                if st.st_nlink == 1:
                    os.unlink(entry.path)
                    freed += st.st_blocks * 512
            try:
                os.rmdir(folder.path)
            except OSError:
                pass  # not empty
        return freed

    def usage(self) -> tuple[int, int]:
        """(files, bytes on disk) in the store.

        Each install asks (for the cache's budget), so what each of the 256
        folders holds is remembered until the folder's mtime changes: store
        files are read-only, only adding or removing one changes the sum. A
        folder changed within the last seconds is counted afresh each time,
        as a change in the same clock tick would leave its mtime as it was.
        """
        files = size = 0
        recent = time.time_ns() - 2_000_000_000
        for folder in os.scandir(self.root):
            if not folder.is_dir(follow_symlinks=False):
                continue
            mtime = folder.stat(follow_symlinks=False).st_mtime_ns
            known = self._usage.get(folder.name)
            if known is None or known[0] != mtime:
                count = blocks = 0
                for entry in os.scandir(folder.path):
                    count += 1
                    blocks += entry.stat(follow_symlinks=False).st_blocks
                known = (mtime, count, blocks * 512)
                if mtime < recent:
                    self._usage[folder.name] = known
            files += known[1]
            size += known[2]
        return files, size


def unshare(path: str | os.PathLike) -> None:
    """Replace ``path`` by a private copy if other links share its inode.

    Called before anything rewrites a file of an environment, so that no file
    of the store (nor of another environment) ever changes.
    """
    path = os.fspath(path)
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink == 1:
        return
    tmp = f"{path}.{secrets.token_hex(4)}.unshare"
    try:
        shutil.copy2(path, tmp)
        os.rename(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
