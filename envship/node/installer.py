"""Installing into the node cache: each environment unpacked once per node.

The first process of a node that needs an environment takes its lock, makes
room (evicting within the budget, bounded by what the archive can honestly
unpack to), unpacks the held artifact into ``tmp/`` (:func:`unpack`: verify,
fix up, seal) and renames the tree into place; processes at the same time
wait on the lock and reuse the result. A bad artifact is deleted, so it is
never tried again.

This module decides nothing about transfers or which environment a worker
runs in.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

from dask.utils import format_bytes

from envship.errors import EnvshipError, MissingStoreFileError
from envship.files import write_json_atomic
from envship.manifest import Manifest, ThinManifest

from .archives import Archives
from .budget import CacheBudget
from .extract import Progress, remove_tree
from .filestore import FileStore
from .layout import CacheLayout
from .locks import CacheLocks, Leases
from .unpack import unpack

logger = logging.getLogger("envship.cache")

#: A filesystem block: what a file's bytes may round up by on disk (not
#: tar's 512-byte block, ``envship.archive.BLOCK``).
DISK_BLOCK = 4096
#: Most bytes an archive may unpack to per byte of itself. Environments
#: compress 3 to 5 times; a bomb of zeros, a thousand times. The archive's
#: size is what the node holds, unlike the size its manifest declares.
MAX_RATIO = 100
#: Disk left free by an install: 1 GiB, or a twentieth of a small disk.
RESERVE = 1 << 30


class Installer:
    """Installs environments of a node cache from the artifacts it holds."""

    def __init__(
        self,
        layout: CacheLayout,
        locks: CacheLocks,
        leases: Leases,
        archives: Archives,
        budget: CacheBudget,
        files: FileStore,
    ) -> None:
        self.layout = layout
        self.locks = locks
        self.leases = leases
        self.archives = archives
        self.budget = budget
        self.files = files

    def installed(self, id: str) -> bool:
        """Whether ``id`` is installed: its tree, and the record written before
        the tree appeared (in one rename). A tree without it is not ours."""
        return self.layout.install_record(id).is_file() and self.layout.env(id).is_dir()

    def ensure(
        self,
        id: str,
        *,
        env: str | None = None,
        lease_pid: int | None = None,
        progress: Progress | None = None,
        via: str | None = None,
    ) -> Path:
        """The prefix of environment ``id``, installed if needed (see
        :meth:`envship.node.cache.EnvCache.ensure`)."""
        final = self.layout.env(id)
        if lease_pid is None and self.installed(id):
            self.archives.mark_used(id)
            return final
        installed = False
        with self.locks.held(id, env):
            if not self.installed(id):
                self._install(id, env, progress, via)
                installed = True
            if lease_pid is not None:
                self.leases.take(id, lease_pid)
            self.archives.mark_used(id)
        if installed:  # back within the budget, now that it has verified
            try:
                self.budget.evict(keep=(id,))
            except OSError as e:
                logger.warning("could not evict from %s: %s", self.layout.root, e)
        return final

    def installs(self, id: str | None = None) -> list[dict]:
        """Past extractions on this node (all, or of ``id``), oldest first."""
        try:
            with open(self.layout.installs_log, encoding="utf-8") as f:
                lines = [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []
        return [r for r in lines if id is None or r.get("id") == id]

    def _install(
        self, id: str, env: str | None, progress: Progress | None, via: str | None
    ) -> None:
        """Install ``id`` (lock held)."""
        layout = self.layout
        archive, manifest = self._source(id, via)
        name = env or (manifest.name if manifest else id)
        if manifest is None:
            raise EnvshipError(
                name,
                f"this node's cache ({layout.root}) has no artifact {id} (or "
                "its manifest is unreadable)",
                "send the artifact to this node before installing it",
            )
        self.budget.remove_temp(id)
        final = layout.env(id)
        if os.path.lexists(final):
            # No record: not a tree this cache made (a crash, or planted).
            logger.warning("removing %s: no install record", final)
            self.budget.remove_locked(id, keep_archive=True)
        limit = self._make_room(id, via, archive, manifest, name)
        logger.info(
            "unpacking %s (%s) from %s (%s) into %s",
            name,
            id[:12],
            "its thin pack" if archive != layout.archive(id) else "its archive",
            format_bytes(os.stat(archive).st_size),
            layout.root,
        )
        tmp = layout.make_install_dir(id)
        record = layout.install_record(id)
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
                    threads=1 if archive != layout.archive(id) else None,
                )
            except MissingStoreFileError:
                raise  # the thin pack is sound, this node lacks what it needs
            except EnvshipError:
                self._discard_source(id, via, archive)
                raise
            except OSError as e:
                raise _disk_error(name, layout.root, e) from e
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
        self._log(info)
        logger.info(
            "unpacked %s (%s) in %.1f s: %d files, %d of them linked from the "
            "file store; %s on disk, %s of it its own",
            name,
            id[:12],
            info["seconds"],
            info["files"],
            info["linked_files"],
            format_bytes(info["size"]),
            format_bytes(info["private"]),
        )

    def _log(self, info: dict) -> None:
        """Append the install record to ``installs.log`` (one line, one write)."""
        line = json.dumps(dict(info, pid=os.getpid())) + "\n"
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        fd = os.open(self.layout.installs_log, flags, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

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
        root, max_size = self.layout.root, self.budget.max_size
        declared = manifest.unpacked_size
        if declared > max_size:
            self._discard_source(id, via, archive)
            raise EnvshipError(
                name,
                f"it unpacks to {format_bytes(declared)}, more than this node's "
                f"cache budget ({format_bytes(int(max_size))})",
                "raise envship.cache.max-size on the nodes, or ship a smaller "
                "environment",
            )
        bound = os.stat(archive).st_size * MAX_RATIO
        needed = min(declared + DISK_BLOCK * manifest.file_count, bound)
        try:
            self.budget.evict(needed, keep=(id, via) if via else (id,))
        except OSError as e:
            logger.warning("could not evict from %s: %s", root, e)
        disk = shutil.disk_usage(root)
        room = disk.free - min(RESERVE, disk.total // 20)
        if min(needed, declared) > room:
            raise EnvshipError(
                name,
                f"it may take {format_bytes(min(needed, declared))} and the disk "
                f"of this node's cache ({root}) has "
                f"{format_bytes(max(room, 0))} to spare",
                "free disk space on this node, or set envship.cache.max-size "
                "lower so that old environments are evicted",
            )
        return min(declared, bound)

    def _discard_source(self, id: str, via: str | None, archive: Path) -> None:
        """Never try a bad artifact again: the sender must send a good one."""
        if via is None or archive == self.layout.archive(id):
            self.archives.discard(id)
        else:
            self.archives.discard(via)
            self.layout.manifest(id).unlink(missing_ok=True)

    def _source(self, id: str, via: str | None) -> tuple[Path, Manifest | None]:
        """The archive to install ``id`` from (its own, or the thin pack ``via``)."""
        own_archive = self.layout.archive(id)
        if own_archive.is_file() or via is None:
            own = self.archives.manifest(id)
            return own_archive, own if isinstance(own, Manifest) else None
        thin = self.archives.manifest(via)
        if (
            not isinstance(thin, ThinManifest)
            or thin.thin_of != id
            or not self.layout.archive(via).is_file()
        ):
            return own_archive, None
        self.archives.put_manifest(id, thin.env)
        return self.layout.archive(via), thin.env


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
