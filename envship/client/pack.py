"""Pack a conda environment or a venv into a content-addressed artifact.

Conda environments go through conda-pack's own file selection and prefix
handling (``CondaEnv`` and ``Packer``); venvs are packed the way venv-pack does
it, without the base interpreter. Either kind carries an unpack record
(:mod:`envship.unpack_record`) that tells the node cache how to fix it up: for
a conda environment, conda-pack's own prefix records (``Packer.prefixes``).

Either way, packing is first a *table pass* (:class:`envship.table.TableWriter`):
it lists every entry and computes the content id, reading only the files
whose stat changed since the last pack of the same folder. When only the code
of editable projects changed, the table pass of the rest is not run again:
its entries are reused from the last pass in this process (:class:`_EnvPart`),
as a whole unchanged environment reuses its artifact. The archive itself
(a zstandard-compressed tar) is written from that table when something needs
it: ``archive=True`` (the default, and ``envship pack``), or a node that
holds nothing of the environment.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import xxhash
from conda_pack.core import (
    CondaEnv,
    CondaPackException,
    File,
    Packer,
    rewrite_conda_meta,
)

from envship.errors import EnvshipError
from envship.machine import platform_facts
from envship.manifest import FORMAT_VERSION, Manifest
from envship.table import ROW_SYMLINK, Entry, EntryTable, TableWriter
from envship.unpack_record import UNPACK_FILE, CondaRecord, VenvRecord

from .editable import EditableProject
from .environment import SourceEnvironment
from .locate import find_named, looks_like_path, where_looked
from .progress import progress_bar
from .store import (
    Artifact,
    ArtifactStore,
    DamagedArtifactError,
    StoreRepairWarning,
    check_name,
)


def pack(
    env: str | os.PathLike,
    *,
    name: str | None = None,
    store: str | os.PathLike | ArtifactStore | None = None,
    level: int | None = None,
    threads: int | None = None,
    ignore_editable: bool = False,
    progress: bool = False,
    archive: bool = True,
) -> Artifact:
    """Pack an environment into the artifact store, or find it there unchanged.

    Parameters
    ----------
    env : str or path
        A conda environment name, the prefix of a conda environment or venv, or
        the name of an artifact already in the store.
    name : str, optional
        The name to record; defaults to the environment's folder name.
    store : path or ArtifactStore, optional
        Defaults to dask config ``envship.store``.
    level : int, optional
        zstandard level, default ``envship.pack.level`` (3).
    threads : int, optional
        Compression threads, default every core available.
    ignore_editable : bool
        Ship editable (development) installs without their code, as they are
        in the environment (hooks pointing to folders the workers lack). By
        default their code is shipped: the current content of each
        project's mapped packages goes into site-packages as a normal install
        would put it, and the editable hooks are left out.
    progress : bool
        Show a progress bar.
    archive : bool
        Write the archive too. With False only the table pass runs (a
        fraction of a second for an edited environment); ``use_environment``
        writes the archive later if a node needs all of it.

    Returns
    -------
    Artifact
        With ``id`` (content hash), ``name``, ``path`` (the archive, once
        written) and ``manifest``.

    Examples
    --------
    >>> artifact = envship.pack("sklearn-dev")  # doctest: +SKIP
    >>> artifact.manifest.python  # doctest: +SKIP
    '3.11.7'
    """
    store = store if isinstance(store, ArtifactStore) else ArtifactStore(store)
    prefix = _resolve(env, store)
    if isinstance(prefix, Artifact):
        return prefix
    name = check_name(name or prefix.name)
    source = SourceEnvironment.from_prefix(prefix, name)

    projects = [] if ignore_editable else source.editable_projects()
    _check_projects(name, projects)
    code = [(project, list(project.files())) for project in projects]
    env_signature, signature = _signature(source, code, ignore_editable)
    known = store.by_signature(signature)
    if known is not None:
        problem = _reusable(store, known)
        if problem is None:
            store.set_name(name, known)
            artifact = store.get(known, name)
            if archive:
                artifact = store.ensure_archive(
                    artifact, level=level, threads=threads, progress=progress
                )
            return artifact
        warnings.warn(
            f"the store's entry of {name} ({known[:12]}) was damaged ({problem}): "
            "packing it again",
            StoreRepairWarning,
            stacklevel=2,
        )

    started = time.perf_counter()
    part = _ENV_PARTS.get(env_signature)
    if part is not None:
        table, read_files = part.with_code(env_signature, source, code, name)
    else:
        digests = store.load_digests()
        writer = TableWriter(digests)
        if source.kind == "conda":
            existing, span = _pack_conda(source, name, writer, code, progress)
        else:
            existing, span = _pack_venv(source, name, writer, code, progress)
        table, read_files = writer.close(), writer.read_files
        if read_files:  # else the digests are all as they were
            store.save_digests(digests, writer.seen, name)
        if code:  # else nothing of it can change without the rest
            _EnvPart.remember(env_signature, table.entries, span, existing, digests)
    manifest = Manifest(
        id=table.id,
        name=name,
        kind=source.kind,
        python=source.python,
        file_count=table.file_count,
        unpacked_size=table.unpacked_size,
        packages=source.package_versions(),
        platform=platform_facts(),
        source_prefix=str(source.prefix),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        stats={
            "files_read": read_files,
            "pack_seconds": round(time.perf_counter() - started, 3),
        },
    )
    if _reusable(store, table.id) is None:
        store.set_name(name, table.id)
        artifact = store.get(table.id, name)
    else:  # none yet, or a damaged one: replaced
        artifact = store.add(table, manifest)
    if known is not None and known != artifact.id:
        store.discard(known)  # the damaged entry, after its names moved on
    store.remember_signature(signature, artifact.id, name)
    if archive:
        artifact = store.ensure_archive(
            artifact, level=level, threads=threads, progress=progress
        )
    return artifact


def _reusable(store: ArtifactStore, artifact_id: str) -> str | None:
    """Why the entry ``artifact_id`` of ``store`` cannot be reused; None if it can.

    Its manifest and table are checked (a few milliseconds); its archive is
    checked when it is used (``ArtifactStore.ensure_archive``).
    """
    if not store.has(artifact_id):
        return "it is not there"
    try:
        store.get(artifact_id)
    except DamagedArtifactError as e:
        return e.damaged
    if not store.table_path(artifact_id).is_file():
        return None  # an older envship's entry, its archive alone: checked when used
    return store.check_table(artifact_id)


def _resolve(env: str | os.PathLike, store: ArtifactStore) -> Path | Artifact:
    if looks_like_path(env):
        return Path(env).expanduser().absolute()
    prefix = find_named(str(env))
    if prefix is not None:
        return prefix
    artifact = store.resolve(str(env))
    if artifact is not None:
        return artifact
    if Path(env).exists():
        return Path(env).absolute()
    places = "\n  ".join(where_looked() + [f"{store.root} (artifact names)"])
    raise EnvshipError(
        str(env),
        f"no conda environment, venv or stored artifact of that name; looked in:\n  {places}",
        "give the environment's path, create it, or check `conda env list` and "
        "`envship list`",
    )


def _check_projects(name: str, projects: list[EditableProject]) -> None:
    """Refuse editable projects whose code cannot be found."""
    for project in projects:
        missing = project.missing()
        if missing or not project.mapped:
            where = (
                f"maps to {', '.join(missing)}, which does not exist"
                if missing
                else "has no hook envship understands, so where its code is is unknown"
            )
            raise EnvshipError(
                name,
                f"{project.name} is installed in editable (development) mode and "
                f"{where}",
                f"install it again (`pip install -e SOURCE_DIR`, or `pip install "
                f"SOURCE_DIR` for a normal install), uninstall it (`pip uninstall "
                f"{project.name}`), or pack it without its code with "
                "--ignore-editable (ignore_editable=True)",
            )


def _signature(
    source: SourceEnvironment,
    code: list[tuple[EditableProject, list[tuple[str, str]]]],
    ignore_editable: bool,
) -> tuple[str, str]:
    """Cheap fingerprints: the stat of every file, not its bytes.

    Returns two: of the environment without its editable projects' code
    (the folder itself, and which projects are editable through which
    hooks), and of all of it (that and the stat of every file of the code).

    Any change that conda or pip makes changes a size, an mtime or an inode;
    so does an edit of an editable project's code (its mapped files are
    stat'ed too).
    """
    h = xxhash.xxh3_128()
    h.update(f"{FORMAT_VERSION}\0{source.kind}\0{source.prefix}\n".encode())
    if ignore_editable:
        h.update(b"ignore-editable\n")
    for project, _ in code:
        h.update(
            f"editable\0{project.name}\0{project.hooks}\0{project.pth_lines}\n".encode(
                "utf-8", "surrogateescape"
            )
        )
    stack = [str(source.prefix)]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                st = entry.stat(follow_symlinks=False)
                h.update(
                    f"{entry.path}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}"
                    f"\0{st.st_ino}\n".encode("utf-8", "surrogateescape")
                )
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    env_signature = h.hexdigest()
    for project, files in code:
        h.update(f"code\0{project.name}\n".encode())
        for path, target in files:
            st = os.lstat(path)
            h.update(
                f"{path}\0{target}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}"
                f"\0{st.st_ino}\n".encode("utf-8", "surrogateescape")
            )
    return env_signature, h.hexdigest()


#: The most environments whose table pass :class:`_EnvPart` keeps.
MAX_ENV_PARTS = 8


@dataclass(frozen=True)
class _EnvPart:
    """The table of an environment without its editable projects' code.

    What a table pass gives is a function of the environment's files and of
    which projects are editable through which hooks: the entries before the
    projects' code (``head``) and after it (``tail``: conda-pack's scripts,
    the unpack record), and the paths the environment installs
    (``existing``, which the code must not shadow). All of it is named by
    the first fingerprint of :func:`_signature`, so an edit of the code
    alone, which leaves that one as it was, redoes only the code's entries
    (reading only the files whose stat changed). Kept in this process, for
    the last few environments packed.
    """

    head: tuple[Entry, ...]
    tail: tuple[Entry, ...]
    existing: frozenset[str]
    #: ``TableWriter`` digests of the code's files: ``{path: [stat..., digest]}``.
    digests: dict = field(default_factory=dict)

    @staticmethod
    def remember(
        env_signature: str,
        entries: list[Entry],
        span: tuple[int, int],
        existing: set[str],
        digests: dict,
    ) -> None:
        """Keep the parts of ``entries`` around the code at ``span`` (start, end)."""
        start, end = span
        code = {e.source for e in entries[start:end]}
        part = _EnvPart(
            tuple(entries[:start]),
            tuple(entries[end:]),
            frozenset(existing),
            {path: digests[path] for path in code if path in digests},
        )
        _keep_part(env_signature, part)

    def with_code(
        self,
        env_signature: str,
        source: SourceEnvironment,
        code: list[tuple[EditableProject, list[tuple[str, str]]]],
        name: str,
    ) -> tuple[EntryTable, int]:
        """The whole table with the projects' code as it is now; files read."""
        writer = TableWriter(dict(self.digests))
        editable = _EditableCode(source, [project for project, _ in code])
        checked = _Checked(writer, source.prefix, name)
        editable.add_code(checked, self.existing, name, code)
        digests = {p: writer.digests[p] for p in writer.seen if p in writer.digests}
        _keep_part(env_signature, dataclasses.replace(self, digests=digests))
        entries = [*self.head, *writer.entries, *self.tail]
        return EntryTable(entries), writer.read_files


