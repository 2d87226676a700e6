"""Who may touch an entry of the node cache now: file locks and leases.

Installs, leases and removals of an id take its lock (one lock file per
bucket of ids, see :func:`envship.node.layout.bucket`), so any number of
nannies and workers of a node may share one cache. A lease records that a
process uses an environment: eviction never removes a leased one, and a
lease dies with its process (even after SIGKILL).

This module decides nothing about what to install or evict.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
from filelock import FileLock, Timeout

from envship.errors import EnvshipError
from envship.files import write_atomic

from .layout import CacheLayout, bucket

# Create times of one process, read at different moments, agree to well
# within this (the kernel's boot time estimate can move by a second).
CREATE_TIME_SLACK = 1.0


class CacheLocks:
    """The locks of a node cache's ids.

    Parameters
    ----------
    layout : CacheLayout
        Where the lock files are.
    timeout : float
        Seconds to wait for another process holding an id's lock.
    """

    def __init__(self, layout: CacheLayout, timeout: float) -> None:
        self.layout = layout
        self.timeout = timeout
        self._locks: dict[str, FileLock] = {}

    def lock(self, id: str) -> FileLock:
        """The lock of ``id``'s bucket, reentrant per thread."""
        key = bucket(id)
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = FileLock(str(self.layout.lock(id)))
        return lock

    @contextmanager
    def held(self, id: str, env: str | None = None) -> Iterator[None]:
        """Hold ``id``'s lock; an ``EnvshipError`` (naming ``env``) on timeout."""
        lock = self.lock(id)
        try:
            lock.acquire(timeout=self.timeout)
        except Timeout:
            raise EnvshipError(
                env or id,
                f"another process has held {lock.lock_file} for over "
                f"{self.timeout:.0f} s",
                "look for a hung envship process on this node",
            ) from None
        try:
            yield
        finally:
            lock.release()

    def try_lock(self, id: str) -> bool:
        """Take ``id``'s lock if nobody holds it; release it with :meth:`release`."""
        try:
            self.lock(id).acquire(timeout=0)
        except Timeout:
            return False
        return True

    def release(self, id: str) -> None:
        self.lock(id).release()

    @contextmanager
    def held_if_free(self, id: str) -> Iterator[bool]:
        """Hold ``id``'s lock for the block if nobody holds it; say whether."""
        if not self.try_lock(id):
            yield False
            return
        try:
            yield True
        finally:
            self.release(id)

    def fetch_lock(self, id: str) -> FileLock:
        """The lock one nanny of the node holds while it downloads ``id``.

        Not thread-local: an event loop takes and releases it from any thread.
        """
        return FileLock(str(self.layout.fetch_lock(id)), thread_local=False)


class Leases:
    """Which processes use which environments of a node cache.

    A lease holds the process's create time, so it dies with the process
    (even after SIGKILL) and a later process that reuses the PID does not
    inherit it.
    """

    def __init__(self, layout: CacheLayout, locks: CacheLocks) -> None:
        self.layout = layout
        self.locks = locks

    def take(self, id: str, pid: int) -> None:
        """Record that process ``pid`` uses environment ``id``."""
        try:
            created = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            raise ValueError(f"there is no process {pid} to lease {id} to") from None
        folder = self.layout.leases(id)
        with self.locks.held(id):
            folder.mkdir(mode=0o700, exist_ok=True)
            write_atomic(self.layout.lease(id, pid), repr(created).encode())

    def drop(self, id: str, pid: int) -> None:
        """Drop the lease of process ``pid`` on ``id``, if it has one."""
        self.layout.lease(id, pid).unlink(missing_ok=True)

    def live(self, id: str) -> list[int]:
        """PIDs of live processes leasing ``id``; dead leases are removed."""
        with self.locks.held_if_free(id) as held:
            return self.live_locked(id, prune=held)

    def live_locked(self, id: str, *, prune: bool) -> list[int]:
        """PIDs of live processes leasing ``id``; ``prune`` (lock held) drops dead ones."""
        folder = self.layout.leases(id)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        live = []
        for name in names:
            if not name.isdigit():
                continue
            try:
                created: float | None = float((folder / name).read_text())
            except FileNotFoundError:
                continue
            except ValueError:
                created = None
            if created is not None and _alive(int(name), created):
                live.append(int(name))
            elif prune:
                (folder / name).unlink(missing_ok=True)
        return sorted(live)


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
