"""``client.use_environment``: pack, check, ship, switch, wait, report;
``client.prepare_environment``: the same up to the switch.

Runs on the client. Packing happens in the calling thread (it is a cache hit
when the environment is unchanged); everything that talks to the cluster runs
on the client's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

from dask.utils import format_bytes
from distributed import Client
from distributed.comm import CommClosedError, get_address_host_port
from distributed.core import clean_exception
from distributed.protocol.pickle import dumps

from envship import config, policy
from envship.errors import EnvshipError, MissingStoreFileError
from envship.manifest import ThinManifest
from envship.node.nanny import NannySetup, UseEnvironment
from envship.nodes import one_nanny_per_node
from envship.scheduler.registry import Registry
from envship.transfer import Offer, Peer, ShipReport, broadcast

from . import delta
from .compat import check_compatibility
from .foreign import ForeignEnvironment, hosts_no_worker
from .pack import pack
from .progress import progress_bar
from .store import Artifact, ArtifactStore

PLUGIN_NAME = "envship"
#: Seconds for a nanny to say how its switch went; to wait for the workers of
#: a switch whose plugin call the scheduler dropped (a nanny died in it).
STATUS_TIMEOUT, SETTLE_TIMEOUT = 10.0, 20.0


@dataclass(frozen=True)
class WorkerReport:
    """How one worker's switch went."""

    name: str
    nanny: str
    address: str | None
    environment: str | None  # the id it runs in; None: the nannies' own
    seconds: float
    ok: bool
    error: str | None = None


