"""The node cache: each environment unpacked once per machine, shared by its nannies.

Nannies that share a cache folder form one node. For each content id the cache
keeps the received artifact and, once installed, the unpacked environment,
read-only, at its final path. Layout under the root::

    <id>/                    an installed environment; exists only when complete
    files/<k>/<key>          the node's file store: contents that installed
                             environments share by hard links (filestore.py)
    archives/<id>.tar.zst    a received artifact ...
    archives/<id>.json       ... and its manifest (name, kind, unpacked_size, ...)
    tmp/                     installs, removals and downloads in progress
    locks/<id>.lock          one lock per id: install, lease and removal take it
    leases/<id>/<pid>        a process using the environment: its create time
    used/<id>                touched on every use: its mtime orders eviction
    installed/<id>.json      what the install found: size on disk, file count
    installs.log             one JSON line per extraction

Everything is made in ``tmp/`` (same filesystem) and renamed into place, so
nobody ever sees half an environment, and a crashed install leaves only a
temp folder that the next one for that id removes.

This module knows nothing of Dask: it can be driven from tests or a CLI.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import psutil
from dask.utils import format_bytes, parse_bytes, parse_timedelta
from filelock import FileLock, Timeout

from envship import config
from envship.archive import ID_PATTERN as _ID
from envship.archive import check_id
from envship.errors import EnvshipError, MissingStoreFileError
from envship.files import write_atomic, write_json_atomic
from envship.manifest import Manifest, ThinManifest, blob_manifest

from .extract import Progress, remove_tree
from .filestore import FileStore
from .install import unpack

logger = logging.getLogger("envship.cache")

# Create times of one process, read at different moments, agree to well
# within this (the kernel's boot time estimate can move by a second).
CREATE_TIME_SLACK = 1.0
#: A filesystem block: what a file's bytes may round up by on disk.
BLOCK = 4096
#: Most bytes an archive may unpack to per byte of itself. Environments
#: compress 3 to 5 times; a bomb of zeros, a thousand times. The archive's
#: size is what the node holds, unlike the size its manifest declares.
MAX_RATIO = 100
#: Disk left free by an install: 1 GiB, or a twentieth of a small disk.
RESERVE = 1 << 30
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


class EnvCache:
    """The per-node cache of unpacked environments, keyed by content id.

    Safe to use from many processes at once: installs of one id are
    serialized by a file lock and done once; removals never touch an
    environment that a live process has leased.

    Parameters
    ----------
    root : path, optional
        The cache folder; default ``envship.cache.directory`` (see
        :func:`envship.config.cache_directory`). Created with mode 0700.
    max_size : int or str, optional
        The budget for trees and archives, in bytes or as ``"20 GB"``;
        default ``envship.cache.max-size``. Least recently used, unleased
        entries are evicted above it.
    lock_timeout : float
        Seconds to wait for another process's install of the same id;
        default ``envship.timeouts.install``.

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
        root: str | os.PathLike | None = None,
        max_size: int | str | None = None,
        *,
        lock_timeout: float | None = None,
    ) -> None:
        default = root is None
        self.root = (
            config.cache_directory() if default else Path(root).expanduser()
        ).absolute()
        if max_size is None:
            max_size = config.get("cache.max-size")
        self.max_size = float("inf") if max_size is None else parse_bytes(max_size)
        if lock_timeout is None:
            lock_timeout = parse_timedelta(config.get("timeouts.install"))
        self.lock_timeout = lock_timeout
        self._locks: dict[str, FileLock] = {}
        self._make_layout(check_owner=default)
        self.files = FileStore(self.root, links=config.get("cache.hard-links"))

    def __repr__(self) -> str:
        return f"EnvCache({str(self.root)!r}, max_size={self.max_size!r})"

    def _make_layout(self, check_owner: bool) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = self.root.stat()
        if check_owner and st.st_uid != os.geteuid():
            # The default lives in the shared temp folder: never use one
            # that another user made for us.
            raise EnvshipError(
                "node cache",
                f"the cache folder {self.root} belongs to another user",
                "set envship.cache.directory (DASK_ENVSHIP__CACHE__DIRECTORY) "
                "to a folder of your own",
            )
        if st.st_mode & 0o022:
            # Others could plant trees or archives that workers then run.
            raise EnvshipError(
                "node cache",
                f"the cache folder {self.root} may be written by other users "
                f"(mode {stat.S_IMODE(st.st_mode):o})",
                f"chmod go-w {self.root}, or set envship.cache.directory to a "
                "folder only the nannies' user may write",
            )
        for sub in ("archives", "tmp", "locks", "leases", "used", "installed"):
            (self.root / sub).mkdir(mode=0o700, exist_ok=True)

    # -- where things are ------------------------------------------------------

    def path(self, id: str) -> Path:
        """The final prefix of environment ``id`` (which may not exist yet)."""
        return self.root / check_id(id)

    def has(self, id: str) -> bool:
        """Whether ``id`` is installed: its tree, and the record written before
        the tree appeared (in one rename). A tree without it is not ours."""
        return self._record_path(id).is_file() and self.path(id).is_dir()

    def archive_path(self, id: str) -> Path:
        """Where the artifact of ``id`` is kept: ``archives/<id>.tar.zst``."""
        return self.root / "archives" / f"{check_id(id)}.tar.zst"

    def manifest_path(self, id: str) -> Path:
        """Where the manifest of ``id`` is kept: ``archives/<id>.json``."""
        return self.root / "archives" / f"{check_id(id)}.json"

    def has_archive(self, id: str) -> bool:
        """Whether the artifact and its manifest of ``id`` are both here."""
        return self.archive_path(id).is_file() and self.manifest_path(id).is_file()

    def manifest(self, id: str) -> Manifest | ThinManifest | None:
        """The manifest of ``id``, or None if there is none (or it is unreadable)."""
        try:
            with open(self.manifest_path(id), encoding="utf-8") as f:
                return blob_manifest(json.load(f))
        except FileNotFoundError:
            return None
        except ValueError as e:
            logger.warning("ignoring bad manifest %s: %s", self.manifest_path(id), e)
            return None

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
        check_id(id)
        if manifest is not None and manifest.id != id:
            raise ValueError(f"manifest of {manifest.id} given for {id}")
        part = self.root / "tmp" / f"{id}.{os.getpid()}.{secrets.token_hex(4)}.part"
        f = open(part, "xb")
        try:
            yield f
            f.close()
            self.adopt_archive(id, part, manifest)
        except BaseException:
            f.close()
            part.unlink(missing_ok=True)
            raise

    def adopt_archive(
        self, id: str, part: str | os.PathLike, manifest: Manifest | ThinManifest | None
    ) -> None:
        """Move a complete artifact file from ``tmp/`` into place (a rename).

        The one way an incoming blob enters the cache. What is held for an id
        is never replaced: if the archive is here already, ``part`` is
        dropped.
        """
        with self._locked(id):
            if self.archive_path(id).is_file() and self.manifest_path(id).is_file():
                os.unlink(part)
            else:
                if manifest is not None:
                    self.put_manifest(id, manifest)
                os.replace(part, self.archive_path(id))
            self._touch(id)

    def fetch_lock(self, id: str) -> FileLock:
        """The lock one nanny of the node holds while it downloads ``id``.

        Not thread-local: an event loop takes and releases it from any thread.
        """
        path = self.root / "locks" / f"{_bucket(id)}.fetch.lock"
        return FileLock(str(path), thread_local=False)

    def put_manifest(self, id: str, manifest: Manifest | ThinManifest) -> None:
        """Store the manifest of ``id`` (atomically)."""
        if manifest.id != id:
            raise ValueError(f"manifest of {manifest.id} given for {id}")
        write_json_atomic(self.manifest_path(id), manifest.to_dict())

    def add_archive(
        self, id: str, source: str | os.PathLike, manifest: Manifest | ThinManifest
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
        final = self.path(id)
        if lease_pid is None and self.has(id):
            self._touch(id)
            return final
        installed = False
        with self._locked(id, env):
            if not self.has(id):
                self._install(id, env, progress, via)
                installed = True
            if lease_pid is not None:
                self.lease(id, lease_pid)
            self._touch(id)
        if installed:  # back within the budget, now that it has verified
            try:
                self.evict(keep=(id,))
            except OSError as e:
                logger.warning("could not evict from %s: %s", self.root, e)
        return final

    def _install(
        self, id: str, env: str | None, progress: Progress | None, via: str | None
    ) -> None:
        """Install ``id`` (lock held)."""
        archive, manifest = self._source(id, via)
        name = env or (manifest.name if manifest else id)
        if manifest is None:
            raise EnvshipError(
                name,
                f"this node's cache ({self.root}) has no artifact {id} (or "
                "its manifest is unreadable)",
                "send the artifact to this node before installing it",
            )
        self._remove_temp(id)
        if os.path.lexists(self.path(id)):
            # No record: not a tree this cache made (a crash, or planted).
            logger.warning("removing %s: no install record", self.path(id))
            self._remove_locked(id, keep_archive=True)
        limit = self._make_room(id, via, archive, manifest, name)
        final = self.path(id)
        tmp = Path(tempfile.mkdtemp(prefix=f"{id}-install-", dir=self.root / "tmp"))
        record = self._record_path(id)
        try:
            try:
                info = unpack(
                    archive,
                    tmp,
                    final,
                    id=id,
                    manifest=manifest,
                    limit=limit,
                    name=name,
                    files=self.files,
                    progress=progress,
                    # A thin pack is mostly links: cheap calls that writer
                    # threads would only slow down, taking turns for the GIL.
                    threads=1 if archive != self.archive_path(id) else None,
                )
            except MissingStoreFileError:
                raise  # the thin pack is sound, this node lacks what it needs
            except EnvshipError:
                self._discard_source(id, via, archive)
                raise
            except OSError as e:
                raise _disk_error(name, self.root, e) from e
            write_json_atomic(record, info)
            os.rename(tmp, final)
        except BaseException:
            record.unlink(missing_ok=True)
            remove_tree(tmp)
            self.files.gc()  # what it stored is linked by nobody now
            raise
        # Folders can't be renamed without write permission on themselves.
        os.chmod(final, 0o500)
        # The stored copies of files that the fix-up rewrote stay until the
        # next eviction: a thin pack of an edited environment refers to them.
        line = json.dumps(dict(info, pid=os.getpid())) + "\n"
        fd = os.open(
            self.root / "installs.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600
        )
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        logger.info(
            "installed %s (%s) in %.1f s: %d files, %d of them linked from the "
            "file store; %s on disk, %s of it its own",
            name,
            id,
            info["seconds"],
            info["files"],
            info["linked_files"],
            format_bytes(info["size"]),
            format_bytes(info["private"]),
        )

    def _make_room(
        self, id: str, via: str | None, archive: Path, manifest: Manifest, name: str
    ) -> int:
        """Evict for an install and bound it; the most bytes it may write.

        What its manifest declares is the sender's word: eviction makes room
        for no more than ``MAX_RATIO`` times the archive's own size, so a small
        archive that declares a huge size evicts nothing, and the extraction
        stops there too (a bomb is refused long before the disk fills).
        Eviction after the install, once it has verified, restores the budget.
        """
        declared = manifest.unpacked_size
        if declared > self.max_size:
            self._discard_source(id, via, archive)
            raise EnvshipError(
                name,
                f"it unpacks to {format_bytes(declared)}, more than this node's "
                f"cache budget ({format_bytes(self.max_size)})",
                "raise envship.cache.max-size on the nodes, or ship a smaller "
                "environment",
            )
        bound = os.stat(archive).st_size * MAX_RATIO
        needed = min(declared + BLOCK * manifest.file_count, bound)
        try:
            self.evict(needed, keep=(id, via) if via else (id,))
        except OSError as e:
            logger.warning("could not evict from %s: %s", self.root, e)
        disk = shutil.disk_usage(self.root)
        room = disk.free - min(RESERVE, disk.total // 20)
        if min(needed, declared) > room:
            raise EnvshipError(
                name,
                f"it may take {format_bytes(min(needed, declared))} and the disk "
                f"of this node's cache ({self.root}) has "
                f"{format_bytes(max(room, 0))} to spare",
                "free disk space on this node, or set envship.cache.max-size "
                "lower so that old environments are evicted",
            )
        return min(declared, bound)

    def _discard_source(self, id: str, via: str | None, archive: Path) -> None:
        """Never try a bad artifact again: the sender must send a good one."""
        if archive == self.archive_path(id):
            self._discard_archive(id)
        else:
            self._discard_archive(via)
            self.manifest_path(id).unlink(missing_ok=True)

    def _source(self, id: str, via: str | None) -> tuple[Path, Manifest | None]:
        """The archive to install ``id`` from (its own, or the thin pack ``via``)."""
        if self.archive_path(id).is_file() or via is None:
            own = self.manifest(id)
            return self.archive_path(id), own if isinstance(own, Manifest) else None
        thin = self.manifest(via)
        if (
            not isinstance(thin, ThinManifest)
            or thin.thin_of != id
            or not self.archive_path(via).is_file()
        ):
            return self.archive_path(id), None
        self.put_manifest(id, thin.env)
        return self.archive_path(via), thin.env

    def installs(self, id: str | None = None) -> list[dict]:
        """Past extractions on this node (all, or of ``id``), oldest first."""
        try:
            with open(self.root / "installs.log", encoding="utf-8") as f:
                lines = [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []
        return [r for r in lines if id is None or r.get("id") == id]

    # -- leases ----------------------------------------------------------------

    def lease(self, id: str, pid: int) -> None:
        """Record that process ``pid`` uses environment ``id``.

        The lease holds the process's create time, so it dies with the
        process (even after SIGKILL) and a later process that reuses the PID
        does not inherit it.
        """
        try:
            created = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            raise ValueError(f"there is no process {pid} to lease {id} to") from None
        folder = self.root / "leases" / check_id(id)
        with self._locked(id):
            folder.mkdir(mode=0o700, exist_ok=True)
            write_atomic(folder / str(pid), repr(created).encode())

    def release(self, id: str, pid: int) -> None:
        """Drop the lease of process ``pid`` on ``id``, if it has one."""
        (self.root / "leases" / check_id(id) / str(pid)).unlink(missing_ok=True)

    def live_leases(self, id: str) -> list[int]:
        """PIDs of live processes leasing ``id``; dead leases are removed."""
        if self._try_lock(id):
            try:
                return self._live_leases(id, prune=True)
            finally:
                self._lock(id).release()
        return self._live_leases(id, prune=False)

    def _live_leases(self, id: str, *, prune: bool) -> list[int]:
        folder = self.root / "leases" / check_id(id)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        live = []
        for name in names:
            if not name.isdigit():
                continue
            try:
                created = float((folder / name).read_text())
            except FileNotFoundError:
                continue
            except ValueError:
                created = None
            if created is not None and _alive(int(name), created):
                live.append(int(name))
            elif prune:
                (folder / name).unlink(missing_ok=True)
        return sorted(live)

    # -- budget and removal ----------------------------------------------------

    def entries(self) -> list[CacheEntry]:
        """Every id with a tree or an archive here, least recently used first.

        Walks every tree to tell its own bytes from those it shares.
        """
        result = [self._entry(id) for id in self._ids()]
        result.sort(key=lambda e: e.last_used or 0.0)
        return result

    def size(self) -> int:
        """Bytes on disk of trees, archives, partial downloads and the file
        store, shared files once."""
        own = sum(self._size(id)[0] for id in self._ids())
        return own + self.files.usage()[1] + self._partial_bytes()

    def evict(self, needed: int = 0, keep: Iterable[str] = ()) -> list[str]:
        """Remove least recently used entries until ``needed`` more bytes fit.

        Never removes a leased environment, one in ``keep`` or one another
        process is installing right now.

        Returns
        -------
        list of str
            The ids removed.
        """
        budget = self.max_size - needed
        self._expire_partials(PARTIAL_TTL)
        sizes = {id: self._size(id)[0] for id in self._ids()}
        total = sum(sizes.values()) + self.files.usage()[1] + self._partial_bytes()
        removed: list[str] = []
        if total <= budget:
            return removed
        keep = set(keep)
        for id in sorted(sizes, key=self._last_used):
            if total <= budget:
                break
            if id in keep or not self._try_lock(id):
                continue
            try:
                if self._live_leases(id, prune=True):
                    continue
                self._remove_locked(id)
            finally:
                self._lock(id).release()
            total -= sizes[id] + self.files.gc()  # and the files only it linked
            removed.append(id)
            logger.info(
                "evicted %s (%s) from %s", id, format_bytes(sizes[id]), self.root
            )
        if total > budget:
            logger.warning(
                "node cache %s holds %s, over its budget of %s: the rest is in use",
                self.root,
                format_bytes(total),
                format_bytes(self.max_size),
            )
        return removed

    def remove(self, id: str, *, force: bool = False) -> None:
        """Remove ``id`` (tree and archive); refuse if leased unless ``force``."""
        with self._locked(id):
            leases = self._live_leases(id, prune=True)
            if leases and not force:
                manifest = self.manifest(id)
                raise EnvshipError(
                    manifest.name if manifest else id,
                    f"it is in use by processes {leases} on this node",
                    "stop the workers that use it first, or remove it with force",
                )
            self._remove_locked(id)
        self.files.gc()

    def clear(self) -> list[str]:
        """Remove every entry that no live process leases; return their ids."""
        removed = []
        for id in self._ids():
            with self._locked(id):
                if self._live_leases(id, prune=True):
                    continue
                self._remove_locked(id)
            removed.append(id)
        self.files.gc()
        return removed

    def gc(self) -> list[str]:
        """Remove leftovers of crashed processes, dead leases, then evict.

        Returns
        -------
        list of str
            The ids evicted.
        """
        self._expire_partials(0)
        for name in os.listdir(self.root / "tmp"):
            path = self.root / "tmp" / name
            if name.endswith(".partial"):
                continue
            if name.endswith(".part"):
                # <id>.<pid>.<random>.part: a download whose writer is gone.
                fields = name.split(".")
                if len(fields) == 4 and fields[1].isdigit():
                    if psutil.pid_exists(int(fields[1])):
                        continue
                path.unlink(missing_ok=True)
                continue
            id = name.split("-", 1)[0]
            if _ID.fullmatch(id) and self._try_lock(id):
                try:
                    remove_tree(path)
                finally:
                    self._lock(id).release()
        for id in os.listdir(self.root / "leases"):
            if not _ID.fullmatch(id) or not self._try_lock(id):
                continue
            try:
                if not self._live_leases(id, prune=True):
                    remove_tree(self.root / "leases" / id)
            finally:
                self._lock(id).release()
        self.files.gc()
        return self.evict()

    # -- internals -------------------------------------------------------------

    def _expire_partials(self, age: float) -> None:
        """Remove partial downloads unwritten for ``age`` seconds whose fetcher is gone.

        ``<id>.<digest>.partial`` files let an interrupted download resume;
        one that no download took up again is only taking space.
        """
        now = time.time()
        for entry in os.scandir(self.root / "tmp"):
            id = entry.name.split(".", 1)[0]
            if not entry.name.endswith(".partial") or not _ID.fullmatch(id):
                continue
            try:
                if now - entry.stat().st_mtime < age:
                    continue
            except FileNotFoundError:
                continue
            lock = self.fetch_lock(id)
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
        for entry in os.scandir(self.root / "tmp"):
            if entry.name.endswith(".partial"):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_blocks * 512
        return total

    def _lock(self, id: str) -> FileLock:
        """The lock of ``id``'s bucket (see :func:`_bucket`), reentrant per thread."""
        bucket = _bucket(id)
        lock = self._locks.get(bucket)
        if lock is None:
            path = self.root / "locks" / f"{bucket}.lock"
            lock = self._locks[bucket] = FileLock(str(path))
        return lock

    @contextmanager
    def _locked(self, id: str, env: str | None = None) -> Iterator[None]:
        lock = self._lock(id)
        try:
            lock.acquire(timeout=self.lock_timeout)
        except Timeout:
            raise EnvshipError(
                env or id,
                f"another process has held {lock.lock_file} for over "
                f"{self.lock_timeout:.0f} s",
                "look for a hung envship process on this node",
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _try_lock(self, id: str) -> bool:
        try:
            self._lock(id).acquire(timeout=0)
        except Timeout:
            return False
        return True

    def _ids(self) -> list[str]:
        ids = {name for name in os.listdir(self.root) if _ID.fullmatch(name)}
        for name in os.listdir(self.root / "archives"):
            if name.endswith(".tar.zst") and _ID.fullmatch(name[: -len(".tar.zst")]):
                ids.add(name[: -len(".tar.zst")])
        return sorted(ids)

    def _record_path(self, id: str) -> Path:
        return self.root / "installed" / f"{id}.json"

    def _size(self, id: str) -> tuple[int, bool, bool]:
        """(bytes of its own outside the file store, has_tree, has_archive) of ``id``."""
        total = 0
        has_tree = self.path(id).is_dir()
        if has_tree:
            try:
                with open(self._record_path(id), encoding="utf-8") as f:
                    record = json.load(f)
                total += int(record.get("private", record["size"]))
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                total += disk_usage(self.path(id))
        has_archive = False
        for path in (self.archive_path(id), self.manifest_path(id)):
            try:
                total += os.stat(path).st_size
            except FileNotFoundError:
                continue
            if path.name.endswith(".tar.zst"):
                has_archive = True
        return total, has_tree, has_archive

    def _entry(self, id: str) -> CacheEntry:
        size, has_tree, has_archive = self._size(id)
        shared = 0
        if has_tree:
            alone, shared = _stored_usage(self.path(id))
            size += alone
        manifest = self.manifest(id)
        name = manifest.name if manifest else None
        if isinstance(manifest, ThinManifest):
            name += " (thin pack)"
        return CacheEntry(
            id=id,
            name=name,
            size=size,
            last_used=self._last_used(id) or None,
            leases=tuple(self.live_leases(id)),
            has_tree=has_tree,
            has_archive=has_archive,
            shared=shared,
        )

    def _last_used(self, id: str) -> float:
        for path in (self.root / "used" / id, self.archive_path(id), self.path(id)):
            try:
                return os.stat(path).st_mtime
            except FileNotFoundError:
                pass
        return 0.0

    def _touch(self, id: str) -> None:
        path = self.root / "used" / id
        try:
            os.utime(path)
        except FileNotFoundError:
            path.touch()

    def _remove_temp(self, id: str) -> None:
        """Remove what crashed installs or removals of ``id`` left (lock held)."""
        for name in os.listdir(self.root / "tmp"):
            if name.startswith(f"{id}-"):
                logger.info("removing leftover %s", self.root / "tmp" / name)
                remove_tree(self.root / "tmp" / name)

    def _discard_archive(self, id: str) -> None:
        for path in (self.archive_path(id), self.manifest_path(id)):
            path.unlink(missing_ok=True)
        (self.root / "used" / id).unlink(missing_ok=True)

    def _remove_locked(self, id: str, keep_archive: bool = False) -> None:
        tree = self.path(id)
        if tree.is_symlink() or tree.is_file():
            tree.unlink()
        elif tree.is_dir():
            # Disappear in one step, then delete at leisure.
            doomed = self.root / "tmp" / f"{id}-remove-{secrets.token_hex(4)}"
            os.chmod(tree, 0o700)
            os.rename(tree, doomed)
            remove_tree(doomed)
        self._record_path(id).unlink(missing_ok=True)
        if not keep_archive:
            self._discard_archive(id)
            remove_tree(self.root / "leases" / id)


def _bucket(id: str) -> str:
    """Which of 256 lock files guards ``id``: its first two hex digits.

    A lock file per id would pile up for every id ever tried, and one can't
    be deleted safely (a process waiting on it would hold a lock on a file
    nobody else sees). Ids of one bucket merely take turns.
    """
    return check_id(id)[:2]


def _disk_error(name: str, root: Path, e: OSError) -> EnvshipError:
    """What an ``OSError`` while installing means for the user."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return EnvshipError(
            name,
            f"the disk of this node's cache ({root}) filled up while unpacking it "
            "(the archive is kept)",
            "free disk space on this node, or set envship.cache.max-size lower",
        )
    return EnvshipError(
        name,
        f"could not unpack it into {root}: {e}",
        f"check that {root} is a local folder this nanny's user may write",
    )


def _stored_usage(tree: Path) -> tuple[int, int]:
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


def disk_usage(*trees: str | os.PathLike) -> int:
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


def _alive(pid: int, created: float) -> bool:
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - created) > CREATE_TIME_SLACK:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True
