"""The nanny side: envship's handlers on a nanny, and the plugin that switches
its worker into an environment.

Blobs never travel through the scheduler or inside a plugin: the client and
peer nannies move them through the transfer handlers
(:class:`envship.transfer.BlobServer`), and the plugin carries only an id, a
name and which nannies to switch. A nanny that joins later asks the
scheduler's registry (:mod:`envship.scheduler.registry`) what its worker should run in
and who holds it now.

Turned on by ``dask worker --preload-nanny envship`` (``dask_setup`` in
``envship/__init__.py``) or, for nannies started without it, by the small
``NannySetup`` plugin that ``use_environment`` registers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

import dask.utils
from distributed.diagnostics.plugin import NannyPlugin

from envship import config, policy
from envship.errors import EnvshipError, MissingStoreFileError
from envship.identity import nanny_identity
from envship.ids import EnvId, ThinId, check_id
from envship.machine import platform_facts
from envship.manifest import ThinManifest
from envship.messages import (
    NannyStatus,
    Status,
    TransferState,
    ZygoteState,
    optional,
    serve,
)
from envship.registry_messages import Hold, Runs, Where, WhereAnswer
from envship.table import decode_keys, encode_bits
from envship.transfer import BlobServer, Download, Peer

from . import zygotes
from .cache import EnvCache
from .logs import route_envship_logs
from .messages import (
    Foreign,
    ForeignAnswer,
    GcAnswer,
    Info,
    InfoAnswer,
    Install,
    InstallAnswer,
    Lacks,
    LastSwitch,
    Wanted,
)
from .targets import default_target, installed_target, keep, kept_target
from .worker_process import (
    TargetEnvironment,
    bootstrap_script,
    child_environ,
    install,
    set_initial_target,
    switch,
)
from .zygote import runs_under

logger = logging.getLogger("envship")

#: The nanny's own handlers (``envship_<name>``) and the requests they take.
HANDLERS = {
    "info": Info,
    "lacks": Lacks,
    "install": Install,
    "status": Status,
    "gc": None,
    "foreign": Foreign,
}
#: Seconds before a nanny asks a scheduler without the registry again.
REGISTRY_RETRY = 30.0

#: nanny address -> the environment id its worker should run in, for every
#: nanny of this process: a lease is released only when none still uses it.
_targets: dict[str, EnvId | None] = {}
#: environment id -> until when (monotonic) the lease taken when it was
#: installed lasts, unless a switch into it takes over: no eviction between
#: the unpack and the restart of a switch, nor soon after a prepare.
_prepared: dict[str, float] = {}
PREPARED_LEASE = 600.0


def setup_nanny(nanny) -> NannySide:
    """Give ``nanny`` envship's handlers and worker process class. Idempotent.

    Before its first worker (a preload), a nanny that ran in an environment
    under the same name on this node starts its worker in it again: so a
    nanny restarted after its scheduler went away (a nanny closes then) comes
    back as it was, with or without a scheduler that knows.
    """
    side = getattr(nanny, "_envship", None)
    if side is None:
        route_envship_logs()
        side = NannySide(nanny)
        nanny._envship = side
        for name, request in HANDLERS.items():
            nanny.handlers[f"envship_{name}"] = serve(getattr(side, name), request)
        nanny.handlers.update(side.blobs.handlers())
        install(nanny)
        if nanny.process is None:
            side.resume()
        logger.info(
            "envship: nanny %s uses cache %s (%s)",
            nanny.address,
            side.cache.root,
            f"site {side.site}" if side.site else "no site set",
        )
    return side


class NannySide:
    """Per-nanny state: the node cache, transfers, the outcome of the last switch."""

    def __init__(self, nanny):
        self.nanny = nanny
        own = sys.prefix if config.get("cache.copy-from-own-environment") else None
        self.cache = EnvCache(own_environment=own)
        self.site = config.get("site")
        self.blobs = BlobServer(self.cache, nanny.rpc, nanny.address, self.site)
        self.blobs.on_event = self._report_holding
        self.last_switch = LastSwitch()
        self._reports: set[asyncio.Task] = set()  # held until sent
        self._registry_missing_until = 0.0
        self.running: dict = {"id": None, "since": time.time()}
        #: The administrator's default environment, once resolved: what
        #: ``use_environment(None)`` switches to.
        self.default_id: EnvId | None = None

    @property
    def identity(self) -> str:
        """What this nanny's worker goes by across its restarts.

        Its name; for a nanny started without one (whose worker takes its
        own address, new at each restart), the nanny's address. The client
        computes the same (:mod:`envship.identity`): the registry's rules
        and the records kept on the node use it.
        """
        return nanny_identity(self.nanny.name, self.nanny.address)

    @property
    def node(self) -> str:
        """Nannies with the same node key share one cache, hence one copy."""
        st = os.stat(self.cache.root)
        return f"{os.uname().nodename}:{st.st_dev}:{st.st_ino}"

    # -- comm handlers ------------------------------------------------------

    def info(self, request: Info) -> InfoAnswer:
        """Which node and site this nanny is on and whether it holds ``artifact_id``."""
        id = request.artifact_id
        return InfoAnswer(
            node=self.node,
            site=self.site,
            platform=platform_facts(),
            installed=None if id is None else self.cache.has(id),
            archive=None if id is None else self.cache.has_archive(id),
        )

    async def lacks(self, request: Lacks) -> bytes:
        """One bit per file: whether the node's file store lacks it.

        ``keys`` are store keys, as ``envship.table.encode_keys`` sends them.
        """
        names = decode_keys(request.keys)
        files = self.cache.files
        lacking = await asyncio.to_thread(files.lacking, names, request.own_only)
        return encode_bits(lacking)

    async def install(self, request: Install) -> InstallAnswer:
        """Unpack a held archive (or the held thin pack ``via``) into the node cache.

        Once per node. Returns the seconds it took and, if this call unpacked
        it, how many files it wrote and how many it linked from the node's
        file store.
        """
        started = time.perf_counter()
        artifact_id, via = request.artifact_id, request.via
        before = len(self.cache.installs(artifact_id))
        manifest = self.cache.manifest(artifact_id)
        if manifest is None and via is not None:
            manifest = self.cache.manifest(via)
        if manifest is not None:
            policy.check(manifest.name, artifact_id)
        prefix = await asyncio.to_thread(
            self.cache.ensure, artifact_id, via=via, lease_pid=os.getpid()
        )
        _prepared[artifact_id] = time.monotonic() + PREPARED_LEASE
        asyncio.get_running_loop().call_later(PREPARED_LEASE + 1, self._release_unused)
        records = self.cache.installs(artifact_id)
        done = records[-1] if len(records) > before else {}
        if not done:  # the switch that follows says so for each worker
            logger.debug(
                "envship: %s (%s) is unpacked in this node's cache already",
                manifest.name if manifest else "an environment",
                artifact_id[:12],
            )
        linked = done.get("linked_files", 0)
        process = install(self.nanny)
        env = manifest.env if isinstance(manifest, ThinManifest) else manifest
        if process is not None and env is not None and runs_under(env.python):
            # The switch that follows forks at once.
            process.warm_zygote(
                installed_target(self.cache, artifact_id, prefix, env.name)
            )
        return InstallAnswer(
            seconds=time.perf_counter() - started,
            written=done.get("files", linked) - linked,
            linked=linked,
        )

    async def status(self, request: Status) -> NannyStatus:
        """The last switch, what the worker runs in since when, transfers and
        the zygotes of this process.

        With ``cache``, also the node cache's use (a walk of its file store, in
        a thread): for ``envship.status``, not after every switch.
        """
        target = getattr(self.nanny.process, "target", None)
        size = await asyncio.to_thread(self.cache.size) if request.cache else None
        last = self.last_switch
        return NannyStatus(
            ok=last.ok,
            error=last.error,
            seconds=last.seconds,
            running=EnvId(target.id) if target else None,
            name=target.name if target else None,
            since=self.running["since"],
            default=self.default_id,
            worker=self.nanny.worker_address,
            node=self.node,
            site=self.site,
            cache_root=str(self.cache.root),
            cache_size=size,
            transfers=tuple(
                TransferState(
                    id=EnvId(d.offer.id),
                    name=d.offer.name,
                    have=d.count,
                    count=d.table.count,
                    bytes=d.table.size,
                    sources=tuple(sorted(d.received)),
                    error=d.error,
                )
                for d in self.blobs.downloads.values()
                if not d.done.is_set()
            ),
            zygotes=tuple(
                ZygoteState(EnvId(z["id"]), z["name"], z["pid"], z["rss"])
                for z in zygotes.states()
            ),
        )

    async def gc(self) -> GcAnswer:
        """Clean the node's cache: leftovers, dead leases, then evict to budget.

        Never evicts what a worker of the node runs in or a switch just
        installed.
        """
        evicted = await asyncio.to_thread(self.cache.gc)
        for artifact_id in evicted:
            zygotes.forget(self.cache.path(artifact_id))
        size = await asyncio.to_thread(self.cache.size)
        return GcAnswer(self.node, tuple(map(EnvId, evicted)), size)

    async def foreign(self, request: Foreign) -> ForeignAnswer:
        """Hold environment ``id`` for a bridge of this nanny's worker ``pid``.

        For calls into an environment whose Python cannot host a worker
        (``envship.foreign``): fetched and unpacked if the node lacks it,
        leased while the worker lives. Returns how to start the bridge: the
        environment's python, the variables a worker inside it would get, and
        the path of ``bootstrap/bridge.py``.
        """
        pid = request.pid
        if pid != self.nanny.pid:
            raise ValueError(f"pid {pid!r} is not this nanny's worker")
        target = await self.target_for(Wanted(request.id, request.name))
        self.cache.lease(target.id, pid)
        self._release_unused(target.id)  # what target_for leased for the nanny
        return ForeignAnswer(
            python=str(target.python),
            environ=child_environ(target, os.environ, self.nanny.env),
            script=str(bootstrap_script("bridge.py")),
        )

    # -- what this nanny runs in, kept on the node ------------------------------

    def resume(self) -> None:
        """Start the first worker in the environment kept for this nanny's identity.

        Only if it is still installed here; else in the administrator's
        default environment (``envship.default-environment``), else in the
        nanny's own.
        """
        target = kept_target(self.cache, self.identity) or self.default_target()
        if target is None:
            return
        set_initial_target(self.nanny, target)
        _targets[self.nanny.address] = EnvId(target.id)
        self.running = {"id": target.id, "since": time.time()}
        logger.info("envship: %s starts its worker in %s", self.identity, target.name)

    def default_target(self) -> TargetEnvironment | None:
        """The administrator's default environment, installed; None if unset.

        See :func:`envship.node.targets.default_target`; remembered as what
        ``use_environment(None)`` switches to.

        Examples
        --------
        >>> with dask.config.set({"envship.default-environment": path}):  # doctest: +SKIP
        ...     side.default_target().name
        'sklearn-dev'
        """
        target = default_target(self.cache)
        self.default_id = EnvId(target.id) if target else None
        return target

    # -- talking to the scheduler's registry ----------------------------------

    async def _registry(self, op: str, request: Hold | Runs | Where):
        """Call a registry handler; None if the scheduler has no registry.

        After a failure it is not asked again for a while: a scheduler without
        the registry logs every unknown call with a traceback.
        """
        if time.monotonic() < self._registry_missing_until:
            return None
        try:
            handler = getattr(self.nanny.scheduler, f"envship_{op}")
            return await handler(**request.to_msg())
        except Exception as e:  # no registry (no client switched yet), or gone
            logger.debug("envship: registry %s failed: %s", op, e)
            self._registry_missing_until = time.monotonic() + REGISTRY_RETRY
            return None

    async def _where(self, request: Where) -> WhereAnswer:
        """The registry's answer to ``request``; no offer if none or invalid."""
        answer = await self._registry("where", request)
        try:
            return WhereAnswer.from_msg(answer or {"offer": None, "holders": []})
        except ValueError as e:
            logger.warning("envship: the registry answered nonsense: %s", e)
            return WhereAnswer(None)

    def _report_holding(self, download: Download, event: str) -> None:
        complete = {"started": False, "complete": True, "failed": None}[event]
        hold = Hold(
            self.nanny.address, download.offer.id, complete, self.site, self.node
        )
        report = asyncio.ensure_future(self._registry("hold", hold))
        self._reports.add(report)
        report.add_done_callback(self._reports.discard)

    # -- used by the plugin -------------------------------------------------

    async def wanted_on_joining(self) -> Wanted | None:
        """What the registry says this nanny's first worker should run in."""
        offer = (await self._where(Where(name=self.identity))).offer
        if offer is None:
            return None
        if not isinstance(offer.manifest, ThinManifest):
            return Wanted(offer.id, offer.name)
        # Only a thin pack of it is held: get its base first.
        manifest = offer.manifest
        return Wanted(
            check_id(manifest.thin_of),
            offer.name,
            via=ThinId(offer.id),
            base=optional(check_id, manifest.base),
        )

    async def target_for(self, wanted: Wanted) -> TargetEnvironment:
        """Make sure the node holds ``wanted`` unpacked; lease it for this process.

        ``wanted`` may name a thin pack (``via``) and the ``base`` whose files
        it refers to: the base is fetched and unpacked first, so that the
        node's file store holds them. A thin pack without a base refers to
        files of the nodes' own environments: a node whose own environment
        lacks some cannot install it without the client.
        """
        artifact_id, name, via = wanted.id, wanted.name, wanted.via
        policy.check(name, artifact_id)
        if self.cache.has(artifact_id):
            state = "unpacked in this node's cache already"
        elif self.cache.has_archive(artifact_id) or (
            via is not None and self.cache.has_archive(via)
        ):
            state = "its archive is in this node's cache"
        else:
            state = "this node lacks it: fetching it from the nodes that hold it"
        logger.info(
            "envship: %s (%s) for %s: %s",
            name,
            artifact_id[:12],
            self.identity,
            state,
        )
        if not self.cache.has(artifact_id) and not self.cache.has_archive(artifact_id):
            if via is None:
                await self.fetch(artifact_id, name)
            else:
                base = wanted.base
                if base is not None and not self.cache.has(base):
                    if not self.cache.has_archive(base):
                        await self.fetch(base, f"{name} (its base)")
                    await asyncio.to_thread(self.cache.ensure, base)
                if not self.cache.has_archive(via):
                    await self.fetch(via, name)
        try:
            prefix = await asyncio.to_thread(
                self.cache.ensure, artifact_id, lease_pid=os.getpid(), via=via
            )
        except MissingStoreFileError as e:
            if via is None or wanted.base is not None:
                raise
            raise EnvshipError(
                name,
                "this node joined later and its own environment lacks files of "
                f"it ({e.problem}); only a thin pack of it exists on the cluster",
                "call use_environment again so that the client sends it",
            ) from e
        return installed_target(self.cache, artifact_id, prefix, name)

    async def fetch(self, artifact_id: EnvId, name: str) -> None:
        """Get an archive from the nodes that hold it now (no client involved)."""
        where = await self._where(Where(id=artifact_id))
        if where.offer is None:
            raise EnvshipError(
                name,
                "this node lacks it and the scheduler knows no node that holds it",
                "call use_environment again so that the client sends it",
            )
        stall = dask.utils.parse_timedelta(config.get("transfer.stall-timeout"))

        async def holders_now() -> list[Peer]:
            return [h.peer for h in (await self._where(Where(id=artifact_id))).holders]

        holders = [h.peer for h in where.holders]
        await self.blobs.fetch(where.offer, holders, stall, more_peers=holders_now)

    def _release_unused(self, *ids: str | None) -> None:
        """Drop this process's lease on environments none of its nannies use.

        Also on those installed more than ``PREPARED_LEASE`` seconds ago that
        no switch took over.
        """
        now = time.monotonic()
        expired = [id for id, until in _prepared.items() if until <= now]
        for artifact_id in expired:
            del _prepared[artifact_id]
        for unused in {*ids, *expired}:
            if unused and unused not in _targets.values() and unused not in _prepared:
                self.cache.release(unused, os.getpid())

    async def switch(self, wanted: Wanted | None) -> None:
        started = time.perf_counter()
        previous = _targets.get(self.nanny.address)
        try:
            if wanted is None:
                target = await asyncio.to_thread(self.default_target)
            else:
                target = await self.target_for(wanted)
        except Exception as e:
            logger.warning("envship: cannot switch to %s: %s", wanted, e)
            self.last_switch = LastSwitch.failed(e)
            return
        _targets[self.nanny.address] = EnvId(target.id) if target else None
        if target is not None:
            _prepared.pop(target.id, None)  # the switch's own lease takes over
        if self.nanny.process is None:  # a nanny joining: its first worker
            set_initial_target(self.nanny, target)
            outcome: dict = {"ok": True, "error": None}
        else:
            outcome = await switch(self.nanny, target, reason="envship-switch")
            if not outcome["ok"]:
                _targets[self.nanny.address] = None
                logger.warning(
                    "envship: the worker of %s could not start in %s: %s",
                    self.nanny.address,
                    target.name if target else "the nanny's own environment",
                    outcome["error"],
                )
        self._release_unused(previous, target.id if target else None)
        running = _targets[self.nanny.address]
        try:  # the administrator's default is not kept: it may change
            kept = target if running and wanted is not None else None
            keep(self.cache, self.identity, kept)
        except OSError as e:
            logger.warning("envship: could not keep what %s runs: %s", self.identity, e)
        if running != self.running["id"]:
            self.running = {"id": running, "since": time.time()}
        name = target.name if target and running else None
        await self._registry("runs", Runs(self.nanny.address, running, name))
        self.last_switch = LastSwitch(
            outcome["ok"], outcome["error"], time.perf_counter() - started
        )


