"""What a worker started in another environment runs with.

The environment itself (:class:`TargetEnvironment`), the script its python
runs (:func:`bootstrap_script`) and the variables of its process
(:func:`child_environ`): those of the nanny less whatever would steer the
environment's python back to the nanny's packages. Used by
:mod:`envship.node.worker_process` to start workers and by the nanny to start
bridges; it touches no distributed internals and starts nothing.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: Variables of the nanny's environment that would make the environment's
#: python load the nanny's packages or startup code. CONDA_* goes too.
DROPPED_VARIABLES = (
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PYTHONUSERBASE",
    "PYTHONEXECUTABLE",
    "VIRTUAL_ENV",
)

#: Conda's variables of the nanny's activated environment (``CONDA_*``, and
#: ``_CONDA_ROOT``, ``_CONDA_EXE``, ``_CE_*`` of its shell functions): they
#: describe the nanny's installation, not the worker's environment.
CONDA_VARIABLES = ("CONDA_", "_CONDA_", "_CE_")

#: The PYTHON* variables of the nanny's process environment that a worker in
#: another environment still gets. Others (PYTHONWARNINGS, PYTHONPYCACHEPREFIX,
#: PYTHONSAFEPATH, ...) were meant for the nanny's interpreter; set them for
#: workers explicitly (``distributed.nanny.environ``) to pass them on.
KEPT_PYTHON_VARIABLES = (
    "PYTHONHASHSEED",
    "PYTHONUNBUFFERED",
    "PYTHONFAULTHANDLER",
    "PYTHONIOENCODING",
)


@dataclass(frozen=True)
class TargetEnvironment:
    """An unpacked environment that a nanny's worker can run in.

    Parameters
    ----------
    id : str
        The environment's content id.
    prefix : Path
        Where it is unpacked; its python is ``<prefix>/bin/python``.
    kind : {"conda", "venv"}
        Sets ``CONDA_PREFIX`` or ``VIRTUAL_ENV`` for the worker.
    name : str
        A name for people, used in messages.
    zygotes : Path, optional
        Where the nannies of the node meet the zygote of this environment
        (the node cache's ``zygotes/``); None: each nanny process starts its
        own.
    """

    id: str
    prefix: Path
    kind: Literal["conda", "venv"]
    name: str
    zygotes: Path | None = None

    @property
    def python(self) -> Path:
        return Path(self.prefix) / "bin" / "python"


def bootstrap_script(name: str = "worker.py") -> Path:
    """The path of ``bootstrap/<name>``, which an environment's python runs.

    ``worker.py`` runs a worker; ``bridge.py`` serves a worker's calls into
    an environment whose Python cannot host one.
    """
    script = importlib.resources.files("envship._bootstrap") / name
    if not isinstance(script, os.PathLike):
        # A python must run it from a file: envship is never run from a zip.
        raise RuntimeError(f"{script} is not a file on disk")
    return Path(os.fspath(script))


def _inside(path: str, prefix: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(prefix)
    except (OSError, ValueError):
        return False


def child_environ(
    target: TargetEnvironment,
    inherited: Mapping[str, str],
    explicit: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment variables of a worker that runs in ``target``.

    ``inherited`` (the nanny's process environment) less what would steer
    the environment's python back to the nanny's packages and less the
    ``PYTHON*`` settings meant for the nanny's own interpreter (but
    :data:`KEPT_PYTHON_VARIABLES`); then ``explicit`` (what the nanny is
    configured to give its workers), less what would steer it back; with
    ``<prefix>/bin`` first on PATH.
    """
    env = {
        k: v
        for k, v in inherited.items()
        if not k.startswith(("PYTHON", *CONDA_VARIABLES)) or k in KEPT_PYTHON_VARIABLES
    }
    env.update(explicit or {})
    for k in [
        k for k in env if k in DROPPED_VARIABLES or k.startswith(CONDA_VARIABLES)
    ]:
        del env[k]
    prefix = Path(target.prefix)
    bin_dir = str(prefix / "bin")
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bin_dir]
    env["PATH"] = os.pathsep.join([bin_dir, *path])
    if target.kind == "conda":
        env["CONDA_PREFIX"] = str(prefix)
    else:
        env["VIRTUAL_ENV"] = str(prefix)

    # Libraries of the nanny's own prefix would shadow the environment's.
    nanny_prefix = Path(sys.prefix).resolve()
    target_prefix = prefix.resolve()
    library_path = [
        p
        for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep)
        if p and (not _inside(p, nanny_prefix) or _inside(p, target_prefix))
    ]
    if library_path:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(library_path)
    else:
        env.pop("LD_LIBRARY_PATH", None)
    return env
