"""Benchmark: shipping one artifact to 2, 4 and 8 nodes over 100 MB/s links, in one run.

Needs root and iproute2 (``ip``, ``tc``); without them it fails (exit 1),
it never skips. CI runs its smallest case (``--small``: 8 MB, 2 nodes, one
round, the two-site run included)::

    sudo .venv/bin/python bench/broadcast.py [--size 256MB] [--rounds 3] [--json out.json]
    sudo .venv/bin/python bench/broadcast.py --small
    sudo .venv/bin/python bench/broadcast.py --series [--sim-json real.json]

Simulated hosts: one network namespace per host, ``esb-client``,
``esb-scheduler`` and ``esb-node0`` .. ``esb-node7`` (addresses in
10.213.0.0/24), each joined by a veth pair to the bridge of its site; both
ends of every host link are limited with ``tc tbf`` to ``--rate``. The two site
bridges, ``esb-br-east`` and ``esb-br-west``, live in one more namespace,
``esb-switch``, and are joined by one veth pair limited to ``--slow-rate``:
the slow link between the sites. The client and the scheduler are on site
east. Nothing is added to the root namespace, and every namespace (hence every
veth) and process is removed when the script ends, also on error or Ctrl-C.

The scheduler and one nanny per node (``--preload-nanny envship``, a fresh
cache directory each) run in their own namespaces. This script moves its own
thread into ``esb-client`` (``setns``) before it connects, so the client and
every thread it starts send through the client's link. The node caches are on
tmpfs (``--cache-root``, default ``/dev/shm``): the simulated hosts share one
disk, which real hosts do not. The scheduler runs without the Active Memory
Manager, as ``scatter(broadcast=True)`` requires (with it, the replicas that
``replicate`` makes are dropped again and the scatter never ends).

1. Scaling, all nodes on the east bridge and no site labels, so the slow link
   plays no part. For N in ``--nodes`` (2, 4, 8; the first N nodes): envship
   peer to peer (:func:`envship.transfer.broadcast`), today's direct push (the
   same call with ``peer_to_peer=False``: the client sends every piece to every
   node) and ``client.scatter(blob, workers=..., broadcast=True)``.
2. Two sites: the second half of the nodes moved onto the west bridge and all
   nannies restarted with ``DASK_ENVSHIP__SITE`` set; envship peer to peer and
   the direct push to every node, counting the bytes that cross the slow link
   each way (its veth counters) and envship's own count
   (:meth:`ShipReport.crossing`).

The blob is ``--size`` random bytes. The compared runs interleave: each of
``--rounds`` rounds runs envship, the direct push and scatter, in an order that
rotates every round; rows show the run of median time and the spread
(min-max) of all. Each envship run ships it under a fresh
id (as a thin pack whose first 16 bytes change: a node keeps a blob only
under the id its bytes hash to), and the nodes' archives are deleted after
it. Scatter uses ``hash=False``
(a fresh key each run) and waits until the workers have released it. Bytes
sent are read from the client link's counters, so they include protocol
overhead. The scheduler's RSS is sampled every 20 ms during each run: its peak
rise is reported for envship runs and, separately, for scatter runs (whose
bytes pass through the scheduler). "cpu" is the whole machine's busy share
during a run and "own" the cores that the benchmark's processes kept busy, to
tell a CPU-bound run from a link-bound one.

Targets: the client sends at most 1.1x the artifact whatever the node count;
8 nodes take at most 1.3x the time of 2; at 8 nodes at least 3x faster than
scatter(broadcast=True) and than the direct push; across two sites the slow
link carries at most 1.2x the artifact into each site; scheduler RSS rises by
under 50 MB during envship runs.

The link-bound series (``--series``)
------------------------------------

The scaling runs at 2, 8, 16, 32 and 64 nodes (all 64 nannies started once,
the first N used), with links slow enough that the machine's two cores are
not what limits them: 250 KB/s host links, a 16 MiB blob in 64 pieces of
256 KiB (about a second of a link each), two interleaved rounds, and
``scatter(broadcast=True)`` once, at 64 nodes only (10 minutes; the direct
push, 64 times the blob through the client's link, is left out). The
figures it writes with ``--sim-json`` are what ``simulate.py --validate``
reads. Choices, each for a reason the runs showed:

- Why 250 KB/s, and pieces of a second: every node long-polls every peer it
  knows (``have``), so 64 nodes exchange about 64 x 63 answers per second
  whatever the link, one per new piece or per second without news
  (``HAVE_WAIT``). Pieces much shorter than a second make that many more
  (one per piece), and at a ``have`` round trip of a few tenths of a
  millisecond of Python on each side 64 nodes become CPU-bound here.
- The nannies' ``envship.transfer.piece-timeout`` (and ``idle-timeout``)
  is 600 s, not 30 s: whoever holds the newest piece is asked for it by
  every other node at once (rarest first), and its link, shared among up
  to 63 x 2 requests of a 1-second piece, takes minutes for each; with
  30 s every one of them times out and drops that peer (``simulate.py
  --links fair --piece-timeout 30`` shows the client then sending the
  blob many times over).
- Lighter nodes: each worker runs with dask's profiler off and no memory
  limit (so neither it nor its nanny samples anything every 10 ms): 64
  idle workers profiling kept more than a core busy. A nanny and its
  worker take about 70 MB each: 64 nodes fit in 24 GB many times over;
  the two cores are the limit, not memory.
- The tbf burst is 20 ms of the link's rate, at least 64 KiB (it was at
  least 2 MiB: 8 s of free traffic at 250 KB/s).
- Nannies start 8 at a time, each batch registered before the next
  (64 at once on two cores took minutes and timed out).

- The kernel's ARP table (one for all namespaces, 1024 entries) is raised
  for the run and put back after: 64 hosts that each know 63 others
  overflowed it, and every node's connections to its last ~15 peers failed
  at once ("neighbor table overflow"; the first 64-node run hung on it).

Measured (2026-12-04, this 2-core machine, one round, after the ARP fix;
the CI and other sessions' simulations ran meanwhile, load 1 to 8), with
the transfer code before the bounded peer set and late requests (every
peer polled; the simulator with ``peers`` 0):

    nodes   seconds   / 2 nodes   own cores   simulated (fair)   error
        2     83.60        1.00        0.13              79.56   -4.8%
       16    121.85        1.46        0.39             123.32   +1.2%
       64    196.31        2.35        1.89             245.96  +25.3%

The ideal is 16 MiB over 250 KB/s, 71 s with the headers. Targets: 64
nodes take 2.35x the time of 2 (target 1.3: missed). The client's link
carried 1.13x the blob at 2 nodes (target 1.1: missed; TCP/IP headers,
~5%, and the rest retransmissions at the tbf queue; envship's own count,
``client_bytes``, is 1.00). Scatter at 64 nodes was not measured: the run
that had it failed on the ARP table, and there was no time for another.
Memory: a nanny ~70 MB and its worker ~71 MB (RSS), the scheduler 63 MB:
64 nodes ~9 GB, with 22 GB available; memory is not the limit, the cores
are. At 64 nodes the benchmark's processes kept 1.89 of the 2 cores busy,
nearly all of it the ``have`` long polls (64 x 63 answers a second), so 64
is at the edge of link-bound here; 16 (0.39 cores) is well within.

Where the time goes at 64 nodes (``simulate.py`` with the same setup):
rarest first sends every node to the one holder of the newest piece, and
that holder's link serves all 63 of them at once, each at 1/63 of it, so
nobody can pass the piece on before about 63 piece-times; the client's last
pieces are spread that way at the end. Serve slots that cover the send
(``--serve-slots 2``: askers go elsewhere while a node sends two) took
the simulated 64 nodes from 226 s to 167 s (both with a wire overhead of
1.045, the headers alone; slow to simulate: the busy answers). The
simulator is within 5% at 2 and 16 nodes but 25% slower than the real run at 64: the real nodes, on
two busy cores, see news of a piece late, by when more nodes hold it, so
fewer pile onto one holder; the simulation has no CPU to be late on.

Again with the code of this submission (24 peers polled per node, late
requests asked again elsewhere; 23:45, one round, nothing else running):

    nodes   seconds   / 2 nodes   own cores   simulated (fair)   error
        2     83.11        1.00        0.12              81.01   -2.5%
       16    119.33        1.44        0.43             127.73   +7.0%
       64    213.11        2.56        1.69             259.10  +21.6%

envship's own count of the client's bytes: 1.00 of the blob at every N
(the client's link: 1.15, 1.08 and 1.20, with headers, the offers and
waits to every node, and retransmissions). The bound spares cores (1.69
against 1.89 at 64) but not time: the hot holder of the newest piece
stays (see above).

With serve slots that cover the send (12) and 32 MiB of requests in flight
(24 of these pieces) per node (2026-12-05, two interleaved rounds, nothing
else running; 64 nodes in a run of their own, and a third run the same way):

    nodes   seconds (spread)          / 2 nodes   own cores   simulated   error
        2    84.23 (82.99-85.47)          1.00        0.12        80.40   -4.5%
        8    92.12 (91.65-92.60)          1.09        0.21        93.93   +2.0%
       16   103.59 (102.42-104.76)        1.23        0.48       109.92   +6.1%
       32   131.79 (129.03-134.56)        1.56        1.31       132.19   +0.3%
       64   175.62 (164.59-317.06)        2.08        1.65       144.54  -17.7%

``scatter(broadcast=True)`` to the 64 nodes did not end within
``RUN_TIMEOUT`` (900 s) and was stopped: at least 5.1x envship's time. At 64
nodes envship's own count of the client's bytes was 1.00 and 1.03 of the
blob (two pieces pushed again in the slow run), the client's link 1.16 to
1.24. The run of 317 s kept only 1.04 cores busy: nodes waited rather than
worked, for a cause not found yet (a busy peer is left alone for half the
time a piece takes the asker lately, and with 24 requests sharing a 250
KB/s link that is many seconds). At 64 nodes the machine is no longer
link-bound (1.65 cores), which is where the simulator, within 6.1% up to
32 nodes, is 18% fast.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import dask
import psutil
import xxhash
from dask.utils import parse_bytes
from distributed import Client

from envship import config
from envship.archive import path_digest
from envship.manifest import Manifest, ThinManifest
from envship.transfer import Offer, Peer, PieceTable, broadcast, piece_size

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Sample, rotated, small_parser, target_line  # noqa: E402

PREFIX = "esb-"
SWITCH = "esb-switch"
SITES = ("east", "west")
BRIDGE = {site: f"esb-br-{site}" for site in SITES}
#: The slow link's two ends, by the bridge each sits on: what ``esb-x-east``
#: transmits goes from east to west.
SLOW_END = {site: f"esb-x-{site}" for site in SITES}
HOST_DEV = "esb-eth0"
SUBNET = "10.213.0"
SCHEDULER = f"tcp://{SUBNET}.2:8786"
CLIENT_SITE = "east"
ENV = {"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "30s"}
RUN_TIMEOUT = 900
CLONE_NEWNET = 0x40000000
#: Nannies started at once (each batch registers before the next starts).
START_BATCH = 8
#: ``--series``: link-bound, so that the machine's two cores are not what
#: limits it (see the docstring).
SERIES = {
    "nodes": [2, 8, 16, 32, 64],
    "rate": 250_000,
    "size": 16 * 2**20,
    "piece_size": 2**18,
    "sites": False,
    "baselines": ["scatter"],
    "baselines_at": "largest",
    "baseline_rounds": 1,
    "rounds": 2,
    "piece_timeout": "600s",
}
#: ``--series``: lighter nannies and workers. 128 idle processes that each
#: sample their stack every 10 ms (dask's profiler), check their event loop
#: every 20 ms and their system every 0.5 s kept 1.7 cores busy.
LIGHT = {
    "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
    "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "1s",
    "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "5s",
    "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__DISK": "False",
    "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__GIL__ENABLED": "False",
}
#: One-way latency of a host link, s, for the simulator: two veths and a bridge.
LINK_LATENCY = 0.0002


def sh(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def ip(ns: str, *args: str) -> str:
    """``ip`` inside namespace ``ns``."""
    return sh("ip", "-n", ns, *args)


def namespaces() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").splitlines()]


def tx_bytes(ns: str, dev: str) -> int:
    (link,) = json.loads(ip(ns, "-s", "-j", "link", "show", "dev", dev))
    return link["stats64"]["tx"]["bytes"]


def limit(ns: str, dev: str, rate: int) -> None:
    """Limit what ``dev`` sends to ``rate`` bytes/s."""
    # 20 ms of traffic (far above rate/HZ), and at least one 64 KiB segment
    # (GSO). Not a fixed 2 MiB: at a slow link's rate that would carry a good
    # part of a small blob at no cost (2 s of a 1 MB/s link).
    burst = max(2**16, rate // 50)
    sh(
        *("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf"),
        *("rate", f"{rate * 8}bit", "burst", str(burst), "latency", "100ms"),
    )


def enter_netns(name: str) -> None:
    """Move this thread, and every thread it starts from now on, into ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/run/netns/{name}") as f:
        if libc.setns(f.fileno(), CLONE_NEWNET):
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")


