"""What ``envship inspect`` shows: an artifact's manifest and all its packages.

The manifest records only the packages the compatibility check needs; the
whole list comes from the artifact's table of entries (``<id>.table.zst``,
next to the archive): each ``conda-meta/<name>-<version>-<build>.json`` is a
conda package, each ``<name>-<version>.dist-info`` (or ``.egg-info``) that
conda did not install is a pip package. Reads the store, writes nothing.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from dask.utils import format_bytes

from envship.ids import is_id
from envship.text_table import Col, TextTable, clock_time

from .store import Artifact, ArtifactStore

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


def describe(artifact: Artifact, width: int | None = 80) -> str:
    """The manifest, readably, then every package in columns.

    Examples
    --------
    >>> print(describe(envship.pack("venv")))  # doctest: +SKIP
    name      venv
    id        5f0c2d9a1b7e...
    ...
    """
    m = artifact.environment
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
    found = artifact.packages()
    table = TextTable(Col("package", keep=True), Col("version", keep=True), "source")
    for row in found:
        table.add_row(*row)
    lines += ["", f"{len(found)} packages:", table.render(width)]
    return "\n".join(lines)
