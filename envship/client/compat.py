"""Can workers of this cluster run inside an environment? Checked before any restart.

Compares an artifact's manifest with the client (Python major.minor), the
scheduler (the packages that must agree on the wire) and the nodes (OS,
machine, libc). Pure functions over plain dicts, so they are tested without
a cluster.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from distributed.versions import optional_packages

from envship.errors import IncompatibleEnvironmentError
from envship.manifest import Manifest

#: Packages whose versions must match the scheduler's: they serialise tasks
#: and messages between client, scheduler and workers.
WIRE_PACKAGES = ("dask", "distributed", "cloudpickle", "msgpack", "toolz")
#: Packages distributed compares between client and workers beyond those
#: (``distributed.versions.optional_packages``: numpy, pandas, lz4): data of
#: their types cannot be unpickled where they are missing.
OPTIONAL_PACKAGES = tuple(optional_packages)


@dataclass(frozen=True)
class Mismatch:
    what: str
    environment: str
    cluster: str
    fatal: bool  # True: cannot work even with strict=False


def _major_minor(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def _interpreter(
    manifest: Manifest, client_python: str, scheduler_packages: dict[str, str | None]
) -> list[Mismatch]:
    """What keeps a worker of this cluster from running in it: Python, wire packages."""
    found = []
    env_python = manifest.python
    if _major_minor(env_python) < (3,):
        found.append(Mismatch("python", env_python, client_python, fatal=True))
    elif _major_minor(env_python) != _major_minor(client_python):
        found.append(Mismatch("python", env_python, client_python, fatal=False))
    packages = manifest.packages
    for name in WIRE_PACKAGES:
        theirs = scheduler_packages.get(name)
        ours = packages.get(name)
        if ours is None and name == "distributed":
            found.append(Mismatch(name, "not installed", str(theirs), fatal=True))
        elif ours is not None and theirs is not None and ours != theirs:
            found.append(Mismatch(name, ours, theirs, fatal=False))
    return found


def find_mismatches(
    manifest: Manifest,
    client_python: str,
    scheduler_packages: dict[str, str | None],
    node_platforms: list[dict],
    call_only: bool = False,
) -> list[Mismatch]:
    """Everything that differs between the environment and the cluster.

    With ``call_only``, for an environment that tasks call into through a
    bridge (``envship.foreign``) rather than run workers in, only the
    platform counts.

    Examples
    --------
    >>> manifest = Manifest(
    ...     id="0" * 32, name="x", kind="conda", python="3.12.1", file_count=1,
    ...     unpacked_size=1, packages={"distributed": "2026.8.0"},
    ...     platform={"os": "linux", "machine": "x86_64", "libc": "glibc",
    ...               "libc_version": "2.36"})
    >>> [m.what for m in find_mismatches(manifest, "3.11.7",
    ...                                  {"distributed": "2026.8.0"}, [])]
    ['python']
    """
    found = (
        [] if call_only else _interpreter(manifest, client_python, scheduler_packages)
    )
    env_platform = manifest.platform
    for node in node_platforms:
        for key in ("os", "machine"):
            if env_platform.get(key) != node.get(key):
                found.append(
                    Mismatch(key, str(env_platform.get(key)), str(node.get(key)), True)
                )
        env_libc = _version_tuple(env_platform.get("libc_version", ""))
        node_libc = _version_tuple(node.get("libc_version", ""))
        if env_libc and node_libc and env_libc > node_libc:
            found.append(
                Mismatch(
                    "libc",
                    f"{env_platform.get('libc')} {env_platform.get('libc_version')}",
                    f"{node.get('libc')} {node.get('libc_version')}",
                    fatal=False,
                )
            )
    # One line per kind of difference is enough, however many nodes share it.
    unique = {(m.what, m.environment, m.cluster): m for m in found}
    return list(unique.values())


def _table(mismatches: list[Mismatch]) -> str:
    rows = [("", "environment", "cluster")] + [
        (m.what, m.environment, m.cluster) for m in mismatches
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  "
        + "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    )


def _fix(name: str, manifest: Manifest, mismatches: list[Mismatch]) -> str:
    whats = {m.what for m in mismatches}
    bridge = (
        f"or call into it from tasks, workers staying where they are: "
        f"env = envship.foreign(client, {name!r}); client.submit(env.call, "
        "'module.function', ...)"
    )
    if "python" in whats and _major_minor(manifest.python) < (3,):
        return (
            "Dask workers cannot run on Python 2.7: distributed dropped Python 2 "
            "in 2019 (version 2.0) and today needs Python 3.10 or newer, so no "
            f"worker of this cluster can start in it. {bridge[0].upper()}{bridge[1:]}."
        )
    steps = []
    if "python" in whats:
        steps.append("build the environment with the client's Python version")
    pinned = [f"{m.what}=={m.cluster}" for m in mismatches if m.what in WIRE_PACKAGES]
    if pinned:
        steps.append(f"install {' '.join(pinned)} into {name!r}")
    if whats & {"os", "machine"}:
        steps.append("pack the environment on a machine like the workers' nodes")
    if "libc" in whats:
        steps.append("build the environment on a system no newer than the nodes'")
    fix = "; ".join(steps)
    if not any(m.fatal for m in mismatches):
        fix += "; or pass strict=False to go on anyway"
    if whats & {"python", "distributed"}:
        fix += f"; {bridge}"
    return fix


def check_compatibility(
    name: str,
    manifest: Manifest,
    client_python: str,
    scheduler_packages: dict[str, str | None],
    node_platforms: list[dict],
    strict: bool = True,
    call_only: bool = False,
) -> list[Mismatch]:
    """Raise ``IncompatibleEnvironmentError`` with a table of differences.

    With ``strict=False``, differences that can still work (package versions,
    Python minor version, a newer libc) only warn. With ``call_only``, only the
    platform is compared (see :func:`find_mismatches`).
    """
    mismatches = find_mismatches(
        manifest, client_python, scheduler_packages, node_platforms, call_only
    )
    if not mismatches:
        return []
    fatal = any(m.fatal for m in mismatches)
    where = "its python would fail here" if call_only else "workers would fail in it"
    problem = f"it does not match the cluster, so {where}:\n" + _table(mismatches)
    if strict or fatal:
        raise IncompatibleEnvironmentError(
            name, problem, _fix(name, manifest, mismatches)
        )
    warnings.warn(
        f"environment {name!r}: {problem}\ngoing on because strict=False",
        stacklevel=3,
    )
    return mismatches


def missing_optional(
    manifest: Manifest,
    client_packages: Mapping[str, str | None],
    files: Iterable[str] | None = None,
) -> tuple[str, ...]:
    """The optional packages (numpy, pandas, lz4) the client has and the environment lacks.

    Read from the manifest's packages; ``files``, the paths in the environment
    (its table), confirm that one is missing (a manifest packed by an older
    envship lists numpy only).

    Examples
    --------
    >>> manifest = Manifest(
    ...     id="0" * 32, name="x", kind="conda", python="3.11.7", file_count=1,
    ...     unpacked_size=1, packages={"distributed": "2026.8.0"})
    >>> missing_optional(manifest, {"numpy": "2.1.0", "pandas": None, "lz4": "4.3"},
    ...                  ["lib/python3.11/site-packages/lz4/__init__.py"])
    ('numpy',)
    """
    lacking = [
        name
        for name in OPTIONAL_PACKAGES
        if client_packages.get(name) and name not in manifest.packages
    ]
    if files is not None and lacking:
        found = _site_packages(files)
        lacking = [name for name in lacking if name not in found]
    return tuple(lacking)


_TOP_LEVEL = re.compile(r"(?:^|/)site-packages/([^/]+)/")


def _site_packages(files: Iterable[str]) -> set[str]:
    """The top-level folders in site-packages (the import names of packages)."""
    return {m.group(1) for path in files if (m := _TOP_LEVEL.search(path))}


def optional_warning(name: str, missing: tuple[str, ...]) -> str:
    """The one line that says what ``missing_optional`` found.

    Examples
    --------
    >>> optional_warning("sklearn-dev", ("numpy", "pandas"))
    'sklearn-dev lacks numpy, pandas that this client has: results of those types cannot be unpickled on the workers (install them into sklearn-dev to use them there)'
    """
    return (
        f"{name} lacks {', '.join(missing)} that this client has: results of "
        "those types cannot be unpickled on the workers (install them into "
        f"{name} to use them there)"
    )
