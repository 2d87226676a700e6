"""Creating the files of one extraction, in batches handed to writer threads.

Creating a file costs far more kernel time than parsing its header, and the
kernel creates files in different folders in parallel, so
:mod:`envship.node.extract` checks and hashes every entry in its own thread
and hands small files and symlinks to a :class:`BatchWriter`, in batches of
one folder each. Big files are streamed to disk in the calling thread
(:func:`write_large`).

Files are created with ``O_EXCL | O_NOFOLLOW``, never through a symlink. With
a :class:`~envship.node.filestore.FileStore`, a file it holds is linked
rather than written and a file written enters it. This module checks
nothing: the caller has refused unsafe entries before handing them here.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import xxhash

from envship.archive import READ_SIZE
from envship.archive_reader import ForwardReader

from .filestore import FileStore

# A writer thread's batch: files of one folder, up to this many or this size.
BATCH_FILES = 64
BATCH_BYTES = 4 << 20
# Batches handed out and not yet written; bounds memory to about 64 MiB.
MAX_PENDING_BATCHES = 16

OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

#: One file or symlink to create: ``(name, data, mode, mtime, link_target,
#: key, size)``; ``data`` None and ``link_target`` None: a reference to
#: the store's file ``key``.
Item = tuple[str, bytes | None, int, float, str | None, str | None, int]


class NotInStore(Exception):
    """A reference to a file the store lacks: (name, key)."""


class BatchWriter:
    """Writes the files queued for one destination folder, in a thread pool.

    ``threads`` of 1 or less writes in the calling thread, when a batch is
    full. Errors of a writer thread are raised by a later :meth:`queue`,
    :meth:`flush` or by :meth:`drain`. ``linked_files`` and ``linked_bytes``
    count what came from the store, once drained.
    """

    def __init__(self, dest: str, threads: int, files: FileStore | None) -> None:
        self.dest = dest
        self.files = files
        self.linked_files = 0
        self.linked_bytes = 0
        self.batch: list[Item] = []
        self.batch_dir: str | None = None
        self.batch_bytes = 0
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.pending: deque[Future] = deque()
        self.slots = threading.Semaphore(MAX_PENDING_BATCHES)

    def queue(self, name: str, item: Item, size: int) -> None:
        folder = name.rpartition("/")[0]
        if folder != self.batch_dir or len(self.batch) >= BATCH_FILES:
            self.flush()
            self.batch_dir = folder
        self.batch.append(item)
        self.batch_bytes += size
        if self.batch_bytes >= BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        batch = self.batch
        if not batch:
            return
        self.batch, self.batch_bytes, self.batch_dir = [], 0, None
        if self.pool is None:
            self.count_linked(*write_batch(self.dest, batch, self.files))
            return
        while self.pending and self.pending[0].done():
            # raises a writer's error here
            self.count_linked(*self.pending.popleft().result())
        self.slots.acquire()
        future = self.pool.submit(write_batch, self.dest, batch, self.files)
        future.add_done_callback(lambda _: self.slots.release())
        self.pending.append(future)

    def reference(self, name: str, key: str, size: int) -> None:
        """A file of the store, by ``key``: linked at once when writing in this
        thread (a thin pack's thousands of references skip the batching)."""
        if self.pool is not None:
            self.queue(name, (name, None, 0, 0, None, key, size), 0)
            return
        if self.files is None or not self.files.fill(key, f"{self.dest}/{name}", size):
            raise NotInStore(name, key)
        self.count_linked(1, size)

    def drain(self) -> None:
        """Wait until every batch handed out is written."""
        while self.pending:
            self.count_linked(*self.pending.popleft().result())

    def count_linked(self, files: int, size: int) -> None:
        self.linked_files += files
        self.linked_bytes += size

    def close(self) -> None:
        """Stop the threads; on an error, let running batches end before the
        caller removes the tree under them."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def share_large(self, name: str, key: str, size: int) -> None:
        """Swap a big file just written for the stored copy, or store it."""
        if self.files is None:
            return
        path = os.path.join(self.dest, name)
        if self.files.link(key, path + ".stored"):
            os.replace(path + ".stored", path)
            self.count_linked(1, size)
        else:
            self.files.add(key, path)


def write_large(
    reader: ForwardReader, path: str, name: str, size: int, mode: int, mtime: float
) -> str:
    """Stream ``size`` bytes of ``reader`` to a new file at ``path``; their digest."""
    h = xxhash.xxh3_128()
    fd = os.open(path, OPEN_FLAGS, 0o600)
    try:
        left = size
        while left:
            data = reader.read(min(left, READ_SIZE))
            if not data:
                raise EOFError(f"{name} is cut short")
            h.update(data)
            write_all(fd, data)
            left -= len(data)
        os.fchmod(fd, mode)
        os.utime(fd, (mtime, mtime))
    finally:
        os.close(fd)
    return h.hexdigest()


def write_batch(
    dest: str, batch: list[Item], files: FileStore | None
) -> tuple[int, int]:
    """Create the files and symlinks of ``batch`` (see :data:`Item`).

    A file whose ``key`` the store holds is linked, not written; a file
    written enters the store; a reference (``data`` None) must be in the
    store. Returns the files and bytes linked.
    """
    linked = linked_bytes = 0
    for name, data, mode, mtime, target, key, size in batch:
        path = f"{dest}/{name}"  # name: a checked relative path
        if target is not None:
            os.symlink(target, path)
            os.utime(path, (mtime, mtime), follow_symlinks=False)
            continue
        if data is None:  # a reference: the store must hold it
            if files is None or key is None or not files.fill(key, path, size):
                raise NotInStore(name, key)
            linked += 1
            linked_bytes += size
            continue
        if key and files is not None and files.link(key, path):
            linked += 1
            linked_bytes += size
            continue
        fd = os.open(path, OPEN_FLAGS, 0o600)
        try:
            if data:
                write_all(fd, data)
            os.fchmod(fd, mode)
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)
        if key and files is not None:
            files.add(key, path)
    return linked, linked_bytes


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
