"""The local artifact store: packed environments, their manifests and names.

Layout::

    <store>/<id>.table.zst      the environment's entries (see envship.table)
    <store>/<id>.tar.zst        the compressed archive, once something needed it
    <store>/<id>.json           its manifest, and under "checks" the size and
                                xxh3-128 of its table and archive as written
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

What the store reuses it checks first: a table or an archive against the
size and xxh3-128 digest recorded when it was written (one read of the file,
milliseconds; once per session while its stat, ctime included, is unchanged),
so that a file damaged on disk is written again rather than shipped. Files of
an older envship, with nothing recorded, are read whole once: a table must
hash to its id, an archive must unpack to it. An entry whose manifest cannot be read is
*damaged*: listed as such (:meth:`ArtifactStore.damaged`), removed by
``envship rm ID`` and replaced by the next pack of its environment; it never
keeps the others from being listed or used.
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import msgpack
import xxhash
import zstandard

from envship import config
from envship.archive import is_id, path_digest
from envship.blob_id import UNREADABLE as UNREADABLE_ARCHIVE
from envship.blob_id import content_id
from envship.errors import EnvshipError
from envship.files import atomic_file, temporary_file
from envship.manifest import Manifest, ThinManifest, packages_of
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
    def environment(self) -> Manifest:
        """The manifest of the environment it is (a thin pack: the one it carries)."""
        m = self.manifest
        return m if isinstance(m, Manifest) else m.env

    def packages(self) -> list[tuple[str, str, str]]:
        """Every package in it: (name, version, source), sorted by name.

        From its table of entries (:func:`envship.manifest.packages_of`): the
        manifest records only the packages the compatibility check needs. An
        artifact without a table gives those, of unknown source (``-``).
        """
        table = self.table()
        if table is None:
            return [(n, v, "-") for n, v in sorted(self.environment.packages.items())]
        return packages_of(e.path for e in table.entries)

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
        """Its entries; None for an artifact packed by an older envship, or a
        table that is damaged (see :meth:`ArtifactStore.check_table`).

        Kept in memory for the session: each switch reads the tables of the
        environment and of its base.
        """
        try:
            st = os.stat(self.table_path)
            table = _load_table(str(self.table_path), st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            return None
        except UNREADABLE:  # damaged, or another envship's format
            return None
        # A damaged table that still reads hashes to another id: never used.
        return table if table.id == self.id else None


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
        """Record a packed environment: its table and manifest (no archive yet).

        Replaces whatever the store held under its id (a damaged entry),
        keeping the names that pointed to it.
        """
        names = [n for n, i in self.names().items() if i == manifest.id]
        self.discard(manifest.id)
        path = self.table_path(manifest.id)
        with self.writing_to(path, manifest.name) as f:
            table.save(f)
        _keep_table(str(path), table)  # read next, in a switch
        self._put_manifest(manifest, {"table": _file_check(path)})
        for name in {*names, manifest.name}:
            self.set_name(name, manifest.id)
        return self.get(manifest.id)

    def _put_manifest(self, manifest: Manifest, checks: dict) -> None:
        self._write_text(
            self.manifest_path(manifest.id),
            json.dumps(
                {**manifest.to_dict(), CHECKS: checks}, indent=2, sort_keys=True
            ),
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

        An archive already written is checked first (:meth:`check_archive`);
        a damaged one is written again, with a warning that says so.

        Raises
        ------
        EnvshipError
            The environment changed since it was packed, its table is damaged
            too, or the disk is full.
        """
        if not isinstance(artifact.manifest, Manifest):
            if artifact.has_archive:  # a thin pack: written just now, by its digest
                return artifact
            raise TypeError(f"{artifact.id} is a thin pack: it has no table to write")
        if artifact.has_archive:
            problem = self.check_archive(artifact)
            if problem is None:
                return artifact
            warnings.warn(
                f"the archive of {artifact.name} ({artifact.short_id}) in your store "
                f"was damaged ({problem}): writing it again",
                StoreRepairWarning,
                stacklevel=2,
            )
            artifact.path.unlink(missing_ok=True)
        table = artifact.table()
        if table is None:
            problem = self.check_table(artifact.id) or "it is missing"
            raise DamagedArtifactError(
                artifact.name,
                f"the store {self.root} has no usable archive of it, and its "
                f"table {self.table_path(artifact.id).name} cannot write one: "
                f"{problem}",
                f"pack it again (`envship pack {_source(artifact.manifest)}`)",
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
                out = _HashingWriter(f)
                write_archive(
                    table,
                    cast(BinaryIO, out),
                    level=level,
                    threads=threads,
                    on_file=bar.advance,
                )
        except OSError as e:
            raise EnvshipError(
                artifact.name,
                f"the environment changed since it was packed: {e}",
                f"pack it again (`envship pack {_source(artifact.manifest)}`)",
            ) from e
        manifest = artifact.manifest.replace(
            packed_size=out.size,
            stats={
                **artifact.manifest.stats,
                "level": level,
                "archive_seconds": round(time.perf_counter() - started, 3),
            },
        )
        checks = {**self._checks(artifact.id), "archive": out.check()}
        self._put_manifest(manifest, checks)
        _VERIFIED.add(_verified_key(artifact.path))  # hashed as it was written
        return Artifact(artifact.id, artifact.name, artifact.path, manifest)

    def set_name(self, name: str, artifact_id: str) -> None:
        check_name(name)
        self._write_text(self.root / "names" / name, artifact_id, name)

    def remember_signature(self, signature: str, artifact_id: str, name: str) -> None:
        self._write_text(self.root / "signatures" / signature, artifact_id, name)

    # -- checking ----------------------------------------------------------

    def check_table(self, artifact_id: str) -> str | None:
        """What is wrong with the table of ``artifact_id``; None if it is sound.

        Sound: its bytes have the size and xxh3-128 digest recorded when it
        was written (a millisecond). A table of an older envship, with nothing
        recorded, is read whole and must hash to the artifact's id; its
        digest is then recorded.

        Examples
        --------
        >>> store.check_table(artifact.id)  # doctest: +SKIP
        'its table 5f0c….table.zst has 1208 bytes, not the 1214 written'
        """
        path = self.table_path(artifact_id)
        if not path.is_file():
            return f"its table {path.name} is missing"
        key = _verified_key(path)
        if key in _VERIFIED:
            return None
        recorded = self._checks(artifact_id).get("table")
        problem = _check_file(path, recorded)
        if problem is not None:
            return f"its table {problem}"
        if recorded is None:
            try:
                table = EntryTable.load(path)
            except UNREADABLE as e:
                return f"its table {path.name} cannot be read: {e}"
            if table.id != artifact_id:
                return f"its table {path.name} hashes to {table.id}, not to its id"
            try:
                self._record(self.get(artifact_id), "table", _file_check(path))
            except DamagedArtifactError as e:
                return e.damaged
        _VERIFIED.add(key)
        return None

    def check_archive(self, artifact: Artifact, *, deep: bool = False) -> str | None:
        """What is wrong with the archive of ``artifact``; None if it is sound.

        Its size and xxh3-128 digest are compared with those recorded when it
        was written: one read of the file (about 10 ms for 40 MiB). An
        archive written by an older envship, with nothing recorded, or
        ``deep``, is read as a node reads it: decompressed whole and its
        content hashed into the id it must have (about a second for 130 MiB
        unpacked);
        its digest is then recorded.

        A file is read again after any change to it (size, mtime, ctime or
        inode differ), but only once per session while none of them does.

        Examples
        --------
        >>> store.check_archive(artifact)  # doctest: +SKIP
        'its archive 5f0c….tar.zst has digest 1c2e…, not the 9a0b… written'
        """
        path = artifact.path
        if not path.is_file():
            return f"its archive {path.name} is missing"
        key = _verified_key(path)
        if not deep and key in _VERIFIED:
            return None
        recorded = self._checks(artifact.id).get("archive")
        problem = _check_file(path, recorded)
        if problem is not None:
            return f"its archive {problem}"
        if deep or recorded is None:
            try:
                content = content_id(path)
            except UNREADABLE_ARCHIVE as e:
                return f"its archive {path.name} does not read: {e}"
            if content != artifact.id:
                return f"its archive {path.name} unpacks to {content}, not to its id"
            if recorded is None:
                self._record(artifact, "archive", _file_check(path))
        _VERIFIED.add(key)
        return None

    def check(self, artifact: Artifact) -> str | None:
        """What is wrong with the table or archive of ``artifact``; None if nothing.

        The quick checks of :meth:`check_table` and :meth:`check_archive`, for
        the files it has (an artifact may have either or both).
        """
        if self.table_path(artifact.id).is_file():
            problem = self.check_table(artifact.id)
            if problem is not None:
                return problem
        return self.check_archive(artifact) if artifact.has_archive else None

    def _checks(self, artifact_id: str) -> dict:
        """The sizes and digests recorded for the files of ``artifact_id``."""
        try:
            data = json.loads(self.manifest_path(artifact_id).read_text())
            checks = data.get(CHECKS, {})
        except (OSError, ValueError, AttributeError):
            return {}
        return checks if isinstance(checks, dict) else {}

    def _record(self, artifact: Artifact, what: str, check: list) -> None:
        if isinstance(artifact.manifest, Manifest):
            checks = {**self._checks(artifact.id), what: check}
            self._put_manifest(artifact.manifest, checks)

    # -- reading -----------------------------------------------------------

    def get(self, artifact_id: str, name: str | None = None) -> Artifact:
        """The artifact with this id (its manifest's name unless ``name``).

        Raises
        ------
        DamagedArtifactError
            Its manifest cannot be read, is not its own, or neither its table
            nor its archive is there; the fix says how to get rid of it.
        """
        path = self.manifest_path(artifact_id)
        try:
            data = json.loads(path.read_bytes())
            manifest = Manifest.from_dict(data)
            if manifest.id != artifact_id:
                raise ValueError(f"it is the manifest of {manifest.id}")
        except FileNotFoundError:
            problem = f"its manifest {path.name} is missing"
        except (OSError, ValueError, TypeError) as e:  # JSONDecodeError too
            problem = f"its manifest {path.name} cannot be read: {e}"
        else:
            if self.has(artifact_id):
                return Artifact(
                    artifact_id,
                    name or manifest.name,
                    self.archive_path(artifact_id),
                    manifest,
                )
            problem = "neither its table nor its archive is in the store"
        raise self._damaged(artifact_id, problem).error(self.root, name)

    def _damaged(self, artifact_id: str, problem: str) -> DamagedEntry:
        names = tuple(n for n, i in self.names().items() if i == artifact_id)
        return DamagedEntry(artifact_id, problem, names)

    def has(self, artifact_id: str) -> bool:
        return self.manifest_path(artifact_id).is_file() and (
            self.table_path(artifact_id).is_file()
            or self.archive_path(artifact_id).is_file()
        )

    def by_signature(self, signature: str) -> str | None:
        try:
            artifact_id = (self.root / "signatures" / signature).read_text()
        except (OSError, ValueError):
            return None
        return artifact_id if self.has(artifact_id) else None

    def names(self) -> dict[str, str]:
        """Every name in the store and the id it points to (a content id)."""
        folder = self.root / "names"
        if not folder.is_dir():
            return {}
        names = {}
        for p in sorted(folder.iterdir()):
            try:
                artifact_id = p.read_text()
            except (OSError, ValueError):  # a folder, bytes that are not text
                continue
            if is_id(artifact_id):
                names[p.name] = artifact_id
        return names

    def ids(self) -> list[str]:
        """The id of every entry that has any file in the store, healthy or not."""
        if not self.root.is_dir():
            return []
        found = set()
        for p in self.root.iterdir():
            for suffix in SUFFIXES:
                stem = p.name.removesuffix(suffix)
                if stem != p.name and is_id(stem):
                    found.add(stem)
        return sorted(found)

    def find_id(self, name_or_id: str) -> str | None:
        """The id of an entry by name, full id or unambiguous id prefix (6 digits or
        more), whether the entry is healthy or damaged; None if there is none.
        """
        names = self.names()
        ids = self.ids()
        if name_or_id in names and names[name_or_id] in ids:
            return names[name_or_id]
        if len(name_or_id) >= 6 and re.fullmatch(r"[0-9a-f]+", name_or_id):
            matches = [i for i in ids if i.startswith(name_or_id)]
            if len(matches) == 1:
                return matches[0]
        return None

    def resolve(self, name_or_id: str) -> Artifact | None:
        """An artifact by name, full id or unambiguous id prefix; None if unknown.

        Raises
        ------
        DamagedArtifactError
            The entry it names is damaged.
        """
        artifact_id = self.find_id(name_or_id)
        if artifact_id is None:
            return None
        name = name_or_id if self.names().get(name_or_id) == artifact_id else None
        return self.get(artifact_id, name)

    def scan(self) -> tuple[list[Artifact], list[DamagedEntry]]:
        """Every entry of the store: the healthy artifacts (newest first), the damaged.

        Only manifests are read: a damaged table or archive shows when it is
        reused (:meth:`check_table`, :meth:`check_archive`).
        """
        healthy, damaged = [], []
        for artifact_id in self.ids():
            try:
                healthy.append(self.get(artifact_id))
            except DamagedArtifactError as e:
                damaged.append(self._damaged(artifact_id, e.damaged))
        return sorted(healthy, key=_created, reverse=True), damaged

    def artifacts(self) -> list[Artifact]:
        """Every healthy artifact in the store, newest first."""
        return self.scan()[0]

    def damaged(self) -> list[DamagedEntry]:
        """Every damaged entry of the store: its id, names and what is wrong.

        Examples
        --------
        >>> for entry in ArtifactStore().damaged():  # doctest: +SKIP
        ...     print(entry.short_id, entry.problem)
        5f0c2d9a1b7e its manifest 5f0c….json is damaged: Expecting value: ...
        """
        return self.scan()[1]

    def remove(self, name_or_id: str) -> Artifact | DamagedEntry:
        """Delete an entry, healthy or damaged, and every name and signature
        pointing to it. Returns what it was.
        """
        artifact_id = self.find_id(name_or_id)
        if artifact_id is None:
            raise EnvshipError(
                name_or_id,
                f"no artifact of that name or id in the store {self.root}",
                "see `envship list` for what the store holds",
            )
        removed: Artifact | DamagedEntry
        try:
            removed = self.resolve(name_or_id) or self.get(artifact_id)
        except DamagedArtifactError as e:
            removed = self._damaged(artifact_id, e.damaged)
        self.discard(artifact_id)
        return removed

    def discard(self, artifact_id: str) -> None:
        """Delete every file of ``artifact_id``: the names and signatures
        pointing to it, its archive, table and manifest. Nothing if none."""
        for sub in ("names", "signatures"):
            folder = self.root / sub
            for entry in folder.iterdir() if folder.is_dir() else ():
                try:
                    points_to = entry.read_text()
                except (OSError, ValueError):
                    continue
                if points_to == artifact_id:
                    entry.unlink()
        for path in (
            self.archive_path(artifact_id),
            self.table_path(artifact_id),
            self.manifest_path(artifact_id),  # last: what makes it an entry
        ):
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class DamagedEntry:
    """An entry of the store that cannot be used: its id, names and what is wrong.

    Examples
    --------
    >>> entry = DamagedEntry("5f0c" * 8, "its manifest is damaged: ...", ("demo",))
    >>> entry.short_id, entry.fix
    ('5f0c5f0c5f0c', 'remove it (`envship rm 5f0c5f0c5f0c5f0c5f0c5f0c5f0c5f0c`), or pack the environment again from its path (`envship pack PATH`), which replaces it')
    """

    id: str
    problem: str
    names: tuple[str, ...] = ()

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def fix(self) -> str:
        return (
            f"remove it (`envship rm {self.id}`), or pack the environment again "
            "from its path (`envship pack PATH`), which replaces it"
        )

    def error(self, root: Path, name: str | None = None) -> DamagedArtifactError:
        """The error that using this entry raises."""
        error = DamagedArtifactError(
            name or self.id,
            f"the entry {self.id} of the store {root} is damaged: {self.problem}",
            self.fix,
        )
        error.damaged = self.problem
        return error


class DamagedArtifactError(EnvshipError):
    """An entry of the local store is damaged; the fix says how to replace it."""

    damaged: str = ""


class StoreRepairWarning(UserWarning):
    """envship found a damaged file in the local store and writes it again."""


#: The key of a manifest file under which the store records its files' checks.
CHECKS = "checks"
#: The files of an entry, after its id.
SUFFIXES = (".json", ".table.zst", ".tar.zst")
#: Tables and archives checked in this session, by (path, size, mtime, ctime,
#: inode):
#: any write or ``touch`` changes the ctime, so a file changed since is read again.
_VERIFIED: set[tuple] = set()


def _verified_key(path: Path) -> tuple:
    try:
        st = os.stat(path)
    except OSError:
        return (str(path),)
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _file_check(path: Path) -> list:
    """[size, xxh3-128] of the file at ``path``: what :func:`_check_file` compares."""
    return [path.stat().st_size, path_digest(path)]


def _check_file(path: Path, recorded: object) -> str | None:
    """What differs between the file at ``path`` and ``recorded`` ([size, digest])."""
    if not (isinstance(recorded, list) and len(recorded) == 2):
        return None  # nothing recorded (an older envship): no check by digest
    size, digest = recorded
    actual = path.stat().st_size
    if actual != size:
        return f"{path.name} has {actual} bytes, not the {size} written"
    actual_digest = path_digest(path)
    if actual_digest != digest:
        return f"{path.name} has digest {actual_digest}, not the {digest} written"
    return None


class _HashingWriter:
    """A file that hashes and counts what is written to it, on its way to ``f``."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self._hash = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self.size

    def check(self) -> list:
        return [self.size, self._hash.hexdigest()]


def _source(manifest: Manifest) -> str:
    """What to pack again to replace ``manifest``'s artifact: its source folder."""
    return manifest.source_prefix or manifest.name


def _created(artifact: Artifact) -> str:
    """When ``artifact`` was packed (a thin pack: its environment)."""
    return artifact.environment.created
