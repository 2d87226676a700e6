"""Transport: make every node hold an artifact, with progress and byte counts.

This first version pushes the archive from the client to one nanny per node
that lacks it, in chunks with a few in flight, through the nanny's own
``envship_put`` handler: never through the scheduler, never in a plugin, never
the whole blob in memory. Nannies sharing a node's cache don't receive it
again. A peer-to-peer version replaces only this module.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from distributed.protocol import to_serialize

from . import config
from .store import Artifact

#: Chunks in flight per destination: enough to keep a link busy while the
#: receiver writes, few enough to bound memory (IN_FLIGHT * chunk-size).
IN_FLIGHT = 4


async def push(
    rpc,
    artifact: Artifact,
    nanny: str,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> int:
    """Stream ``artifact`` to ``nanny``'s node cache; return the bytes sent.

    ``rpc`` is a connection pool such as ``client.rpc``.
    """
    chunk_size = config.chunk_size()
    upload = uuid.uuid4().hex
    remote = rpc(nanny)
    slots = asyncio.Semaphore(IN_FLIGHT)
    tasks: list[asyncio.Task] = []

    async def send(offset: int, data: bytes) -> None:
        try:
            await remote.envship_put(
                artifact_id=artifact.id,
                upload=upload,
                offset=offset,
                data=to_serialize(data),
            )
            on_bytes(len(data))
        finally:
            slots.release()

    offset = 0
    with open(artifact.path, "rb") as f:
        while True:
            await slots.acquire()
            data = f.read(chunk_size)
            if not data:
                slots.release()
                break
            tasks.append(asyncio.create_task(send(offset, data)))
            offset += len(data)
            # Surface a failed chunk now rather than after sending the rest.
            for task in tasks:
                if task.done() and task.exception():
                    await asyncio.gather(*tasks, return_exceptions=True)
                    task.result()
    await asyncio.gather(*tasks)
    await remote.envship_commit(
        artifact_id=artifact.id, upload=upload, size=offset, manifest=artifact.manifest
    )
    return offset


async def distribute(
    rpc,
    artifact: Artifact,
    nodes: dict[str, str],
    on_bytes: Callable[[int], None] = lambda n: None,
) -> dict[str, int]:
    """Push to each node of ``nodes`` (node -> the nanny to send to), at once.

    Returns the bytes sent per node.
    """
    sent = await asyncio.gather(
        *(push(rpc, artifact, nanny, on_bytes) for nanny in nodes.values())
    )
    return dict(zip(nodes, sent, strict=True))
