"""Find an environment's prefix from a name or a path, the way conda does.

A name is looked up in ``CONDA_ENVS_PATH``/``CONDA_ENVS_DIRS``,
``~/.conda/environments.txt``, ``~/.conda/envs`` and the envs folder of the
conda found through ``CONDA_EXE``. The artifact store is the last resort and
is consulted by the caller, not here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from envship.errors import EnvshipError
from envship.kinds import environment_kind


def looks_like_path(env: str | os.PathLike) -> bool:
    """True if ``env`` is meant as a path rather than an environment name."""
    text = os.fspath(env)
    return isinstance(env, os.PathLike) or os.sep in text or text.startswith((".", "~"))


def _conda_root() -> Path | None:
    conda_exe = os.environ.get("CONDA_EXE")
    if not conda_exe:
        return None
    # <root>/bin/conda or <root>/condabin/conda
    return Path(conda_exe).resolve().parent.parent


def search_places() -> list[Path]:
    """Folders that may hold named environments, in conda's order of preference."""
    places: list[Path] = []
    for var in ("CONDA_ENVS_PATH", "CONDA_ENVS_DIRS"):
        places += [
            Path(p).expanduser() for p in os.environ.get(var, "").split(os.pathsep) if p
        ]
    places.append(Path("~/.conda/envs").expanduser())
    root = _conda_root()
    if root is not None:
        places.append(root / "envs")
    return places


def _registered_prefixes() -> list[Path]:
    registry = Path("~/.conda/environments.txt").expanduser()
    try:
        lines = registry.read_text().splitlines()
    except OSError:
        return []
    return [Path(line.strip()) for line in lines if line.strip()]


def find_named(name: str) -> Path | None:
    """The prefix of the conda environment called ``name``, or None.

    Examples
    --------
    >>> find_named("an-environment-that-does-not-exist") is None
    True
    """
    root = _conda_root()
    if name == "base" and root is not None and environment_kind(root) == "conda":
        return root
    for place in search_places():
        candidate = place / name
        if environment_kind(candidate) is not None:
            return candidate
    for prefix in _registered_prefixes():
        if prefix.name == name and prefix.is_dir():
            return prefix
    return None


def where_looked() -> list[str]:
    """Human-readable list of the places a name was searched, for error messages."""
    return [str(p) for p in search_places()] + [
        str(Path("~/.conda/environments.txt").expanduser())
    ]


def base_prefix(base: str | os.PathLike | None) -> Path:
    """The folder of a build's base: a path, an environment's name, or None
    for the client's own (``sys.prefix``).

    Examples
    --------
    >>> import sys
    >>> base_prefix(None) == Path(sys.prefix)
    True
    """
    if base is None:
        return Path(sys.prefix)
    if looks_like_path(base):
        return Path(base).expanduser().absolute()
    found = find_named(str(base))
    if found is not None:
        return found
    if Path(base).exists():
        return Path(base).absolute()
    places = "\n  ".join(where_looked())
    raise EnvshipError(
        str(base),
        f"no conda environment or venv of that name; looked in:\n  {places}",
        "give the base environment's path, or check `conda env list`",
    )