#: Fingerprint of an environment without its code -> its :class:`_EnvPart`.
_ENV_PARTS: dict[str, _EnvPart] = {}


def _keep_part(env_signature: str, part: _EnvPart) -> None:
    _ENV_PARTS.pop(env_signature, None)
    _ENV_PARTS[env_signature] = part
    while len(_ENV_PARTS) > MAX_ENV_PARTS:
        del _ENV_PARTS[next(iter(_ENV_PARTS))]


class _EditableCode:
    """What editable projects change in the shipped tree.

    Their hooks are left out (``drop``), their lines in shared ``.pth``
    files removed (``edited``), and their code added where a normal install
    puts it (``add_code``).
    """

    def __init__(self, source: SourceEnvironment, projects: list[EditableProject]):
        self.projects = projects
        self.site = (
            os.path.relpath(source.site_packages, source.prefix)
            if source.site_packages is not None
            else ""
        )
        self.drop = {f"{self.site}/{h}" for p in projects for h in p.hooks}
        self.edits: dict[str, set[str]] = {}
        for p in projects:
            for pth, line in p.pth_lines:
                self.edits.setdefault(f"{self.site}/{pth}", set()).add(line)

    def edited(self, path: str, target: str) -> bytes:
        """The content of the shared ``.pth`` file ``target`` without the lines."""
        removed = self.edits[target]
        lines = Path(path).read_text().splitlines(keepends=True)
        return "".join(x for x in lines if x.rstrip("\r\n") not in removed).encode()

    def add_code(
        self,
        checked: _Checked,
        existing: set[str] | frozenset[str],
        name: str,
        code: list[tuple[EditableProject, list[tuple[str, str]]]],
    ) -> None:
        """Add the files of ``code`` (each project and its ``files()``)."""
        for project, files in code:
            for path, rel in files:
                target = f"{self.site}/{rel}"
                if target in existing:
                    raise EnvshipError(
                        name,
                        f"{target} is installed in the environment and is also "
                        f"the code of the editable project {project.name} "
                        f"({project.source})",
                        "uninstall the other distribution that installed "
                        f"{rel.split('/')[0]}, or install {project.name} normally",
                    )
                checked.add(path, target)


