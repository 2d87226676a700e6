"""What a nanny's worker starts in before any switch, as the node holds it.

A nanny that restarts (after its scheduler went away, or a reboot) starts
its first worker in the environment its worker last ran in, kept on the node
under the nanny's name (``<cache>/nannies/``, see
:class:`envship.node.layout.CacheLayout`), if the node still holds it; else
in the administrator's default environment (``envship.default-environment``);
else in the nanny's own.

Every target made here is installed in the node cache and leased for this
process. This module talks to nobody: the nanny's handlers
(:mod:`envship.node.nanny`) decide when to use it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Literal

from envship import config, policy
from envship.archive import check_id
from envship.errors import EnvshipError
from envship.files import write_json_atomic
from envship.manifest import Manifest, ThinManifest

from .cache import EnvCache
from .worker_process import TargetEnvironment

logger = logging.getLogger("envship")


def installed_target(
    cache: EnvCache, artifact_id: str, prefix: Path, name: str
) -> TargetEnvironment:
    """The installed environment ``artifact_id`` at ``prefix``, as a worker's target."""
    manifest = cache.manifest(artifact_id)
    return TargetEnvironment(
        id=artifact_id,
        prefix=Path(prefix),
        kind=_kind(manifest),
        name=name or (manifest.name if manifest else artifact_id),
        zygotes=cache.layout.zygotes(),
    )


def leased_target(cache: EnvCache, artifact_id: str, name: str) -> TargetEnvironment:
    """``artifact_id`` installed (if it was not) and leased for this process."""
    prefix = cache.ensure(artifact_id, lease_pid=os.getpid())
    return installed_target(cache, artifact_id, prefix, name)


def keep(cache: EnvCache, nanny_name: str, target: TargetEnvironment | None) -> None:
    """Remember on the node what the worker of ``nanny_name`` runs in (None: forget)."""
    path = cache.layout.nanny_record(nanny_name)
    if target is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(mode=0o700, exist_ok=True)
    record = {"nanny": nanny_name, "id": target.id, "name": target.name}
    write_json_atomic(path, record, indent=None)


def kept_target(cache: EnvCache, nanny_name: str) -> TargetEnvironment | None:
    """The environment kept for ``nanny_name``, if still installed here (leased)."""
    try:
        record = json.loads(cache.layout.nanny_record(nanny_name).read_text())
        artifact_id = check_id(record["id"])
        if record["nanny"] != nanny_name:
            return None
        if not cache.has(artifact_id):
            logger.info("envship: %s is no longer on this node", record["name"])
            return None
        policy.check(str(record["name"]), artifact_id)
        return leased_target(cache, artifact_id, str(record.get("name", "")))
    except (FileNotFoundError, ValueError, KeyError, TypeError, EnvshipError):
        return None


def default_target(cache: EnvCache) -> TargetEnvironment | None:
    """The administrator's default environment, installed and leased; None if unset.

    ``envship.default-environment`` is the path of an archive that
    ``envship pack`` wrote, its manifest next to it. The node copies it
    into its cache once and checks it like anything it is sent. A default
    that cannot be used is logged and the nanny's own environment used
    instead: the worker must come up.

    Examples
    --------
    >>> with dask.config.set({"envship.default-environment": path}):  # doctest: +SKIP
    ...     default_target(cache).name
    'sklearn-dev'
    """
    path = config.get("default-environment")
    if not path:
        return None
    try:
        artifact_id, manifest = read_packed(Path(path).expanduser())
        if not cache.has(artifact_id) and not cache.has_archive(artifact_id):
            cache.add_archive(artifact_id, Path(path).expanduser(), manifest)
        return leased_target(cache, artifact_id, manifest.name)
    except (OSError, ValueError, EnvshipError) as e:
        logger.warning(
            "envship: cannot use the default environment %s, so workers start "
            "in the nanny's own: %s",
            path,
            e,
        )
        return None


def read_packed(archive: Path) -> tuple[str, Manifest]:
    """The id (from the file name) and the manifest of an archive ``envship pack`` wrote."""
    if not archive.name.endswith(".tar.zst"):
        raise ValueError(
            f"{archive} is not an archive of `envship pack` (<id>.tar.zst)"
        )
    artifact_id = check_id(archive.name.removesuffix(".tar.zst"))
    manifest = Manifest.from_dict(
        json.loads(archive.with_name(f"{artifact_id}.json").read_text())
    )
    if manifest.id != artifact_id:
        raise ValueError(f"the manifest next to {archive} is that of {manifest.id}")
    return artifact_id, manifest


def _kind(manifest: Manifest | ThinManifest | None) -> Literal["conda", "venv"]:
    """The kind of an installed environment (its manifest checked it on install)."""
    if isinstance(manifest, Manifest) and manifest.kind == "venv":
        return "venv"
    return "conda"