class SwitchReport(dict):
    """Worker name -> ``WorkerReport``, shown as a table.

    ``stages`` holds the seconds spent packing, checking, shipping, unpacking
    and restarting; ``transfer`` the bytes the client sent and, per fetching
    nanny, where its bytes came from (a :class:`envship.transfer.ShipReport`);
    ``unpacked``, per node that unpacked it now (one nanny's address), the
    files written and the files linked from the node's file store.
    """

    stages: dict[str, float]
    transfer: ShipReport | None = None
    unpacked: dict[str, dict] | None = None
    gone: tuple[str, ...] = ()  # workers whose nanny left during the call

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.values())

    def __repr__(self) -> str:
        lines = [f"{'worker':<12} {'environment':<14} {'seconds':>7}  status"]
        for name, r in sorted(self.items(), key=lambda kv: str(kv[0])):
            env = r.environment[:12] if r.environment else "(nanny's own)"
            status = "ok" if r.ok else f"FAILED: {r.error}"
            lines.append(f"{str(name):<12} {env:<14} {r.seconds:>7.2f}  {status}")
        stages = getattr(self, "stages", {})
        if stages:
            lines.append(", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
        if self.transfer is not None and self.transfer.nodes:
            lines.append(
                f"shipped to {len(self.transfer.nodes)} node(s); the client sent "
                f"{format_bytes(self.transfer.client_bytes)}"
            )
        unpacked = {
            n: u
            for n, u in (self.unpacked or {}).items()
            if u["written"] or u["linked"]
        }
        if unpacked:
            written = sum(u["written"] for u in unpacked.values())
            linked = sum(u["linked"] for u in unpacked.values())
            lines.append(
                f"unpacked on {len(unpacked)} node(s): {written} files written, "
                f"{linked} linked from the nodes' file stores"
            )
        return "\n".join(lines)


def use_environment(
    client: Client,
    env,
    *,
    workers=None,
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
    call = _Call(client, timeout, progress)
    artifact = None if env is None else call.pack(env)
    if artifact is not None and hosts_no_worker(artifact.manifest):
        return _foreign(call, artifact, workers, strict)
    label = artifact.name if artifact else "the nannies' own environment"
    with call.stage("check"):
        targets, infos, lost = call.run(
            _check(client, artifact, workers, strict, label)
        )
    if lost:
        warnings.warn(
            f"switching to {label} restarts workers that alone hold {lost} "
            "keys (scattered data or persisted results): futures of computed "
            "results will be recomputed, scattered data is lost",
            stacklevel=2,
        )
    owner = f"{client.id}/{uuid.uuid4().hex}"
    call.run(_claim(client, owner, targets, label))
    try:
        report = call.run(
            _switch(
                client,
                artifact,
                workers,
                targets,
                infos,
                call.progress,
                label,
                call.stages,
            )
        )
    finally:
        with contextlib.suppress(Exception):  # it ends with the client anyway
            client.sync(client.scheduler.envship_release, owner=owner)
    _warn_left_out(report, "switched")
    return report


def prepare_environment(
    client: Client,
    env,
    *,
    workers=None,
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
    call = _Call(client, timeout, progress)
    return _prepare(call, call.pack(env), workers, strict)


def foreign(
    client: Client,
    env,
    *,
    workers=None,
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
    call = _Call(client, timeout, progress)
    return _foreign(call, call.pack(env), workers, strict)


def _foreign(call, artifact, workers, strict) -> ForeignEnvironment:
    _prepare(call, artifact, workers, strict, call_only=True)
    return ForeignEnvironment(artifact.id, artifact.name, artifact.manifest.python)


def _prepare(call, artifact, workers, strict, call_only=False) -> SwitchReport:
    client = call.client
    with call.stage("check"):
        targets, infos, _ = call.run(
            _check(client, artifact, workers, strict, artifact.name, call_only)
        )
    started = time.perf_counter()
    shipped, unpacked = call.run(
        _deliver(client, artifact, targets, infos, call.progress, call.stages)
    )
    report = call.run(
        _report(client, targets, time.perf_counter() - started, prepared=True)
    )
    report.stages, report.transfer, report.unpacked = call.stages, shipped, unpacked
    report.transfer.left_out.extend(report.gone)
    _warn_left_out(report, "prepared")
    return report


class _Call:
    """One public call: its deadline, its progress setting, its stage times."""

    def __init__(self, client: Client, timeout: float | None, progress: bool | None):
        self.client = client
        self.deadline = None if timeout is None else time.monotonic() + timeout
        if progress is None:
            progress = sys.stderr.isatty() or "ipykernel" in sys.modules
        self.progress = progress
        self.stages: dict[str, float] = {}

    def run(self, coro):
        """Run ``coro`` on the client's loop within what is left of the timeout."""
        left = self.deadline
        if left is not None:
            left = max(left - time.monotonic(), 0)
        return self.client.sync(asyncio.wait_for, coro, left)

    @contextmanager
    def stage(self, name: str):
        with _stage(self.stages, name):
            yield

    def pack(self, env) -> Artifact:
        with self.stage("pack"):
            return as_artifact(env, self.progress)


def _warn_left_out(report: SwitchReport, done: str) -> None:
    if report.transfer is not None and report.transfer.left_out:
        warnings.warn(
            f"not {done}: workers {', '.join(report.transfer.left_out)}, whose "
            "nanny left the cluster during the call",
            stacklevel=3,
        )


@contextmanager
def _stage(stages: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    stages[name] = stages.get(name, 0.0) + time.perf_counter() - start


def as_artifact(env, progress: bool) -> Artifact:
    if isinstance(env, Artifact):
        return env
    return pack(env, progress=progress, archive=False)


async def _check(client, artifact, workers, strict, label, call_only=False):
    """Everything that must hold before anything moves or restarts."""
    targets = await _targets(client, workers, label)
    infos = await _nanny_side(client, targets, artifact, label)
    await _ensure_registry(client, label)
    if artifact is not None:
        # The scheduler's policy, before anything is shipped.
        policy.check(
            artifact.name, artifact.id, await client.scheduler.envship_policy()
        )
        versions = await client.scheduler.versions(packages=[])
        check_compatibility(
            artifact.name,
            artifact.manifest,
            client_python=".".join(map(str, sys.version_info[:3])),
            scheduler_packages=versions["packages"],
            node_platforms=[info["platform"] for info in infos.values()],
            strict=strict,
            call_only=call_only,
        )
    return targets, infos, await _keys_only_on(client, targets)


async def _deliver(client, artifact, targets, infos, progress, stages):
    """Ship to every node of ``targets`` and unpack there; nodes lost are left out.

    Returns the ``ShipReport`` and, per node, what unpacking it did. A node
    sent a thin pack whose file store lost a file it refers to meanwhile gets
    the whole archive.
    """
    with _stage(stages, "ship"):
        shipped, via = await _ship(client, artifact, infos, progress)
    lost = _leave_out_lost(targets, infos, shipped)
    infos = _without(infos, lost)
    with _stage(stages, "unpack"):
        unpacked, stale, gone = await _install(client, artifact, infos, progress, via)
    if gone:
        for nanny in gone:
            shipped.failed[nanny] = "lost: its nanny left while unpacking"
        infos = _without(infos, _leave_out_lost(targets, infos, shipped))
        stale = [n for n in stale if n in infos]
    if stale:
        with _stage(stages, "ship"):
            again, _ = await _ship(client, artifact, infos, progress, only=stale)
        shipped.merge(again)
        with _stage(stages, "unpack"):
            more, _, _ = await _install(client, artifact, infos, progress, {}, stale)
        unpacked.update(more)
    return shipped, unpacked


async def _switch(client, artifact, workers, targets, infos, progress, label, stages):
    shipped = unpacked = None
    if artifact is not None:
        shipped, unpacked = await _deliver(
            client, artifact, targets, infos, progress, stages
        )
    names = None if workers is None else [t["name"] for t in targets.values()]
    await client.scheduler.envship_desire(
        id=None if artifact is None else artifact.id, names=names
    )

    started = time.perf_counter()
    plugin = UseEnvironment(
        None if artifact is None else {"id": artifact.id, "name": artifact.name},
        nannies=None if workers is None else [t["nanny"] for t in targets.values()],
    )
    with progress_bar(f"restarting {len(targets)} workers", None, progress):
        try:
            responses = await client.scheduler.register_nanny_plugin(
                plugin=dumps(plugin), name=PLUGIN_NAME, idempotent=False
            )
        except CommClosedError:
            # A nanny left while the scheduler passed the plugin on, and the
            # scheduler dropped the call: each nanny is asked below instead,
            # once the others' workers are back.
            responses = {}
            await _settle(client, targets)
    for response in responses.values():
        if response.get("status") == "error":
            _, exc, _ = clean_exception(response["exception"], response["traceback"])
            raise EnvshipError(label, f"a nanny could not switch: {exc}") from exc
    stages["restart"] = time.perf_counter() - started
    report = await _report(
        client, targets, stages["restart"], expected=artifact.id if artifact else None
    )
    report.stages, report.unpacked = stages, unpacked
    report.transfer = shipped or ShipReport()
    report.transfer.left_out.extend(report.gone)
    failed = [r for r in report.values() if not r.ok]
    if failed:
        details = "\n".join(f"  {r.name}: {r.error}" for r in failed)
        error = EnvshipError(
            label,
            f"{len(failed)} of {len(report)} workers could not start in it and "
            f"run in the nannies' own environment again:\n{details}",
            "fix the environment (does `python -c 'import distributed'` work in "
            "it?), pack it again and call use_environment again",
        )
        error.report = report
        raise error
    return report


async def _claim(client, owner: str, targets: dict, label: str) -> None:
    """Claim the workers for this switch; refuse if another switch holds any."""
    names = {t["nanny"]: t["name"] for t in targets.values()}
    answer = await client.scheduler.envship_claim(
        owner=owner, client=client.id, nannies=list(names), name=label
    )
    conflicts = answer["conflicts"]
    if conflicts:
        now = time.time()
        lines = "\n".join(
            f"  {names[nanny]}: to {c['name']}, by {c['client']}, for "
            f"{now - c['since']:.0f} s"
            for nanny, c in conflicts.items()
        )
        raise EnvshipError(
            label,
            "another switch of the same workers is under way, so this one did "
            f"not start:\n{lines}",
            "call use_environment again once it has ended, or switch other "
            "workers (workers=[...])",
        )


async def _settle(client, targets, timeout: float = SETTLE_TIMEOUT) -> None:
    """Wait until every target nanny has a worker again or is gone, or ``timeout`` s."""
    waiting = {t["nanny"] for t in targets.values()}
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:
        info = await client.scheduler.identity()
        waiting -= {w.get("nanny") for w in info["workers"].values()}
        for nanny in list(waiting):
            if not await _listening(nanny):
                waiting.discard(nanny)  # dead: nothing to wait for
        await asyncio.sleep(0.2)


async def _listening(address: str) -> bool:
    """Whether anything accepts connections at ``address`` (a dead nanny: no)."""
    try:
        host, port = get_address_host_port(address)
    except ValueError:
        return True  # not TCP (inproc, ucx): no way to tell, so wait
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def _ensure_registry(client, label) -> None:
    """Register envship's registry on the scheduler, unless it is there already."""
    try:
        await client.scheduler.register_scheduler_plugin(
            plugin=dumps(Registry()), name=Registry.name, idempotent=True
        )
    except Exception as e:  # whatever unpickling the plugin raised there
        raise EnvshipError(
            label,
            f"the scheduler cannot load envship ({e})",
            "install envship where the scheduler runs (`pip install envship`); "
            "administrators may start it with `dask scheduler --preload envship`",
        ) from e


async def _targets(client, workers, label) -> dict[str, dict]:
    """Worker address -> {"name", "nanny"} of the workers to switch."""
    info = await client.scheduler.identity()
    found = {}
    wanted = None if workers is None else {str(w) for w in workers}
    for address, w in info["workers"].items():
        if (
            wanted is not None
            and address not in wanted
            and str(w["name"]) not in wanted
        ):
            continue
        if not w.get("nanny"):
            raise EnvshipError(
                label,
                f"worker {w['name']} ({address}) has no nanny, so nothing can "
                "restart it in another environment",
                "start workers with a nanny (`dask worker --nanny`, the default)",
            )
        found[address] = {"name": w["name"], "nanny": w["nanny"]}
    if wanted is not None:
        missing = wanted - set(found) - {str(t["name"]) for t in found.values()}
        if missing:
            raise EnvshipError(
                label,
                f"no such workers: {', '.join(sorted(missing))}",
                "pass addresses or names from client.scheduler_info()['workers']",
            )
    if not found:
        raise EnvshipError(label, "the cluster has no workers", "start some first")
    return found


async def _nanny_side(client, targets, artifact, label) -> dict[str, dict]:
    """Nanny address -> its ``envship_info``, installing the nanny side if needed."""
    nannies = [t["nanny"] for t in targets.values()]
    artifact_id = artifact.id if artifact else None

    async def info(nanny):
        return await client.rpc(nanny).envship_info(artifact_id=artifact_id)

    results = await asyncio.gather(*map(info, nannies), return_exceptions=True)
    # A nanny without envship's handlers answers an error or nothing.
    if not all(isinstance(r, dict) for r in results):
        try:
            await client._register_nanny_plugin(
                NannySetup(), name=NannySetup.name, idempotent=False
            )
        except Exception as e:  # whatever unpickling the plugin raised there
            raise EnvshipError(
                label,
                f"the nannies cannot load envship ({e})",
                "install envship where the workers run (`pip install envship`) "
                "and start them with `dask worker --preload-nanny envship`",
            ) from e
        results = await asyncio.gather(*map(info, nannies))
    return dict(zip(nannies, results, strict=True))


async def _keys_only_on(client, targets) -> int:
    """How many keys in memory only the ``targets`` workers hold."""
    has_what = await client.scheduler.has_what()
    elsewhere = {k for w, keys in has_what.items() if w not in targets for k in keys}
    return len({k for w in targets for k in has_what.get(w, ()) if k not in elsewhere})


def _one_nanny_per_node(infos, missing_only: bool) -> dict[str, str]:
    """Node -> one of its nannies (only nodes that lack the artifact, if asked)."""
    return one_nanny_per_node(
        {
            nanny: info["node"]
            for nanny, info in infos.items()
            if not missing_only or not (info["installed"] or info["archive"])
        }
    )


async def _ship(client, artifact, infos, progress, only=None):
    """Get the environment to every node that lacks it, peer to peer.

    Nodes that hold most files of an environment whose archive the cluster
    holds get a thin pack (see :mod:`envship.client.delta`), the others the
    whole archive, written from the table if it was not yet. ``only``: these
    nannies get the whole archive, whatever they hold.

    Returns the ``ShipReport`` and ``{nanny: thin pack id}``. Raises (before
    any restart) when a node that is still there could not get it; nodes
    whose nanny left meanwhile are only left out.
    """
    if only is None:
        nodes = list(_one_nanny_per_node(infos, missing_only=True).values())
        plan = await delta.plan(client, artifact, nodes) if nodes else None
    else:
        nodes, plan = list(only), None
    if not nodes:
        return ShipReport(), {}
    if plan is None:
        plan = delta.Plan(full=nodes)
    jobs, via = [], {}
    if plan.thin:
        thin = await asyncio.to_thread(delta.write_thin, artifact, plan)
        via = dict.fromkeys(plan.thin, thin.id)
        jobs.append(_broadcast(client, thin, plan.thin, infos, progress, holding=()))
    if plan.full:
        if not artifact.has_archive:
            store = ArtifactStore(artifact.path.parent)
            artifact = await asyncio.to_thread(
                store.ensure_archive, artifact, progress=bool(progress)
            )
        holding = [n for n, i in infos.items() if i["archive"]]
        jobs.append(_broadcast(client, artifact, plan.full, infos, progress, holding))
    shipped = ShipReport()
    try:
        for report in await asyncio.gather(*jobs):
            shipped.merge(report)
    finally:
        if plan.thin:  # the nodes hold it now; a later call writes it again
            thin.path.unlink(missing_ok=True)
    stuck = {n: why for n, why in shipped.failed.items() if not why.startswith("lost")}
    if stuck:
        raise EnvshipError(
            artifact.name,
            "these nodes could not get it, so no worker was restarted:\n"
            + "\n".join(f"  {nanny}: {why}" for nanny, why in stuck.items()),
            "check that the nodes can reach each other and have disk space, "
            "then call use_environment again",
        )
    return shipped, via


async def _broadcast(client, blob: Artifact, nannies, infos, progress, holding):
    """Publish ``blob``'s offer and broadcast it to ``nannies``."""
    offer = await asyncio.to_thread(Offer.of_artifact, blob)
    await client.scheduler.envship_publish(offer=offer.to_msg())
    holders = await _holders(client, blob.id, infos, holding)
    fetchers = [Peer(nanny, infos[nanny]["site"]) for nanny in nannies]
    total = offer.table.size * len(fetchers)  # bytes, over all nodes
    piece = offer.table.piece_size
    what = "a thin pack of " if isinstance(blob.manifest, ThinManifest) else ""
    with progress_bar(
        f"shipping {what}{blob.name} to {len(fetchers)} node(s)", total, progress
    ) as bar:
        return await broadcast(
            client.rpc,
            blob.path,
            offer,
            fetchers,
            holders,
            peer_to_peer=config.get("transfer.peer-to-peer"),
            client_site=config.get("site"),
            on_progress=lambda held: bar.update(min(held * piece, total), total),
        )


async def _holders(client, blob_id: str, infos: dict, holding) -> list[Peer]:
    """Nannies that hold the whole blob: ``holding`` targets, and any the registry knows."""
    where = await client.scheduler.envship_where(id=blob_id)
    chosen = _one_nanny_per_node(
        {n: infos[n] for n in holding}, missing_only=False
    ).values()
    holders = {nanny: Peer(nanny, infos[nanny]["site"]) for nanny in chosen}
    for msg in where["holders"]:
        if msg["complete"] and msg["address"] not in infos:
            holders[msg["address"]] = Peer.from_msg(msg)
    return list(holders.values())


def _leave_out_lost(targets, infos, shipped: ShipReport) -> set[str]:
    """Leave out the nodes whose nanny left during the transfer; their nannies."""
    lost_nodes = {infos[n]["node"] for n in shipped.failed if n in infos}
    lost = {n for n, info in infos.items() if info["node"] in lost_nodes}
    for address in [a for a, t in targets.items() if t["nanny"] in lost]:
        shipped.left_out.append(str(targets.pop(address)["name"]))
    if not targets:
        raise EnvshipError(
            "the environment",
            "every node left the cluster during the transfer",
            "start workers, then call use_environment again",
        )
    return lost


def _without(infos: dict, nannies: set[str]) -> dict:
    return {n: info for n, info in infos.items() if n not in nannies}


async def _install(client, artifact, infos, progress, via, only=None):
    """Unpack on every node (its other nannies share the result); what each did.

    ``via``: {nanny: thin pack id} for nodes sent a thin pack. Returns what
    each node did, the nannies whose file store lacked a file the thin pack
    refers to (they need the whole archive) and those that left meanwhile.
    ``only``: these nannies.
    """
    nodes = list(only or _one_nanny_per_node(infos, missing_only=False).values())
    stale, gone = [], []
    with progress_bar(f"unpacking {artifact.name}", len(nodes), progress) as bar:

        async def install(nanny):
            try:
                return await client.rpc(nanny).envship_install(
                    artifact_id=artifact.id, via=via.get(nanny)
                )
            except MissingStoreFileError:
                stale.append(nanny)
            except (CommClosedError, OSError):
                gone.append(nanny)
            finally:
                bar.advance()

        # Every node settles (a refusal discards its copy) before any error
        # reaches the caller.
        done = await asyncio.gather(*map(install, nodes), return_exceptions=True)
    for result in done:
        if isinstance(result, BaseException):
            raise result
    unpacked = {n: d for n, d in zip(nodes, done, strict=True) if d is not None}
    return unpacked, stale, gone


async def _report(
    client, targets, seconds, prepared: bool = False, expected: str | None = None
) -> SwitchReport:
    """What each worker runs in; how its switch went (unless only ``prepared``).

    A switch is ok for a worker only if its nanny says so and the worker runs
    in ``expected`` now: never ok while it runs elsewhere.
    """
    info = await client.scheduler.identity()
    present = {w.get("nanny") for w in info["workers"].values()}

    async def status(target):
        # A nanny gone from the scheduler is given a short while only: connecting
        # to a closed port is retried until the connect timeout (30 s).
        wait = STATUS_TIMEOUT if target["nanny"] in present else 2
        try:
            s = await asyncio.wait_for(
                client.rpc(target["nanny"]).envship_status(), wait
            )
        except (CommClosedError, OSError, asyncio.TimeoutError):
            return target["name"]  # its nanny left the cluster
        ok, error = s["ok"], s["error"]
        # None: the nannies' own environment, or their administrator's default.
        wanted = s.get("default") if expected is None else expected
        if ok and s["running"] != wanted:
            ok = False
            runs = s["name"] or s["running"] or "the nannies' own environment"
            error = (
                f"it runs in {runs}, not in what was asked: switched again meanwhile?"
            )
        return WorkerReport(
            name=target["name"],
            nanny=target["nanny"],
            address=s["worker"],
            environment=s["running"],
            seconds=seconds if prepared else s.get("seconds") or seconds,
            ok=prepared or ok,
            error=None if prepared else error,
        )

    results = await asyncio.gather(*map(status, targets.values()))
    report = SwitchReport({r.name: r for r in results if isinstance(r, WorkerReport)})
    report.gone = tuple(str(r) for r in results if not isinstance(r, WorkerReport))
    return report


# ``client.use_environment(...)`` and ``client.prepare_environment(...)`` are
# the same functions, bound to the client.
Client.use_environment = use_environment
Client.prepare_environment = prepare_environment

__all__ = [
    "SwitchReport",
    "WorkerReport",
    "foreign",
    "prepare_environment",
    "use_environment",
]
