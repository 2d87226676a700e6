"""Benchmark: shipping one artifact to 2, 4 and 8 nodes over 100 MB/s links, in one run.

Needs root and iproute2 (``ip``, ``tc``); without them it fails (exit 1),
it never skips. CI runs its smallest case (``--small``: 8 MB, 2 nodes, one
round, the two-site run included)::

    sudo .venv/bin/python bench/broadcast.py [--size 256MB] [--rounds 3] [--json out.json]
    sudo .venv/bin/python bench/broadcast.py --small

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
id, and the nodes' archives are deleted after it. Scatter uses ``hash=False``
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import psutil
import xxhash
from dask.utils import parse_bytes
from distributed import Client

from envship.manifest import Manifest
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
    burst = max(2 * 2**20, rate // 50)  # 20 ms of traffic: far above rate/HZ
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
        self, workdir: Path, cache_root: Path, count: int, rate: int, slow_rate: int
    ):
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

    def start_nodes(self, sites: bool) -> None:
        """A nanny per node, west the second half if ``sites`` else all east."""
        for k in range(self.count):
            name = f"node{k}"
            site = SITES[2 * k // self.count] if sites else None
            self.attach(name, site or "east")
            self.sites[name] = site
            self.caches[name] = Path(tempfile.mkdtemp(dir=self.cache_root))
            scratch = tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir)
            env = {"DASK_ENVSHIP__CACHE__DIRECTORY": str(self.caches[name])}
            if site:
                env["DASK_ENVSHIP__SITE"] = site
            argv = ["distributed.cli.dask_worker", SCHEDULER, "--nanny"]
            argv += ["--nthreads", "1", "--host", node_ip(k), "--no-dashboard"]
            argv += ["--preload-nanny", "envship", "--name", name]
            argv += ["--local-directory", scratch]
            self.nannies.append(self._start(name, argv, env))

    def stop_nodes(self) -> None:
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

    def close(self) -> None:
        self.stop_nodes()
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
    """The highest RSS of a process while the block runs, sampled every 20 ms."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)

    def __enter__(self) -> RssPeak:
        self.before = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

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
    after = bed.counters()
    m.update({k: after[k] - before[k] for k in after})


@dataclass
class Blob:
    path: Path
    size: int
    table: PieceTable


def make_blob(path: Path, size: int) -> Blob:
    with open(path, "wb") as f:
        for offset in range(0, size, 2**24):
            f.write(os.urandom(min(2**24, size - offset)))
    return Blob(path, size, PieceTable.of_file(path, piece_size()))


def ship(client, bed, blob, nodes, label: str, peer_to_peer: bool) -> dict:
    """One envship broadcast to ``nodes`` under a fresh id."""
    id = xxhash.xxh3_128_hexdigest(label.encode())
    manifest = Manifest(
        id=id,
        name="bench-blob",
        kind="conda",
        python="3.11.7",
        file_count=1,
        unpacked_size=blob.size,
    )
    offer = Offer(id, "bench-blob", manifest, blob.table)
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
        future = client.sync(asyncio.wait_for, scattering, RUN_TIMEOUT)
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


def rounds_of(client, bed, blob: Blob, nodes, kinds: list[str], tag: str, rounds: int):
    """``rounds`` runs of each of ``kinds`` to ``nodes``, interleaved: kind -> runs."""
    by: dict[str, list[dict]] = {kind: [] for kind in kinds}
    data = blob.path.read_bytes() if "scatter" in kinds else b""
    for r in range(rounds):
        for kind in rotated(kinds, r):
            if kind == "scatter":
                m = scatter(client, bed, data, nodes)
            else:
                p2p = kind == "envship"
                m = ship(client, bed, blob, nodes, f"{tag}-{kind}-{r}", p2p)
            by[kind].append(m)
    return by


