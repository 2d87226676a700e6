"""``envship.environment(...)``: run tasks only on workers inside an environment.

Through Dask's own means: a worker inside environment ``<id>`` has the
resource ``envship-<id>`` (see :mod:`envship.resources`), and tasks submitted
in the block are annotated to need one unit of it, so the scheduler runs them
there and nowhere else, whatever other users switch meanwhile.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import dask
from distributed import Client, default_client

from envship.errors import EnvshipError
from envship.resources import environment_of, resource_name

from .packages import build_spec, spec_for
from .store import Artifact
from .use import as_artifact, use_environment


@contextmanager
def environment(
    env: Any = None,
    client: Client | None = None,
    *,
    pip: Iterable[str] | str | None = None,
    requirements: str | os.PathLike | None = None,
    lock: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    file: str | os.PathLike | None = None,
    workers: int | None = None,
    strict: bool = True,
    timeout: float | None = None,
    progress: bool | None = None,
) -> Iterator[Artifact]:
    """Run the tasks submitted in the block only on workers inside ``env``.

    Parameters
    ----------
    env : str, path or Artifact
        What ``use_environment`` takes (but not None).
    client : distributed.Client, optional
        Default: the current client.
    pip, requirements, lock, base, file
        A package list, built first, as for ``use_environment``.
    workers : int, optional
        Make sure at least this many workers run in it, switching idle ones
        (workers with no task, those in the nannies' own environment first).
        Without it, the environment must run somewhere already.
    strict, timeout, progress
        As for ``use_environment``, for the switch of idle workers.

    Yields
    ------
    Artifact
        The environment; tasks need the resource ``envship-<its id>``.

    Raises
    ------
    EnvshipError
        No worker runs in it (and ``workers`` was not given), or too few
        workers are idle to switch.

    Examples
    --------
    >>> with envship.environment("sklearn-dev"):  # doctest: +SKIP
    ...     futures = client.map(fit, datasets)
    >>> with envship.environment("sklearn-dev", workers=2):  # doctest: +SKIP
    ...     model = client.submit(fit, data).result()
    """
    client = client or default_client()
    spec = spec_for(
        env, pip=pip, requirements=requirements, lock=lock, base=base, file=file
    )
    if spec is not None:
        env = build_spec(spec, progress=bool(progress), archive=False)
    if env is None:
        raise EnvshipError(
            "None",
            "tasks cannot ask for the nannies' own environment",
            "name an environment, or submit the tasks outside the block",
        )
    artifact = as_artifact(env, bool(progress))
    running = _workers(client)
    inside = [name for name, found in running.items() if found["id"] == artifact.id]
    if workers is not None and len(inside) < workers:
        chosen = _idle(client, running, artifact, workers - len(inside))
        use_environment(
            client,
            artifact,
            workers=chosen,
            strict=strict,
            timeout=timeout,
            progress=progress,
        )
    elif not inside:
        raise EnvshipError(
            artifact.name,
            "no worker runs in it, so tasks that need it would wait forever",
            f"switch workers first (client.use_environment({artifact.name!r}, "
            f"workers=[...])), or ask for some: envship.environment("
            f"{artifact.name!r}, workers=2)",
        )
    with dask.annotate(resources={resource_name(artifact.id): 1}):
        yield artifact


def _workers(client: Client) -> dict[str, dict]:
    """Worker name -> its address and the id of the environment it runs in."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    return {
        str(w["name"]): {"address": a, "id": environment_of(w.get("resources"))}
        for a, w in info.items()
    }


def _idle(client: Client, running: dict, artifact: Artifact, count: int) -> list[str]:
    """Names of ``count`` workers with no task, those in no environment first."""
    processing = client.processing()
    idle = [
        name
        for name, w in running.items()
        if w["id"] != artifact.id and not processing.get(w["address"])
    ]
    idle.sort(key=lambda name: running[name]["id"] is not None)
    if len(idle) < count:
        raise EnvshipError(
            artifact.name,
            f"{count} more workers should run in it, but only {len(idle)} are idle",
            "wait for tasks to finish, ask for fewer workers, or switch "
            "workers yourself with use_environment(..., workers=[...])",
        )
    return idle[:count]
