"""The nanny side: comm handlers that receive and install artifacts, and the
plugin that switches a nanny's worker into an environment.

Artifacts never travel through the scheduler or inside a plugin: the client
(or a peer nanny) streams them straight to a nanny's ``envship_put`` handler,
and the plugin carries only an id, a name and the nannies to fetch from.

Turned on by ``dask worker --preload-nanny envship`` (``dask_setup`` in
``envship/__init__.py``) or, for nannies started without it, by the small
``NannySetup`` plugin that ``use_environment`` registers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path

from distributed.diagnostics.plugin import NannyPlugin
from distributed.protocol import to_serialize

from . import config
from .cache import EnvCache
from .environment import platform_facts
from .errors import EnvshipError
from .store import is_id
from .worker_process import TargetEnvironment, install, set_initial_target, switch

logger = logging.getLogger("envship")

HANDLERS = ("info", "put", "commit", "read", "install", "status")

#: nanny address -> the environment id its worker should run in, for every
#: nanny of this process: a lease is released only when none still uses it.
_targets: dict[str, str | None] = {}


def setup_nanny(nanny) -> NannySide:
    """Give ``nanny`` envship's handlers and worker process class. Idempotent."""
    side = getattr(nanny, "_envship", None)
    if side is None:
        side = NannySide(nanny)
        nanny._envship = side
        for name in HANDLERS:
            nanny.handlers[f"envship_{name}"] = getattr(side, name)
        install(nanny)
        logger.info("envship: nanny %s uses cache %s", nanny.address, side.cache.root)
    return side


def _checked(artifact_id: str) -> str:
    if not is_id(artifact_id):
        raise ValueError(f"not an artifact id: {artifact_id!r}")
    return artifact_id