def _pack_conda(
    source: SourceEnvironment,
    name: str,
    writer: TableWriter,
    code: list[tuple[EditableProject, list[tuple[str, str]]]],
    progress: bool,
) -> tuple[set[str], tuple[int, int]]:
    """The table pass of a conda environment with the editable projects' ``code``.

    Returns the paths the environment installs and where the code's entries
    are among the writer's (start, end).
    """
    projects = [project for project, _ in code]
    try:
        # Editable installs are ours to handle (_EditableCode), not conda-pack's.
        conda_env = CondaEnv.from_prefix(
            str(source.prefix), ignore_editable_packages=True
        )
        checked = _Checked(writer, source.prefix, name)
        packer = _Packer(str(source.prefix), checked)
        editable = _EditableCode(source, projects)
        with progress_bar(f"packing {name}", len(conda_env.files), progress) as bar:
            for file in conda_env.files:
                bar.advance()
                if file.target in editable.drop:
                    continue
                if file.target in editable.edits:
                    data = editable.edited(file.source, file.target)
                    checked.add_bytes(file.source, data, file.target)
                    continue
                packer.add(file)
        existing = {file.target for file in conda_env.files}
        start = len(writer.entries)
        editable.add_code(checked, existing, name, code)
        span = (start, len(writer.entries))
        # conda-pack's own scripts: from temporary files, gone right after.
        writer.keep_data = True
        packer.finish()
        writer.add_bytes(None, _conda_record(packer).to_json(), UNPACK_FILE)
        return existing, span
    except CondaPackException as e:
        raise EnvshipError(
            name, f"conda-pack refused it: {e}", _conda_fix(str(e))
        ) from e


