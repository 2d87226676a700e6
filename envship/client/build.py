"""Build a derived environment: a base environment plus a package list, with uv.

The result is an ordinary environment (conda-kind for a conda base, a venv for
a venv base) in the builds folder (``envship.build.directory``), which
``envship.pack`` packs like any other. dask, distributed, cloudpickle, msgpack
and toolz stay at the base's versions (uv constraints), so the result passes
the compatibility check by construction; a requirement that would move them
is refused before anything is built.

Built once, cached by content: the folder's name holds a hash of the base and
the resolved requirement set, so the same list on the same base is found
again after the resolve and nothing is installed. The base is never written:
see :mod:`envship.client.clone`. This module does not pack or ship.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import xxhash
from filelock import FileLock

from envship import config
from envship.errors import EnvshipError

from . import uv
from .clone import clone_environment
from .editable import skipped_dir
from .environment import SourceEnvironment
from .locate import base_prefix, looks_like_path

#: Held at the base's versions in every derived environment.
PINNED_PACKAGES = ("dask", "distributed", "cloudpickle", "msgpack", "toolz")

_FORMAT = "envship-build-1"


@dataclass(frozen=True)
class BuildSpec:
    """What to add to a base environment.

    ``pip``: requirement strings, or paths of local projects (``"./proj"``);
    ``requirements``: a requirements file; ``lock``: a ``uv.lock`` (or its
    project folder) or a ``pylock.toml``, installed exactly as listed;
    ``base``: an environment name or path, None for the client's own
    (``sys.prefix``).
    """

    pip: tuple[str, ...] = ()
    requirements: Path | None = None
    lock: Path | None = None
    base: str | None = None


def build_environment(
    spec: BuildSpec, *, index_args: Sequence[str] = (), progress: bool = False
) -> Path:
    """The prefix of the base plus the spec's packages, built once, cached by content.

    Parameters
    ----------
    spec : BuildSpec
        The base and the packages.
    index_args : sequence of str
        Passed to uv as they are, e.g. ``["--no-index", "--find-links", DIR]``
        or ``["--index-url", URL]``.
    progress : bool
        Say on stderr what is being done.

    Returns
    -------
    Path
        The derived environment's prefix, ``<builds>/<base name>+<8 hex>``.

    Examples
    --------
    >>> prefix = build_environment(BuildSpec(pip=("tabulate==0.9.0",)))  # doctest: +SKIP
    >>> envship.pack(prefix).name  # doctest: +SKIP
    'myenv+3f2a9c01'
    """
    base = base_prefix(spec.base)
    source = SourceEnvironment.from_prefix(base, spec.base or None)
    label = spec.base or str(base)
    versions = source.package_versions()
    pins = {name: versions[name] for name in PINNED_PACKAGES if name in versions}
    python = base / "bin" / "python"
    builds = config.build_directory()
    builds.mkdir(parents=True, exist_ok=True)
    say = _say if progress else _quiet

    with tempfile.TemporaryDirectory(dir=builds, prefix=".resolve-") as work_dir:
        work = Path(work_dir)
        constraints = work / "pins.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in pins.items()))
        say(f"resolving against {label}")
        plan = _resolve(spec, python, constraints, pins, index_args, label, work)
        key = _key(source, plan)
        target = builds / f"{_readable_name(base)}+{key[:8]}"
        if _is_complete(target):
            say(f"already built: {target}")
            return target
        with FileLock(str(target) + ".lock"):
            if not _is_complete(target):
                _build(source, target, plan, constraints, index_args, label, say)
    return target


@dataclass
class _Plan:
    lines: list[str]  # the resolved set, sorted
    install_from: Path  # the file uv installs from
    exact: bool  # a lock: install what it lists, no resolving (--no-deps)
    local: dict[str, str]  # local project path -> content hash


def _resolve(
    spec: BuildSpec,
    python: Path,
    constraints: Path,
    pins: dict[str, str],
    index_args: Sequence[str],
    label: str,
    work: Path,
) -> _Plan:
    if spec.lock is not None:
        if spec.pip or spec.requirements is not None:
            raise EnvshipError(
                label,
                "a lock was given together with a package list or requirements file",
                "give the lock alone (it lists everything), or no lock",
            )
        return _from_lock(Path(spec.lock).expanduser(), pins, index_args, label, work)
    local: dict[str, str] = {}
    requested: list[str] = []
    for item in spec.pip:
        path = Path(item).expanduser()
        if _LOCAL.match(item) and looks_like_path(item):
            if not path.is_dir():
                raise EnvshipError(
                    label,
                    f"the local project {item} is not a folder",
                    "give the path of a folder holding a pyproject.toml or setup.py",
                )
            local[str(path.absolute())] = _tree_hash(path)
            requested.append(str(path.absolute()))
        else:
            requested.append(item)
    inputs = []
    if requested:
        listed = work / "requested.in"
        listed.write_text("\n".join(requested) + "\n")
        inputs.append(str(listed))
    if spec.requirements is not None:
        requirements = Path(spec.requirements).expanduser().absolute()
        if not requirements.is_file():
            raise EnvshipError(
                label,
                f"the requirements file {requirements} does not exist",
                "give the path of an existing requirements.txt",
            )
        inputs.append(str(requirements))
        requested += requirements.read_text().splitlines()
    if not inputs:
        raise EnvshipError(
            label, "nothing to add", "give packages (pip=...), requirements= or lock="
        )
    _refuse_moves(requested, pins, label)
    try:
        lines = uv.compile_requirements(python, inputs, constraints, index_args, label)
    except uv.UvError as e:
        moved = uv.pinned_names_in(e.message, pins)
        if moved:
            raise _moves_error(label, moved, pins, None, e.message) from None
        raise
    _refuse_moves(lines, pins, label)
    return _written(sorted(lines), work, exact=False, local=local)


def _from_lock(
    lock: Path, pins: dict[str, str], index_args: Sequence[str], label: str, work: Path
) -> _Plan:
    if lock.is_dir():
        lock = lock / "uv.lock"
    if not lock.is_file():
        raise EnvshipError(
            label,
            f"the lock {lock} does not exist",
            "give a uv.lock (or its project folder) or a pylock.toml",
        )
    if lock.name == "uv.lock":
        lines = uv.export_lock(lock.parent, index_args, label)
        _refuse_moves(lines, pins, label)
        return _written(sorted(lines), work, exact=True, local={})
    lines = _pylock_lines(lock, label)
    _refuse_moves(lines, pins, label)
    # uv installs from the lock itself: its own URLs and hashes.
    plan = _written(lines, work, exact=True, local={})
    plan.install_from = lock.absolute()
    plan.lines.append("# pylock " + xxhash.xxh3_128_hexdigest(lock.read_bytes()))
    return plan


def _pylock_lines(lock: Path, label: str) -> list[str]:
    """``name==version`` for each package a pylock.toml lists, sorted."""
    if sys.version_info >= (3, 11):
        import tomllib

        try:
            listed = tomllib.loads(lock.read_text()).get("packages", [])
        except tomllib.TOMLDecodeError as e:
            raise EnvshipError(
                label, f"{lock} is not valid TOML: {e}", "fix it"
            ) from None
        return sorted(f"{p['name']}=={p['version']}" for p in listed if "version" in p)
    raise EnvshipError(
        label, "reading a pylock.toml needs Python 3.11 or newer", "use a uv.lock"
    )


def _written(lines: list[str], work: Path, exact: bool, local: dict[str, str]) -> _Plan:
    resolved = work / "resolved.txt"
    resolved.write_text("".join(line + "\n" for line in lines))
    return _Plan(lines, resolved, exact, local)


def _refuse_moves(lines: Sequence[str], pins: dict[str, str], label: str) -> None:
    """Refuse requirement lines that pin a pinned package to another version.

    Ranges (``distributed<2025``) are left to uv, whose conflict message is
    read the same way (:func:`envship.client.uv.pinned_names_in`).
    """
    for line in lines:
        line = line.split(" #", 1)[0].split(";", 1)[0].strip()
        match = _NAME.match(line)
        if not match or line.startswith(("#", "-")):
            continue
        name = match.group(1).lower().replace("_", "-")
        for version in _EXACT.findall(line[match.end() :]):
            if name in pins and "*" not in version and version != pins[name]:
                raise _moves_error(label, [name], pins, line)


# "./proj", "/src/proj", "~/proj": a local project; "pkg @ https://..." is not.
_LOCAL = re.compile(r"^[\w.~/+-]+$")
_NAME = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?")
_EXACT = re.compile(r"===?\s*([^\s,;]+)")


def _moves_error(
    label: str,
    names: list[str],
    pins: dict[str, str],
    requirement: str | None,
    uv_says: str = "",
) -> EnvshipError:
    held = ", ".join(f"{n}=={pins[n]}" for n in names)
    asked = (
        f"the requirement {requirement!r}" if requirement else "the packages asked for"
    )
    problem = (
        f"{asked} would move {', '.join(names)}, which must stay at the base's "
        f"version ({held}) to match the scheduler and workers; nothing was built"
    )
    if uv_says:
        problem += f"\nuv says:\n{uv_says}"
    return EnvshipError(
        label,
        problem,
        f"drop that requirement or ask for a version compatible with {held}; "
        "to change these packages, build a base environment with them (and "
        "run the scheduler and workers with the same versions)",
    )


def _key(source: SourceEnvironment, plan: _Plan) -> str:
    h = xxhash.xxh3_128()
    h.update(f"{_FORMAT}\0{source.kind}\0{source.prefix}\0{plan.exact}\n".encode())
    h.update(_stat_signature(source.prefix).encode())
    for line in plan.lines:
        h.update(line.encode() + b"\n")
    for path, digest in sorted(plan.local.items()):
        h.update(f"{path}\0{digest}\n".encode())
    return h.hexdigest()


def _readable_name(base: Path) -> str:
    """The base's folder name, with its project's for a bare ``.venv``.

    Examples
    --------
    >>> _readable_name(Path("/home/ada/analysis/.venv")), _readable_name(Path("/envs/ml"))
    ('analysis-venv', 'ml')
    """
    name = base.name.lstrip(".") or "env"
    if name in ("venv", "env") and base.parent.name:
        name = f"{base.parent.name.lstrip('.')}-{name}"
    return name


def _stat_signature(prefix: Path) -> str:
    """The base's identity, cheaply: installs change these folders' mtimes."""
    parts = []
    for rel in ("conda-meta", "pyvenv.cfg", "bin", "lib"):
        path = prefix / rel
        if path.exists():
            st = path.stat()
            parts.append(f"{rel}:{st.st_ino}:{st.st_mtime_ns}")
    for site in prefix.glob("lib/python*/site-packages"):
        st = site.stat()
        parts.append(f"{site.name}:{st.st_ino}:{st.st_mtime_ns}")
    return "\0".join(parts) + "\n"


def _tree_hash(folder: Path) -> str:
    """The content of a local project, as its build backend would see it."""
    h = xxhash.xxh3_128()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not skipped_dir(d))
        for name in sorted(files):
            path = Path(root, name)
            h.update(str(path.relative_to(folder)).encode() + b"\0")
            h.update(path.read_bytes() if not path.is_symlink() else b"")
    return h.hexdigest()


def _build(
    source: SourceEnvironment,
    target: Path,
    plan: _Plan,
    constraints: Path,
    index_args: Sequence[str],
    label: str,
    say,
) -> None:
    marker = _marker(target)
    marker.unlink(missing_ok=True)
    if os.path.lexists(target):  # an earlier build that did not finish
        shutil.rmtree(target)
    started = time.perf_counter()
    parent = _nearest_build(target.parent, source, plan)
    start_from = parent or source.prefix
    try:
        say(f"cloning {start_from} to {target}")
        counts = clone_environment(start_from, target, source.kind)
        cloned = time.perf_counter()
        say(f"installing {len(plan.lines)} packages with uv")
        refresh = [a for n in _local_names(plan) for a in ("--refresh-package", n)]
        uv.install(
            target / "bin" / "python",
            plan.install_from,
            None if plan.install_from.suffix == ".toml" else constraints,
            [*refresh, *index_args],
            label,
            no_deps=plan.exact and plan.install_from.suffix == ".txt",
        )
        compile_new_modules(target, say)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    info = {
        "base": str(source.prefix),
        "base_signature": _stat_signature(source.prefix),
        "parent": str(parent) if parent else None,
        "requirements": plan.lines,
        "local": plan.local,
        "exact": plan.exact,
        "clone_seconds": round(cloned - started, 3),
        "seconds": round(time.perf_counter() - started, 3),
        **counts,
    }
    info["signature"] = _stat_signature(target)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, marker)  # last: the build is whole


#: Folders whose modules workers seldom import: left to compile on import.
_NOT_COMPILED = {"tests", "test"}


def compile_new_modules(prefix: Path, say=lambda message: None) -> int:
    """Compile the ``.py`` files that the install just wrote; how many.

    uv does not compile (pip does), and node trees are read-only: a module
    shipped without its ``.pyc`` is compiled again by every worker at every
    start. The files uv wrote are the ones no clone link shares (one link);
    test folders are left out. ``compileall`` writes each ``.pyc`` to a new
    file and renames it over the old one, so no file of the base, which the
    clone shares by hard links, is ever written.
    """
    new = []
    for folder, dirs, files in os.walk(prefix):
        dirs[:] = [d for d in dirs if d not in _NOT_COMPILED and d != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                if os.lstat(path).st_nlink == 1:
                    new.append(path)
    if not new:
        return 0
    say(f"compiling {len(new)} new modules")
    python = prefix / "bin" / "python"
    # -I: none of the client's PYTHON* variables (a PYTHONPYCACHEPREFIX
    # would put the .pyc files elsewhere); timestamps, as pip writes them.
    command = [str(python), "-I", "-m", "compileall", "-q", "-j", "0"]
    done = subprocess.run(
        [*command, "--invalidation-mode", "timestamp", "-i", "-"],
        input="\n".join(new),
        capture_output=True,
        text=True,
        cwd=prefix,
    )
    if done.returncode not in (0, 1):  # 1: a module that does not compile
        raise EnvshipError(
            str(prefix),
            f"could not compile its new modules: {done.stderr.strip()[-2000:]}",
            f"check that its python runs (`{python} -c pass`)",
        )
    return len(new)


def _nearest_build(builds: Path, source: SourceEnvironment, plan: _Plan) -> Path | None:
    """A finished build of the same base whose packages are all in ``plan``.

    Cloning it instead of the base leaves uv only the difference to install:
    everything it holds is wanted at the same version. One that changed since
    it was built (a ``pip install`` into it) or that holds a local project or
    a lock's exact set is not used.
    """
    if plan.local or plan.exact:
        return None
    wanted = set(plan.lines)
    base_signature = _stat_signature(source.prefix)
    best: tuple[int, Path] | None = None
    for marker in builds.glob("*.complete"):
        prefix = marker.with_name(marker.name[: -len(".complete")])
        record = build_record(prefix)
        if (
            record is None
            or record.get("base") != str(source.prefix)
            or record.get("base_signature") != base_signature
            or record.get("local")
            or record.get("exact", True)
            or not set(record.get("requirements", ())) <= wanted
            or record.get("signature") != _stat_signature(prefix)
        ):
            continue
        size = len(record["requirements"])
        if best is None or size > best[0]:
            best = (size, prefix)
    return best[1] if best else None


def _local_names(plan: _Plan) -> list[str]:
    """Names of the local projects, for uv to rebuild them rather than reuse.

    uv caches a local project's wheel until its pyproject.toml changes; an
    edit of a module must give a new wheel.
    """
    names = []
    for path in plan.local:
        name = None
        if sys.version_info >= (3, 11):
            import tomllib

            try:
                text = (Path(path) / "pyproject.toml").read_text()
                name = tomllib.loads(text).get("project", {}).get("name")
            except (OSError, ValueError):
                name = None
        names.append(name or Path(path).name)
    return names


def build_record(prefix: Path) -> dict | None:
    """What a finished build recorded (times, counts, requirements), or None."""
    try:
        return json.loads(_marker(prefix).read_text())
    except (OSError, ValueError):
        return None


def _marker(target: Path) -> Path:
    # Beside the prefix, not in it: packing the environment must not see it.
    return target.with_name(target.name + ".complete")


def _is_complete(target: Path) -> bool:
    return _marker(target).is_file() and (target / "bin" / "python").exists()


def _say(message: str) -> None:
    print(f"envship build: {message}", file=sys.stderr)


def _quiet(message: str) -> None:
    pass
