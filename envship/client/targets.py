"""Which workers a switch restarts, and what their nannies say about their nodes.

The first part of the check step of :class:`envship.client.switch.Switch`:
the workers asked for (all by default), each with a nanny; envship's side on
those nannies and on the scheduler, registered if missing; and the keys that
only those workers hold. Nothing is shipped or restarted here. Runs on the
client's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

from distributed import Client
from distributed.core import PooledRPCCall, rpc
from distributed.protocol.pickle import dumps

from envship.errors import EnvshipError
from envship.identity import same_address, worker_identity
from envship.ids import check_id
from envship.node.messages import Info, InfoAnswer
from envship.node.nanny import NannySetup
from envship.scheduler.registry import Registry

from .store import Artifact

#: Worker address -> ``{"name": its identity, "nanny": its nanny's address}``
#: (the identity: its name, or its nanny's address if it has no name of its
#: own; see :mod:`envship.identity`).
Targets = dict[str, dict[str, Any]]
#: Nanny address -> its ``envship_info`` answer (``node``, ``site``,
#: ``platform``, whether it holds the environment ``installed`` or its
#: ``archive``).
Infos = dict[str, InfoAnswer]


def scheduler_of(client: Client) -> rpc | PooledRPCCall:
    """The client's connection to its scheduler (a started client has one)."""
    scheduler = client.scheduler
    assert scheduler is not None, "the client has not started"
    return scheduler


async def find_targets(
    client: Client, workers: Iterable[str] | None, label: str
) -> Targets:
    """The workers to switch: ``workers``, default all.

    A worker may be given by its identity (its name, or for a worker started
    without one, its nanny's address: see :mod:`envship.identity`), its
    nanny's address or its current address, with or without ``tcp://``.
    Each target's ``name`` is its identity.
    """
    info = await scheduler_of(client).identity()
    found = {}
    wanted = None if workers is None else {str(w) for w in workers}
    matched: set[str] = set()
    for address, w in info["workers"].items():
        identity = worker_identity(w["name"], address, w.get("nanny"))
        if wanted is not None:
            given = {str(w["name"]), identity, address, w.get("nanny") or address}
            hits = {x for x in wanted if any(same_address(x, g) for g in given)}
            if not hits:
                continue
            matched |= hits
        if not w.get("nanny"):
            raise EnvshipError(
                label,
                f"worker {identity} ({address}) has no nanny, so nothing can "
                "restart it in another environment",
                "start workers with a nanny (`dask worker --nanny`, the default)",
            )
        found[address] = {"name": identity, "nanny": w["nanny"]}
    if wanted is not None:
        missing = wanted - matched
        if missing:
            known = sorted(
                worker_identity(w["name"], a, w.get("nanny"))
                for a, w in info["workers"].items()
            )
            raise EnvshipError(
                label,
                f"no such workers: {', '.join(sorted(missing))}",
                "pass worker names as `envship status` lists them (a worker "
                "started without --name goes by its nanny's address), nanny "
                f"addresses or worker addresses; this cluster has: "
                f"{_some(known)}",
            )
    if not found:
        raise EnvshipError(label, "the cluster has no workers", "start some first")
    return found


def _some(names: list[str], most: int = 8) -> str:
    """``names`` joined, at most ``most`` of them, then how many more."""
    if not names:
        return "no workers"
    more = len(names) - most
    return ", ".join(names[:most]) + (f" and {more} more" if more > 0 else "")


async def nannies_with_envship(client: Client, nannies: Mapping[str, str]) -> set[str]:
    """Which of the ``nannies`` (worker address -> its nanny's) have envship.

    Found without calling envship's handlers: a nanny that lacks one logs a
    warning with a traceback when called on it (Dask's answer to an unknown
    operation). Each nanny is asked through ``client.run`` instead, one round
    trip through the scheduler. A nanny that did not answer (gone, or it could
    not run the check) is left out.

    Examples
    --------
    >>> await nannies_with_envship(
    ...     client, {"tcp://10.0.0.5:40124": "tcp://10.0.0.5:40123"}
    ... )  # doctest: +SKIP
    {'tcp://10.0.0.5:40123'}
    """
    if not nannies:
        return set()

    # Defined here so that it is pickled by value: a nanny without envship
    # can run it too, and says no.
    def has_envship(dask_worker) -> bool:
        return "envship_info" in dask_worker.handlers

    try:  # answers by worker address, though the nannies ran it
        answers = await client._run(
            has_envship, workers=sorted(nannies), nanny=True, on_error="return"
        )
    except Exception:  # a worker left meanwhile: the scheduler refused the call
        try:  # so ask every nanny there is, and keep those asked about
            answers = await client._run(has_envship, nanny=True, on_error="return")
        except Exception:
            return set()
    return {nannies[w] for w, yes in answers.items() if yes is True and w in nannies}


async def nanny_side(
    client: Client, targets: Targets, artifact: Artifact | None, label: str
) -> Infos:
    """Each target nanny's ``envship_info``, installing the nanny side if needed.

    Nannies started without ``--preload-nanny envship`` get it from a nanny
    plugin (:class:`envship.node.nanny.NannySetup`), registered only when
    some target nanny lacks it; no nanny is called on a handler it lacks.
    """
    nannies = [t["nanny"] for t in targets.values()]
    request = Info(check_id(artifact.id) if artifact else None).to_msg()
    nanny_of = {address: t["nanny"] for address, t in targets.items()}
    if not set(nannies) <= await nannies_with_envship(client, nanny_of):
        try:
            await client._register_nanny_plugin(
                NannySetup(), name=NannySetup.name, idempotent=False
            )
        except Exception as e:  # whatever unpickling the plugin raised there
            raise EnvshipError(
                label,
                f"the nannies cannot load envship ({e})",
                "install the client's envship where the nannies run (the same "
                "version: docs/install.md) and start them with "
                "`dask worker --preload-nanny envship`",
            ) from e

    async def info(nanny: str) -> dict:
        return await client.rpc(nanny).envship_info(**request)

    results = await asyncio.gather(*map(info, nannies))
    infos = {}
    for nanny, answer in zip(nannies, results, strict=True):
        try:
            infos[nanny] = InfoAnswer.from_msg(answer)
        except ValueError as e:
            raise EnvshipError(
                label,
                f"the nanny {nanny} answered an invalid info ({e})",
                "install the same envship version on every node",
            ) from e
    return infos


async def ensure_registry(client: Client, label: str) -> None:
    """Register envship's registry on the scheduler, unless it is there already."""
    try:
        await scheduler_of(client).register_scheduler_plugin(
            plugin=dumps(Registry()), name=Registry.name, idempotent=True
        )
    except Exception as e:  # whatever unpickling the plugin raised there
        raise EnvshipError(
            label,
            f"the scheduler cannot load envship ({e})",
            "install the client's envship where the scheduler runs (the same "
            "version: docs/install.md); administrators may start it with "
            "`dask scheduler --preload envship`",
        ) from e


async def keys_only_on(client: Client, targets: Targets) -> int:
    """How many keys in memory only the ``targets`` workers hold."""
    has_what = await scheduler_of(client).has_what()
    elsewhere = {k for w, keys in has_what.items() if w not in targets for k in keys}
    return len({k for w in targets for k in has_what.get(w, ()) if k not in elsewhere})
