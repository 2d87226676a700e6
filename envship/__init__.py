"""envship: ship packed environments to Dask workers and restart them inside.

Examples
--------
>>> import envship
>>> artifact = envship.pack("sklearn-dev")  # doctest: +SKIP
"""

from __future__ import annotations

from . import config as _config  # noqa: F401  (registers the config defaults)
from .client import SwitchReport, WorkerReport, use_environment
from .errors import EnvshipError
from .pack import pack
from .store import Artifact, ArtifactStore

__all__ = [
    "Artifact",
    "ArtifactStore",
    "EnvshipError",
    "SwitchReport",
    "WorkerReport",
    "pack",
    "use_environment",
]


def dask_setup(nanny):
    """Preload hook: ``dask worker --nanny --preload-nanny envship``.

    Gives the nanny envship's handlers and its worker process class so that
    ``client.use_environment`` can switch its worker.
    """
    from distributed import Nanny

    if not isinstance(nanny, Nanny):
        raise TypeError(
            "envship is a nanny preload: use `--preload-nanny envship`, not "
            "`--preload envship`"
        )
    from .nanny import setup_nanny

    setup_nanny(nanny)