class NannySide:
    """Per-nanny state: the node cache, uploads, the outcome of the last switch."""

    def __init__(self, nanny):
        self.nanny = nanny
        self.cache = EnvCache()
        self.last_switch: dict = {"ok": True, "error": None, "seconds": None}

    @property
    def node(self) -> str:
        """Nannies with the same node key share one cache, hence one copy."""
        st = os.stat(self.cache.root)
        return f"{os.uname().nodename}:{st.st_dev}:{st.st_ino}"

    def _upload_path(self, artifact_id: str, upload: str) -> Path:
        # <id>.<pid>.<random>.part: `envship cache gc` removes it once this
        # nanny is gone.
        name = f"{_checked(artifact_id)}.{os.getpid()}.{uuid.UUID(upload).hex}.part"
        return self.cache.root / "tmp" / name

    # -- comm handlers ------------------------------------------------------

    def info(self, artifact_id: str | None = None) -> dict:
        """Which node this nanny is on and whether it holds ``artifact_id``."""
        held = {}
        if artifact_id is not None:
            held = {
                "installed": self.cache.has(_checked(artifact_id)),
                "archive": self.cache.has_archive(artifact_id),
            }
        return {"node": self.node, "platform": platform_facts(), **held}

    def put(self, artifact_id: str, upload: str, offset: int, data) -> int:
        """Write one chunk of an upload at ``offset``."""
        fd = os.open(
            self._upload_path(artifact_id, upload), os.O_WRONLY | os.O_CREAT, 0o600
        )
        try:
            return os.pwrite(fd, data, offset)
        finally:
            os.close(fd)

    def commit(self, artifact_id: str, upload: str, size: int, manifest: dict) -> str:
        """Move a complete upload into the node cache."""
        path = self._upload_path(artifact_id, upload)
        received = path.stat().st_size if path.exists() else 0
        if received != size or manifest.get("id") != artifact_id:
            path.unlink(missing_ok=True)
            raise EnvshipError(
                manifest.get("name", artifact_id),
                f"the transfer to {self.nanny.address} was incomplete "
                f"({received} of {size} bytes)",
                "call use_environment again",
            )
        self.cache.adopt_archive(artifact_id, path, manifest)
        return "OK"

    def read(self, artifact_id: str, offset: int, length: int):
        """A chunk of a held archive (``length`` 0: its manifest), for peers."""
        if length == 0:
            return self.cache.manifest(_checked(artifact_id))
        with open(self.cache.archive_path(_checked(artifact_id)), "rb") as f:
            f.seek(offset)
            return to_serialize(f.read(length))

    async def install(self, artifact_id: str) -> dict:
        """Unpack a held archive into the node cache (once per node)."""
        started = time.perf_counter()
        await asyncio.to_thread(self.cache.ensure, _checked(artifact_id))
        return {"seconds": time.perf_counter() - started}

    def status(self) -> dict:
        """The outcome of the last switch and what the worker runs in now."""
        target = getattr(self.nanny.process, "target", None)
        return {
            **self.last_switch,
            "running": target.id if target else None,
            "worker": self.nanny.worker_address,
        }

    # -- used by the plugin -------------------------------------------------

    async def fetch(self, artifact_id: str, sources: list[str]) -> None:
        """Copy an archive from a nanny that holds it (for nannies that join later)."""
        chunk = config.chunk_size()
        for source in sources:
            if source == self.nanny.address:
                continue
            try:
                peer = self.nanny.rpc(source)
                manifest = await peer.envship_read(
                    artifact_id=artifact_id, offset=0, length=0
                )
                if manifest is None:
                    continue
                with self.cache.archive_writer(artifact_id, manifest) as f:
                    offset = 0
                    while data := await peer.envship_read(
                        artifact_id=artifact_id, offset=offset, length=chunk
                    ):
                        f.write(data)
                        offset += len(data)
                return
            except OSError as e:  # that peer left or lost it; try the next
                logger.info("envship: no %s from %s: %s", artifact_id, source, e)
        raise EnvshipError(
            artifact_id,
            "no nanny that holds this environment could be reached",
            "call use_environment again so that the client sends it",
        )

    async def target_for(self, wanted: dict) -> TargetEnvironment:
        """Make sure the node holds ``wanted`` unpacked; lease it for this process."""
        artifact_id = wanted["id"]
        if not self.cache.has(artifact_id) and not self.cache.has_archive(artifact_id):
            await self.fetch(artifact_id, wanted["sources"])
        prefix = await asyncio.to_thread(
            self.cache.ensure, artifact_id, lease_pid=os.getpid()
        )
        manifest = self.cache.manifest(artifact_id) or {}
        return TargetEnvironment(
            id=artifact_id,
            prefix=Path(prefix),
            kind=manifest.get("kind", "conda"),
            name=wanted["name"],
        )

    def _release_unused(self, *ids: str | None) -> None:
        """Drop this process's lease on environments none of its nannies use."""
        for artifact_id in ids:
            if artifact_id and artifact_id not in _targets.values():
                self.cache.release(artifact_id, os.getpid())

    async def switch(self, wanted: dict | None) -> None:
        started = time.perf_counter()
        previous = _targets.get(self.nanny.address)
        try:
            target = None if wanted is None else await self.target_for(wanted)
        except Exception as e:
            self.last_switch = {"ok": False, "error": str(e), "seconds": None}
            return
        _targets[self.nanny.address] = target.id if target else None
        if self.nanny.process is None:  # a nanny joining: its first worker
            set_initial_target(self.nanny, target)
            outcome = {"ok": True, "error": None}
        else:
            outcome = await switch(self.nanny, target, reason="envship-switch")
            if not outcome["ok"]:
                _targets[self.nanny.address] = None
        self._release_unused(previous, target.id if target else None)
        self.last_switch = {
            "ok": outcome["ok"],
            "error": outcome["error"],
            "seconds": time.perf_counter() - started,
        }


class NannySetup(NannyPlugin):
    """Installs envship's handlers on nannies started without ``--preload-nanny``."""

    name = "envship-setup"

    def setup(self, nanny):
        setup_nanny(nanny)


class UseEnvironment(NannyPlugin):
    """Switch nannies' workers into an environment (or back, with ``None``).

    Tiny on purpose: the scheduler keeps it and gives it to every nanny that
    joins later, which then fetches the archive from one of ``sources``.

    Parameters
    ----------
    environment : dict or None
        ``{"id": ..., "name": ...}`` of the artifact; None for the nannies'
        own environment.
    nannies : list of str, optional
        Addresses of the nannies to switch; None for all, joiners included.
    sources : list of str
        Nannies whose node holds the archive.

    Examples
    --------
    >>> plugin = UseEnvironment({"id": artifact.id, "name": "sklearn-dev"},
    ...                         sources=["tcp://127.0.0.1:40123"])  # doctest: +SKIP
    """

    name = "envship"

    def __init__(self, environment: dict | None, nannies=None, sources=()):
        self.environment = environment
        self.nannies = None if nannies is None else set(nannies)
        self.sources = list(sources)

    async def setup(self, nanny):
        side = setup_nanny(nanny)
        if self.nannies is not None and nanny.address not in self.nannies:
            return
        wanted = None
        if self.environment is not None:
            wanted = {**self.environment, "sources": self.sources}
        await side.switch(wanted)
