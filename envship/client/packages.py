"""A package list, from what the user passed to a packed environment.

``envship.build(pip=[...])``, ``use_environment(pip=[...])`` and ``envship
build`` all come here: the arguments are checked for contradictions (before
anything is built), an ``environment.yml`` is read into a pip list, the
environment is built by :func:`envship.client.build.build_environment`
through the index the user's pip configuration names
(:mod:`envship.client.index`), then packed into the store like any other.

Building is not done here, nor packing: only the glue between them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envship.errors import EnvshipError

from .index import index_args
from .locate import base_prefix
from .store import Artifact

#: The tools that can install a conda package, in the order they are looked for.
CONDA_TOOLS = ("conda", "mamba", "micromamba", "pixi")

#: What an environment.yml lists that any base satisfies: uv installs, the
#: base's Python runs.
_ALWAYS_THERE = {"pip", "python"}


@dataclass(frozen=True)
class EnvironmentFile:
    """What an ``environment.yml`` asks for.

    Attributes
    ----------
    path : Path
    conda : tuple of str
        Its conda dependencies, as written (``numpy=1.26``, ``conda-forge::gdal``).
    pip : tuple of str
        Its ``pip:`` part; local paths made absolute against the file's folder.
    """

    path: Path
    conda: tuple[str, ...]
    pip: tuple[str, ...]

    @property
    def conda_names(self) -> list[str]:
        """The package names of :attr:`conda`, without channel or version.

        Examples
        --------
        >>> EnvironmentFile(Path("e.yml"), ("conda-forge::gdal>=3", "numpy=1.26"), ()).conda_names
        ['gdal', 'numpy']
        """
        names = []
        for dep in self.conda:
            name = dep.split("::")[-1]
            names.append(re.split(r"[\s=<>!~\[]", name, maxsplit=1)[0].lower())
        return names


def read_environment_file(path: str | os.PathLike) -> EnvironmentFile:
    """Read an ``environment.yml`` (conda's format) into conda and pip lists.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     yml = Path(folder, "environment.yml")
    ...     _ = yml.write_text(
    ...         "name: demo\\ndependencies:\\n  - python=3.12\\n  - pip\\n"
    ...         "  - pip:\\n    - tabulate==0.8.10\\n"
    ...     )
    ...     found = read_environment_file(yml)
    >>> found.conda, found.pip
    (('python=3.12', 'pip'), ('tabulate==0.8.10',))
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise EnvshipError(
            str(path),
            f"cannot read it: {e.strerror or e}",
            "check the path of the environment.yml",
            subject="file",
        ) from None
    except yaml.YAMLError as e:
        raise EnvshipError(
            str(path),
            f"it is not valid YAML: {e}",
            "fix the file (conda's environment.yml format)",
            subject="file",
        ) from None
    deps = data.get("dependencies") if isinstance(data, dict) else None
    if not isinstance(deps, list):
        raise EnvshipError(
            str(path),
            "it has no `dependencies:` list, as an environment.yml has",
            "list the packages under `dependencies:` (pip ones under `- pip:`)",
            subject="file",
        )
    conda: list[str] = []
    pip: list[str] = []
    for dep in deps:
        if isinstance(dep, dict) and isinstance(dep.get("pip"), list):
            pip += [_pip_entry(str(p), path) for p in dep["pip"]]
        elif isinstance(dep, str | int | float):
            conda.append(str(dep))
        else:
            raise EnvshipError(
                str(path),
                f"a dependency is neither a package nor a `pip:` list: {dep!r}",
                "write each conda package as a string, pip ones under `- pip:`",
                subject="file",
            )
    return EnvironmentFile(path, tuple(conda), tuple(pip))


def _pip_entry(entry: str, yml: Path) -> str:
    """One line of the ``pip:`` part; a local path made absolute."""
    entry = entry.strip()
    if entry.startswith("-"):
        raise EnvshipError(
            str(yml),
            f"its pip part has an option line, {entry!r}, which envship does "
            "not pass on",
            "put index options in pip's or uv's configuration (envship uses "
            "it), and give a requirements file as requirements= / -r",
            subject="file",
        )
    if entry.startswith(("./", "../")) or entry in (".", ".."):
        return str((yml.parent / entry).resolve())
    return entry


def conda_tool() -> str | None:
    """The first of :data:`CONDA_TOOLS` on PATH, or None."""
    for tool in CONDA_TOOLS:
        if shutil.which(tool):
            return tool
    return None


def _conda_names_in(base: Path) -> set[str] | None:
    """The conda packages installed in ``base``; None for a venv (no conda-meta)."""
    meta = base / "conda-meta"
    if not meta.is_dir():
        return None
    names = set()
    for record in meta.glob("*.json"):
        try:
            names.add(str(json.loads(record.read_text())["name"]).lower())
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return names


def check_conda_part(found: EnvironmentFile, base: str | None) -> None:
    """Refuse an environment.yml whose conda packages the base does not have.

    envship installs pip packages only; the conda part must be the base: an
    environment built from the file with a conda tool. Without one on PATH,
    say so and what to install.
    """
    needed = [n for n in found.conda_names if n not in _ALWAYS_THERE]
    if not needed:
        return
    try:
        have = _conda_names_in(base_prefix(base))
    except EnvshipError:  # no such base: the missing packages say enough
        have = None
    missing = needed if have is None else [n for n in needed if n not in have]
    if not missing:
        return
    tool = conda_tool()
    where = "the client's own environment" if base is None else repr(base)
    listed = ", ".join(missing)
    if tool is None:
        raise EnvshipError(
            str(found.path),
            f"its conda dependencies ({listed}) need a conda channel, {where} "
            "lacks them, and no conda, mamba, micromamba or pixi is on PATH; "
            "envship installs only the file's pip part",
            "install micromamba (or conda), create the conda part with "
            f"`micromamba create -p ./env -f {found.path}` and build on it: "
            f"`envship build ./env --file {found.path}`; or move these "
            "packages to the file's `pip:` list when PyPI has them",
            subject="file",
        )
    create = {
        "pixi": f"pixi init --import {found.path} && pixi install",
        "micromamba": f"micromamba create -p ./env -f {found.path}",
    }.get(tool, f"{tool} env create -p ./env -f {found.path}")
    raise EnvshipError(
        str(found.path),
        f"its conda dependencies ({listed}) are not in {where}; envship "
        "installs only the file's pip part",
        f"create the conda part with {tool} (`{create}`) and build on it: "
        f"`envship build ./env --file {found.path}`",
        subject="file",
    )


def spec_for(
    env: Any = None,
    *,
    pip: Iterable[str] | str | None = None,
    requirements: str | os.PathLike | None = None,
    lock: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    file: str | os.PathLike | None = None,
) -> Any:
    """The build spec that ``use_environment``'s arguments ask for, or None.

    ``env`` with a package list is the base (``use_environment("sklearn-dev",
    pip=[...])``); without ``env`` nor ``base`` the base is the client's own
    environment. None when no package list is given: ``env`` is used as is.

    Raises
    ------
    EnvshipError
        For arguments that contradict each other, before anything is built.

    Examples
    --------
    >>> spec_for("sklearn-dev") is None
    True
    >>> spec_for("sklearn-dev", pip=["tabulate"])  # doctest: +ELLIPSIS
    BuildSpec(pip=('tabulate',), requirements=None, lock=None, base='sklearn-dev'...)
    >>> spec_for("sklearn-dev", base="base", pip=["tabulate"])
    Traceback (most recent call last):
    ...
    envship.errors.EnvshipError: environment 'sklearn-dev': both it and base='base' are given as the base of the package list
    Fix: give the base once: use_environment('sklearn-dev', pip=[...]) or use_environment(base='base', pip=[...])
    """
    if isinstance(pip, str):
        pip = [pip]
    pip = tuple(pip or ())
    listed = bool(pip) or requirements is not None or lock is not None
    if not listed and file is None:
        if base is not None:
            raise EnvshipError(
                str(base),
                "base= is the environment a package list is built on, but no "
                "list is given (pip=, requirements=, lock= or file=)",
                f"to run in it as it is: use_environment({str(base)!r}); to add "
                f"packages: use_environment({str(base)!r}, pip=[...])",
            )
        return None
    if isinstance(env, Artifact):
        raise EnvshipError(
            env.name,
            "a package list is built on an environment folder, not on an "
            "artifact of the store",
            "pass the environment's name or path (or base=) with the list",
        )
    if env is not None and base is not None:
        raise EnvshipError(
            str(env),
            f"both it and base={str(base)!r} are given as the base of the package list",
            f"give the base once: use_environment({str(env)!r}, pip=[...]) or "
            f"use_environment(base={str(base)!r}, pip=[...])",
        )
    base = env if env is not None else base
    if lock is not None and (pip or requirements is not None or file is not None):
        raise EnvshipError(
            str(lock),
            "a lock is the whole resolved set; it cannot be combined with "
            "pip=, requirements= or file=",
            "add the packages to the project and lock again (`uv lock`), or "
            "give the list without the lock",
            subject="lock",
        )
    for given, what in ((requirements, "requirements file"), (lock, "lock")):
        if given is not None and not Path(given).exists():
            raise EnvshipError(
                str(given),
                f"no such {what}",
                f"check the path of the {what}",
                subject=what,
            )
    if file is not None:
        found = read_environment_file(file)
        check_conda_part(found, None if base is None else str(base))
        pip = found.pip + pip
        if not pip and requirements is None:
            raise EnvshipError(
                str(found.path),
                "it has no pip packages and its conda ones are all in the base: "
                "there is nothing to build",
                "use the base as it is, or add packages under `- pip:`",
                subject="file",
            )
    from .build import BuildSpec

    return BuildSpec(
        pip=pip,
        requirements=None if requirements is None else Path(requirements),
        lock=None if lock is None else Path(lock),
        base=None if base is None else str(base),
    )


def build(
    pip: Iterable[str] | str | None = None,
    *,
    requirements: str | os.PathLike | None = None,
    lock: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    file: str | os.PathLike | None = None,
    name: str | None = None,
    store: Any = None,
    index: Sequence[str] | None = None,
    progress: bool = False,
) -> Artifact:
    """Build an environment from a package list and pack it into the store.

    The base environment plus the packages, with dask, distributed,
    cloudpickle, msgpack and toolz held at the base's versions, resolved and
    installed by uv through the index pip's configuration names; then packed
    like ``envship.pack``. The same base and list again builds nothing.

    Parameters
    ----------
    pip : list of str, optional
        Requirements (``"scikit-learn==1.8.0"``), or local projects
        (``"./myproject"``).
    requirements : path, optional
        A requirements.txt.
    lock : path, optional
        A ``uv.lock`` (of its project's folder) or a ``pylock.toml``.
    base : str or path, optional
        The environment to build on, a name or a path; default the client's
        own (``sys.prefix``).
    file : path, optional
        An ``environment.yml``: its ``pip:`` part is added to ``pip``; its
        conda packages must be in the base (envship installs pip packages).
    name : str, optional
        The name to record; default ``<base>+<first package>`` and so on.
    store : path or ArtifactStore, optional
        Defaults to dask config ``envship.store``.
    index : list of str, optional
        uv index arguments; default those of :func:`envship.client.index.index_args`.
    progress : bool
        Show what uv does, and a progress bar when packing.

    Returns
    -------
    Artifact

    Examples
    --------
    >>> artifact = envship.build(pip=["tabulate==0.8.10"])  # doctest: +SKIP
    >>> artifact.name  # doctest: +SKIP
    'envship+tabulate'
    """
    spec = spec_for(
        pip=pip,
        requirements=requirements,
        lock=lock,
        base=base,
        file=file,
    )
    if spec is None:
        raise EnvshipError(
            "-" if base is None else str(base),
            "no package list given: nothing to build",
            "give pip=[...], requirements=, lock= or file=; to pack an "
            "environment as it is, use envship.pack",
        )
    return build_spec(spec, name=name, store=store, index=index, progress=progress)


def build_spec(
    spec: Any,
    *,
    name: str | None = None,
    store: Any = None,
    index: Sequence[str] | None = None,
    progress: bool = False,
    archive: bool = True,
) -> Artifact:
    """Build ``spec`` (a ``BuildSpec``) and pack the result into the store.

    ``archive=False`` records its table only, as a switch does (it ships a
    thin pack); ``envship.build`` writes the archive, as ``envship.pack``.
    """
    from .build import build_environment
    from .pack import pack

    args = index_args() if index is None else list(index)
    prefix = build_environment(spec, index_args=args, progress=progress)
    return pack(
        prefix,
        name=name or readable_name(spec),
        store=store,
        progress=progress,
        archive=archive,
    )


def readable_name(spec: Any) -> str:
    """A short name for a built environment: its base, then what was added.

    Examples
    --------
    >>> from types import SimpleNamespace as S
    >>> readable_name(S(base="sklearn-dev", pip=("tabulate==0.8.10", "rich"),
    ...                 requirements=None, lock=None))
    'sklearn-dev+tabulate+rich'
    >>> readable_name(S(base="/envs/x", pip=(), requirements=Path("req.txt"),
    ...                 lock=None))
    'x+req'
    """
    base = Path(spec.base).name if spec.base is not None else Path(sys.prefix).name
    added = [
        Path(p).name if p.startswith((".", "/")) else re.split(r"[\s=<>!~\[;@]", p)[0]
        for p in spec.pip
    ]
    for path in (spec.requirements, spec.lock):
        if path is not None:
            path = Path(path)
            added.append(path.parent.name if path.name == "uv.lock" else path.stem)
    shown = added[:3] + ([f"{len(added) - 3}more"] if len(added) > 3 else [])
    return "+".join([base, *shown])
