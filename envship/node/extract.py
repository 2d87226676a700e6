"""Safe, verifying extraction of an artifact that came from another machine.

An archive is untrusted input until its content id checks out, and the id can
only be checked once every entry has been read. So extraction and verification
happen in one streaming pass: each entry is checked before anything is written
for it, written without ever following a symlink, and hashed exactly as
:class:`envship.archive.ArchiveWriter` hashed it; a mismatch at the end undoes
everything.

Refused: absolute paths, ``..`` and other non-canonical paths, duplicates,
symlinks that point out of the tree, hard links to anything but an earlier
regular file, devices, fifos and other special entries, setuid, setgid and
sticky bits, and more unpacked bytes than the caller allows.

This module writes only inside the destination folder it is given (and, when
given a :class:`~envship.node.filestore.FileStore`, links from and into it).
It knows nothing of the node cache, conda or Dask.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import xxhash
import zstandard

from envship.archive import (
    READ_SIZE,
    TAR_DIRECTORY,
    TAR_HARDLINK,
    TAR_REGULAR,
    TAR_SYMLINK,
    ContentHasher,
    ContentSummary,
)
from envship.archive_reader import (
    TAR_SPECIAL,
    CorruptArchive,
    ForwardReader,
    Member,
    Prefetcher,
    read_members,
)
from envship.config import usable_cores
from envship.errors import (
    CorruptArchiveError,
    EnvshipError,
    MissingStoreFileError,
    UnsafeArchiveError,
)
from envship.thin import THIN_MAGIC, read_thin_pack

from .batch_writer import BatchWriter, Item, NotInStore, write_large
from .filestore import FileStore

# Files up to this size are read, hashed and written in one piece.
WHOLE_FILE = 4 << 20
# Report progress about this often (unpacked bytes).
PROGRESS_STEP = 16 << 20
Progress = Callable[[str, int, int], None]


def extract_archive(
    archive_path: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    expected_id: str,
    max_unpacked_bytes: int,
    env: str,
    progress: Progress | None = None,
    threads: int | None = None,
    files: FileStore | None = None,
    max_total_bytes: int | None = None,
) -> ContentSummary:
    """Extract an artifact into ``dest``, refusing unsafe entries and checking its id.

    The archive is decompressed and read once. Regular files get the permission
    bits and modification time of their entry (``.pyc`` files compare the
    source's mtime), directories their mode once everything inside is written.

    Parameters
    ----------
    archive_path : path
        The compressed tar (``<id>.tar.zst``).
    dest : path
        An empty or missing folder, private to the caller. On any error the
        entries written into it are removed again (and ``dest`` itself if this
        function created it).
    expected_id : str
        The content id the archive claims; the tree read must hash to it.
    max_unpacked_bytes : int
        Most bytes of regular files to write from the archive; more is
        treated as a bomb.
    max_total_bytes : int, optional
        Most bytes of regular files in the tree, those of a thin pack's
        references included (linked or copied from the store, each counted
        at its size); default ``max_unpacked_bytes``.
    env : str
        The environment's name, for messages.
    progress : callable, optional
        Called as ``progress("extract", bytes_written, max_unpacked_bytes)``
        every few megabytes and once at the end.
    threads : int, optional
        Threads that create files (the kernel creates files in different
        folders in parallel); default one per usable core, at most 8.
    files : FileStore, optional
        A store of file contents on the same filesystem: a file it holds
        (same bytes, mode and mtime) is linked instead of written; a file
        written here enters it. Every file is still read and hashed.

    Returns
    -------
    ContentSummary
        The id, number of regular files and their total size, and how many
        of them were linked from ``files``.

    Raises
    ------
    UnsafeArchiveError
        An entry that must never be extracted; the message names it.
    EnvshipError
        The archive is corrupt, or its content does not match ``expected_id``.

    Examples
    --------
    >>> summary = extract_archive(  # doctest: +SKIP
    ...     "abc.tar.zst", "/tmp/x", expected_id="abc...", max_unpacked_bytes=2**30,
    ...     env="sklearn-dev",
    ... )
    >>> summary.file_count  # doctest: +SKIP
    5495
    """
    dest = os.fspath(dest)
    created = not os.path.lexists(dest)
    if created:
        os.mkdir(dest, 0o700)
    elif os.path.islink(dest) or not os.path.isdir(dest) or os.listdir(dest):
        raise ValueError(f"{dest} must be an empty directory or not exist")
    try:
        with open(archive_path, "rb") as f:
            if threads is None:
                threads = default_threads()
            extractor = _Extractor(
                dest, env, max_unpacked_bytes, progress, threads, files
            )
            if max_total_bytes is not None:
                extractor.total_limit = max_total_bytes
            summary = extractor.run(f)
        if summary.id != expected_id:
            raise CorruptArchiveError(
                env,
                f"archive does not match its id: it should be {expected_id} "
                f"but its content hashes to {summary.id} (corrupted in transit, "
                "or changed after packing)",
                "send the artifact again; if that fails, pack the environment again",
            )
        return summary
    except BaseException:
        if created:
            remove_tree(dest)
        else:
            for name in os.listdir(dest):
                remove_tree(os.path.join(dest, name))
        raise


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a file or tree, also if its folders were made read-only.

    Symlinks are removed, never followed. A missing ``path`` is not an error.
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    try:
        shutil.rmtree(path)
    except PermissionError:
        _make_dirs_writable(path)
        shutil.rmtree(path)


def _make_dirs_writable(path: str) -> None:
    os.chmod(path, 0o700)
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                _make_dirs_writable(entry.path)


class _Extractor:
    """One extraction: checks and hashes in the calling thread.

    Small files and symlinks are handed to a
    :class:`~envship.node.batch_writer.BatchWriter` in batches of one folder
    each. Folders are made here, before any batch that needs them is handed
    out.
    """

    def __init__(
        self,
        dest: str,
        env: str,
        limit: int,
        progress: Progress | None,
        threads: int,
        files: FileStore | None = None,
    ) -> None:
        self.dest = dest
        self.files = files
        self.env = env
        self.limit = limit
        self.progress = progress
        self.hasher = ContentHasher()
        self.kinds: dict[str, str] = {}  # entry -> "f", "h", "l" or "d"
        self.dirs: set[str] = {""}  # every folder made, listed or not
        self.dir_times: dict[str, tuple[int, float]] = {}  # listed folders
        self.odd_links: list[str] = []
        self.written = 0
        #: Bytes of the thin pack's references, and the most the tree may hold.
        self.referenced = 0
        self.total_limit = limit
        self.file_count = 0
        self.next_report = PROGRESS_STEP
        self.writer = BatchWriter(dest, threads, files)

    def refuse(self, name: str, problem: str) -> UnsafeArchiveError:
        return UnsafeArchiveError(
            self.env,
            f"the archive holds an unsafe entry {name!r}: {problem}; "
            "nothing was extracted",
            "pack the environment again with envship; an archive made "
            "otherwise, or altered, is never unpacked",
        )

    def run(self, fileobj) -> ContentSummary:
        try:
            self.read_all(fileobj)
            self.writer.flush()
            self.writer.drain()
        except NotInStore as e:
            name, key = e.args
            raise MissingStoreFileError(
                self.env,
                f"this node's file store no longer holds {name} ({key}), which "
                "the thin pack refers to",
                "send the whole archive to this node",
            ) from None
        finally:
            self.writer.close()
        self.check_odd_links()
        self.finish_dirs()
        if self.progress is not None:
            self.progress("extract", self.written, self.limit)
        return ContentSummary(
            self.hasher.hexdigest(),
            self.file_count,
            self.written,
            self.writer.linked_files,
            self.writer.linked_bytes,
        )

    def read_all(self, fileobj) -> None:
        decompressor = zstandard.ZstdDecompressor()
        raw = decompressor.stream_reader(fileobj, read_size=READ_SIZE)
        prefetcher = Prefetcher(raw)
        self.reader = ForwardReader(prefetcher)
        try:
            thin = self.reader.peek(len(THIN_MAGIC)) == THIN_MAGIC
            for member in (read_thin_pack if thin else read_members)(self.reader):
                self.member(member)
        except (CorruptArchive, zstandard.ZstdError, EOFError) as e:
            raise CorruptArchiveError(
                self.env,
                f"the archive is not a readable envship artifact: {e}",
                "send the artifact again; if that fails, pack the environment again",
            ) from None
        finally:
            # A refusal leaves the stream half read: stop the thread that
            # decompresses ahead, or it waits forever with its buffers.
            prefetcher.close()

    def member(self, info: Member) -> None:
        name = info.name
        self.check_name(name, name)
        mode = info.mode & 0o7777
        if mode & 0o7000:
            raise self.refuse(name, f"setuid, setgid or sticky bits (mode {mode:o})")
        kind = info.type
        if name in self.kinds or (name in self.dirs and kind != TAR_DIRECTORY):
            raise self.refuse(name, "a duplicate entry")
        if kind in TAR_REGULAR:
            self.make_parents(name)
            self.regular(info, name, mode)
            return
        if kind not in (TAR_DIRECTORY, TAR_SYMLINK, TAR_HARDLINK):
            what = TAR_SPECIAL.get(kind, f"an entry of tar type {kind!r}")
            raise self.refuse(
                name, f"{what}; only files, folders and links are allowed"
            )
        if info.size:
            raise self.refuse(name, "a folder or link entry that carries data")
        self.make_parents(name)
        if kind == TAR_DIRECTORY:
            if name not in self.dirs:
                os.mkdir(self.path(name), 0o700)
                self.dirs.add(name)
            self.kinds[name] = "d"
            self.dir_times[name] = (mode, info.mtime)
            self.hasher.add_dir(name, mode)
        elif kind == TAR_SYMLINK:
            self.symlink(info, name)
        else:
            self.hardlink(info, name)

    def check_name(self, name: str, entry: str) -> None:
        if not name:
            raise self.refuse(entry, "an empty path")
        if "\0" in name:
            raise self.refuse(entry, "a NUL byte in a path")
        if name.startswith("/"):
            raise self.refuse(entry, "an absolute path")
        parts = name.split("/")
        if ".." in parts:
            raise self.refuse(entry, "a '..' component leaves the folder")
        if "." in parts or "" in parts:
            raise self.refuse(entry, "not a plain relative path ('.' or '//')")

    def path(self, name: str) -> str:
        return f"{self.dest}/{name}"  # name: a checked relative path

    def make_parents(self, name: str) -> None:
        """Create the folders above ``name``; each must be a real folder."""
        parent = name.rpartition("/")[0]
        missing = []
        while parent not in self.dirs:
            if parent in self.kinds:
                raise self.refuse(
                    name, f"its parent {parent!r} is a link or a file, not a folder"
                )
            missing.append(parent)
            parent = parent.rpartition("/")[0]
        for parent in reversed(missing):
            os.mkdir(self.path(parent), 0o700)
            self.dirs.add(parent)

    def regular(self, info: Member, name: str, mode: int) -> None:
        size = info.size
        if size < 0:
            raise self.refuse(name, "a negative size")
        if self.written + size > self.limit:
            raise self.refuse(
                name,
                f"more than the {self.limit} bytes it may unpack to: an archive bomb?",
            )
        if info.digest is not None:
            self.reference(info, name, mode, info.digest)
            return
        if size <= WHOLE_FILE:
            data = self.reader.read(size)
            if len(data) != size:
                raise EOFError(f"{name} is cut short")
            digest = xxhash.xxh3_128_hexdigest(data)
            key = (
                None if self.files is None else self.files.key(digest, mode, info.mtime)
            )
            item: Item = (name, data, mode, info.mtime, None, key, size)
            self.writer.queue(name, item, size)
        else:
            digest = write_large(
                self.reader, self.path(name), name, size, mode, info.mtime
            )
            if self.files is not None:
                key = self.files.key(digest, mode, info.mtime)
                self.writer.share_large(name, key, size)
        self.kinds[name] = "f"
        self.hasher.add_file(name, mode, digest)
        self.file_count += 1
        self.written += size
        if self.progress is not None and self.written >= self.next_report:
            self.next_report = self.written + PROGRESS_STEP
            self.progress("extract", self.written, self.limit)

    def reference(self, info: Member, name: str, mode: int, digest: str) -> None:
        """A file of a thin pack given by digest alone: linked from the store."""
        if self.files is None:
            raise EnvshipError(
                self.env,
                "a thin pack arrived but this node has no file store to fill it from",
                "send the whole archive",
            )
        size = info.ref_size
        if size is None or size < 0:
            raise self.refuse(name, "a reference without a valid size")
        if self.written + self.referenced + size > self.total_limit:
            raise self.refuse(
                name,
                f"its references and files come to more than the "
                f"{self.total_limit} bytes it may unpack to: an archive bomb?",
            )
        self.referenced += size
        key = self.files.key(digest, mode, info.mtime)
        self.writer.reference(name, key, size)
        self.kinds[name] = "f"
        self.hasher.add_file(name, mode, digest)
        self.file_count += 1

    def symlink(self, info: Member, name: str) -> None:
        target = info.linkname
        if not target:
            raise self.refuse(name, "a symlink with an empty target")
        if "\0" in target:
            raise self.refuse(name, "a NUL byte in a symlink target")
        if target.startswith("/"):
            raise self.refuse(name, f"a symlink to the absolute path {target!r}")
        # Walk the target lexically from the link's folder. A '..' after a
        # normal component could climb out through another symlink, so such
        # links are checked again on disk once every entry exists.
        level = name.count("/")
        descended = odd = False
        for part in target.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                odd = odd or descended
                level -= 1
                if level < 0:
                    raise self.refuse(
                        name, f"a symlink to {target!r}, outside the environment"
                    )
            else:
                descended = True
                level += 1
        if odd:
            self.odd_links.append(name)
        self.writer.queue(name, (name, None, 0, info.mtime, target, None, 0), 0)
        self.kinds[name] = "l"
        self.hasher.add_symlink(name, target)

    def hardlink(self, info: Member, name: str) -> None:
        target = info.linkname
        self.check_name(target, name)
        if self.kinds.get(target) not in ("f", "h"):
            raise self.refuse(
                name, f"a hard link to {target!r}, which is not an earlier file"
            )
        # Rare: wait until the target is surely on disk.
        self.writer.flush()
        self.writer.drain()
        os.link(self.path(target), self.path(name), follow_symlinks=False)
        self.kinds[name] = "h"
        self.hasher.add_hardlink(name, target)

    def check_odd_links(self) -> None:
        root = os.path.realpath(self.dest)
        for name in self.odd_links:
            resolved = os.path.realpath(self.path(name))
            if resolved != root and not resolved.startswith(root + os.sep):
                target = os.readlink(self.path(name))
                raise self.refuse(
                    name, f"a symlink to {target!r}, which resolves outside"
                )

    def finish_dirs(self) -> None:
        # Deepest first: setting a folder's mode could lock out its children,
        # and creating children changes a folder's mtime.
        for name in sorted(self.dirs, key=lambda d: d.count("/"), reverse=True):
            if not name:
                continue
            path = self.path(name)
            if name in self.dir_times:
                mode, mtime = self.dir_times[name]
                os.chmod(path, mode)
                os.utime(path, (mtime, mtime))
            else:
                os.chmod(path, 0o755)


def default_threads() -> int:
    """Writer threads: one per usable core, at most 8."""
    return max(1, min(8, usable_cores()))
