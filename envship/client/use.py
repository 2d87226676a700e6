"""The public calls that switch workers: ``use_environment``,
``prepare_environment`` (the same up to the restart) and ``foreign`` (for an
environment no worker can run in). With a package list (``pip=``,
``requirements=``, ``lock=``, ``file=``) the first two build the environment
first (:mod:`envship.client.packages`).

Each is one :class:`envship.client.switch.Switch`, whose steps do the work;
this module only says which steps each call takes. ``client.use_environment``
and ``client.prepare_environment`` are these functions (see
:mod:`envship.client.methods`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from distributed import Client

from envship.errors import EnvshipError

from .foreign import ForeignEnvironment, hosts_no_worker
from .packages import build_spec, spec_for
from .report import SwitchReport, WorkerReport, timing
from .store import Artifact
from .switch import Switch, as_artifact, manifest_of


def use_environment(
    client: Client,
    env: Any = None,
    *,
    pip: Iterable[str] | str | None = None,
    requirements: str | os.PathLike | None = None,
    lock: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    file: str | os.PathLike | None = None,
    workers: Iterable[str] | None = None,
    strict: bool = True,
    timeout: float | None = None,
    progress: bool | None = None,
) -> SwitchReport | ForeignEnvironment:
    """Restart workers inside an environment, shipping it to their nodes first.

    An environment whose Python cannot host a worker (Python 2.7) is shipped
    and installed, nobody restarts, and tasks call into it instead: see
    :func:`foreign`.

    Parameters
    ----------
    client : distributed.Client
    env : str, path, Artifact or None
        A conda environment name or prefix, a venv path, an artifact or the
        name or id of one in the store; ``None`` goes back to the nannies' own
        environment. With a package list: the base it is built on.
    pip : list of str, optional
        Packages to add (``"scikit-learn==1.8.0"``, ``"./myproject"``): the
        environment ``env`` (or ``base``, or the client's own) plus these is
        built, packed and used. dask, distributed, cloudpickle, msgpack and
        toolz stay at the base's versions. The same list again builds nothing.
    requirements : path, optional
        A requirements.txt to add, as ``pip``.
    lock : path, optional
        A ``uv.lock`` or ``pylock.toml``: the exact set to install (alone).
    base : str or path, optional
        The environment a package list is built on, when ``env`` is not given;
        default the client's own (``sys.prefix``).
    file : path, optional
        An ``environment.yml``: its ``pip:`` part is added to ``pip``; its
        conda packages must already be in the base.
    workers : list of str, optional
        Worker addresses or names; default all.
    strict : bool
        Refuse an environment whose versions differ from the cluster's. With
        False, differences that may still work only warn.
    timeout : float, optional
        Seconds to wait for the whole switch.
    progress : bool, optional
        Progress bars; default when attached to a terminal or Jupyter.

    Returns
    -------
    SwitchReport
        Per worker: the environment id it runs in, seconds, ok or the error.
    ForeignEnvironment
        For a Python 2 environment: ``.call`` for tasks to run.

    Raises
    ------
    EnvshipError
        Before any restart when the environment is incompatible or cannot be
        shipped, or the arguments contradict each other (before anything is
        built); after all workers have settled when some could not start in
        it (those run in the nannies' own environment again).

    Examples
    --------
    >>> import envship
    >>> client.use_environment("sklearn-dev")  # doctest: +SKIP
    worker       environment    seconds  status
    0            5f0c2d9a1b7e      2.31  ok
    >>> client.use_environment(pip=["tabulate==0.8.10"])  # doctest: +SKIP
    >>> client.use_environment("sklearn-dev", requirements="requirements.txt")  # doctest: +SKIP
    """
    spec = spec_for(
        env, pip=pip, requirements=requirements, lock=lock, base=base, file=file
    )
    switch = Switch(
        client, workers=workers, strict=strict, timeout=timeout, progress=progress
    )
    if spec is not None:
        with timing(switch.stages, "build"):
            env = build_spec(spec, progress=switch.progress, archive=False)
    artifact = None if env is None else switch.pack(env)
    if artifact is not None and hosts_no_worker(manifest_of(artifact)):
        return _foreign(switch, artifact)
    return switch.to(artifact)


def prepare_environment(
    client: Client,
    env: Any = None,
    *,
    pip: Iterable[str] | str | None = None,
    requirements: str | os.PathLike | None = None,
    lock: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    file: str | os.PathLike | None = None,
    workers: Iterable[str] | None = None,
    strict: bool = True,
    timeout: float | None = None,
    progress: bool | None = None,
) -> SwitchReport:
    """Ship and install an environment on the workers' nodes; restart nobody.

    Workers keep running their tasks meanwhile. A ``use_environment`` of the
    same environment afterwards is a warm switch: a plain restart.

    Parameters
    ----------
    client : distributed.Client
    env : str, path or Artifact
        What ``use_environment`` takes (but not None without a package list).
    pip, requirements, lock, base, file
        A package list, as for :func:`use_environment`.
    workers, strict, timeout, progress
        As for :func:`use_environment`: the nodes of ``workers`` get it.

    Returns
    -------
    SwitchReport
        Per worker: the environment it still runs in; ``stages`` and
        ``transfer`` as for a switch.

    Examples
    --------
    >>> client.prepare_environment("sklearn-dev")  # doctest: +SKIP
    >>> client.use_environment("sklearn-dev")  # a restart only  # doctest: +SKIP
    """
    spec = spec_for(
        env, pip=pip, requirements=requirements, lock=lock, base=base, file=file
    )
    if env is None and spec is None:
        raise EnvshipError(
            "None",
            "there is nothing to prepare for the nannies' own environment",
            "name an environment, or call use_environment(None) to go back",
        )
    switch = Switch(
        client, workers=workers, strict=strict, timeout=timeout, progress=progress
    )
    if spec is not None:
        with timing(switch.stages, "build"):
            env = build_spec(spec, progress=switch.progress, archive=False)
    return switch.prepare(switch.pack(env))


def foreign(
    client: Client,
    env: Any,
    *,
    workers: Iterable[str] | None = None,
    strict: bool = True,
    timeout: float | None = None,
    progress: bool | None = None,
) -> ForeignEnvironment:
    """Ship and install ``env`` on the workers' nodes, for tasks to call into.

    For an environment whose Python cannot host a worker (Python 2.7, another
    Python 3): no worker restarts; only its platform must suit the nodes.
    Nodes that join later get it from their peers on their first call.
    ``use_environment`` does the same for a Python 2 environment.

    Parameters
    ----------
    client : distributed.Client
    env : str, path or Artifact
        What ``use_environment`` takes (but not None).
    workers, strict, timeout, progress
        As for :func:`prepare_environment`.

    Returns
    -------
    ForeignEnvironment
        ``.call(target, *args, **kwargs)`` is a function for tasks to run.

    Examples
    --------
    >>> py2 = envship.foreign(client, "py2-sklearn-dev")  # doctest: +SKIP
    >>> client.submit(py2.call, "legacy_model.fit_predict", X, y, X_new)  # doctest: +SKIP
    """
    switch = Switch(
        client, workers=workers, strict=strict, timeout=timeout, progress=progress
    )
    return _foreign(switch, switch.pack(env))


def _foreign(switch: Switch, artifact: Artifact) -> ForeignEnvironment:
    switch.prepare(artifact, call_only=True)
    return ForeignEnvironment(artifact.id, artifact.name, manifest_of(artifact).python)


__all__ = [
    "SwitchReport",
    "WorkerReport",
    "as_artifact",
    "foreign",
    "prepare_environment",
    "use_environment",
]
