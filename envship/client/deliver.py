"""Get an environment onto the nodes of a switch: ship it, then install it there.

The deliver step of :class:`envship.client.switch.Switch`. Each node (the
nannies sharing one cache) gets the environment once, peer to peer, as a thin
pack when it holds most of its files (see :mod:`envship.client.delta`) or as
the whole archive; one nanny per node unpacks it. Nodes whose nanny leaves
meanwhile are left out of the switch; a node that cannot get it stops the
switch before anyone restarts. Runs on the client's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from distributed import Client
from distributed.comm import CommClosedError

from envship import config
from envship.errors import CorruptArchiveError, EnvshipError, MissingStoreFileError
from envship.ids import Address, check_id, check_thin_id
from envship.manifest import Manifest, ThinManifest
from envship.messages import optional
from envship.node.messages import Install, InstallAnswer
from envship.nodes import one_nanny_per_node
from envship.registry_messages import Publish, Where, WhereAnswer
from envship.transfer import (
    FailureKind,
    Offer,
    Peer,
    ShipFailure,
    ShipReport,
    broadcast,
)

from . import delta
from .progress import progress_bar
from .report import timing
from .store import Artifact, ArtifactStore
from .targets import Infos, Targets, scheduler_of


async def deliver(
    client: Client,
    artifact: Artifact,
    targets: Targets,
    infos: Infos,
    progress: bool,
    stages: dict[str, float],
) -> tuple[ShipReport, dict[str, dict]]:
    """Ship to every node of ``targets`` and unpack there; nodes lost are left out.

    Returns the ``ShipReport`` and, per node, what unpacking it did. The
    workers of nodes lost are taken out of ``targets`` (and named in the
    report's ``left_out``). A node sent a thin pack whose file store lost a
    file it refers to meanwhile gets the whole archive.
    """
    with timing(stages, "ship"):
        shipped, via = await ship(client, artifact, infos, progress)
    infos = _without(infos, leave_out_lost(targets, infos, shipped, artifact.name))
    with timing(stages, "unpack"):
        unpacked, stale, gone = await install(client, artifact, infos, progress, via)
    if gone:
        for nanny in gone:
            shipped.failed[nanny] = ShipFailure(
                FailureKind.LOST, "lost: its nanny left while unpacking"
            )
        infos = _without(infos, leave_out_lost(targets, infos, shipped, artifact.name))
        stale = [n for n in stale if n in infos]
    if stale:
        with timing(stages, "ship"):
            again, _ = await ship(client, artifact, infos, progress, only=stale)
        shipped.merge(again)
        with timing(stages, "unpack"):
            more, _, _ = await install(client, artifact, infos, progress, {}, stale)
        unpacked.update(more)
    return shipped, unpacked


async def ship(
    client: Client,
    artifact: Artifact,
    infos: Infos,
    progress: bool,
    only: list[str] | None = None,
) -> tuple[ShipReport, dict[str, str]]:
    """Get the environment to every node that lacks it, peer to peer.

    Nodes that hold most files of an environment whose archive the cluster
    holds get a thin pack (see :mod:`envship.client.delta`), the others the
    whole archive, written from the table if it was not yet. ``only``: these
    nannies get the whole archive, whatever they hold.

    Returns the ``ShipReport`` and ``{nanny: thin pack id}``. Raises (before
    any restart) when a node that is still there could not get it; nodes
    whose nanny left meanwhile are only left out.
    """
    plan: delta.Plan | None
    if only is None:
        nodes = list(one_nanny_per_node(_lacking(infos)).values())
        plan = await delta.plan(client, artifact, nodes) if nodes else None
    else:
        nodes, plan = list(only), None
    if not nodes:
        # Every node holds it. A scheduler that restarted since may not know
        # its offer: the switch publishes it if the registry says so.
        return ShipReport(), {}
    if plan is None:
        plan = delta.Plan(full=nodes)
    jobs, via, thin = [], {}, None
    if plan.thin:
        thin = await asyncio.to_thread(delta.write_thin, artifact, plan)
        via = dict.fromkeys(plan.thin, thin.id)
        jobs.append(_broadcast(client, thin, plan.thin, infos, progress, holding=()))
    if plan.full:
        # Written if it was not yet, checked if it was (a damaged one is
        # written again): the nodes verify pieces against this copy.
        store = ArtifactStore(artifact.path.parent)
        artifact = await asyncio.to_thread(
            store.ensure_archive, artifact, progress=bool(progress)
        )
        holding = [n for n, i in infos.items() if i.archive]
        jobs.append(_broadcast(client, artifact, plan.full, infos, progress, holding))
    shipped = ShipReport()
    try:
        for report in await asyncio.gather(*jobs):
            shipped.merge(report)
    finally:
        if thin is not None:  # the nodes hold it now; a later call writes it again
            thin.path.unlink(missing_ok=True)
    failed = shipped.failed.items()
    if refused := {
        n: CorruptArchiveError(artifact.name, why.why, "")
        for n, why in failed
        if why.kind is FailureKind.NOT_ITS_ID
    }:
        # Every piece matched this client's table: whose copy is damaged?
        raise await asyncio.to_thread(which_side, artifact, refused, via)
    stuck = {n: why for n, why in failed if why.kind is not FailureKind.LOST}
    if stuck:
        raise EnvshipError(
            artifact.name,
            "these nodes could not get it, so no worker was restarted:\n"
            + "\n".join(f"  {nanny}: {why}" for nanny, why in stuck.items()),
            "check that the nodes can reach each other and have disk space, "
            "then call use_environment again",
        )
    return shipped, via


async def install(
    client: Client,
    artifact: Artifact,
    infos: Infos,
    progress: bool,
    via: dict[str, str],
    only: list[str] | None = None,
) -> tuple[dict[str, dict], list[str], list[str]]:
    """Unpack on every node (its other nannies share the result); what each did.

    ``via``: {nanny: thin pack id} for nodes sent a thin pack. Returns what
    each node did, the nannies whose file store lacked a file the thin pack
    refers to (they need the whole archive) and those that left meanwhile.
    ``only``: these nannies.
    """
    node_of = {nanny: info.node for nanny, info in infos.items()}
    nodes = list(only or one_nanny_per_node(node_of).values())
    stale: list[str] = []
    gone: list[str] = []
    refused: dict[str, CorruptArchiveError] = {}
    with progress_bar(f"unpacking {artifact.name}", len(nodes), progress) as bar:

        async def on(nanny: str) -> dict | None:
            request = Install(
                check_id(artifact.id), optional(check_thin_id, via.get(nanny))
            )
            try:
                reply = await client.rpc(nanny).envship_install(**request.to_msg())
                # Checked, and kept as the dict the report shows.
                return InstallAnswer.from_msg(reply).to_msg()
            except MissingStoreFileError:
                stale.append(nanny)
            except CorruptArchiveError as e:
                refused[nanny] = e
            except (CommClosedError, OSError):
                gone.append(nanny)
            finally:
                bar.advance()
            return None

        # Every node settles (a refusal discards its copy) before any error
        # reaches the caller.
        done = await asyncio.gather(*map(on, nodes), return_exceptions=True)
    for result in done:
        if isinstance(result, BaseException):
            raise result
    if refused:
        raise await asyncio.to_thread(which_side, artifact, refused, via)
    unpacked = {n: d for n, d in zip(nodes, done, strict=True) if isinstance(d, dict)}
    return unpacked, stale, gone


def which_side(
    artifact: Artifact, refused: dict[str, CorruptArchiveError], via: dict[str, str]
) -> EnvshipError:
    """The error to raise when nodes refused ``artifact`` as corrupt: whose copy it is.

    Every piece a node received matched the digest this client computed
    from its own copy, so the client reads that copy as a node would
    (:meth:`ArtifactStore.check_archive` with ``deep``) and checks its table.
    A damaged local copy is removed, so that the next pack or switch writes
    it again; otherwise the node's side is at fault.

    Examples
    --------
    >>> print(which_side(artifact, refused, {}))  # doctest: +SKIP
    environment 'sklearn-dev': your local copy of 5f0c... is damaged (...)
    Fix: re-pack with `envship pack /envs/sklearn-dev` (done automatically next time); no worker was restarted
    """
    store = ArtifactStore(artifact.path.parent)
    problem = None
    if store.table_path(artifact.id).is_file():
        problem = store.check_table(artifact.id)
    full = [n for n in refused if n not in via]
    if problem is None and full and artifact.has_archive:
        problem = store.check_archive(artifact, deep=True)
        if problem is not None:
            artifact.path.unlink(missing_ok=True)
    error = next(iter(refused.values()))
    nodes = ("nodes " if len(refused) > 1 else "node ") + ", ".join(refused)
    if problem is not None:
        source = artifact.manifest
        prefix = source.source_prefix if isinstance(source, Manifest) else ""
        return EnvshipError(
            artifact.name,
            f"your local copy of {artifact.id} is damaged ({problem}); "
            f"{nodes} refused it: {error.problem}",
            f"re-pack with `envship pack {prefix or artifact.name}` (done "
            "automatically next time); no worker was restarted",
        )
    return EnvshipError(
        artifact.name,
        f"{nodes} refused a verified artifact: {error.problem}. This "
        f"machine's copy of {artifact.id} reads as it should, so what the node "
        "received or wrote went wrong there; no worker was restarted",
        "call use_environment again (a node discards a copy it refuses and "
        "fetches it again); if the same node refuses it again, check its disk "
        "and memory, and leave it out meanwhile (workers=[...])",
    )


def leave_out_lost(
    targets: Targets, infos: Infos, shipped: ShipReport, name: str
) -> set[str]:
    """Leave out the nodes whose nanny left during the transfer; their nannies.

    Their workers are taken out of ``targets`` and named in ``shipped.left_out``.
    """
    lost_nodes = {infos[n].node for n in shipped.failed if n in infos}
    lost = {n for n, info in infos.items() if info.node in lost_nodes}
    for address in [a for a, t in targets.items() if t["nanny"] in lost]:
        shipped.left_out.append(str(targets.pop(address)["name"]))
    if not targets:
        raise EnvshipError(
            name,
            "every node left the cluster during the transfer",
            "start workers, then call use_environment again",
        )
    return lost


def _lacking(infos: Infos) -> dict[str, str]:
    """Nanny -> its node, for the nannies that hold neither the tree nor the archive."""
    return {
        nanny: info.node
        for nanny, info in infos.items()
        if not (info.installed or info.archive)
    }


def _without(infos: Infos, nannies: set[str]) -> Infos:
    return {n: info for n, info in infos.items() if n not in nannies}


async def _broadcast(
    client: Client,
    blob: Artifact,
    nannies: list[str],
    infos: Infos,
    progress: bool,
    holding: Iterable[str],
) -> ShipReport:
    """Publish ``blob``'s offer and broadcast it to ``nannies``."""
    offer = await _publish(client, blob)
    holders = await _holders(client, blob.id, infos, holding)
    fetchers = [Peer(Address(nanny), infos[nanny].site) for nanny in nannies]
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


async def publish_archive(client: Client, artifact: Artifact) -> None:
    """Publish the offer of ``artifact``'s whole archive (written if it was not).

    For a registry that knows no offer of an environment every node holds.
    """
    store = ArtifactStore(artifact.path.parent)
    artifact = await asyncio.to_thread(store.ensure_archive, artifact)
    await _publish(client, artifact)


async def _publish(client: Client, blob: Artifact) -> Offer:
    """Tell the scheduler's registry ``blob``'s offer (its piece table)."""
    offer = await asyncio.to_thread(Offer.of_artifact, blob)
    await scheduler_of(client).envship_publish(**Publish(offer).to_msg())
    return offer


async def _holders(
    client: Client, blob_id: str, infos: Infos, holding: Iterable[str]
) -> list[Peer]:
    """Nannies that hold the whole blob: ``holding`` targets, and any the registry knows."""
    request = Where(id=check_id(blob_id)).to_msg()
    where = WhereAnswer.from_msg(await scheduler_of(client).envship_where(**request))
    chosen = one_nanny_per_node({n: infos[n].node for n in holding}).values()
    holders = {nanny: Peer(Address(nanny), infos[nanny].site) for nanny in chosen}
    for holder in where.holders:
        if holder.complete and holder.peer.address not in infos:
            holders[holder.peer.address] = holder.peer
    return list(holders.values())
