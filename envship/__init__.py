"""envship: ship packed environments to Dask workers and restart them inside.

Examples
--------
>>> import envship
>>> artifact = envship.pack("sklearn-dev")  # doctest: +SKIP
"""

from __future__ import annotations

from . import config as _config  # noqa: F401  (registers the config defaults)
from .errors import EnvshipError
from .pack import pack
from .store import Artifact, ArtifactStore

__all__ = ["Artifact", "ArtifactStore", "EnvshipError", "pack"]
