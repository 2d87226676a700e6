"""``envship.gc(client)``: clean every node's cache from a client.

Each node (the nannies sharing one cache) removes the leftovers of crashed
installs and downloads and evicts down to its budget, as ``envship cache gc``
does on one machine; environments that workers run in stay.
"""

from __future__ import annotations

import asyncio

from distributed import Client

from envship.node.messages import GcAnswer, InfoAnswer
from envship.nodes import one_nanny_per_node

from .targets import nannies_with_envship


def gc(client: Client) -> dict[str, dict]:
    """Clean the cache of every node of the cluster, once per node.

    Returns
    -------
    dict
        Node -> ``{"evicted": [ids], "size": bytes left}``, or
        ``{"error": text}`` for a node whose nanny did not answer.

    Examples
    --------
    >>> envship.gc(client)  # doctest: +SKIP
    {'host1:2049:1234': {'evicted': ['5f0c2d9a...'], 'size': 1843200}}
    """
    return client.sync(_gc, client)


async def _gc(client: Client) -> dict[str, dict]:
    if client.scheduler is None:
        raise ValueError("the client is not connected to a scheduler")
    identity = await client.scheduler.identity()
    # Only nannies with envship's handlers are asked: a nanny without them
    # has no cache of envship's, and would log a traceback for the call.
    nanny_of = {a: w["nanny"] for a, w in identity["workers"].items() if w.get("nanny")}
    nannies = sorted(await nannies_with_envship(client, nanny_of))

    async def node_of(nanny: str) -> str | None:
        try:
            return InfoAnswer.from_msg(await client.rpc(nanny).envship_info()).node
        except Exception:  # gone meanwhile, or an invalid answer
            return None

    nodes = dict(
        zip(nannies, await asyncio.gather(*map(node_of, nannies)), strict=True)
    )
    one_per_node = one_nanny_per_node(nodes)

    async def clean(nanny: str) -> dict:
        try:
            answer = GcAnswer.from_msg(await client.rpc(nanny).envship_gc())
            return {"evicted": list(answer.evicted), "size": answer.size}
        except Exception as e:
            return {"error": str(e)}

    done = await asyncio.gather(*map(clean, one_per_node.values()))
    return dict(zip(one_per_node, done, strict=True))