def scaling_runs(
    client, bed: Testbed, blob: Blob, counts: list[int], rounds: int
) -> dict:
    """envship, direct push and scatter to the first N nodes, all on site east."""
    results = {}
    for n in counts:
        print(f"{n} nodes ...", flush=True)
        nodes = bed.nodes(client)[:n]
        kinds = ["envship", "push", "scatter"]
        results[n] = rounds_of(client, bed, blob, nodes, kinds, f"n{n}", rounds)
    return results


def site_runs(client, bed: Testbed, blob: Blob, rounds: int) -> dict:
    """envship and direct push to all nodes, half of them moved to site west."""
    print("two sites ...", flush=True)
    bed.stop_nodes()
    while client.scheduler_info(n_workers=-1)["workers"]:
        time.sleep(0.2)
    bed.start_nodes(sites=True)
    client.wait_for_workers(bed.count, timeout=120)
    nodes = bed.nodes(client)
    return rounds_of(client, bed, blob, nodes, ["envship", "push"], "sites", rounds)


def measure_all(
    bed: Testbed, blob: Blob, counts: list[int], sites: bool, rounds: int
) -> dict:
    bed.start_scheduler()
    bed.start_nodes(sites=False)
    enter_netns(PREFIX + "client")
    with Client(SCHEDULER, timeout="120s") as client:
        client.wait_for_workers(bed.count, timeout=120)
        rss = psutil.Process(bed.scheduler_pid).memory_info().rss
        results: dict[str, Any] = {"nodes": bed.count, "scheduler_rss_start": rss}
        results["scaling"] = scaling_runs(client, bed, blob, counts, rounds)
        if sites:
            results["sites"] = site_runs(client, bed, blob, rounds)
    return results


# -- report --------------------------------------------------------------------------


def seconds(runs: list[dict]) -> Sample:
    return Sample(m["seconds"] for m in runs)


def checks(results: dict, size: int) -> list[tuple[str, float, str, float]]:
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
        m for by in scaling.values() for k in ("envship", "push") for m in by[k]
    ]
    envship_runs += [m for runs in results.get("sites", {}).values() for m in runs]
    rise = max(m["rss_rise"] for m in envship_runs) / 1e6
    rows.append(("scheduler RSS rise, envship runs, worst (MB)", rise, "<", 50))
    return rows


def row(label: str, runs: list[dict], size: int) -> str:
    r, s = middle(runs), seconds(runs)
    return (
        f"{label:<16}{r['seconds']:8.2f}{f'{s.low:.2f}-{s.high:.2f}':>12}"
        f"{r['client'] / size:6.2f}{r['cpu']:6.0f}{r['own']:6.1f}{r['rss_rise'] / 1e6:7.0f}"
    )


def print_report(
    results: dict, blob: Blob, rates: tuple[int, int], rounds: int
) -> None:
    size = blob.size
    print(
        f"\nblob {size / 1e6:.0f} MB in {blob.table.count} pieces; host links "
        f"{rates[0] / 1e6:.0f} MB/s, slow link {rates[1] / 1e6:.0f} MB/s; "
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
    print(
        f"\nscheduler RSS at start: {results['scheduler_rss_start'] / 1e6:.0f} MB"
        "\n\ntargets"
    )
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
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.small:
        args.size, args.nodes, args.rounds = parse_bytes("8MB"), [2], 1
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
        bed = Testbed(
            Path(tmp), Path(caches), max(args.nodes), args.rate, args.slow_rate
        )
        atexit.register(bed.close)
        try:
            bed.build()
            blob = make_blob(Path(tmp) / "blob", args.size)
            results = measure_all(
                bed, blob, sorted(args.nodes), args.sites, args.rounds
            )
        except Exception:
            bed.show_logs()
            raise
        finally:
            bed.close()
    results["checks"] = checks(results, blob.size)
    print_report(results, blob, (args.rate, args.slow_rate), args.rounds)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps({"config": config, **results}, indent=1))


if __name__ == "__main__":
    main()
