"""The local artifact store: packed environments, their manifests and names.

Layout::

    <store>/<id>.table.zst      the environment's entries (see envship.table)
    <store>/<id>.tar.zst        the compressed archive, once something needed it
    <store>/<id>.json           its manifest
    <store>/names/<name>        the id a name points to
    <store>/signatures/<sig>    the id of an environment whose files had this
                                cheap signature (stat of every file)
    <store>/digests.zst         the digest of each file packed and the stat it
                                had, so that a re-pack reads only the files
                                whose stat changed
    <store>/thin/<id>.tar.zst   thin packs written for a cluster, named by
                                their own digest (envship.client.delta)

Every write goes to a temporary file in the store and is renamed into place
(:mod:`envship.files`), so an interrupted pack leaves nothing half-written.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack
import zstandard

from envship import config
from envship.archive import is_id
from envship.errors import EnvshipError
from envship.files import atomic_file, temporary_file
from envship.manifest import Manifest, ThinManifest
from envship.table import EntryTable, pack_msg, unpack_msg, write_archive

from .progress import progress_bar

#: What reading a table or the digests of another envship version raises.
UNREADABLE = (ValueError, TypeError, zstandard.ZstdError, msgpack.UnpackException)
#: Files whose digests the store remembers, beyond those of the last pack.
MAX_DIGESTS = 200_000


def check_name(name: str) -> str:
    """``name`` if it can name an artifact: one file name in ``<store>/names/``.

    Examples
    --------
    >>> check_name("sklearn-dev")
    'sklearn-dev'
    >>> check_name("../x")
    Traceback (most recent call last):
    ...
    envship.errors.EnvshipError: environment '../x': a name cannot hold '/' or NUL, be '.' or '..', or be longer than 200 characters
    Fix: pack it with another name (name=...)
    """
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= 200
        or "/" in name
        or "\0" in name
        or name in (".", "..")
    ):
        raise EnvshipError(
            str(name),
            "a name cannot hold '/' or NUL, be '.' or '..', or be longer than "
            "200 characters",
            "pack it with another name (name=...)",
        )
    return name


@dataclass(frozen=True)
class Artifact:
    """A packed environment: its content id, its name, its archive and manifest.

    Examples
    --------
    >>> artifact = envship.pack("sklearn-dev")  # doctest: +SKIP
    >>> artifact.short_id  # doctest: +SKIP
    '5f0c2d9a1b7e'
    """

    id: str
    name: str
    path: Path
    manifest: Manifest | ThinManifest

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def _repr_html_(self) -> str:
        from .html import artifact

        return artifact(self)

    @property
    def size(self) -> int | None:
        """Bytes of the compressed archive; None until it is written."""
        return self.manifest.packed_size

    @property
    def has_archive(self) -> bool:
        return self.path.is_file()

    @property
    def table_path(self) -> Path:
        return self.path.with_name(f"{self.id}.table.zst")

    def table(self) -> EntryTable | None:
        """Its entries, or None for an artifact packed by an older envship.

        Kept in memory for the session: each switch reads the tables of the
        environment and of its base.
        """
        try:
            st = os.stat(self.table_path)
            return _load_table(str(self.table_path), st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return None
        except UNREADABLE:  # another envship's format: pack again to have one
            return None


#: The tables read or written lately, by (path, mtime_ns, size): the last few.
_TABLES: dict[tuple[str, int, int], EntryTable] = {}


def _load_table(path: str, mtime_ns: int, size: int) -> EntryTable:
    table = _TABLES.get((path, mtime_ns, size))
    if table is None:
        table = EntryTable.load(path)
        _keep_table(path, table)
    return table


def _keep_table(path: str, table: EntryTable) -> None:
    st = os.stat(path)
    _TABLES[path, st.st_mtime_ns, st.st_size] = table
    while len(_TABLES) > 8:
        del _TABLES[next(iter(_TABLES))]


class ArtifactStore:
    """Packed environments on the client machine.

    Parameters
    ----------
    root : path, optional
        Defaults to dask config ``envship.store`` or ``~/.cache/envship/store``.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else config.store_directory()

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    def _repr_html_(self) -> str:
        from .html import artifact_store

        return artifact_store(self, self.artifacts())

    def _ensure_dirs(self) -> None:
        for sub in ("names", "signatures"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def archive_path(self, artifact_id: str) -> Path:
        return self.root / f"{artifact_id}.tar.zst"

    def manifest_path(self, artifact_id: str) -> Path:
        return self.root / f"{artifact_id}.json"

    def table_path(self, artifact_id: str) -> Path:
        return self.root / f"{artifact_id}.table.zst"

    def thin_path(self, thin_id: str) -> Path:
        return self.root / "thin" / f"{thin_id}.tar.zst"

    def load_digests(self) -> dict:
        """What earlier packs learnt of files' digests: ``{path: [stat..., digest]}``."""
        try:
            with open(self.root / "digests.zst", "rb") as f:
                digests = unpack_msg(
                    zstandard.ZstdDecompressor().stream_reader(f).read()
                )
        except (OSError, *UNREADABLE):
            return {}  # none yet: every file is read
        return digests if isinstance(digests, dict) else {}

    def save_digests(self, digests: dict, seen: set[str], label: str) -> None:
        """Keep ``digests`` for the next pack; beyond ``MAX_DIGESTS``, only ``seen``.

        Shared by every environment: conda environments pack most files from
        conda's package cache, so environments made from the same packages
        share these paths.
        """
        if len(digests) > MAX_DIGESTS:
            digests = {path: digests[path] for path in seen if path in digests}
        data = zstandard.ZstdCompressor(level=1).compress(pack_msg(digests))
        with self.writing_to(self.root / "digests.zst", label) as f:
            f.write(data)

    # -- writing -----------------------------------------------------------

    @contextmanager
    def writing(self, label: str) -> Iterator[tuple[BinaryIO, Path]]:
        """A temporary file in the store; the caller renames it into place.

        For a file named by what it holds (a thin pack, by its digest). The
        file is removed if the block fails, and a full disk becomes an
        ``EnvshipError`` naming the environment.
        """
        self._ensure_dirs()
        with self._full_disk(label), temporary_file(self.root) as (f, tmp):
            yield f, tmp

    @contextmanager
    def writing_to(self, path: Path, label: str) -> Iterator[BinaryIO]:
        """Write ``path`` of the store: it appears only if the block succeeds.

        The temporary file is made in the store's root, never among names or
        signatures (each file there is read as one); a full disk becomes an
        ``EnvshipError`` naming the environment.
        """
        self._ensure_dirs()
        with self._full_disk(label), atomic_file(path, temp_dir=self.root) as f:
            yield f

    @contextmanager
    def _full_disk(self, label: str) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise EnvshipError(
                    label,
                    f"the disk holding the store {self.root} is full; nothing "
                    "was written",
                    "free some space, remove old artifacts with `envship rm`, or "
                    "pack into another store with --store DIR",
                ) from e
            raise

    def _write_text(self, path: Path, text: str, label: str) -> None:
        with self.writing_to(path, label) as f:
            f.write(text.encode())

    def add(self, table: EntryTable, manifest: Manifest) -> Artifact:
        """Record a packed environment: its table and manifest (no archive yet)."""
        with self.writing_to(self.table_path(manifest.id), manifest.name) as f:
            table.save(f)
        _keep_table(str(self.table_path(manifest.id)), table)  # read next, in a switch
        self._put_manifest(manifest)
        self.set_name(manifest.name, manifest.id)
        return self.get(manifest.id)

    def _put_manifest(self, manifest: Manifest) -> None:
        self._write_text(
            self.manifest_path(manifest.id),
            json.dumps(manifest.to_dict(), indent=2, sort_keys=True),
            manifest.name,
        )

    def ensure_archive(
        self,
        artifact: Artifact,
        *,
        level: int | None = None,
        threads: int | None = None,
        progress: bool = False,
    ) -> Artifact:
        """The artifact with its archive written (from its table) if it was not yet.

        Raises
        ------
        EnvshipError
            The environment changed since it was packed, or the disk is full.
        """
        if artifact.has_archive:
            return artifact
        if not isinstance(artifact.manifest, Manifest):
            raise TypeError(f"{artifact.id} is a thin pack: it has no table to write")
        table = artifact.table()
        if table is None:
            raise EnvshipError(
                artifact.name,
                f"the store {self.root} has neither its archive nor its table",
                f"pack it again (`envship pack {artifact.name}`)",
            )
        level = config.get("pack.level") if level is None else level
        threads = config.default_threads() if threads is None else threads
        started = time.perf_counter()
        try:
            with (
                self.writing_to(artifact.path, artifact.name) as f,
                progress_bar(
                    f"writing the archive of {artifact.name}",
                    table.unpacked_size,
                    progress,
                ) as bar,
            ):
                write_archive(
                    table, f, level=level, threads=threads, on_file=bar.advance
                )
                packed_size = f.tell()
        except OSError as e:
            raise EnvshipError(
                artifact.name,
                f"the environment changed since it was packed: {e}",
                f"pack it again (`envship pack {artifact.name}`)",
            ) from e
        manifest = artifact.manifest.replace(
            packed_size=packed_size,
            stats={
                **artifact.manifest.stats,
                "level": level,
                "archive_seconds": round(time.perf_counter() - started, 3),
            },
        )
        self._put_manifest(manifest)
        return Artifact(artifact.id, artifact.name, artifact.path, manifest)

    def set_name(self, name: str, artifact_id: str) -> None:
        check_name(name)
        self._write_text(self.root / "names" / name, artifact_id, name)

    def remember_signature(self, signature: str, artifact_id: str, name: str) -> None:
        self._write_text(self.root / "signatures" / signature, artifact_id, name)

    # -- reading -----------------------------------------------------------

    def get(self, artifact_id: str, name: str | None = None) -> Artifact:
        """The artifact with this id (its manifest's name unless ``name``)."""
        path = self.manifest_path(artifact_id)
        try:
            manifest = Manifest.from_dict(json.loads(path.read_text()))
        except ValueError as e:
            raise EnvshipError(
                name or artifact_id,
                f"its manifest {path} is damaged: {e}",
                f"remove it (`envship rm {artifact_id}`) and pack it again",
            ) from None
        return Artifact(
            artifact_id,
            name or manifest.name,
            self.archive_path(artifact_id),
            manifest,
        )

    def has(self, artifact_id: str) -> bool:
        return self.manifest_path(artifact_id).is_file() and (
            self.table_path(artifact_id).is_file()
            or self.archive_path(artifact_id).is_file()
        )

    def by_signature(self, signature: str) -> str | None:
        try:
            artifact_id = (self.root / "signatures" / signature).read_text()
        except OSError:
            return None
        return artifact_id if self.has(artifact_id) else None

    def names(self) -> dict[str, str]:
        """Every name in the store and the id it points to."""
        folder = self.root / "names"
        if not folder.is_dir():
            return {}
        return {p.name: p.read_text() for p in sorted(folder.iterdir())}

    def resolve(self, name_or_id: str) -> Artifact | None:
        """An artifact by name, full id or unambiguous id prefix; None if unknown."""
        names = self.names()
        if name_or_id in names and self.has(names[name_or_id]):
            return self.get(names[name_or_id], name_or_id)
        if is_id(name_or_id) and self.has(name_or_id):
            return self.get(name_or_id)
        if len(name_or_id) >= 6 and re.fullmatch(r"[0-9a-f]+", name_or_id):
            matches = [a for a in self.artifacts() if a.id.startswith(name_or_id)]
            if len(matches) == 1:
                return matches[0]
        return None

    def artifacts(self) -> list[Artifact]:
        """Every artifact in the store, newest first."""
        if not self.root.is_dir():
            return []
        ids = [p.stem for p in self.root.glob("*.json") if is_id(p.stem)]
        found = [self.get(i) for i in ids if self.has(i)]
        return sorted(found, key=_created, reverse=True)

    def remove(self, name_or_id: str) -> Artifact:
        """Delete an artifact and every name and signature pointing to it."""
        artifact = self.resolve(name_or_id)
        if artifact is None:
            raise EnvshipError(
                name_or_id,
                f"no artifact of that name or id in the store {self.root}",
                "see `envship list` for what the store holds",
            )
        for sub in ("names", "signatures"):
            folder = self.root / sub
            for entry in folder.iterdir() if folder.is_dir() else ():
                if entry.read_text() == artifact.id:
                    entry.unlink()
        self.archive_path(artifact.id).unlink(missing_ok=True)
        self.table_path(artifact.id).unlink(missing_ok=True)
        self.manifest_path(artifact.id).unlink(missing_ok=True)
        return artifact


def _created(artifact: Artifact) -> str:
    """When ``artifact`` was packed (a thin pack: its environment)."""
    manifest = artifact.manifest
    if isinstance(manifest, ThinManifest):
        return manifest.env.created
    return manifest.created
