"""Editable (development) installs: where their code is, so that it ships.

``pip install -e ./proj`` (or uv, or ``setup.py develop``) leaves a project's
code in its source folder and puts only a *hook* into site-packages that
points there. The workers do not have the source folder, so packing puts the
code itself into the shipped tree, as a normal install would, and leaves the
hooks out. The client's environment is not changed.

Hooks understood:

- setuptools' PEP 660 finder: ``__editable__.<dist>.pth`` importing
  ``__editable___<dist>_finder.py``, whose ``MAPPING`` maps each top-level
  name to its source path;
- the ``editables`` redirector (``map_module(name, path)`` calls in the hook
  module a ``.pth`` file imports);
- ``.pth`` files holding a folder (setuptools' ``editable_mode=compat`` and
  src layouts, hatchling's default, uv): the project's importable packages
  and modules in that folder (named by the distribution's ``top_level.txt``
  if it has one, else those found there: the one named like the distribution
  if any, else every package and module but tests, docs and the like);
- legacy ``<dist>.egg-link`` files with their line in ``easy-install.pth``.

A distribution is editable when its ``direct_url.json`` says so
(``dir_info.editable``); its hooks are the ``.pth`` files and modules its
``RECORD`` lists at the top of site-packages.

This module reads files only; it imports nothing of the environment.
"""

from __future__ import annotations

import ast
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from envship.manifest import normalize_name

#: Folders never shipped from a project's source tree.
SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        "__pycache__",
        "build",
        "dist",
        ".tox",
        ".nox",
        ".eggs",
        ".venv",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".ipynb_checkpoints",
        "node_modules",
    }
)
#: File suffixes never shipped from a project's source tree.
SKIP_SUFFIXES = (".pyc", ".pyo", ".swp", "~")
#: Names in a folder a ``.pth`` file lists that are not the project's code.
NOT_CODE = frozenset(
    {
        "test",
        "tests",
        "testing",
        "doc",
        "docs",
        "example",
        "examples",
        "bench",
        "benchmarks",
        "build",
        "dist",
        "scripts",
        "tools",
        "setup",
        "conftest",
        "noxfile",
        "tasks",
        "fabfile",
        "site-packages",
    }
)

_import_line = re.compile(r"^import\s")
_module_name = re.compile(r"\bimport\s+([A-Za-z_][\w.]*)")


@dataclass(frozen=True)
class EditableProject:
    """One editable distribution: its hooks and the code they map.

    Attributes
    ----------
    name : str
        The distribution's name, normalized (``my-proj``).
    source : str
        Where its code lives (a source folder, or the first mapped path).
    mapped : tuple
        ``(target, source path)`` pairs: ``target`` is the package folder or
        module file relative to site-packages (``myproj``, ``ns/sub``,
        ``mod.py``).
    hooks : tuple
        Files of site-packages (relative to it) that make it editable: left
        out of the shipped tree.
    pth_lines : tuple
        ``(pth file, line)`` pairs: lines of ``.pth`` files shared with other
        projects (``easy-install.pth``) that are left out.

    Examples
    --------
    >>> p = EditableProject("demo", "/nowhere", (("demo", "/nowhere/demo"),))
    >>> p.missing(), list(p.files())
    (['/nowhere/demo'], [])
    """

    name: str
    source: str
    mapped: tuple[tuple[str, str], ...]
    hooks: tuple[str, ...] = ()
    pth_lines: tuple[tuple[str, str], ...] = field(default=())

    def missing(self) -> list[str]:
        """Mapped source paths that do not exist (a moved or deleted checkout)."""
        return [src for _, src in self.mapped if not os.path.exists(src)]

    def files(self) -> Iterator[tuple[str, str]]:
        """``(source file, path relative to site-packages)`` of the code, sorted.

        Folders are walked without ``.git``, ``__pycache__``, build folders,
        ``*.egg-info`` and compiled bytecode; a symlinked file gives the file
        it points to; symlinked folders are not followed.
        """
        for target, src in self.mapped:
            if os.path.isfile(src):
                yield os.path.realpath(src), target
                continue
            found = []
            for root, dirs, names in os.walk(src):
                dirs[:] = [d for d in dirs if not skipped_dir(d)]
                rel = os.path.relpath(root, src)
                for n in names:
                    if n.endswith(SKIP_SUFFIXES) or n == ".DS_Store":
                        continue
                    path = os.path.join(root, n)
                    if os.path.islink(path):
                        if not os.path.isfile(path):
                            continue  # dangling, or a folder
                        path = os.path.realpath(path)
                    found.append((path, os.path.normpath(os.path.join(target, rel, n))))
            yield from sorted(found, key=lambda pair: pair[1])


