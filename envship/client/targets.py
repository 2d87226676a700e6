"""Which workers a switch restarts, and what their nannies say about their nodes.

The first part of the check step of :class:`envship.client.switch.Switch`:
the workers asked for (all by default), each with a nanny; envship's side on
those nannies and on the scheduler, registered if missing; and the keys that
only those workers hold. Nothing is shipped or restarted here. Runs on the
client's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from distributed import Client
from distributed.core import PooledRPCCall, rpc
from distributed.protocol.pickle import dumps

from envship.errors import EnvshipError
from envship.ids import check_id
from envship.node.messages import Info, InfoAnswer
from envship.node.nanny import NannySetup
from envship.scheduler.registry import Registry

from .store import Artifact

#: Worker address -> ``{"name": its name, "nanny": its nanny's address}``.
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
    """The workers to switch: ``workers`` (addresses or names), default all."""
    info = await scheduler_of(client).identity()
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


async def nanny_side(
    client: Client, targets: Targets, artifact: Artifact | None, label: str
) -> Infos:
    """Each target nanny's ``envship_info``, installing the nanny side if needed."""
    nannies = [t["nanny"] for t in targets.values()]
    request = Info(check_id(artifact.id) if artifact else None).to_msg()

    async def info(nanny: str) -> dict:
        return await client.rpc(nanny).envship_info(**request)

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
            "install envship where the scheduler runs (`pip install envship`); "
            "administrators may start it with `dask scheduler --preload envship`",
        ) from e


async def keys_only_on(client: Client, targets: Targets) -> int:
    """How many keys in memory only the ``targets`` workers hold."""
    has_what = await scheduler_of(client).has_what()
    elsewhere = {k for w, keys in has_what.items() if w not in targets for k in keys}
    return len({k for w in targets for k in has_what.get(w, ()) if k not in elsewhere})
