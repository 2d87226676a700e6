"""Ship only what nodes lack: choose a base, ask the nodes, write a thin pack.

An edited environment shares nearly all its files (same bytes, mode and
mtime) with the one it was made from. When the cluster holds the whole
archive of such a *base*, the client asks each node which of the shared
files its file store lacks (one round trip, 26 bytes a file) and sends a
*thin pack*: the environment's table and the data of the files some
receiving node lacks; the others are references (see :mod:`envship.thin`).
It travels like any blob, peer to peer, and hashes to the environment's id
on the node.

Without such a base the client asks about every file, and a node counts as
held only the files of its nanny's own environment (see
:mod:`envship.node.own_files`), so an environment built on the one the
nannies run in travels as the files it adds. Nodes that lack most of the
files get the whole archive instead, written from the table only then. A node that joins later fetches the base's archive and
the thin pack from its peers.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from envship import config
from envship.archive import path_digest
from envship.errors import EnvshipError
from envship.manifest import Manifest, ThinManifest
from envship.node.messages import Lacks
from envship.table import Entry, EntryTable, decode_bits, encode_keys
from envship.thin import write_thin_pack

from .store import Artifact, ArtifactStore

#: A node lacking more than this share of the shared bytes gets the whole archive.
MOSTLY_MISSING = 0.5
#: A base must share at least this share of the environment's bytes.
MIN_SHARED = 0.5
#: Seconds a node may take to say what it lacks (its first answer hashes the
#: matching files of its own environment); then it is sent the whole archive.
LACKS_TIMEOUT = 120


@dataclass
class Plan:
    """Which nodes get the whole archive and which the thin pack (nanny addresses)."""

    full: list[str] = field(default_factory=list)
    thin: list[str] = field(default_factory=list)
    base: Artifact | None = None
    refs: set[str] = field(default_factory=set)
    table: EntryTable | None = None  # the environment's, once loaded


async def plan(client, artifact: Artifact, nannies: list[str]) -> Plan:
    """Ask the nodes (one nanny each) what they lack; decide what each gets."""
    table = await asyncio.to_thread(artifact.table)
    if table is None:
        return Plan(full=list(nannies))
    base, shared = await _choose_base(client, artifact, table)
    if base is None:
        # No environment the cluster holds shares enough with it; the nodes'
        # own environments may (one built on the environment they run in).
        # Only those count: a node that joins later has its own environment
        # too, not what this node's store happens to hold.
        shared = table.files
    keys = encode_keys(shared)
    total = sum(e.size for e in shared) or 1

    async def lacks(nanny):
        try:
            request = Lacks(keys, own_only=base is None)
            ask = client.rpc(nanny).envship_lacks(**request.to_msg())
            bits = await asyncio.wait_for(ask, LACKS_TIMEOUT)
            return decode_bits(bits, len(shared))
        except Exception:  # an older nanny, one that left or is stuck: send it all
            return None

    answers = await asyncio.gather(*map(lacks, nannies))
    result = Plan(base=base, table=table)
    lacked_by_thin: set[int] = set()
    for nanny, lacking in zip(nannies, answers, strict=True):
        missing = None if lacking is None else [i for i, x in enumerate(lacking) if x]
        if missing is None or sum(shared[i].size for i in missing) > (
            MOSTLY_MISSING * total
        ):
            result.full.append(nanny)
        else:
            result.thin.append(nanny)
            lacked_by_thin.update(missing)
    result.refs = {e.path for i, e in enumerate(shared) if i not in lacked_by_thin}
    if not result.refs:
        return Plan(full=list(nannies))
    return result


async def _choose_base(client, artifact: Artifact, table: EntryTable):
    """The held environment sharing most bytes with ``table``; and those files.

    Candidates: environments whose whole archive some live nanny holds (the
    registry knows) and whose table this client's store has.
    """
    snapshot = await client.scheduler.envship_registry()
    held = [
        id
        for id, offer in snapshot["offers"].items()
        if id != artifact.id
        and not offer.get("thin_of")
        and any(h["complete"] for h in snapshot["holders"].get(id, ()))
    ]
    store = ArtifactStore(artifact.path.parent)

    def best():
        choice: Artifact | None = None
        files: list[Entry] = []
        keyed = list(zip(table.keys, table.files, strict=True))
        for id in held:
            if not store.has(id):
                continue
            candidate = store.get(id)
            base_table = candidate.table()
            if base_table is None:
                continue
            keys = set(base_table.keys)
            shared = [e for key, e in keyed if key in keys]
            if sum(e.size for e in shared) > sum(e.size for e in files):
                choice, files = candidate, shared
        if sum(e.size for e in files) < MIN_SHARED * table.unpacked_size:
            return None, []
        return choice, files

    return await asyncio.to_thread(best)


def write_thin(artifact: Artifact, plan: Plan) -> Artifact:
    """Write the thin pack of ``artifact`` that ``plan`` asks for.

    Returns it as an artifact of its own: its id hashes its bytes; its
    manifest carries the environment's, ``thin_of`` and ``base``.
    """
    store = ArtifactStore(artifact.path.parent)
    table, refs, base = plan.table, plan.refs, plan.base
    if table is None or not isinstance(artifact.manifest, Manifest):
        raise ValueError(f"no thin pack of {artifact.id} in this plan")
    level, threads = config.get("pack.level"), config.default_threads()
    try:
        with store.writing(artifact.name) as (f, tmp):
            summary = write_thin_pack(table, f, refs, level=level, threads=threads)
            size = f.tell()
    except OSError as e:  # store.writing made a full disk an EnvshipError already
        raise EnvshipError(
            artifact.name,
            f"could not read it again to send it: {e}",
            "pack it again (`envship.pack` or use_environment with its path)",
        ) from e
    thin_id = path_digest(tmp)
    path = store.thin_path(thin_id)
    path.parent.mkdir(exist_ok=True)
    os.replace(tmp, path)
    manifest = ThinManifest(
        id=thin_id,
        thin_of=artifact.id,
        base=None if base is None else base.id,
        env=artifact.manifest,
        packed_size=size,
        files=summary.files,
        refs=summary.refs,
    )
    return Artifact(thin_id, artifact.name, path, manifest)