def skipped_dir(name: str) -> bool:
    """A folder of a project's tree never shipped nor hashed (``.git``, ``build``, ...)."""
    return name in SKIP_DIRS or name.endswith((".egg-info", ".dist-info"))


def find_projects(site_packages: Path) -> list[EditableProject]:
    """The editable projects installed into ``site_packages``, by name.

    Examples
    --------
    >>> import sysconfig
    >>> site = Path(sysconfig.get_paths()["purelib"])
    >>> all(p.mapped or p.hooks for p in find_projects(site))
    True
    """
    projects: dict[str, EditableProject] = {}
    claimed: set[str] = set()
    entries = sorted(site_packages.iterdir())
    for entry in entries:
        if entry.suffix == ".dist-info" and _is_editable(entry):
            project = _from_dist_info(site_packages, entry)
            projects.setdefault(project.name, project)
            claimed.update(project.hooks)
    for entry in entries:
        name = entry.name
        if (
            name.startswith("__editable__.")
            and name.endswith(".pth")
            and name not in claimed
        ):
            # No RECORD said whose it is: setuptools names it after the dist.
            dist = normalize_name(_strip_version(name[len("__editable__.") : -4]))
            hooks, mapped = _read_pth(site_packages, name, {name})
            project = _project(site_packages, dist, mapped, hooks, None)
            projects.setdefault(dist, project)
        elif entry.suffix == ".egg-link":
            legacy = _from_egg_link(site_packages, entry)
            if legacy is not None:
                projects.setdefault(legacy.name, legacy)
    return [projects[name] for name in sorted(projects)]


def _is_editable(dist_info: Path) -> bool:
    try:
        info = json.loads((dist_info / "direct_url.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and bool((info.get("dir_info") or {}).get("editable"))


def _from_dist_info(site_packages: Path, dist_info: Path) -> EditableProject:
    name = normalize_name(_strip_version(dist_info.name[: -len(".dist-info")]))
    try:
        record = (dist_info / "RECORD").read_text().splitlines()
    except OSError:
        record = []
    listed = {line.rsplit(",", 2)[0] for line in record if line.strip()}
    top = {p for p in listed if "/" not in p}
    hooks: set[str] = set()
    mapped: list[tuple[str, str]] = []
    for pth in sorted(p for p in top if p.endswith(".pth")):
        more_hooks, more_mapped = _read_pth(site_packages, pth, top)
        hooks |= more_hooks
        mapped += more_mapped
    return _project(site_packages, name, mapped, hooks, dist_info)


def _read_pth(
    site_packages: Path, pth: str, owned: set[str]
) -> tuple[set[str], list[tuple[str, str]]]:
    """A hook ``.pth`` file: the hooks it brings and what it maps.

    Folders it lists are returned as ``("", folder)``: the caller chooses
    what in them is the project's.
    """
    hooks = {pth}
    mapped: list[tuple[str, str]] = []
    try:
        lines = (site_packages / pth).read_text().splitlines()
    except OSError:
        return hooks, mapped
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if _import_line.match(line):
            for module in _module_name.findall(line):
                filename = module.replace(".", "/") + ".py"
                if filename in owned or module.startswith("__editable__"):
                    hooks.add(filename)
                    for cached in (site_packages / "__pycache__").glob(
                        f"{module}.*.pyc"
                    ):
                        hooks.add(f"__pycache__/{cached.name}")
                    mapped += _read_hook_module(site_packages / filename)
        else:
            mapped.append(("", os.path.normpath(os.path.join(site_packages, line))))
    return hooks, mapped


def _read_hook_module(path: Path) -> list[tuple[str, str]]:
    """What a finder module maps: setuptools' ``MAPPING``, editables' calls."""
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, ValueError):
        return []
    mapped = []
    for node in ast.walk(tree):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, ast.AnnAssign)
            else []
        )
        if (
            any(isinstance(t, ast.Name) and t.id == "MAPPING" for t in targets)
            and isinstance(node, (ast.Assign, ast.AnnAssign))
            and isinstance(node.value, ast.Dict)
        ):
            try:
                mapping = ast.literal_eval(node.value)
            except ValueError:
                continue
            for name, src in mapping.items():
                if isinstance(name, str) and isinstance(src, str):
                    mapped.append((_target(name, src), src))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and len(node.args) >= 1
            and all(isinstance(a, ast.Constant) for a in node.args)
        ):
            args = [a.value for a in node.args]  # type: ignore[attr-defined]
            if node.func.attr == "map_module" and len(args) == 2:
                name, src = str(args[0]), str(args[1])
                if os.path.basename(src) == "__init__.py":
                    src = os.path.dirname(src)
                mapped.append((_target(name, src), src))
            elif node.func.attr == "add_to_path" and len(args) == 1:
                mapped.append(("", str(args[0])))
    return mapped


