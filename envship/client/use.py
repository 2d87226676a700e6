"""The public calls that switch workers: ``use_environment``,
``prepare_environment`` (the same up to the restart) and ``foreign`` (for an
environment no worker can run in).

Each is one :class:`envship.client.switch.Switch`, whose steps do the work;
this module only says which steps each call takes. ``client.use_environment``
and ``client.prepare_environment`` are these functions (see
:mod:`envship.client.methods`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from distributed import Client

from envship.errors import EnvshipError

from .foreign import ForeignEnvironment, hosts_no_worker
from .report import SwitchReport, WorkerReport
from .store import Artifact
from .switch import Switch, as_artifact, manifest_of


def use_environment(
    client: Client,
    env: Any,
    *,
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
        environment.
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
        shipped; after all workers have settled when some could not start in
        it (those run in the nannies' own environment again).

    Examples
    --------
    >>> import envship
    >>> client.use_environment("sklearn-dev")  # doctest: +SKIP
    worker       environment    seconds  status
    0            5f0c2d9a1b7e      2.31  ok
    """
    switch = Switch(
        client, workers=workers, strict=strict, timeout=timeout, progress=progress
    )
    artifact = None if env is None else switch.pack(env)
    if artifact is not None and hosts_no_worker(manifest_of(artifact)):
        return _foreign(switch, artifact)
    return switch.to(artifact)


def prepare_environment(
    client: Client,
    env: Any,
    *,
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
        What ``use_environment`` takes (but not None).
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
    if env is None:
        raise EnvshipError(
            "None",
            "there is nothing to prepare for the nannies' own environment",
            "name an environment, or call use_environment(None) to go back",
        )
    switch = Switch(
        client, workers=workers, strict=strict, timeout=timeout, progress=progress
    )
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
