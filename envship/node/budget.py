"""The node cache's budget: what it holds, and what goes when it is over.

Eviction removes the least recently used entries that no live process
leases and nobody is installing, until the cache fits its budget
(``envship.cache.max-size``); ``gc`` first removes what crashed processes
left (temp folders, writes of dead writers, dead leases, partial downloads
nobody resumes). A removed tree first disappears in one rename into
``tmp/``, then is deleted at leisure.

This module decides nothing about installing; it never removes an entry
without holding its lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psutil
from dask.utils import format_bytes
from filelock import Timeout

from envship.manifest import ThinManifest

from .archives import Archives
from .extract import remove_tree
from .filestore import FileStore
from .layout import CacheLayout
from .locks import CacheLocks, Leases

logger = logging.getLogger("envship.cache")

#: Seconds a partial download may lie unwritten, with no download of it
#: running on the node, before eviction removes it.
PARTIAL_TTL = 3600.0


@dataclass(frozen=True)
class CacheEntry:
    """One id in the cache, as :meth:`EnvCache.entries` reports it.

    Attributes
    ----------
    id : str
        The content id.
    name : str or None
        The environment's name from its manifest.
    size : int
        Bytes on disk that are its own: its archive and manifest, and the
        files of its tree that no other environment links.
    last_used : float or None
        Unix time of the last ``ensure`` or archive write.
    leases : tuple of int
        PIDs of live processes that use it.
    has_tree, has_archive : bool
        Whether it is installed, and whether its artifact is kept.
    shared : int
        Bytes of its files that other environments link too (not in ``size``).
    """

    id: str
    name: str | None
    size: int
    last_used: float | None
    leases: tuple[int, ...]
    has_tree: bool
    has_archive: bool
    shared: int = 0


class CacheBudget:
    """Sizes, eviction, removal and clean-up of a node cache.

    Parameters
    ----------
    max_size : float
        The budget in bytes for trees, archives, partial downloads and the
        file store (``inf``: none).
    """

    def __init__(
        self,
        layout: CacheLayout,
        locks: CacheLocks,
        leases: Leases,
        archives: Archives,
        files: FileStore,
        max_size: float,
    ) -> None:
        self.layout = layout
        self.locks = locks
        self.leases = leases
        self.archives = archives
        self.files = files
        self.max_size = max_size

    # -- what the cache holds ----------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Every id with a tree or an archive here, least recently used first.

        Walks every tree to tell its own bytes from those it shares.
        """
        result = [self._entry(id) for id in self.layout.ids()]
        result.sort(key=lambda e: e.last_used or 0.0)
        return result

    def size(self) -> int:
        """Bytes on disk of trees, archives, partial downloads and the file
        store, shared files once."""
        own = sum(self._size(id)[0] for id in self.layout.ids())
        return own + self.files.usage()[1] + self._partial_bytes()

    # -- making room -------------------------------------------------------------

    def evict(self, needed: int = 0, keep: Iterable[str] = ()) -> list[str]:
        """Remove least recently used entries until ``needed`` more bytes fit.

        Never removes a leased environment, one in ``keep`` or one another
        process is installing right now. Returns the ids removed.
        """
        budget = self.max_size - needed
        self._expire_partials(PARTIAL_TTL)
        sizes = {id: self._size(id)[0] for id in self.layout.ids()}
        total = sum(sizes.values()) + self.files.usage()[1] + self._partial_bytes()
        removed: list[str] = []
        if total <= budget:
            return removed
        kept = set(keep)
        for id in sorted(sizes, key=self.archives.last_used):
            if total <= budget:
                break
            if id in kept:
                continue
            with self.locks.held_if_free(id) as held:
                if not held or self.leases.live_locked(id, prune=True):
                    continue
                self.remove_locked(id)
            total -= sizes[id] + self.files.gc()  # and the files only it linked
            removed.append(id)
            logger.info(
                "evicted %s (%s) from %s",
                id,
                format_bytes(sizes[id]),
                self.layout.root,
            )
        if total > budget:
            logger.warning(
                "node cache %s holds %s, over its budget of %s: the rest is in use",
                self.layout.root,
                format_bytes(int(total)),
                format_bytes(int(self.max_size)),
            )
        return removed

    def clear(self) -> list[str]:
        """Remove every entry that no live process leases; return their ids."""
        removed = []
        for id in self.layout.ids():
            with self.locks.held(id):
                if self.leases.live_locked(id, prune=True):
                    continue
                self.remove_locked(id)
            removed.append(id)
        self.files.gc()
        return removed

    def gc(self) -> list[str]:
        """Remove leftovers of crashed processes, dead leases, then evict.

        Returns the ids evicted.
        """
        layout = self.layout
        self._expire_partials(0)
        for name in os.listdir(layout.tmp):
            path = layout.tmp / name
            if layout.is_partial(name):
                continue
            if layout.is_incoming(name):
                # An artifact whose writer is gone.
                writer = layout.incoming_writer(name)
                if writer is not None and psutil.pid_exists(writer):
                    continue
                path.unlink(missing_ok=True)
                continue
            id = layout.work_id(name)
            if id is not None:
                with self.locks.held_if_free(id) as held:
                    if held:
                        remove_tree(path)
        for id in layout.leased_ids():
            with self.locks.held_if_free(id) as held:
                if held and not self.leases.live_locked(id, prune=True):
                    remove_tree(layout.leases(id))
        self.files.gc()
        return self.evict()

    # -- removing (lock held) ----------------------------------------------------

    def remove_locked(self, id: str, keep_archive: bool = False) -> None:
        """Remove the tree of ``id`` (and its archive and leases unless
        ``keep_archive``); its lock is held."""
        tree = self.layout.env(id)
        if tree.is_symlink() or tree.is_file():
            tree.unlink()
        elif tree.is_dir():
            # Disappear in one step, then delete at leisure.
            doomed = self.layout.removal(id)
            os.chmod(tree, 0o700)
            os.rename(tree, doomed)
            remove_tree(doomed)
        self.layout.install_record(id).unlink(missing_ok=True)
        if not keep_archive:
            self.archives.discard(id)
            remove_tree(self.layout.leases(id))

    def remove_temp(self, id: str) -> None:
        """Remove what crashed installs or removals of ``id`` left (lock held)."""
        for path in self.layout.work_of(id):
            logger.info("removing leftover %s", path)
            remove_tree(path)

    # -- internals ---------------------------------------------------------------

    def _expire_partials(self, age: float) -> None:
        """Remove partial downloads unwritten for ``age`` seconds whose fetcher is gone.

        ``<id>.<digest>.partial`` files let an interrupted download resume;
        one that no download took up again is only taking space.
        """
        now = time.time()
        for entry in os.scandir(self.layout.tmp):
            id = self.layout.partial_id(entry.name)
            if id is None:
                continue
            try:
                if now - entry.stat().st_mtime < age:
                    continue
            except FileNotFoundError:
                continue
            lock = self.locks.fetch_lock(id)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # a download of it is running on this node
            try:
                os.unlink(entry.path)
                logger.info("removed the abandoned partial download %s", entry.path)
            except FileNotFoundError:
                pass
            finally:
                lock.release()

    def _partial_bytes(self) -> int:
        """Bytes on disk of partial downloads in ``tmp/``."""
        total = 0
        for entry in os.scandir(self.layout.tmp):
            if self.layout.is_partial(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_blocks * 512
        return total

    def _size(self, id: str) -> tuple[int, bool, bool]:
        """(bytes of its own outside the file store, has_tree, has_archive) of ``id``."""
        layout = self.layout
        total = 0
        has_tree = layout.env(id).is_dir()
        if has_tree:
            total += _recorded_size(layout, id)
        has_archive = False
        for path in (layout.archive(id), layout.manifest(id)):
            try:
                total += os.stat(path).st_size
            except FileNotFoundError:
                continue
            if path == layout.archive(id):
                has_archive = True
        return total, has_tree, has_archive

    def _entry(self, id: str) -> CacheEntry:
        size, has_tree, has_archive = self._size(id)
        shared = 0
        if has_tree:
            alone, shared = _stored_usage(self.layout.env(id))
            size += alone
        manifest = self.archives.manifest(id)
        name = manifest.name if manifest else None
        if isinstance(manifest, ThinManifest):
            name = f"{name} (thin pack)"
        return CacheEntry(
            id=id,
            name=name,
            size=size,
            last_used=self.archives.last_used(id) or None,
            leases=tuple(self.leases.live(id)),
            has_tree=has_tree,
            has_archive=has_archive,
            shared=shared,
        )


def _recorded_size(layout: CacheLayout, id: str) -> int:
    """Bytes of the tree of ``id`` outside the file store, as its install found."""
    try:
        with open(layout.install_record(id), encoding="utf-8") as f:
            record: Any = json.load(f)
        return int(record.get("private", record["size"]))
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return disk_usage(layout.env(id))


def _stored_usage(tree: os.PathLike[str]) -> tuple[int, int]:
    """Bytes of ``tree``'s files held in the file store: (linked by it alone, shared).

    A stored file has one link in the store and one per environment using it.
    """
    alone = shared = 0
    seen: set[int] = set()
    for folder, _, files in os.walk(tree):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if st.st_nlink < 2 or st.st_ino in seen or not stat.S_ISREG(st.st_mode):
                continue
            seen.add(st.st_ino)
            if st.st_nlink == 2:
                alone += st.st_blocks * 512
            else:
                shared += st.st_blocks * 512
    return alone, shared


def disk_usage(*trees: str | os.PathLike[str]) -> int:
    """Bytes on disk under ``trees``, a file with several links counted once."""
    seen: set[int] = set()
    total = 0
    for folder, dirs, files in (w for tree in trees for w in os.walk(tree)):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if st.st_ino in seen:
                    continue
                seen.add(st.st_ino)
            total += st.st_blocks * 512
    return total
