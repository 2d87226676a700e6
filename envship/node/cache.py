"""The node cache: each environment unpacked once per machine, shared by its nannies.

Nannies that share a cache folder form one node. For each content id the cache
keeps the received artifact and, once installed, the unpacked environment,
read-only, at its final path. :class:`EnvCache` is what the rest of envship
uses; it is made of parts of one purpose each:

- :mod:`~envship.node.layout`: every path of the cache, named once (the
  layout is drawn there);
- :mod:`~envship.node.locks`: the lock of each id, and leases of processes;
- :mod:`~envship.node.archives`: received artifacts and their manifests;
- :mod:`~envship.node.budget`: sizes, eviction, removal and clean-up;
- :mod:`~envship.node.installer`: installing (unpacking: :mod:`~envship.node.unpack`);
- :mod:`~envship.node.filestore`: file contents shared by hard links.

Transfers (:mod:`envship.transfer`) write incoming blobs through the few
methods of the ``BlobStore`` protocol that :class:`EnvCache` implements:
``root``, ``has_archive``, ``archive_path``, ``partial_path``, ``fetch_lock``
and ``adopt_archive``. Only the cache names partial downloads.

This module knows nothing of Dask: it can be driven from tests or a CLI.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from dask.utils import parse_bytes, parse_timedelta
from filelock import FileLock

from envship import config
from envship.manifest import Manifest, ThinManifest

from .archives import Archives
from .budget import CacheBudget, CacheEntry, disk_usage
from .extract import Progress
from .filestore import FileStore
from .installer import Installer
from .layout import CacheLayout
from .locks import CacheLocks, Leases
from .own_files import OwnFiles

__all__ = ["CacheEntry", "EnvCache", "disk_usage"]


class EnvCache:
    """The per-node cache of unpacked environments, keyed by content id.

    Safe to use from many processes at once: installs of one id are
    serialized by a file lock and done once; removals never touch an
    environment that a live process has leased.

    Parameters
    ----------
    root : path, optional
        The cache folder; default ``envship.cache.directory`` (see
        :func:`envship.config.cache_directory`). Created with mode 0700
        unless ``create`` is False.
    max_size : int or str, optional
        The budget for trees and archives, in bytes or as ``"20 GB"``;
        default ``envship.cache.max-size``. Least recently used, unleased
        entries are evicted above it.
    lock_timeout : float
        Seconds to wait for another process's install of the same id;
        default ``envship.timeouts.install``.
    create : bool
        Make the cache if it is not there (a nanny, which writes to it).
        False for readers (``envship cache list``, ``gc``, ``clear``): they
        make nothing, and a folder that holds no cache is an
        :class:`~envship.errors.EnvshipError` ("no cache there").
    own_environment : path, optional
        The nanny's own environment (``sys.prefix``): its files count as held
        by the node's file store (see :mod:`envship.node.own_files`).

    Examples
    --------
    >>> cache = EnvCache("/tmp/envship-cache", max_size="5 GB")  # doctest: +SKIP
    >>> with cache.archive_writer(artifact_id, manifest) as f:  # doctest: +SKIP
    ...     f.write(data)
    >>> prefix = cache.ensure(artifact_id, lease_pid=worker_pid)  # doctest: +SKIP
    >>> str(prefix / "bin" / "python")  # doctest: +SKIP
    '/tmp/envship-cache/6f1c.../bin/python'
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        max_size: int | str | None = None,
        *,
        lock_timeout: float | None = None,
        create: bool = True,
        own_environment: str | os.PathLike[str] | None = None,
    ) -> None:
        default = root is None
        if root is None:
            root = config.cache_directory()
        self.root = Path(root).expanduser().absolute()
        if max_size is None:
            max_size = config.get("cache.max-size")
        self.max_size = float("inf") if max_size is None else parse_bytes(max_size)
        if lock_timeout is None:
            lock_timeout = parse_timedelta(config.get("timeouts.install"))
        self.lock_timeout = lock_timeout
        self.layout = CacheLayout(self.root)
        if create:
            self.layout.create(check_owner=default)
        else:
            self.layout.open(check_owner=default)
        own = None if own_environment is None else OwnFiles(own_environment, self.root)
        self.files = FileStore(self.root, config.get("cache.hard-links"), own)
        self.locks = CacheLocks(self.layout, lock_timeout)
        self.leases = Leases(self.layout, self.locks)
        self.archives = Archives(self.layout, self.locks)
        self.budget = CacheBudget(
            self.layout,
            self.locks,
            self.leases,
            self.archives,
            self.files,
            self.max_size,
        )
        self.installer = Installer(
            self.layout, self.locks, self.leases, self.archives, self.budget, self.files
        )

    def __repr__(self) -> str:
        return f"EnvCache({str(self.root)!r}, max_size={self.max_size!r})"

    # -- where things are ------------------------------------------------------

    def path(self, id: str) -> Path:
        """The final prefix of environment ``id`` (which may not exist yet)."""
        return self.layout.env(id)

    def has(self, id: str) -> bool:
        """Whether ``id`` is installed: its tree, and the record written before
        the tree appeared (in one rename). A tree without it is not ours."""
        return self.installer.installed(id)

    def archive_path(self, id: str) -> Path:
        """Where the artifact of ``id`` is kept: ``archives/<id>.tar.zst``."""
        return self.layout.archive(id)

    def manifest_path(self, id: str) -> Path:
        """Where the manifest of ``id`` is kept: ``archives/<id>.json``."""
        return self.layout.manifest(id)

    def partial_path(self, id: str, digest: str) -> Path:
        """Where a download of ``id`` from peers grows: ``tmp/<id>.<digest[:16]>.partial``.

        One per blob and node (``digest`` is its piece table's), resumed by
        the next download of it; eviction removes one nobody resumes.
        """
        return self.layout.partial(id, digest)

    def has_archive(self, id: str) -> bool:
        """Whether the artifact and its manifest of ``id`` are both here."""
        return self.archives.has(id)

    def manifest(self, id: str) -> Manifest | ThinManifest | None:
        """The manifest of ``id``, or None if there is none (or it is unreadable)."""
        return self.archives.manifest(id)

    # -- receiving artifacts ---------------------------------------------------

    @contextmanager
    def archive_writer(
        self, id: str, manifest: Manifest | ThinManifest | None = None
    ) -> Iterator[BinaryIO]:
        """Write the artifact of ``id``; it appears only if the block succeeds.

        Parameters
        ----------
        id : str
            The artifact's content id (checked when it is installed).
        manifest : Manifest or ThinManifest, optional
            Its manifest, stored next to it. Without one, call
            :meth:`put_manifest` before :meth:`ensure`.

        Examples
        --------
        >>> with cache.archive_writer(artifact_id, manifest) as f:  # doctest: +SKIP
        ...     for chunk in chunks:
        ...         f.write(chunk)
        """
        with self.archives.writer(id, manifest) as f:
            yield f

    def adopt_archive(
        self,
        id: str,
        partial: str | os.PathLike[str],
        manifest: Manifest | ThinManifest,
    ) -> None:
        """Move a complete downloaded blob from ``tmp/`` into place (a rename).

        The one way an incoming blob enters the cache, once it hashes to
        ``id`` (:meth:`Archives.adopt_received`: an archive is read once for
        its content id). What is held for an id is never replaced: if the
        archive is here already, ``partial`` is dropped.
        """
        self.archives.adopt_received(id, partial, manifest)

    def fetch_lock(self, id: str) -> FileLock:
        """The lock one nanny of the node holds while it downloads ``id``.

        Not thread-local: an event loop takes and releases it from any thread.
        """
        return self.locks.fetch_lock(id)

    def put_manifest(self, id: str, manifest: Manifest | ThinManifest) -> None:
        """Store the manifest of ``id`` (atomically)."""
        self.archives.put_manifest(id, manifest)

    def add_archive(
        self, id: str, source: str | os.PathLike[str], manifest: Manifest | ThinManifest
    ) -> None:
        """Copy an artifact file (and its manifest) into the cache."""
        with open(source, "rb") as src, self.archive_writer(id, manifest) as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)

    # -- installing ------------------------------------------------------------

    def ensure(
        self,
        id: str,
        *,
        env: str | None = None,
        lease_pid: int | None = None,
        progress: Progress | None = None,
        via: str | None = None,
    ) -> Path:
        """Return the prefix of environment ``id``, installing it if needed.

        The first caller on a node extracts the stored artifact into a temp
        folder, verifies it (see :func:`envship.node.extract.extract_archive`),
        fixes up absolute prefixes for the final path, makes the tree
        read-only and renames it into place; callers at the same time wait
        for it and reuse the result. Then entries over budget are evicted.

        Parameters
        ----------
        id : str
            The content id; its artifact must be in the cache already.
        env : str, optional
            A name for messages; default the manifest's name.
        lease_pid : int, optional
            Lease the environment for this process (taken under the id's
            lock, so no eviction can slip in between).
        progress : callable, optional
            ``progress(stage, done, total)`` with stages ``"extract"``
            (bytes) and ``"fixup"``.
        via : str, optional
            The id of a thin pack of ``id`` held here (see
            :mod:`envship.table`), used when the archive of ``id`` is not:
            its references are filled from the file store.

        Returns
        -------
        Path
            The environment's final prefix.

        Raises
        ------
        EnvshipError
            The artifact is missing, unsafe, corrupt or can't be fixed up on
            this node. A bad artifact is deleted, so it is never tried again.

        Examples
        --------
        >>> prefix = cache.ensure(artifact_id, lease_pid=os.getpid())  # doctest: +SKIP
        """
        return self.installer.ensure(
            id, env=env, lease_pid=lease_pid, progress=progress, via=via
        )

    def installs(self, id: str | None = None) -> list[dict]:
        """Past extractions on this node (all, or of ``id``), oldest first."""
        return self.installer.installs(id)

    # -- leases ----------------------------------------------------------------

    def lease(self, id: str, pid: int) -> None:
        """Record that process ``pid`` uses environment ``id``.

        The lease holds the process's create time, so it dies with the
        process (even after SIGKILL) and a later process that reuses the PID
        does not inherit it.
        """
        self.leases.take(id, pid)

    def release(self, id: str, pid: int) -> None:
        """Drop the lease of process ``pid`` on ``id``, if it has one."""
        self.leases.drop(id, pid)

    def live_leases(self, id: str) -> list[int]:
        """PIDs of live processes leasing ``id``; dead leases are removed."""
        return self.leases.live(id)

    def _lock(self, id: str) -> FileLock:
        """The lock of ``id`` (tests hold it to stand for another process)."""
        return self.locks.lock(id)

    # -- budget and removal ----------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Every id with a tree or an archive here, least recently used first.

        Walks every tree to tell its own bytes from those it shares.
        """
        return self.budget.entries()

    def size(self) -> int:
        """Bytes on disk of trees, archives, partial downloads and the file
        store, shared files once."""
        return self.budget.size()

    def evict(self, needed: int = 0, keep: Iterable[str] = ()) -> list[str]:
        """Remove least recently used entries until ``needed`` more bytes fit.

        Never removes a leased environment, one in ``keep`` or one another
        process is installing right now.

        Returns
        -------
        list of str
            The ids removed.
        """
        return self.budget.evict(needed, keep)

    def clear(self) -> list[str]:
        """Remove every entry that no live process leases; return their ids."""
        return self.budget.clear()

    def gc(self) -> list[str]:
        """Remove leftovers of crashed processes, dead leases, then evict.

        Returns
        -------
        list of str
            The ids evicted.
        """
        return self.budget.gc()
