"""Run uv: resolve a package list against pins, and install into a prefix.

Only this module knows uv's command line. It never installs into the base
environment: resolving reads the base's interpreter, installing is given the
clone's.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from envship.errors import EnvshipError


def uv_binary() -> str:
    """The uv executable that came with envship's ``uv`` dependency.

    Examples
    --------
    >>> os.path.basename(uv_binary())
    'uv'
    """
    from uv import find_uv_bin

    return find_uv_bin()


def compile_requirements(
    python: Path,
    inputs: Sequence[str],
    constraints: Path,
    index_args: Sequence[str],
    subject: str,
) -> list[str]:
    """``uv pip compile``: the pinned requirement lines for ``inputs``.

    ``inputs`` are file paths uv reads (a requirements file, or one written
    from the package list).
    """
    command = [
        uv_binary(), "pip", "compile", "--quiet", "--no-header",
        "--no-annotate", "--python", str(python),
        "--constraint", str(constraints), *inputs, *index_args,
    ]  # fmt: skip
    return _lines(_run(command, subject, "resolve"))


def export_lock(project: Path, index_args: Sequence[str], subject: str) -> list[str]:
    """``uv export``: the pinned lines a ``uv.lock`` holds, without resolving."""
    command = [
        uv_binary(), "export", "--quiet", "--format", "requirements-txt",
        "--frozen", "--no-hashes", "--no-header", "--no-annotate",
        "--no-emit-project", "--directory", str(project), *index_args,
    ]  # fmt: skip
    return _lines(_run(command, subject, "read the lock of"))


def install(
    python: Path,
    requirements: Path,
    constraints: Path | None,
    index_args: Sequence[str],
    subject: str,
    *,
    no_deps: bool = False,
) -> None:
    """``uv pip install`` the lines of ``requirements`` into ``python``'s prefix.

    ``--link-mode=copy``: files from uv's cache are copied, so nothing in the
    new environment is shared with uv's cache either. ``constraints`` None:
    none (uv refuses them with a ``pylock.toml``, whose pins were checked).
    """
    constrain = ["--constraint", str(constraints)] if constraints else []
    command = [
        uv_binary(), "pip", "install", "--quiet", "--python", str(python),
        "--link-mode=copy", *constrain,
        "-r", str(requirements), *(["--no-deps"] if no_deps else []), *index_args,
    ]  # fmt: skip
    _run(command, subject, "install into")


def _run(command: list[str], subject: str, doing: str) -> str:
    env = dict(os.environ)
    # uv would otherwise prefer an activated environment to --python.
    env.pop("VIRTUAL_ENV", None)
    env.pop("CONDA_PREFIX", None)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise UvError(subject, doing, done.stderr.strip() or done.stdout.strip())
    return done.stdout


def _lines(output: str) -> list[str]:
    lines = []
    for line in output.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith(("#", "-")):
            lines.append(line)
    return lines


class UvError(EnvshipError):
    """uv could not resolve or install; its message says why."""

    def __init__(self, subject: str, doing: str, message: str):
        self.message = message
        super().__init__(
            subject,
            f"uv could not {doing} it:\n{message}",
            "check the package names and versions, and that the index (or "
            "--find-links folder) has them",
        )

    def __reduce__(self) -> tuple[type[EnvshipError], tuple[Any, ...]]:
        # Unpickled as a plain EnvshipError: its text is all it carries.
        return EnvshipError, (self.env, self.problem, self.fix, self.subject)


_CONFLICT = re.compile(
    r"\b([A-Za-z0-9][A-Za-z0-9._-]*)\s*(===|==|!=|~=|<=|>=|<|>)\s*([0-9][^\s,;]*)"
)


def pinned_names_in(message: str, pins: dict[str, str]) -> list[str]:
    """The pinned packages a uv conflict message asks for at another version.

    Examples
    --------
    >>> pinned_names_in("you require distributed==2024.1.0 and distributed==2026.8.0",
    ...                 {"distributed": "2026.8.0"})
    ['distributed']
    >>> pinned_names_in("you require dask<2025 and dask==2026.8.0", {"dask": "2026.8.0"})
    ['dask']
    >>> pinned_names_in("you require dask==2026.8.0", {"dask": "2026.8.0"})
    []
    """
    found = []
    for name, operator, version in _CONFLICT.findall(message):
        key = name.lower().replace("_", "-")
        exact = operator in ("==", "===") and version.rstrip(".") == pins.get(key)
        if key in pins and not exact and key not in found:
            found.append(key)
    return found
