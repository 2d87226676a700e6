"""envship: ship packed environments to Dask workers and restart them inside.

Examples
--------
>>> import envship
>>> artifact = envship.pack("sklearn-dev")  # doctest: +SKIP
>>> artifact = envship.build(pip=["tabulate==0.8.10"])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Awaitable

from envship.client.foreign import ForeignEnvironment
from envship.client.gc import gc
from envship.client.methods import add_client_methods
from envship.client.pack import pack
from envship.client.packages import build
from envship.client.report import SwitchReport, WorkerReport
from envship.client.status import ClusterStatus, status
from envship.client.store import Artifact, ArtifactStore
from envship.client.tasks import environment
from envship.client.use import foreign, prepare_environment, use_environment
from envship.errors import EnvshipError

from . import config as _config  # noqa: F401  (registers the config defaults)

# The one place envship changes a class of distributed: ``client.use_environment``
# and ``client.prepare_environment`` (see envship.client.methods).
add_client_methods()

#: ``envship.prepare(client, env)``: ship and install without restarting anyone.
prepare = prepare_environment

__all__ = [
    "Artifact",
    "ArtifactStore",
    "ClusterStatus",
    "EnvshipError",
    "ForeignEnvironment",
    "SwitchReport",
    "WorkerReport",
    "build",
    "environment",
    "foreign",
    "gc",
    "pack",
    "prepare",
    "prepare_environment",
    "status",
    "use_environment",
]


def dask_setup(server: object) -> Awaitable[None] | None:
    """Preload hook for nannies and schedulers.

    ``dask worker --nanny --preload-nanny envship`` gives the nanny envship's
    handlers and its worker process class, so that ``client.use_environment``
    can switch its worker. ``dask scheduler --preload envship`` starts the
    registry that tells nannies joining later which environment to run in
    (clients register it themselves otherwise).
    """
    from distributed import Nanny, Scheduler

    if isinstance(server, Scheduler):
        from envship.scheduler.registry import Registry

        return server.register_scheduler_plugin(
            Registry(), name=Registry.name, idempotent=True
        )
    if not isinstance(server, Nanny):
        raise TypeError(
            "envship is a nanny or scheduler preload: use `--preload-nanny "
            "envship` on workers, not `--preload envship`"
        )
    from envship.node.nanny import setup_nanny

    setup_nanny(server)
    return None
