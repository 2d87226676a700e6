"""The Dask worker resource by which a worker says what environment it runs in.

A worker started inside environment ``<id>`` has the resource
``envship-<id>``; tasks that need it (``envship.environment``) ask for one
unit, so Dask's scheduler runs them only there. A worker has so many units
that they are never what limits it: its threads are.

Examples
--------
>>> resource_name("5f0c2d9a1b7e4c3d8e9f0a1b2c3d4e5f")
'envship-5f0c2d9a1b7e4c3d8e9f0a1b2c3d4e5f'
>>> environment_of({"GPU": 1, "envship-5f0c2d9a1b7e4c3d8e9f0a1b2c3d4e5f": 1048576})
'5f0c2d9a1b7e4c3d8e9f0a1b2c3d4e5f'
"""

from __future__ import annotations

PREFIX = "envship-"
#: Units of its environment's resource a worker has: more than it can ever use.
ENVIRONMENT_UNITS = 1 << 20


def resource_name(artifact_id: str) -> str:
    """The resource of the workers running in environment ``artifact_id``."""
    return PREFIX + artifact_id


def environment_of(resources: dict | None) -> str | None:
    """The id of the environment a worker with these resources runs in, if any."""
    for name in resources or ():
        if name.startswith(PREFIX):
            return name.removeprefix(PREFIX)
    return None