def _conda_record(packer: Packer) -> CondaRecord:
    """The prefix records that conda-pack wrote into ``bin/conda-unpack``.

    Taken from the packer itself (``Packer.prefixes``), so that the node reads
    data rather than parse the script. Like ``Packer.finish``, leaves out the
    python executables (conda-unpack does not edit the file that runs it).
    """
    return CondaRecord(
        [
            (path, placeholder, mode)
            for path, placeholder, mode in packer.prefixes
            if not path.startswith("bin/python")
        ]
    )


class _Packer(Packer):
    """conda-pack's Packer, remembering its rewrite of each ``conda-meta`` record.

    Rewriting the records (JSON out and in) is most of a re-pack's time when
    nothing else changed; in a session that switches many times, each record
    is rewritten once per content. Files without prefixes to rewrite (nearly
    all) go straight to the archive, as conda-pack's ``add`` does with them.
    """

    def add(self, file: File) -> None:
        if file.file_mode is not None:
            super().add(file)
        elif file.target.startswith("conda-meta/") and file.target.endswith(".json"):
            out, data = _rewritten_record(file.source)
            self.packages.append(data)
            self.archive.add_bytes(file.source, out, file.target)
        else:
            self.archive.add(file.source, file.target)


#: conda-pack's rewrites of conda-meta records, by the digest of the record.
_RECORDS: dict[str, tuple[bytes, dict]] = {}


def _rewritten_record(path: str) -> tuple[bytes, dict]:
    """conda-pack's rewrite of a conda-meta record, once per content per session.

    By content, not path: environments made from the same packages (a
    clone, an edited copy) share most records.
    """
    with open(path, "rb") as f:
        key = xxhash.xxh3_128_hexdigest(f.read())
    if key not in _RECORDS:
        if len(_RECORDS) >= 1024:  # records of a few dozen environments
            del _RECORDS[next(iter(_RECORDS))]
        _RECORDS[key] = rewrite_conda_meta(path)
    return _RECORDS[key]


