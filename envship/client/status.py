"""``envship.status(client)``: what every worker runs in, each node's cache and
zygotes, each blob.

Asks the scheduler's registry for the survey that its dashboard page shows
(:func:`envship.scheduler.dashboard.page_survey`), or, before there is a
registry, every nanny itself (:func:`envship.survey.survey`); never moves a
blob.
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import Any

from dask.utils import format_bytes
from distributed import Client

from envship.survey import (
    EMPTY_REGISTRY,
    SharedSurvey,
    Surveyed,
    survey,
    survey_key,
)
from envship.text_table import NANNY_OWN, Col, TextTable, clock_time, wrap_notes

from .targets import nannies_with_envship

#: Seconds each nanny has to answer; one that does not is listed without its state.
NANNY_TIMEOUT = 30.0
#: Each client's shared survey (:func:`status`).
_shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class ClusterStatus:
    """Per worker, per node and per blob; shown as tables.

    Attributes
    ----------
    workers : list of dict
        ``name`` (its name; for a worker started without one, its nanny's
        address, which survives its restarts), ``address`` (its current one),
        ``nanny``, ``node``, ``site``, ``environment``
        (a name, or None for the nannies' own), ``id``, ``since`` (unix
        time) and ``unreachable`` (why its nanny did not answer, or None).
    nodes : list of dict
        ``node``, ``site``, ``nannies``, ``cache`` (its folder),
        ``cache_size`` (bytes) and ``zygotes``: the running zygotes of its
        nannies' processes (each once), by name, each a dict of ``id`` and
        ``name`` (its environment), ``pid`` and ``rss`` (resident bytes).
    blobs : list of dict
        ``id``, ``name``, ``size``, ``complete`` and ``partial`` (how many
        nannies hold it whole, or are fetching it), ``transfers``: the
        downloads in progress, with pieces held and the sources so far, and
        ``thin_of``: for a thin pack, the id of its environment.

    Examples
    --------
    >>> envship.status(client)  # doctest: +SKIP
    worker    host   site  environment           since
    node-a-0  host1  east  sklearn-dev 5f0c2d9a  14:03:22
    ...
    """

    workers: list[dict]
    nodes: list[dict]
    blobs: list[dict]

    def _repr_html_(self) -> str:
        from .html import cluster_status

        return cluster_status(self)

    def __repr__(self) -> str:
        return self.render()

    def render(self, width: int | None = 80, wide: bool = False) -> str:
        """The tables as text, each line within ``width`` where it can be:
        workers, nodes, zygotes (if any runs) and blobs.

        Names are never cut. ``wide``: also each worker's address, its
        nanny's, its node's id and the full environment id (no width limit).
        """
        if wide:
            width = None
        hosts = host_labels(self.workers, self.nodes)
        sites = any(w["site"] for w in self.workers) or any(
            n["site"] for n in self.nodes
        )
        columns = [Col("worker", keep=True), Col("host", drop=3)]
        columns += [Col("site", drop=1)] if sites else []
        columns += [Col("environment", keep=True), Col("since", drop=2)]
        if wide:
            columns += [Col("address"), Col("nanny"), Col("node id"), Col("id")]
        workers = TextTable(*columns)
        notes = []
        for w in self.workers:
            if w["unreachable"]:
                env = "(no answer)"
                notes.append(
                    f"{w['name']}: its nanny did not answer: {w['unreachable']}"
                )
            elif w["id"]:
                env = f"{w['environment']} {w['id'][:8]}"
            else:
                env = NANNY_OWN
            row = [w["name"], hosts.get(w["node"], "-")]
            row += [w["site"]] if sites else []
            row += [env, clock_time(w["since"]) if w["since"] else "-"]
            if wide:
                row += [w["address"], w["nanny"], w["node"], w["id"]]
            workers.add_row(*row)
        lines = [workers.render(width)]
        lines += wrap_notes(notes, width)

        nodes = TextTable(
            *[Col("host", keep=True)],
            *([Col("site", drop=2)] if sites else []),
            Col("nannies", right=True),
            Col("cache", right=True),
            Col("folder"),
            *([Col("node id")] if wide else []),
        )
        for n in self.nodes:
            nodes.add_row(
                hosts[n["node"]],
                *([n["site"]] if sites else []),
                n["nannies"],
                "?" if n["cache_size"] is None else format_bytes(n["cache_size"]),
                n["cache"],
                *([n["node"]] if wide else []),
            )
        lines += ["", nodes.render(width)]

        zygotes = TextTable(
            Col("host", keep=True),
            Col("zygote of", keep=True),
            Col("pid", right=True),
            Col("memory", right=True),
        )
        for n in self.nodes:
            for z in n.get("zygotes", ()):
                zygotes.add_row(
                    hosts[n["node"]],
                    f"{z['name']} {z['id'] if wide else z['id'][:8]}",
                    z["pid"],
                    format_bytes(z["rss"]),
                )
        if zygotes.rows:
            lines += ["", zygotes.render(width)]

        if self.blobs:
            names = {w["nanny"]: str(w["name"]) for w in self.workers}
            blobs = TextTable(
                Col("environment", keep=True),
                Col("id", keep=True),
                Col("size", right=True),
                Col("holders"),
            )
            transfers = []
            for b in self.blobs:
                blobs.add_row(
                    b["name"],
                    b["id"] if wide else b["id"][:12],
                    format_bytes(b["size"]),
                    f"{b['complete']} whole, {b['partial']} fetching",
                )
                for t in b["transfers"]:
                    sources = ", ".join(names.get(a, a) for a in t["sources"]) or "-"
                    transfers.append(
                        f"{names.get(t['nanny'], t['nanny'])} fetching {b['name']}: "
                        f"{t['have']}/{t['count']} pieces, from {sources}"
                    )
            lines += ["", blobs.render(width)]
            lines += wrap_notes(transfers, width)
        return "\n".join(lines)


def host_labels(workers: list[dict], nodes: list[dict]) -> dict[str, str]:
    """Node id -> its short host name; ``host[2]`` for a host's second cache folder.

    A node id is ``host:device:inode`` of its cache folder (nannies that share
    a folder share a copy): only the host means something to a user, and its
    first label (``gpu1`` of ``gpu1.example.org``) unless two hosts share it.

    Examples
    --------
    >>> host_labels([], [{"node": "vm:65024:1"}, {"node": "vm:65024:2"},
    ...                  {"node": "gpu1.example.org:2049:7"}])
    {'vm:65024:1': 'vm', 'vm:65024:2': 'vm[2]', 'gpu1.example.org:2049:7': 'gpu1'}
    """
    ids = [n["node"] for n in nodes] + [w["node"] for w in workers]
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    hosts = {i: i.rsplit(":", 2)[0] for i in ids}
    short: dict[str, set[str]] = {}
    for host in hosts.values():
        short.setdefault(host.split(".")[0], set()).add(host)
    labels: dict[str, str] = {}
    seen: dict[str, int] = {}
    for node, host in hosts.items():
        name = host.split(".")[0]
        if len(short[name]) > 1:
            name = host
        seen[name] = seen.get(name, 0) + 1
        labels[node] = name if seen[name] == 1 else f"{name}[{seen[name]}]"
    return labels


def status(client: Client) -> ClusterStatus:
    """What every worker runs in, each node's cache use, and who holds which blob.

    Once a client switched (or with ``dask scheduler --preload envship``),
    the scheduler asks the nannies, and shares their answers with its
    dashboard page (``/envship``) and other status calls while the workers
    and the registry stay as they are (:class:`envship.survey.SharedSurvey`);
    before, the client asks them itself, and its calls share likewise.

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

    # Asked without calling them: a scheduler logs a traceback for a handler
    # it lacks. Defined here to be pickled by value (it may lack envship).
    def registry_handlers(dask_scheduler: Any) -> list[str]:
        wanted = ("envship_registry", "envship_survey")
        return [h for h in wanted if h in dask_scheduler.handlers]

    handlers = await client._run_on_scheduler(registry_handlers)
    if "envship_survey" in handlers:
        # The scheduler asks the nannies (over connections it keeps), and
        # shares the answers with its dashboard page and other clients.
        found = Surveyed.from_msg(await scheduler.envship_survey()).found
        return ClusterStatus(*(_lists(found[k]) for k in ("workers", "nodes", "blobs")))
    registry = EMPTY_REGISTRY  # until a client switches, or with no preload
    if "envship_registry" in handlers:  # an older scheduler side
        registry = await scheduler.envship_registry() or EMPTY_REGISTRY
    shared = _shared.get(client)
    if shared is None:
        shared = _shared[client] = SharedSurvey()
    found = await shared.get(
        survey_key(identity, registry), lambda: _gather(client, identity, registry)
    )
    return ClusterStatus(**copy.deepcopy(found))


async def _gather(client: Client, identity: dict, registry: dict) -> dict:
    # A nanny without envship's handlers is not called on them (it would log
    # a traceback): its workers are listed with why it has no state.
    nanny_of = {a: w["nanny"] for a, w in identity["workers"].items() if w.get("nanny")}
    with_envship = await nannies_with_envship(client, nanny_of)

    def rpc(nanny: str) -> Any:
        return client.rpc(nanny) if nanny in with_envship else _WithoutEnvship()

    return await survey(rpc, identity, registry, timeout=NANNY_TIMEOUT)


def _lists(value: Any) -> Any:
    """``value`` with the lists that came back from the wire as tuples lists again."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_lists(v) for v in value]
    return value


class _WithoutEnvship:
    """Stands for a nanny that has no envship yet, in :func:`survey`."""

    async def envship_status(self, **_: Any) -> dict:
        raise LookupError(
            "envship is not set up on its nanny (it will be at the first "
            "switch, or at start with `dask worker --preload-nanny envship`)"
        )
