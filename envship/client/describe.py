"""What ``envship inspect`` shows: an artifact's manifest and all its packages.

The manifest records only the packages the compatibility check needs; the
whole list comes from the artifact's table of entries (``<id>.table.zst``,
next to the archive): each ``conda-meta/<name>-<version>-<build>.json`` is a
conda package, each ``<name>-<version>.dist-info`` (or ``.egg-info``) that
conda did not install is a pip package. Reads the store, writes nothing.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path

from dask.utils import format_bytes

from envship.ids import is_id
from envship.manifest import Manifest
from envship.text_table import Col, TextTable, clock_time

from .store import Artifact, ArtifactStore

_CONDA_META = re.compile(r"conda-meta/([^/]+)-([^-/]+)-([^-/]+)\.json")
_DIST_INFO = re.compile(
    r"site-packages/([A-Za-z0-9_.]+?)-([0-9][^-/]*?)(?:-py[0-9.]+)?\.(?:dist|egg)-info"
)
#: What a path to a store file ends with, after the artifact's id.
_STORE_SUFFIXES = (".tar.zst", ".table.zst", ".json")


def find_by_path(path: str) -> Artifact | None:
    """The artifact whose archive, table or manifest is ``path``; None if not one.

    ``envship pack`` prints the archive's path: ``envship inspect`` takes it.

    Examples
    --------
    >>> find_by_path("/no/such/store/" + "0" * 32 + ".tar.zst") is None
    True
    """
    p = Path(path).expanduser()
    for suffix in _STORE_SUFFIXES:
        if p.name.endswith(suffix):
            artifact_id = p.name[: -len(suffix)]
            store = ArtifactStore(p.parent)
            if is_id(artifact_id) and store.has(artifact_id):
                return store.get(artifact_id)
    return None


def packages(artifact: Artifact) -> list[tuple[str, str, str]]:
    """Every package in ``artifact``: (name, version, source), sorted by name.

    From its table of entries (see the module docstring); an artifact packed
    by an older envship, without a table, gives the packages its manifest
    names, of unknown source.
    """
    manifest = environment_manifest(artifact)
    table = artifact.table()
    if table is None:
        return [(n, v, "-") for n, v in sorted(manifest.packages.items())]
    return packages_of(e.path for e in table.entries)


def packages_of(paths) -> list[tuple[str, str, str]]:
    """Packages from the paths of an environment's entries.

    Examples
    --------
    >>> packages_of([
    ...     "conda-meta/numpy-1.26.4-py311h64a7726_0.json",
    ...     "lib/python3.11/site-packages/numpy-1.26.4.dist-info",
    ...     "lib/python3.11/site-packages/cloudpickle-3.0.0.dist-info/RECORD",
    ... ])
    [('cloudpickle', '3.0.0', 'pip'), ('numpy', '1.26.4', 'conda')]
    """
    conda: dict[str, str] = {}
    pip: dict[str, str] = {}
    for path in paths:
        m = _CONDA_META.fullmatch(path)
        if m:
            conda[m.group(1)] = m.group(2)
            continue
        m = _DIST_INFO.search(path)
        if m:
            pip.setdefault(_normal(m.group(1)), m.group(2))
    by_normal = {_normal(n) for n in conda}
    found = [(n, v, "conda") for n, v in conda.items()]
    found += [(n, v, "pip") for n, v in pip.items() if n not in by_normal]
    return sorted(found, key=lambda p: p[0].lower())


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def environment_manifest(artifact: Artifact) -> Manifest:
    """The manifest of the environment (a thin pack: the one it carries)."""
    m = artifact.manifest
    return m if isinstance(m, Manifest) else m.env


def describe(artifact: Artifact, width: int | None = 80) -> str:
    """The manifest, readably, then every package in columns.

    Examples
    --------
    >>> print(describe(envship.pack("venv")))  # doctest: +SKIP
    name      venv
    id        5f0c2d9a1b7e...
    ...
    """
    m = environment_manifest(artifact)
    platform = m.platform
    created = (
        clock_time(datetime.fromisoformat(m.created).timestamp()) if m.created else "-"
    )
    if m.packed_size is None or not artifact.has_archive:
        archive = "not written yet"
    else:
        archive = format_bytes(m.packed_size)
    if artifact.manifest is not m:
        archive = f"a thin pack of it, {artifact.id}"
    fields = [
        ("name", m.name),
        ("id", m.id),
        ("kind", m.kind),
        ("python", m.python),
        (
            "platform",
            " ".join(
                filter(
                    None,
                    [
                        platform.get("os"),
                        platform.get("machine"),
                        platform.get("libc"),
                        platform.get("libc_version"),
                    ],
                )
            )
            or "-",
        ),
        ("unpacked", f"{format_bytes(m.unpacked_size)} in {m.file_count} files"),
        ("archive", archive),
        ("path", str(artifact.path)),
        ("created", created),
        ("packed from", m.source_prefix or "-"),
    ]
    lines = [f"{key:<12}{value}" for key, value in fields]
    found = packages(artifact)
    table = TextTable(Col("package", keep=True), Col("version", keep=True), "source")
    for row in found:
        table.add_row(*row)
    lines += ["", f"{len(found)} packages:", table.render(width)]
    return "\n".join(lines)
