"""The unpack pipeline: extract and verify, fix up for the final prefix, seal.

Everything happens in a temporary folder that nothing else reads; the caller
(:class:`envship.node.installer.Installer`) renames the tree into place only when
all of it succeeded, so no half-unpacked or unverified environment is ever
visible. This module decides nothing about where trees live, locks, leases or
eviction.
"""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from envship.errors import EnvshipError
from envship.kinds import environment_kind
from envship.manifest import Manifest

from .extract import Progress, extract_archive
from .filestore import FileStore
from .relocate import fixup_conda, fixup_venv


def unpack(
    archive: Path,
    tree: Path,
    final: Path,
    *,
    id: str,
    manifest: Manifest,
    limit: int,
    name: str,
    files: FileStore | None = None,
    progress: Progress | None = None,
    threads: int | None = None,
) -> dict:
    """Make ``tree`` the verified environment ``id``, ready to live at ``final``.

    Parameters
    ----------
    archive : path
        The artifact (``<id>.tar.zst``).
    tree : path
        An empty temporary folder on the same filesystem as ``final``.
    final : path
        Where the caller will rename ``tree`` to; prefixes are fixed up for it.
    id, manifest, name
        The content id the archive must hash to, its manifest (its ``kind``
        chooses the fix-up) and a name for messages.
    limit : int
        Most bytes to unpack from the archive: more is a bomb. A thin pack's
        references may add up to what the manifest declares, the tree no
        more than that.
    files : FileStore, optional
        Link what it holds instead of writing it (see ``extract_archive``).
    progress : callable, optional
        ``progress(stage, done, total)``: ``"extract"`` (bytes), ``"fixup"``.
    threads : int, optional
        Writer threads (see ``extract_archive``).

    Returns
    -------
    dict
        The install record: sizes on disk (all, and its own outside the file
        store), file counts (all, linked), unpacked bytes, seconds.

    Raises
    ------
    EnvshipError
        The archive is unsafe, corrupt, not ``id``, or can't be fixed up.
    """
    start = time.perf_counter()
    summary = extract_archive(
        archive,
        tree,
        expected_id=id,
        max_unpacked_bytes=limit,
        max_total_bytes=max(limit, manifest.unpacked_size),
        env=name,
        progress=progress,
        files=files,
        threads=threads,
    )
    check_manifest(tree, manifest, summary.file_count, name)
    if progress is not None:
        progress("fixup", 0, 1)
    fixup(tree, final, manifest, name)
    if progress is not None:
        progress("fixup", 1, 1)
    disk, private = seal(tree)
    return {
        "id": id,
        "name": manifest.name,
        "size": disk,
        "private": private,
        "files": summary.file_count,
        "linked_files": summary.linked_files,
        "linked_bytes": summary.linked_bytes,
        "unpacked_size": summary.unpacked_size,
        "installed": time.time(),
        "seconds": round(time.perf_counter() - start, 3),
    }


def check_manifest(tree: Path, manifest: Manifest, file_count: int, name: str) -> None:
    """The manifest is the sender's word: what the node acts on must match the tree.

    Its ``kind`` chooses the fix-up and the worker's variables; its file count
    is checked too. (Its ``unpacked_size`` bounded the extraction.)
    """
    found = environment_kind(tree)
    if found != manifest.kind:
        holds = {"conda": "a conda environment", "venv": "a venv"}.get(
            found or "", "neither a conda environment nor a venv"
        )
        raise EnvshipError(
            name,
            f"its manifest says it is a {manifest.kind} environment, but it holds "
            f"{holds}",
            "pack the environment again with envship",
        )
    if file_count != manifest.file_count:
        raise EnvshipError(
            name,
            f"its manifest declares {manifest.file_count} files, and it holds "
            f"{file_count}",
            "pack the environment again with envship",
        )


def fixup(tree: Path, final: Path, manifest: Manifest, name: str) -> None:
    """Make ``tree`` work at ``final``, as its kind of environment needs."""
    kind = manifest.kind
    if kind == "conda":
        fixup_conda(tree, final, name)
    elif kind == "venv":
        fixup_venv(tree, final, env=name)
    else:
        raise EnvshipError(
            name,
            f"its manifest names an unknown kind of environment {kind!r}",
            "use the same envship version on the client and on the nodes",
        )


def seal(tree: Path) -> tuple[int, int]:
    """Remove every write bit below ``tree``; return its bytes on disk.

    Returns (all bytes, bytes of what is not shared with the file store).
    ``tree`` itself stays writable: it is renamed into place afterwards.
    """
    top = os.lstat(tree)
    total = private = top.st_blocks * 512
    seen: set[int] = set()
    stack = [os.fspath(tree)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                kind = stat.S_IFMT(st.st_mode)
                if kind == stat.S_IFDIR:
                    stack.append(entry.path)
                elif st.st_nlink > 1 and kind == stat.S_IFREG:
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                total += st.st_blocks * 512
                if kind != stat.S_IFREG or st.st_nlink == 1:
                    private += st.st_blocks * 512
                if kind == stat.S_IFLNK:
                    continue  # chmod would follow it
                mode = stat.S_IMODE(st.st_mode)
                if mode & 0o222:
                    os.chmod(entry.path, mode & ~0o222)
    return total, private