def _target(name: str, src: str) -> str:
    """Where import name ``name`` mapped to ``src`` goes in site-packages."""
    base = name.replace(".", "/")
    if os.path.isfile(src) or os.path.splitext(src)[1] in (".py", ".so", ".pyd"):
        return os.path.join(os.path.dirname(base), os.path.basename(src))
    return base


def _from_egg_link(site_packages: Path, egg_link: Path) -> EditableProject | None:
    try:
        lines = egg_link.read_text().splitlines()
    except OSError:
        return None
    if not lines or not lines[0].strip():
        return None
    folder = os.path.normpath(os.path.join(site_packages, lines[0].strip()))
    name = normalize_name(egg_link.name[: -len(".egg-link")])
    pth_lines = []
    easy = site_packages / "easy-install.pth"
    if easy.is_file():
        for line in easy.read_text().splitlines():
            if line.strip() and not line.startswith(("#", "import")):
                if (
                    os.path.normpath(os.path.join(site_packages, line.strip()))
                    == folder
                ):
                    pth_lines.append(("easy-install.pth", line))
    egg_info = next(iter(sorted(Path(folder).glob("*.egg-info"))), None)
    project = _project(site_packages, name, [("", folder)], {egg_link.name}, egg_info)
    return EditableProject(
        project.name, project.source, project.mapped, project.hooks, tuple(pth_lines)
    )


def _project(
    site_packages: Path,
    name: str,
    mapped: list[tuple[str, str]],
    hooks: set[str],
    metadata: Path | None,
) -> EditableProject:
    """Resolve the folders of ``mapped`` (target ``""``) into their code."""
    top_level = None
    if metadata is not None and (metadata / "top_level.txt").is_file():
        top_level = [
            n.strip() for n in (metadata / "top_level.txt").read_text().splitlines()
        ]
        top_level = [n for n in top_level if n]
    resolved: list[tuple[str, str]] = []
    folders = [src for target, src in mapped if not target]
    for target, src in mapped:
        if target:
            resolved.append((target, src))
    for folder in folders:
        resolved += _code_in(folder, name, top_level)
    seen: dict[str, str] = {}
    for target, src in resolved:
        seen.setdefault(target, src)
    source = folders[0] if folders else (resolved[0][1] if resolved else "")
    return EditableProject(
        name, source, tuple(sorted(seen.items())), tuple(sorted(hooks))
    )


def _code_in(
    folder: str, name: str, top_level: list[str] | None
) -> list[tuple[str, str]]:
    """The project's packages and modules in ``folder`` (a ``.pth`` line)."""
    if not os.path.isdir(folder):
        return [("", folder)]  # reported as missing
    found: dict[str, str] = {}  # import name -> entry name
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if entry.startswith(".") or skipped_dir(entry):
            continue
        if os.path.isdir(path) and (
            os.path.isfile(os.path.join(path, "__init__.py")) or top_level
        ):
            found.setdefault(entry, entry)
        elif entry.endswith(".py") or entry.endswith((".so", ".pyd")):
            found.setdefault(entry.split(".", 1)[0], entry)
    if top_level is not None:
        chosen = [n for n in top_level if n in found]
    else:
        own = [n for n in found if normalize_name(n) == name]
        chosen = own or [n for n in found if n.lower() not in NOT_CODE]
    return [(found[n], os.path.join(folder, found[n])) for n in chosen]


def _strip_version(stem: str) -> str:
    return re.split(r"-\d", stem, maxsplit=1)[0]