class NannySetup(NannyPlugin):
    """Installs envship's handlers on nannies started without ``--preload-nanny``."""

    name = "envship-setup"

    def setup(self, nanny):
        setup_nanny(nanny)


class UseEnvironment(NannyPlugin):
    """Switch nannies' workers into an environment (or back, with ``None``).

    Tiny on purpose: the scheduler keeps it and gives it to every nanny that
    joins later. Such a nanny ignores what it carries and asks the scheduler's
    registry what its first worker should run in (the cluster default, or a
    rule for its worker name), then fetches it from whichever nodes hold it.

    Parameters
    ----------
    environment : dict or None
        ``{"id": ..., "name": ...}`` of the artifact (a
        :class:`envship.node.messages.Wanted`'s ``to_msg()``, checked on
        the nanny); None for the nannies' own environment. The nodes hold
        its archive already.
    nannies : list of str, optional
        Addresses of the nannies to switch; None for all.

    Examples
    --------
    >>> plugin = UseEnvironment({"id": artifact.id, "name": "sklearn-dev"})  # doctest: +SKIP
    """

    name = "envship"

    def __init__(self, environment: dict | None, nannies=None):
        self.environment = environment
        self.nannies = None if nannies is None else set(nannies)

    async def setup(self, nanny):
        side = setup_nanny(nanny)
        if nanny.process is None:  # joining (or back after a reboot)
            await side.switch(await side.wanted_on_joining())
        elif self.nannies is None or nanny.address in self.nannies:
            env = self.environment
            await side.switch(None if env is None else Wanted.from_msg(env))
