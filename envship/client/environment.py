"""What a source environment is: its kind, its Python, and the versions in it.

Read from files only (conda-meta, pyvenv.cfg, dist-info folders), never by
running the environment's interpreter, so that describing an environment is
fast and works for environments that cannot run here.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from envship.errors import EnvshipError
from envship.kinds import environment_kind

from .editable import EditableProject, find_projects

#: Packages whose versions must agree between client, scheduler and workers,
#: and those distributed compares too (numpy, pandas, lz4: see
#: ``envship.client.compat.missing_optional``).
TRACKED_PACKAGES = (
    "dask",
    "distributed",
    "cloudpickle",
    "msgpack",
    "tornado",
    "toolz",
    "numpy",
    "pandas",
    "lz4",
)

_python_dir = re.compile(r"^python(\d+)\.(\d+)$")


@dataclass(frozen=True)
class SourceEnvironment:
    """An environment on the packing machine.

    Examples
    --------
    >>> import sys
    >>> env = SourceEnvironment.from_prefix(sys.prefix)
    >>> env.kind in ("conda", "venv"), env.prefix == Path(sys.prefix)
    (True, True)
    """

    prefix: Path
    kind: str  # "conda" or "venv"
    python: str  # "3.11.7", or "3.11" when only the folder name tells
    site_packages: Path | None

    @classmethod
    def from_prefix(cls, prefix: str | os.PathLike, name: str | None = None):
        prefix = Path(prefix).absolute()
        label = name or str(prefix)
        if not prefix.exists():
            raise EnvshipError(
                label,
                f"the path {prefix} does not exist",
                "give the prefix of an existing conda environment or venv, "
                "or the name of a conda environment",
            )
        kind = environment_kind(prefix)
        if kind is None:
            raise EnvshipError(
                label,
                f"{prefix} is neither a conda environment (no conda-meta folder) "
                "nor a venv (no pyvenv.cfg)",
                "point envship at the environment's root folder (the one that "
                "holds bin/python)",
            )
        if not (prefix / "bin" / "python").exists():
            raise EnvshipError(
                label,
                f"there is no Python in it ({prefix / 'bin' / 'python'} is missing)",
                "install python into the environment, e.g. `conda install -p "
                f"{prefix} python`",
            )
        site_packages = _find_site_packages(prefix)
        python = _python_version(prefix, kind, site_packages)
        return cls(prefix, kind, python, site_packages)

    def package_versions(self) -> dict[str, str]:
        """Versions of the tracked packages found in the environment."""
        found = _dist_info_versions(self.site_packages) if self.site_packages else {}
        if self.kind == "conda":
            for name, version in _conda_versions(self.prefix).items():
                found.setdefault(name, version)
        return {name: found[name] for name in TRACKED_PACKAGES if name in found}

    def editable_projects(self) -> list[EditableProject]:
        """The projects installed in development (editable) mode, and their code.

        See :mod:`envship.client.editable`: packing ships their code in place
        of their hooks.
        """
        if self.site_packages is None:
            return []
        return find_projects(self.site_packages)


def _find_site_packages(prefix: Path) -> Path | None:
    lib = prefix / "lib"
    if not lib.is_dir():
        return None
    for entry in sorted(lib.iterdir()):
        if _python_dir.match(entry.name) and (entry / "site-packages").is_dir():
            return entry / "site-packages"
    return None


def _python_version(prefix: Path, kind: str, site_packages: Path | None) -> str:
    if kind == "conda":
        for record in (prefix / "conda-meta").glob("python-[0-9]*.json"):
            return json.loads(record.read_text())["version"]
    else:
        config = (prefix / "pyvenv.cfg").read_text()
        match = re.search(r"^version(?:_info)?\s*=\s*(\d+\.\d+\.\d+)", config, re.M)
        if match:
            return match.group(1)
    # _find_site_packages chose site_packages by this pattern: it matches.
    folder = (
        None if site_packages is None else _python_dir.match(site_packages.parent.name)
    )
    if folder is not None:
        major, minor = folder.groups()
        return f"{major}.{minor}"
    return "unknown"


def _dist_info_versions(site_packages: Path) -> dict[str, str]:
    versions = {}
    for entry in site_packages.glob("*.dist-info"):
        name, _, version = entry.name[: -len(".dist-info")].partition("-")
        versions[name.replace("_", "-").lower()] = version
    return versions


def _conda_versions(prefix: Path) -> dict[str, str]:
    versions = {}
    for record in (prefix / "conda-meta").glob("*.json"):
        parts = record.stem.rsplit("-", 2)
        if len(parts) == 3:
            name, version, _build = parts
            versions[name.removesuffix("-python")] = version
    return versions