def node_ip(k: int) -> str:
    return f"{SUBNET}.{10 + k}"


def base_env() -> dict[str, str]:
    """This process's environment without envship settings: the script sets those."""
    return {k: v for k, v in os.environ.items() if not k.startswith("DASK_ENVSHIP__")}


def stop(proc: subprocess.Popen) -> None:
    """End ``proc`` and the rest of its process group (a nanny's worker)."""
    with suppress(ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# -- the simulated hosts ------------------------------------------------------------


@dataclass
class Node:
    name: str
    worker: str
    nanny: str
    site: str | None
    cache: Path


class Testbed:
    """Namespaces, links and processes of one run; :meth:`close` removes them all."""

    def __init__(
        self,
        workdir: Path,
        cache_root: Path,
        count: int,
        rate: int,
        slow_rate: int,
        nanny_env: dict[str, str] | None = None,
    ):
        self.nanny_env = nanny_env or {}
        #: Kernel limits raised for the run (path -> old value), put back at close.
        self.neigh: dict[Path, str] = {}
        self.home = -1
        self.workdir = workdir
        self.cache_root = cache_root
        self.count = count
        self.rate = rate
        self.slow_rate = slow_rate
        self.created: list[str] = []
        self.scheduler: subprocess.Popen | None = None
        self.nannies: list[subprocess.Popen] = []
        self.sites: dict[str, str | None] = {}
        self.caches: dict[str, Path] = {}

    def build(self) -> None:
        self._raise_neighbour_limit()
        self._add_ns(SWITCH)
        for site in SITES:
            ip(SWITCH, "link", "add", BRIDGE[site], "type", "bridge")
            ip(SWITCH, "link", "set", BRIDGE[site], "up")
        east, west = SLOW_END["east"], SLOW_END["west"]
        ip(SWITCH, "link", "add", east, "type", "veth", "peer", west)
        for site in SITES:
            ip(SWITCH, "link", "set", SLOW_END[site], "master", BRIDGE[site], "up")
            limit(SWITCH, SLOW_END[site], self.slow_rate)
        self._add_host("client", f"{SUBNET}.1")
        self._add_host("scheduler", f"{SUBNET}.2")
        for k in range(self.count):
            self._add_host(f"node{k}", node_ip(k))

    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.created.append(name)
        ip(name, "link", "set", "lo", "up")

    def _add_host(self, host: str, address: str) -> None:
        ns = port = PREFIX + host
        self._add_ns(ns)
        ip(SWITCH, "link", "add", port, "type", "veth", "peer", HOST_DEV, "netns", ns)
        ip(ns, "addr", "add", f"{address}/24", "dev", HOST_DEV)
        ip(ns, "link", "set", HOST_DEV, "up")
        ip(SWITCH, "link", "set", port, "up")
        limit(ns, HOST_DEV, self.rate)
        limit(SWITCH, port, self.rate)
        self.attach(host, "east")

    def attach(self, host: str, site: str) -> None:
        ip(SWITCH, "link", "set", PREFIX + host, "master", BRIDGE[site])

    def counters(self) -> dict[str, int]:
        """Bytes sent so far by the client, and over the slow link into each site."""
        return {
            "client": tx_bytes(PREFIX + "client", HOST_DEV),
            "into_west": tx_bytes(SWITCH, SLOW_END["east"]),
            "into_east": tx_bytes(SWITCH, SLOW_END["west"]),
        }

    def _start(self, host: str, argv: list[str], env: dict) -> subprocess.Popen:
        with open(self.workdir / f"{host}.log", "ab") as log:
            return subprocess.Popen(
                ["ip", "netns", "exec", PREFIX + host, sys.executable, "-m", *argv],
                env={**base_env(), **ENV, **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_scheduler(self) -> None:
        self.scheduler = self._start(
            "scheduler",
            ["distributed.cli.dask_scheduler", "--host", f"{SUBNET}.2"]
            + ["--port", "8786", "--no-dashboard"],
            # As scatter's docstring asks for broadcast=True: the Active Memory
            # Manager would drop the replicas that replicate() makes, forever.
            {"DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START": "False"},
        )

    @property
    def scheduler_pid(self) -> int:
        if self.scheduler is None:
            raise RuntimeError("the scheduler is not running")
        return self.scheduler.pid

    def start_nodes(self, client: Client, sites: bool) -> None:
        """A nanny per node, west the second half if ``sites`` else all east.

        Started ``START_BATCH`` at a time, each batch registered before the
        next starts: 64 nannies and their workers importing at once on two
        cores would take minutes, and the first ones time out meanwhile.
        """
        for first in range(0, self.count, START_BATCH):
            for k in range(first, min(first + START_BATCH, self.count)):
                self._start_node(k, sites)
            client.wait_for_workers(len(self.nannies), timeout=120)

    def _start_node(self, k: int, sites: bool) -> None:
        name = f"node{k}"
        site = SITES[2 * k // self.count] if sites else None
        self.attach(name, site or "east")
        self.sites[name] = site
        self.caches[name] = Path(tempfile.mkdtemp(dir=self.cache_root))
        scratch = tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir)
        env = {**self.nanny_env}
        env["DASK_ENVSHIP__CACHE__DIRECTORY"] = str(self.caches[name])
        if site:
            env["DASK_ENVSHIP__SITE"] = site
        argv = ["distributed.cli.dask_worker", SCHEDULER, "--nanny"]
        argv += ["--nthreads", "1", "--host", node_ip(k), "--no-dashboard"]
        argv += ["--preload-nanny", "envship", "--name", name]
        argv += ["--local-directory", scratch, "--memory-limit", "0"]
        self.nannies.append(self._start(name, argv, env))

    def stop_nodes(self) -> None:
        for proc in self.nannies:  # all at once: 64 in turn take minutes
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        while self.nannies:
            stop(self.nannies.pop())

    def nodes(self, client: Client) -> list[Node]:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        by_name = {w["name"]: (addr, w["nanny"]) for addr, w in workers.items()}
        return [
            Node(name, *by_name[name], self.sites[name], self.caches[name])
            for name in (f"node{k}" for k in range(self.count))
        ]

    def processes(self) -> list[psutil.Process]:
        """This process, the scheduler, the nannies and their workers."""
        nannies = [psutil.Process(p.pid) for p in self.nannies]
        workers = [w for n in nannies for w in n.children(recursive=True)]
        return [
            psutil.Process(),
            psutil.Process(self.scheduler_pid),
            *nannies,
            *workers,
        ]

    def memory(self) -> dict[str, float]:
        """RSS, MB: the scheduler, a nanny and a worker (medians), all processes."""
        nannies = [psutil.Process(p.pid) for p in self.nannies]
        workers = [w for n in nannies for w in n.children(recursive=True)]

        def rss(ps: list[psutil.Process]) -> list[float]:
            return sorted(p.memory_info().rss / 1e6 for p in ps)

        n, w = rss(nannies), rss(workers)
        return {
            "scheduler": rss([psutil.Process(self.scheduler_pid)])[0],
            "nanny": n[len(n) // 2],
            "worker": w[len(w) // 2],
            "total": sum(rss(self.processes())),
        }

    def _raise_neighbour_limit(self) -> None:
        """Room in the kernel's ARP table for every host to know every other.

        The table is one for all namespaces (at most ``gc_thresh3`` entries,
        1024 by default): 64 nodes that each talk to the 63 others overflow
        it, and connections to the last peers fail at once ("neighbor table
        overflow", OSError). Raised for the run, put back by :meth:`close`.
        """
        need = 4 * (self.count + 2) ** 2
        # This thread moves into esb-client later: keep a way back to the
        # namespace whose table this is, to put the limits back.
        self.home = os.open("/proc/self/ns/net", os.O_RDONLY)
        for k, floor in ((1, 0), (2, need // 2), (3, need)):
            path = Path(f"/proc/sys/net/ipv4/neigh/default/gc_thresh{k}")
            old = path.read_text().strip()
            if int(old) < floor:
                self.neigh[path] = old
                path.write_text(str(floor))

    def close(self) -> None:
        self.stop_nodes()
        if self.neigh:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(self.home, CLONE_NEWNET):
                raise OSError(ctypes.get_errno(), "setns back failed")
            for path, old in self.neigh.items():
                path.write_text(old)
            self.neigh = {}
        if self.scheduler is not None:
            stop(self.scheduler)
            self.scheduler = None
        while self.created:
            sh("ip", "netns", "del", self.created.pop())

    def show_logs(self, lines: int = 15) -> None:
        for log in sorted(self.workdir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {log.name}", *tail, sep="\n", file=sys.stderr)


# -- measuring --------------------------------------------------------------------


class RssPeak:
    """The highest RSS of a process while the block runs, sampled every 20 ms.

    Also the least memory the machine had available meanwhile (``low``).
    """

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)

    def __enter__(self) -> RssPeak:
        self.before = self.peak = self.process.memory_info().rss
        self.low = psutil.virtual_memory().available
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)
            self.low = min(self.low, psutil.virtual_memory().available)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def cpu_seconds(processes: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in processes)


@contextmanager
def measuring(bed: Testbed):
    """Time the block; fill the dict it gets with seconds, bytes, RSS and CPU.

    ``cpu``: the machine's busy share, %; ``own``: the cores that the
    benchmark's processes kept busy, on average.
    """
    m: dict = {}
    before = bed.counters()
    processes = bed.processes()
    own = cpu_seconds(processes)
    psutil.cpu_percent()
    start = time.perf_counter()
    with RssPeak(bed.scheduler_pid) as rss:
        yield m
    m["seconds"] = time.perf_counter() - start
    m["cpu"] = psutil.cpu_percent()
    m["own"] = (cpu_seconds(processes) - own) / m["seconds"]
    m["rss_rise"] = rss.peak - rss.before
    m["available_low"] = rss.low
    after = bed.counters()
    m.update({k: after[k] - before[k] for k in after})


@dataclass
class Blob:
    path: Path
    size: int
    table: PieceTable


def make_blob(path: Path, size: int, piece: int) -> Blob:
    with open(path, "wb") as f:
        for offset in range(0, size, 2**24):
            f.write(os.urandom(min(2**24, size - offset)))
    return Blob(path, size, PieceTable.of_file(path, piece))


def fresh_offer(blob: Blob, label: str) -> Offer:
    """An offer of ``blob`` under an id of its own for ``label``.

    A node keeps a blob only once its bytes are the id offered (an archive's
    content id, a thin pack's digest), so the blob goes as a thin pack, and
    its first bytes change with ``label``: a fresh id for each run.
    """
    salt = xxhash.xxh3_128_digest(label.encode())
    with open(blob.path, "r+b") as f:
        f.write(salt)
        f.seek(0)
        first = f.read(blob.table.piece_size)
    table = replace(
        blob.table,
        digests=(xxhash.xxh3_128_hexdigest(first), *blob.table.digests[1:]),
    )
    id = path_digest(blob.path)
    env = Manifest(
        id=xxhash.xxh3_128_hexdigest(b"env:" + salt),
        name="bench-blob",
        kind="conda",
        python="3.11.7",
        file_count=1,
        unpacked_size=blob.size,
    )
    manifest = ThinManifest(id, env.id, None, env, blob.size, files=1, refs=0)
    return Offer(id, "bench-blob", manifest, table)


def ship(client, bed, blob, nodes, label: str, peer_to_peer: bool) -> dict:
    """One envship broadcast to ``nodes`` under a fresh id."""
    offer = fresh_offer(blob, label)
    fetchers = [Peer(n.nanny, n.site) for n in nodes]
    client_site = CLIENT_SITE if nodes[0].site else None
    with measuring(bed) as m:
        report = client.sync(
            broadcast,
            client.rpc,
            blob.path,
            offer,
            fetchers,
            peer_to_peer=peer_to_peer,
            client_site=client_site,
            callback_timeout=RUN_TIMEOUT,
        )
    if report.failed:
        raise RuntimeError(f"{label}: {report.failed}")
    m["envship_client_bytes"] = report.client_bytes
    m["received"] = {nanny: s["received"] for nanny, s in report.nodes.items()}
    m["crossing"] = report.crossing({n.nanny: n.site for n in nodes}, client_site)
    for node in nodes:
        for f in (node.cache / "archives").iterdir():
            f.unlink()
    return m


def scatter(client, bed, data: bytes, nodes) -> dict:
    """``client.scatter(broadcast=True)`` to ``nodes``, then release it."""
    workers = [n.worker for n in nodes]
    with measuring(bed) as m:
        scattering = client.scatter(
            data, workers=workers, broadcast=True, hash=False, asynchronous=True
        )
        # scatter has no timeout of its own while it replicates
        try:
            future = client.sync(asyncio.wait_for, scattering, RUN_TIMEOUT)
        except TimeoutError:
            future = None
    if future is None:  # its time is at least RUN_TIMEOUT: say so, go on
        m["timed_out"] = True
        print(f"  scatter did not end within {RUN_TIMEOUT} s", flush=True)
        return m
    holders = client.who_has(future)[future.key]
    if sorted(holders) != sorted(workers):
        raise RuntimeError(f"scatter left the blob on {holders}, not {workers}")
    client.cancel(future)
    deadline = time.monotonic() + 60
    while any(client.has_what().values()):
        if time.monotonic() > deadline:
            raise RuntimeError("the workers kept the scattered blob")
        time.sleep(0.2)
    return m


def middle(runs: list[dict]) -> dict:
    """The run of median time (the lower one of two middles)."""
    return sorted(runs, key=lambda m: m["seconds"])[(len(runs) - 1) // 2]


def rounds_of(client, bed, blob: Blob, nodes, plan: dict[str, int], tag: str):
    """``plan[kind]`` runs of each kind to ``nodes``, interleaved: kind -> runs.

    A kind with fewer rounds than the others runs in the first ones only.
    """
    kinds = list(plan)
    by: dict[str, list[dict]] = {kind: [] for kind in kinds}
    data = blob.path.read_bytes() if "scatter" in kinds else b""
    for r in range(max(plan.values())):
        for kind in rotated(kinds, r):
            if r >= plan[kind]:
                continue
            if kind == "scatter":
                m = scatter(client, bed, data, nodes)
            else:
                p2p = kind == "envship"
                m = ship(client, bed, blob, nodes, f"{tag}-{kind}-{r}", p2p)
            by[kind].append(m)
    return by


def scaling_runs(client, bed: Testbed, blob: Blob, args: argparse.Namespace) -> dict:
    """envship and the baselines to the first N nodes, all on site east.

    The baselines (``args.baselines``: direct push, scatter) run at every N,
    or at the largest only (``--baselines-at largest``), ``args.baseline_rounds``
    times each (default: as many as envship).
    """
    results = {}
    counts = sorted(args.nodes)
    for n in counts:
        print(f"{n} nodes ...", flush=True)
        nodes = bed.nodes(client)[:n]
        plan = {"envship": args.rounds}
        if args.baselines_at == "all" or n == counts[-1]:
            for kind in args.baselines:
                plan[kind] = args.baseline_rounds or args.rounds
        results[n] = rounds_of(client, bed, blob, nodes, plan, f"n{n}")
        if args.sim_json:  # so far: a run that fails later keeps these
            partial = sim_series({"scaling": results}, args)
            args.sim_json.write_text(json.dumps(partial, indent=1))
    return results


def site_runs(client, bed: Testbed, blob: Blob, rounds: int) -> dict:
    """envship and direct push to all nodes, half of them moved to site west."""
    print("two sites ...", flush=True)
    bed.stop_nodes()
    while client.scheduler_info(n_workers=-1)["workers"]:
        time.sleep(0.2)
    bed.start_nodes(client, sites=True)
    nodes = bed.nodes(client)
    plan = {"envship": rounds, "push": rounds}
    return rounds_of(client, bed, blob, nodes, plan, "sites")


def measure_all(bed: Testbed, blob: Blob, args: argparse.Namespace) -> dict:
    bed.start_scheduler()
    enter_netns(PREFIX + "client")
    with Client(SCHEDULER, timeout="120s") as client:
        bed.start_nodes(client, sites=False)
        rss = psutil.Process(bed.scheduler_pid).memory_info().rss
        results: dict[str, Any] = {"nodes": bed.count, "scheduler_rss_start": rss}
        results["memory_start"] = bed.memory()
        results["scaling"] = scaling_runs(client, bed, blob, args)
        results["memory_end"] = bed.memory()
        if args.sites:
            results["sites"] = site_runs(client, bed, blob, args.rounds)
    return results


# -- report --------------------------------------------------------------------------


def seconds(runs: list[dict]) -> Sample:
    return Sample(m["seconds"] for m in runs)


def checks(
    results: dict, size: int, series: bool = False
) -> list[tuple[str, float, str, float]]:
    """(target, measured value, comparison, bound) for each target, on medians."""
    scaling = results["scaling"]
    low, high = min(scaling), max(scaling)
    p2p = {n: by["envship"] for n, by in scaling.items()}
    sent = max(m["client"] for runs in p2p.values() for m in runs) / size
    slower = seconds(p2p[high]).median / seconds(p2p[low]).median
    rows = [
        ("client sends / artifact, worst run of any N", sent, "<=", 1.1),
        (f"time {high} nodes / time {low} nodes (medians)", slower, "<=", 1.3),
    ]
    for kind in ("scatter", "push"):
        if kind not in scaling[high]:
            continue
        speedup = seconds(scaling[high][kind]).median / seconds(p2p[high]).median
        rows.append((f"{high} nodes: {kind} / envship (medians)", speedup, ">=", 3))
    if "sites" in results:
        worst = max(
            max(m["into_west"], m["into_east"]) for m in results["sites"]["envship"]
        )
        rows.append(
            ("slow link into a site / artifact, worst run", worst / size, "<=", 1.2)
        )
    envship_runs = [
        m for by in scaling.values() for k in ("envship", "push") for m in by.get(k, ())
    ]
    envship_runs += [m for runs in results.get("sites", {}).values() for m in runs]
    rise = max(m["rss_rise"] for m in envship_runs) / 1e6
    rows.append(("scheduler RSS rise, envship runs, worst (MB)", rise, "<", 50))
    if series:
        # Link-bound, not CPU-bound: the cores the benchmark's processes used.
        own = max(middle(runs)["own"] for runs in p2p.values())
        rows.append(("own cores, envship median runs, most of any N", own, "<=", 1.0))
    return rows


def row(label: str, runs: list[dict], size: int) -> str:
    r, s = middle(runs), seconds(runs)
    more = ">" if r.get("timed_out") else ""  # a lower bound
    return (
        f"{label:<16}{more + format(r['seconds'], '.2f'):>8}{f'{s.low:.2f}-{s.high:.2f}':>12}"
        f"{r['client'] / size:6.2f}{r['cpu']:6.0f}{r['own']:6.1f}{r['rss_rise'] / 1e6:7.0f}"
    )


def print_report(
    results: dict, blob: Blob, rates: tuple[int, int], rounds: int
) -> None:
    size = blob.size
    print(
        f"\nblob {size / 1e6:.4g} MB in {blob.table.count} pieces of "
        f"{blob.table.piece_size / 2**10:.0f} KiB; host links "
        f"{rates[0] / 1e6:.4g} MB/s, slow link {rates[1] / 1e6:.4g} MB/s; "
        f"{os.cpu_count()} cores; {rounds} round(s), interleaved\n"
        "s: median seconds, spread: min-max; the other columns are of the median run.\n"
        "sent: bytes out of the client's link / blob; cpu: machine busy, %; own:\n"
        "cores used by the benchmark's processes; rss: scheduler RSS peak rise, MB\n"
    )
    header = f"{'':<16}{'s':>8}{'spread':>12}{'sent':>6}{'cpu':>6}{'own':>6}{'rss':>7}"
    print(f"{header}{'/ envship':>11}")
    for n, by in results["scaling"].items():
        base = seconds(by["envship"]).median
        for kind, runs in by.items():
            ratio = seconds(runs).median / base
            slower = f"{ratio:10.2f}x" if kind != "envship" else ""
            print(f"{row(f'{n} nodes {kind}', runs, size)}{slower}")
    if "sites" in results:
        print(
            f"\ntwo sites, {results['nodes']} nodes half east half west, client in "
            "east;\nslow link bytes into each site / blob, and envship's own count "
            "of bytes that crossed\n"
        )
        print(f"{header}{'west':>7}{'east':>7}{'envship':>9}")
        for kind, runs in results["sites"].items():
            r = middle(runs)
            print(
                f"{row(kind, runs, size)}{r['into_west'] / size:7.2f}"
                f"{r['into_east'] / size:7.2f}{r['crossing'] / size:9.2f}"
            )
    print(f"\nscheduler RSS at start: {results['scheduler_rss_start'] / 1e6:.0f} MB")
    for when in ("start", "end"):
        mem = results[f"memory_{when}"]
        print(
            f"memory at the {when} of the scaling runs, MB: scheduler "
            f"{mem['scheduler']:.0f}, a nanny {mem['nanny']:.0f} and its worker "
            f"{mem['worker']:.0f} (medians), all {results['nodes']} nodes' "
            f"processes and the rest {mem['total']:.0f}"
        )
    runs = [m for by in results["scaling"].values() for rs in by.values() for m in rs]
    low = min(m["available_low"] for m in runs) / 1e9
    print(f"least memory available on the machine during a run: {low:.1f} GB")
    print("\ntargets")
    for target, value, how, bound in results["checks"]:
        print(target_line(target, value, how, bound))


def parse_args() -> argparse.Namespace:
    parser = small_parser(__doc__)
    parser.add_argument("--size", default="256MB", type=parse_bytes)
    parser.add_argument("--rate", default="100MB", type=parse_bytes)
    parser.add_argument("--slow-rate", default="50MB", type=parse_bytes)
    parser.add_argument(
        "--nodes", default=[2, 4, 8], type=lambda s: [int(n) for n in s.split(",")]
    )
    parser.add_argument("--rounds", default=1, type=int, help="interleaved rounds")
    parser.add_argument(
        "--no-sites", dest="sites", action="store_false", help="skip the two-site run"
    )
    parser.add_argument(
        "--cache-root",
        default="/dev/shm",
        help="where the node caches go; tmpfs, since the simulated hosts share one disk",
    )
    parser.add_argument(
        "--piece-size",
        type=parse_bytes,
        default=None,
        help="default: envship.transfer.piece-size (the nannies take the offer's)",
    )
    parser.add_argument(
        "--baselines",
        default=["push", "scatter"],
        type=lambda s: [k for k in s.split(",") if k],
        help="what envship is compared with: push, scatter (comma-separated)",
    )
    parser.add_argument(
        "--baselines-at", choices=["all", "largest"], default="all", help="which N"
    )
    parser.add_argument(
        "--baseline-rounds", type=int, default=0, help="default: --rounds"
    )
    parser.add_argument(
        "--series",
        action="store_true",
        help="the link-bound scaling series (2 to 64 nodes, slow links; see above)",
    )
    parser.add_argument(
        "--piece-timeout",
        default=None,
        help="the nannies' envship.transfer.piece-timeout (and idle-timeout); "
        "default: theirs",
    )
    parser.add_argument(
        "--sim-json",
        type=Path,
        help="write the envship series here, as simulate.py --validate reads it",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.series:  # its defaults, under what the command line gives
        parser.set_defaults(**SERIES)
        args = parser.parse_args()
    if args.small:
        args.size, args.nodes, args.rounds = parse_bytes("8MB"), [2], 1
        if args.series:
            args.size, args.piece_size = parse_bytes("2MB"), 2**18
    if args.piece_size is None:
        args.piece_size = piece_size()
    return args


def require_namespaces() -> None:
    """Exit non-zero, saying why, unless this process may make network namespaces."""
    if os.geteuid():
        sys.exit("needs root: sudo .venv/bin/python bench/broadcast.py")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        sys.exit(
            f"needs iproute2 ({', '.join(missing)} not found): apt-get install iproute2"
        )
    try:
        stale = [ns for ns in namespaces() if ns.startswith(PREFIX)]
    except RuntimeError as e:
        sys.exit(f"`ip netns` is unavailable here: {e}")
    if stale:
        sys.exit(f"namespaces {stale} exist: another run, or left over (ip netns del)")


def main() -> None:
    args = parse_args()
    require_namespaces()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    dask.config.set({"distributed.comm.timeouts.connect": "30s"})
    with (
        tempfile.TemporaryDirectory(prefix=PREFIX) as tmp,
        tempfile.TemporaryDirectory(prefix=PREFIX, dir=args.cache_root) as caches,
    ):
        nanny_env = {}
        if args.series:
            nanny_env.update(LIGHT)
        if args.piece_timeout:
            for key in ("PIECE_TIMEOUT", "IDLE_TIMEOUT"):
                nanny_env[f"DASK_ENVSHIP__TRANSFER__{key}"] = args.piece_timeout
        bed = Testbed(
            Path(tmp),
            Path(caches),
            max(args.nodes),
            args.rate,
            args.slow_rate,
            nanny_env,
        )
        atexit.register(bed.close)
        try:
            bed.build()
            blob = make_blob(Path(tmp) / "blob", args.size, args.piece_size)
            results = measure_all(bed, blob, args)
        except Exception:
            bed.show_logs()
            raise
        finally:
            bed.close()
    results["checks"] = checks(results, blob.size, args.series)
    print_report(results, blob, (args.rate, args.slow_rate), args.rounds)
    if args.json:
        config = {k: str(v) for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"config": config, **results}, indent=1))
    if args.sim_json:
        args.sim_json.write_text(json.dumps(sim_series(results, args), indent=1))


def sim_series(results: dict, args: argparse.Namespace) -> dict:
    """The envship series as ``simulate.py --validate`` reads it: medians per N."""
    scaling = results["scaling"]
    counts = sorted(scaling)
    runs = [scaling[n]["envship"] for n in counts]
    # Bytes on the client's link per byte of the blob, at the fewest nodes
    # (whose other messages, offers and waits, are fewest): the headers.
    overhead = min(m["client"] for m in runs[0]) / args.size
    timeout = args.piece_timeout or config.get("transfer.piece-timeout")
    return {
        "nodes": counts,
        "seconds": [seconds(r).median for r in runs],
        "spread": [[seconds(r).low, seconds(r).high] for r in runs],
        "own_cores": [middle(r)["own"] for r in runs],
        "link": {
            "rate": args.rate,
            "latency": LINK_LATENCY,
            "size": args.size,
            "piece_size": args.piece_size,
            # The peers a node polls, as the nannies' default config says.
            "peers": int(config.get("transfer.peers-polled")),
            "wire_overhead": overhead,
            "piece_timeout": dask.utils.parse_timedelta(timeout),
            "links": "fair",
        },
    }


if __name__ == "__main__":
    main()