def _conda_fix(message: str) -> str:
    # conda-pack raises one exception type for everything; its text is all
    # there is to tell this (common) case from the others.
    if "deleted/overwritten" in message:
        return (
            "files that conda installed were changed or removed by hand or by pip; "
            "reinstall the packages named above (`conda install --force-reinstall "
            "NAME`)"
        )
    return "repair the environment as conda-pack says, then pack again"


class _Checked:
    """Refuses symlinks that would point outside the unpacked environment."""

    def __init__(self, writer: TableWriter, prefix: Path, name: str):
        self._writer = writer
        self._prefix = prefix
        self._name = name
        self.add_bytes = writer.add_bytes

    def add(self, source: str, target: str) -> None:
        self._writer.add(source, target)
        entry = self._writer.entries[-1]
        if entry.kind == ROW_SYMLINK:
            link = entry.link
            inside = os.path.normpath(os.path.join(os.path.dirname(target), link))
            if os.path.isabs(link) or inside.startswith(".."):
                raise EnvshipError(
                    self._name,
                    f"{target} is a symlink to {link}, outside the environment; it "
                    "would dangle on the workers",
                    f"replace it by a copy of what it points to (`cp --remove-"
                    f"destination {os.path.realpath(source)} {source}`)",
                )


def _pack_venv(
    source: SourceEnvironment,
    name: str,
    writer: TableWriter,
    code: list[tuple[EditableProject, list[tuple[str, str]]]],
    progress: bool,
) -> tuple[set[str], tuple[int, int]]:
    """The table pass of a venv: as :func:`_pack_conda` does it for conda."""
    projects = [project for project, _ in code]
    prefix = source.prefix
    old = str(prefix).encode()
    links: dict[str, str] = {}
    text_files: list[str] = []
    checked = _Checked(writer, prefix, name)
    editable = _EditableCode(source, projects)
    paths = sorted(_walk(prefix))
    existing = set()
    start = len(os.path.join(prefix, ""))  # _walk yields paths under prefix
    with progress_bar(f"packing {name}", len(paths), progress) as bar:
        for path in paths:
            target = path[start:]
            existing.add(target)
            bar.advance()
            if target in editable.drop:
                continue
            if target in editable.edits:
                data = editable.edited(path, target)
                if old in data:
                    text_files.append(target)
                writer.add_bytes(path, data, target)
                continue
            if target.startswith("bin/python") and os.path.islink(path):
                link = os.readlink(path)
                resolved = os.path.normpath(os.path.join(os.path.dirname(path), link))
                if not resolved.startswith(str(prefix) + os.sep):
                    # The base interpreter: recreated on the node, like venv-pack.
                    links[target] = resolved
                    continue
            if (
                _may_hold_prefix(target)
                and os.path.isfile(path)
                and not os.path.islink(path)
            ):
                data = Path(path).read_bytes()
                if old in data and b"\0" not in data:
                    text_files.append(target)
                writer.add_bytes(path, data, target)
            else:
                checked.add(path, target)
    start = len(writer.entries)
    editable.add_code(checked, existing, name, code)
    span = (start, len(writer.entries))
    if not links:
        raise EnvshipError(
            name,
            "the venv has no bin/python link to a base interpreter",
            "recreate it with `python -m venv` (without --copies)",
        )
    record = VenvRecord(str(prefix), text_files, links)
    writer.add_bytes(None, record.to_json(), UNPACK_FILE)
    return existing, span


def _may_hold_prefix(target: str) -> bool:
    return (
        target.startswith("bin/") or target.endswith(".pth") or target == "pyvenv.cfg"
    )


def _walk(prefix: Path) -> Iterator[str]:
    """Files, symlinks and empty folders under ``prefix``, not following links."""
    for root, dirs, files in os.walk(prefix):
        for d in list(dirs):
            full = os.path.join(root, d)
            if os.path.islink(full):
                dirs.remove(d)
                yield full
        if not dirs and not files and root != str(prefix):
            yield root
        for f in files:
            yield os.path.join(root, f)
