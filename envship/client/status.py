"""``envship.status(client)``: what every worker runs in, each node's cache, each blob.

Runs on the client: asks the scheduler's registry and every nanny (through
:func:`envship.survey.survey`, which the dashboard page uses too), never moves
a blob.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from dask.utils import format_bytes, format_time
from distributed import Client

from envship.survey import EMPTY_REGISTRY, survey

from .targets import nannies_with_envship

#: Seconds each nanny has to answer; one that does not is listed without its state.
NANNY_TIMEOUT = 30.0


@dataclass
class ClusterStatus:
    """Per worker, per node and per blob; shown as three tables.

    Attributes
    ----------
    workers : list of dict
        ``name`` (its name; for a worker started without one, its nanny's
        address, which survives its restarts), ``address`` (its current one),
        ``nanny``, ``node``, ``site``, ``environment``
        (a name, or None for the nannies' own), ``id``, ``since`` (unix
        time) and ``unreachable`` (why its nanny did not answer, or None).
    nodes : list of dict
        ``node``, ``site``, ``nannies``, ``cache`` (its folder) and
        ``cache_size`` (bytes).
    blobs : list of dict
        ``id``, ``name``, ``size``, ``complete`` and ``partial`` (how many
        nannies hold it whole, or are fetching it), ``transfers``: the
        downloads in progress, with pieces held and the sources so far, and
        ``thin_of``: for a thin pack, the id of its environment.

    Examples
    --------
    >>> envship.status(client)  # doctest: +SKIP
    worker     node             site   environment        since
    node-a-0   host1:2049:1234  east   sklearn-dev (5f0c)  3.2 m
    ...
    """

    workers: list[dict]
    nodes: list[dict]
    blobs: list[dict]

    def __repr__(self) -> str:
        now = time.time()
        lines = [f"{'worker':<16} {'node':<28} {'site':<10} {'environment':<28} since"]
        for w in self.workers:
            env = f"{w['environment']} ({w['id'][:8]})" if w["id"] else "(nanny's own)"
            since = format_time(now - w["since"]) if w["since"] else "?"
            lines.append(
                f"{str(w['name']):<16} {str(w['node']):<28} {str(w['site']):<10} "
                f"{env:<28} {since}"
            )
        lines += ["", f"{'node':<28} {'site':<10} {'nannies':>7}  cache"]
        for n in self.nodes:
            lines.append(
                f"{n['node']:<28} {str(n['site']):<10} {n['nannies']:>7}  "
                f"{format_bytes(n['cache_size'])} in {n['cache']}"
            )
        lines += ["", f"{'blob':<34} {'name':<20} {'size':>10}  holders"]
        for b in self.blobs:
            line = (
                f"{b['id']:<34} {b['name']:<20} {format_bytes(b['size']):>10}  "
                f"{b['complete']} whole, {b['partial']} fetching"
            )
            for t in b["transfers"]:
                line += f"\n    {t['nanny']}: {t['have']}/{t['count']} pieces from {', '.join(t['sources']) or '-'}"
            lines.append(line)
        return "\n".join(lines)


def status(client: Client) -> ClusterStatus:
    """What every worker runs in, each node's cache use, and who holds which blob.

    Examples
    --------
    >>> print(envship.status(client))  # doctest: +SKIP
    """
    return client.sync(_status, client)


async def _status(client: Client) -> ClusterStatus:
    scheduler = client.scheduler
    if scheduler is None:
        raise ValueError("the client is not connected to a scheduler")
    identity = await scheduler.identity()

    # Asked without calling it: a scheduler logs a traceback for a handler it
    # lacks. Defined here to be pickled by value (the scheduler may lack envship).
    def has_registry(dask_scheduler: Any) -> bool:
        return "envship_registry" in dask_scheduler.handlers

    registry = EMPTY_REGISTRY  # until a client switches, or with no preload
    if await client._run_on_scheduler(has_registry):
        registry = await scheduler.envship_registry()
    # A nanny without envship's handlers is not called on them (it would log
    # a traceback): its workers are listed with why it has no state.
    nanny_of = {a: w["nanny"] for a, w in identity["workers"].items() if w.get("nanny")}
    with_envship = await nannies_with_envship(client, nanny_of)

    def rpc(nanny: str) -> Any:
        return client.rpc(nanny) if nanny in with_envship else _WithoutEnvship()

    found = await survey(rpc, identity, registry, timeout=NANNY_TIMEOUT)
    return ClusterStatus(**found)


class _WithoutEnvship:
    """Stands for a nanny that has no envship yet, in :func:`survey`."""

    async def envship_status(self, **_: Any) -> dict:
        raise LookupError(
            "envship is not set up on its nanny (it will be at the first "
            "switch, or at start with `dask worker --preload-nanny envship`)"
        )
