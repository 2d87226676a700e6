"""Benchmark: the scheduler side at 1,000 workers (issue 18).

A real scheduler (``dask scheduler --preload envship``, its dashboard on
127.0.0.1, in a process of its own, as an administrator starts it) and
``--nodes`` nanny stand-ins, each its own node, in a few processes (250 each).
A stand-in is a ``distributed.core.Server`` on 127.0.0.1 (real comms) that

- registers a worker with the scheduler through the scheduler's own
  ``register-worker`` protocol (the stream a ``distributed.Worker`` opens;
  it sends heartbeats at the interval the scheduler asks for, and leaves by
  closing the stream), naming itself as the worker's nanny, so the
  scheduler's ``identity()`` lists it as a worker with a nanny;
- answers ``envship_status`` with a valid ``NannyStatus`` (a node, a site, a
  cache, a zygote, what it runs), and ``run`` as a nanny does (so that
  ``envship.status`` finds envship there);
- on joining, asks the registry what to run (``envship_where``), reports
  that it fetches it and then holds it (``envship_hold``) and runs it
  (``envship_runs``), as a nanny does; then a tenth of them leave
  and join again.

Real ``distributed.Worker`` objects were not used: 1,000 of them (thread
pools, memory monitors, their own heartbeats and metrics) would load this
2-core machine far more than the scheduler under test. The stand-ins speak
the same protocol, so the scheduler does the same work per worker.

The client (this process) publishes ``--envs`` environments (offers of
600 MB archives: 150 pieces each), points each worker at one of them by
name (``envship_desire``), and claims and releases all nannies in switches
of 100. Then it times ``envship.status(client)`` three times, a few seconds
apart (the first gathers from every nanny, over connections the scheduler
opens then; the state unchanged, the next ones are given the last survey
while the scheduler gathers the next), and fetches the dashboard's
``/envship`` page every 2 s, as a browser that shows it does, for
``--page-seconds``.

Figures (``--json`` FILE holds them, with more):

- ``handler_p99_ms`` (and p50): round trip of every registry call, as the
  caller sees it (comm included), while all nodes join at once;
- ``registry_rss_mb``: the scheduler's RSS with envship's registry, less the
  same scheduler's without it (no ``--preload``; the same stand-ins joining
  the same way, with no registry calls), after the same load;
- ``scheduler_cpu_percent``: the scheduler's CPU while the page is open,
  less its CPU idle (heartbeats only) just before, in % of one core;
- ``status_seconds``: the slowest of the three status calls (the first);
- ``page_p95_seconds``: the 95th percentile of the page's load times.

Targets (issue 18): status under 5 s, a page under 1 s at p95 and the
scheduler's CPU for it under 5%, registry RSS under 100 MB at 1,000 nodes and
20 environments. The stand-ins answer at once: a real nanny walks its cache
for its size (``Status(cache=True)``), which adds its own time to a survey.

    python bench/registry_load.py --nodes N [--envs E] [--json FILE]
    python bench/registry_load.py --small      # 20 stand-ins, seconds
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from timing import small_parser, target_line  # noqa: E402

from envship.survey import SHARE_SECONDS  # noqa: E402
from fixtures.cluster import scheduler_args, spawn, stop  # noqa: E402

#: Stand-ins per process.
PER_PROCESS = 250
#: Registry calls a stand-in process makes at once (its connections).
CALLS_AT_ONCE = 64
#: Workers in a switch that the client claims at once.
CLAIM_SIZE = 100
#: An archive's size and piece size, for the offers the client publishes.
ARCHIVE_SIZE = 600 * 2**20
PIECE_SIZE = 4 * 2**20
#: Seconds between page loads: the page's own ``<meta http-equiv=refresh>``.
RELOAD = 2.0


def env_id(k: int) -> str:
    return f"{k:032x}"


def env_name(k: int) -> str:
    return f"project-{k}"


# -- the stand-ins (run in processes of their own) -------------------------------


def stand_in_metrics() -> dict:
    """The metrics a worker's heartbeat carries, as an idle worker's."""
    return {
        "task_counts": {},
        "bandwidth": {"total": 100e6, "workers": {}, "types": {}},
        "digests_total_since_heartbeat": {},
        "managed_bytes": 0,
        "spilled_bytes": {"memory": 0, "disk": 0},
        "transfer": {
            "incoming_bytes": 0,
            "incoming_count": 0,
            "incoming_count_total": 0,
            "outgoing_bytes": 0,
            "outgoing_count": 0,
            "outgoing_count_total": 0,
        },
        "event_loop_interval": 0.02,
        "cpu": 0.0,
        "memory": 150 * 2**20,
        "time": time.time(),
        "host_net_io": {"read_bps": 0.0, "write_bps": 0.0},
        "host_disk_io": {"read_bps": 0.0, "write_bps": 0.0},
        "num_fds": 40,
    }


class StandIn:
    """One nanny and its worker, as the scheduler and the registry see them."""

    def __init__(self, i: int, envs: int, scheduler: str, pool, registry: bool):
        from distributed.core import Server
        from distributed.worker import run

        self.i, self.scheduler, self.pool, self.registry = i, scheduler, pool, registry
        self.name = f"stand-in-{i}"
        self.env = i % envs
        self.node = f"standin{i}.example.org:2049:{1000 + i}"
        self.site = "east" if i % 2 else "west"
        self.since = time.time()
        self.running: str | None = None
        self.stream = None
        self.tasks: set[asyncio.Task] = set()
        self.server = Server(
            {
                "envship_status": self.status,
                # Only its presence is checked (``envship.status`` asks ``run``).
                "envship_info": self.status,
                "run": lambda comm, **kw: run(self.server, comm, **kw),
            }
        )

    async def start(self) -> None:
        await self.server.listen("tcp://127.0.0.1:0")  # the nanny
        self.nanny = self.server.listeners[0].contact_address

    async def status(self, cache: bool = False) -> dict:
        from envship.messages import NannyStatus, ZygoteState

        running = self.running
        return NannyStatus(
            ok=True,
            node=self.node,
            since=self.since,
            cache_root=f"/scratch/envship-{self.i}",
            running=running,
            name=env_name(self.env) if running else None,
            worker=self.worker,
            site=self.site,
            cache_size=3 * ARCHIVE_SIZE if cache else None,
            zygotes=(
                ZygoteState(env_id(self.env), env_name(self.env), 4242, 52 * 2**20),
            )
            if running
            else (),
        ).to_msg()

    async def join(self, versions: dict, timings: list) -> None:
        """Register the worker; then report to the registry as a joining nanny does."""
        from distributed.comm import connect

        # A new worker: a new address (its name stays, as a restarted one's),
        # opened before the last one's is closed so that it is another port.
        await self.server.listen("tcp://127.0.0.1:0")
        self.worker = self.server.listeners[-1].contact_address
        for listener in self.server.listeners[1:-1]:
            listener.stop()
        del self.server.listeners[1:-1]
        while True:
            comm = await connect(self.scheduler)
            answer = await asyncio.wait_for(self.register(comm, versions), 120)
            if "name taken" not in str(answer.get("message")):
                break
            await comm.close()  # its previous worker is still being removed
            await asyncio.sleep(0.1)
        if answer.get("status") != "OK":
            raise RuntimeError(f"{self.name} was refused: {answer}")
        self.stream = comm
        self.keep(self.drain(comm))
        self.keep(self.beat(answer["heartbeat-interval"]))
        if self.registry:
            await self.report(timings)

    async def register(self, comm, versions: dict) -> dict:
        """The scheduler's answer to a ``register-worker`` on ``comm``."""
        await comm.write(
            {
                "op": "register-worker",
                "reply": False,
                "address": self.worker,
                "status": "running",
                "nthreads": 1,
                "name": self.name,
                "now": time.time(),
                "resources": {},
                "memory_limit": 4 * 2**30,
                "local_directory": f"/tmp/stand-in-{self.i}",
                "services": {},
                "nanny": self.nanny,
                "pid": os.getpid(),
                "versions": versions,
                "metrics": stand_in_metrics(),
                "extra": {},
                "stimulus_id": f"stand-in-connect-{time.time()}",
                "server_id": f"stand-in-{self.i}-{time.time()}",
            },
            serializers=["msgpack"],
        )
        return await comm.read(deserializers=["msgpack"])

    async def report(self, timings: list) -> None:
        """``envship_where``, ``envship_hold`` (fetching, then whole), ``envship_runs``."""
        from envship.registry_messages import WhereAnswer

        scheduler = self.pool(self.scheduler)
        where = await self.call(
            timings, "where", scheduler.envship_where(id=None, name=self.name)
        )
        offer = WhereAnswer.from_msg(where).offer
        if offer is None:
            raise RuntimeError(f"the registry has nothing for {self.name}")
        for complete in (False, True):
            await self.call(
                timings,
                "hold",
                scheduler.envship_hold(
                    nanny=self.nanny,
                    id=offer.id,
                    complete=complete,
                    site=self.site,
                    node=self.node,
                ),
            )
        await self.call(
            timings,
            "runs",
            scheduler.envship_runs(nanny=self.nanny, id=offer.id, name=offer.name),
        )
        self.running, self.since = offer.id, time.time()

    @staticmethod
    async def call(timings: list, op: str, call) -> object:
        start = time.perf_counter()
        answer = await call
        timings.append((op, time.perf_counter() - start))
        return answer

    async def drain(self, comm) -> None:
        try:
            while True:
                await comm.read()
        except Exception:  # closed: the worker left
            pass

    async def beat(self, interval: float) -> None:
        await asyncio.sleep(interval * (0.5 + (self.i % 100) / 200))
        while self.stream is not None:
            answer = await self.pool(self.scheduler).heartbeat_worker(
                address=self.worker, now=time.time(), metrics=stand_in_metrics()
            )
            await asyncio.sleep(answer.get("heartbeat-interval", interval))

    async def leave(self) -> None:
        """The worker goes (its stream closed); its nanny's report of what it runs stays."""
        stream, self.stream = self.stream, None
        for task in list(self.tasks):
            task.cancel()
        if stream is not None:
            await stream.close()
        self.running = None

    def keep(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def bounded(coroutines, at_once: int) -> list:
    slots = asyncio.Semaphore(at_once)

    async def one(c):
        async with slots:
            return await c

    return await asyncio.gather(*map(one, coroutines))


async def stand_ins(
    scheduler: str, first: int, count: int, envs: int, registry: bool
) -> None:
    """Serve ``count`` stand-ins; commands on stdin, answers as JSON lines on stdout."""
    from distributed.core import ConnectionPool
    from distributed.versions import get_versions

    logging.getLogger("distributed").setLevel(logging.WARNING)

    pool = await ConnectionPool(limit=CALLS_AT_ONCE)
    versions = get_versions()
    nannies = [
        StandIn(i, envs, scheduler, pool, registry) for i in range(first, first + count)
    ]
    await asyncio.gather(*(n.start() for n in nannies))
    timings: list = []
    await bounded([n.join(versions, timings) for n in nannies], CALLS_AT_ONCE)
    say({"ready": count, "timings": timings})
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not line or line[0] == "stop":
            break
        if line[0] == "churn":  # a fraction leave, then join again
            leaving = nannies[:: round(1 / float(line[1]))]
            timings = []
            await asyncio.gather(*(n.leave() for n in leaving))
            await bounded([n.join(versions, timings) for n in leaving], CALLS_AT_ONCE)
            say({"churned": len(leaving), "timings": timings})
    await asyncio.gather(*(n.leave() for n in nannies))
    await pool.close()


def say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


# -- the client's side -----------------------------------------------------------


class StandInProcesses:
    """The processes of ``nodes`` stand-ins, talked to by lines of JSON."""

    def __init__(self, scheduler: str, nodes: int, envs: int, registry: bool):
        self.processes = []
        for first in range(0, nodes, PER_PROCESS):
            count = min(PER_PROCESS, nodes - first)
            args = [sys.executable, __file__, "--stand-ins", str(first), str(count)]
            args += ["--scheduler", scheduler, "--envs", str(envs)]
            args += [] if registry else ["--no-registry"]
            self.processes.append(
                subprocess.Popen(
                    args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                )
            )

    def answers(self, key: str) -> list[dict]:
        found = []
        for p in self.processes:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"a stand-in process ended (exit {p.wait()})")
            answer = json.loads(line)
            if key not in answer:
                raise RuntimeError(f"a stand-in process said {answer}")
            found.append(answer)
        return found

    def tell(self, command: str) -> None:
        for p in self.processes:
            p.stdin.write(command + "\n")
            p.stdin.flush()

    def stop(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                try:
                    p.stdin.write("stop\n")
                    p.stdin.close()
                except BrokenPipeError:
                    pass
        for p in self.processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def offer(k: int):
    from envship.manifest import Manifest
    from envship.transfer.pieces import Offer, PieceTable

    id = env_id(k)
    count = math.ceil(ARCHIVE_SIZE / PIECE_SIZE)
    digests = tuple(f"{k:08x}{p:024x}" for p in range(count))
    manifest = Manifest(
        id=id,
        name=env_name(k),
        kind="conda",
        python="3.11.7",
        file_count=40_000,
        unpacked_size=3 * ARCHIVE_SIZE,
    )
    return Offer(
        id, env_name(k), manifest, PieceTable(ARCHIVE_SIZE, PIECE_SIZE, digests)
    )


def timed_call(dask_client, timings: list, op: str, handler, **msg) -> object:
    start = time.perf_counter()
    answer = dask_client.sync(handler, **msg)
    timings.append((op, time.perf_counter() - start))
    return answer


def cpu_seconds(process: psutil.Process) -> float:
    t = process.cpu_times()
    return t.user + t.system


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def run(
    folder: Path, nodes: int, envs: int, with_envship: bool, page_seconds: float
) -> dict:
    """One scheduler and its stand-ins; figures of the scheduler under their load."""
    from distributed import Client

    scheduler_file = folder / "scheduler.json"
    scheduler_file.unlink(missing_ok=True)
    preload = ["--preload", "envship"] if with_envship else []
    args = scheduler_args(0, ["--scheduler-file", str(scheduler_file), *preload], True)
    log = folder / f"scheduler-{'envship' if with_envship else 'plain'}.log"
    processes = [spawn(sys.executable, args, dict(os.environ), log)]
    figures: dict = {}
    timings: list = []
    stand = None
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() or not scheduler_file.read_text():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the scheduler did not start: see {log}")
            time.sleep(0.05)
        address = json.loads(scheduler_file.read_text())["address"]
        scheduler = psutil.Process(processes[0].pid)
        with Client(address, timeout=60) as client:
            port = client.scheduler_info()["services"]["dashboard"]
            figures["rss_empty_mb"] = scheduler.memory_info().rss / 2**20
            if with_envship:
                for k in range(envs):  # each published, then pointed to
                    timed_call(
                        client,
                        timings,
                        "publish",
                        client.scheduler.envship_publish,
                        offer=offer(k).to_msg(),
                    )
                    names = [f"stand-in-{i}" for i in range(k, nodes, envs)]
                    timed_call(
                        client,
                        timings,
                        "desire",
                        client.scheduler.envship_desire,
                        id=env_id(k),
                        names=names,
                    )
            cpu, start = cpu_seconds(scheduler), time.monotonic()
            stand = StandInProcesses(address, nodes, envs, with_envship)
            for answer in stand.answers("ready"):
                timings += answer["timings"]
            figures["join_seconds"] = time.monotonic() - start
            stand.tell("churn 0.1")
            for answer in stand.answers("churned"):
                timings += answer["timings"]
            deadline = time.monotonic() + 60  # the last removals and joins
            while (
                len(workers := client.scheduler_info(n_workers=-1)["workers"]) != nodes
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(workers)} workers, not {nodes}: {log}")
                time.sleep(0.5)
            if with_envship:
                nannies = sorted(w["nanny"] for w in workers.values())
                for c in range(0, nodes, CLAIM_SIZE):
                    answer = timed_call(
                        client,
                        timings,
                        "claim",
                        client.scheduler.envship_claim,
                        owner=f"switch-{c}",
                        client=client.id,
                        nannies=nannies[c : c + CLAIM_SIZE],
                        name=env_name(0),
                    )
                    if answer["conflicts"]:
                        raise RuntimeError(f"conflicting claims: {answer}")
                for c in range(0, nodes, CLAIM_SIZE):
                    timed_call(
                        client,
                        timings,
                        "release",
                        client.scheduler.envship_release,
                        owner=f"switch-{c}",
                    )
                for i in range(0, nodes, max(1, nodes // 100)):  # one at a time
                    timed_call(
                        client,
                        timings,
                        "where, quiet",
                        client.scheduler.envship_where,
                        name=f"stand-in-{i}",
                    )
            took = time.monotonic() - start
            figures["load_cpu_percent"] = 100 * (cpu_seconds(scheduler) - cpu) / took
            time.sleep(2)
            figures["rss_mb"] = scheduler.memory_info().rss / 2**20
            cpu, start = cpu_seconds(scheduler), time.monotonic()
            time.sleep(page_seconds / 2)
            took = time.monotonic() - start
            figures["idle_cpu_percent"] = 100 * (cpu_seconds(scheduler) - cpu) / took
            if with_envship:
                figures.update(
                    status_and_page(client, scheduler, port, nodes, page_seconds)
                )
    finally:
        if stand is not None:
            stand.stop()
        stop(processes)
    figures["timings"] = timings
    return figures


def status_and_page(client, scheduler, port: int, nodes: int, seconds: float) -> dict:
    import envship

    times = []
    for _ in range(3):
        time.sleep(SHARE_SECONDS + 0.5)  # beyond the shortest sharing
        start = time.perf_counter()
        status = envship.status(client)
        times.append(time.perf_counter() - start)
        answered = [w for w in status.workers if not w["unreachable"]]
        if len(answered) != nodes or any(w["id"] is None for w in answered):
            raise RuntimeError(f"status: {len(answered)} of {nodes} nannies answered")
    start = time.perf_counter()
    envship.status(client)  # the state unchanged: the last one's nannies' answers
    shared = time.perf_counter() - start

    url = f"http://127.0.0.1:{port}/envship"
    loads: list[float] = []
    done = threading.Event()

    def browser() -> None:  # reloads RELOAD s after each load, as the page says
        while not done.is_set():
            start = time.perf_counter()
            with urllib.request.urlopen(url, timeout=60) as page:
                html = page.read().decode()
            loads.append(time.perf_counter() - start)
            if html.count("stand-in-") < nodes:
                raise RuntimeError("the page lacks workers")
            done.wait(RELOAD)

    cpu, start = cpu_seconds(scheduler), time.monotonic()
    thread = threading.Thread(target=browser)
    thread.start()
    time.sleep(seconds)
    done.set()
    thread.join()
    took = time.monotonic() - start
    return {
        "status_times": times,
        "status_shared_seconds": shared,
        "page_times": loads,
        "page_cpu_percent": 100 * (cpu_seconds(scheduler) - cpu) / took,
    }


def main() -> None:
    parser = small_parser(__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--envs", type=int, default=20)
    parser.add_argument("--page-seconds", type=float, default=30.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--stand-ins", nargs=2, type=int, help=argparse_hidden())
    parser.add_argument("--scheduler", help=argparse_hidden())
    parser.add_argument("--no-registry", action="store_true", help=argparse_hidden())
    args = parser.parse_args()
    if args.stand_ins:
        first, count = args.stand_ins
        try:
            asyncio.run(
                stand_ins(args.scheduler, first, count, args.envs, not args.no_registry)
            )
        except BaseException as e:  # told, so the benchmark does not wait for us
            say({"error": f"{type(e).__name__}: {e}"})
            sys.stdout.flush()
            os._exit(1)
        return
    if args.small:
        args.nodes, args.envs, args.page_seconds = 20, 4, 4.0
    folder = Path(tempfile.mkdtemp(prefix="registry-load-"))
    try:
        plain = run(folder, args.nodes, args.envs, False, args.page_seconds)
        with_envship = run(folder, args.nodes, args.envs, True, args.page_seconds)
    except BaseException:
        print(f"the schedulers' logs are in {folder}", file=sys.stderr)
        raise
    shutil.rmtree(folder)
    report(args, plain, with_envship)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


def report(args, plain: dict, ours: dict) -> None:
    ms = [1000 * s for _, s in ours["timings"]]
    by_op: dict[str, list[float]] = {}
    for op, s in ours["timings"]:
        by_op.setdefault(op, []).append(1000 * s)
    figures = {
        "nodes": args.nodes,
        "envs": args.envs,
        "stand_ins": f"{args.nodes} Server stand-ins (register-worker protocol), "
        f"{math.ceil(args.nodes / PER_PROCESS)} processes",
        "status_seconds": max(ours["status_times"]),
        "status_times": ours["status_times"],
        "status_shared_seconds": ours["status_shared_seconds"],
        "page_p95_seconds": percentile(ours["page_times"], 0.95),
        "page_times": ours["page_times"],
        "scheduler_cpu_percent": ours["page_cpu_percent"] - ours["idle_cpu_percent"],
        "page_cpu_percent_absolute": ours["page_cpu_percent"],
        "idle_cpu_percent": ours["idle_cpu_percent"],
        "load_cpu_percent": ours["load_cpu_percent"],
        "load_cpu_percent_without_envship": plain["load_cpu_percent"],
        "registry_rss_mb": ours["rss_mb"] - plain["rss_mb"],
        "rss_mb": ours["rss_mb"],
        "rss_mb_without_envship": plain["rss_mb"],
        "handler_p50_ms": percentile(ms, 0.5),
        "handler_p99_ms": percentile(ms, 0.99),
        "handler_calls": len(ms),
        "handler_ms_by_op": {
            op: {"n": len(v), "p50": percentile(v, 0.5), "p99": percentile(v, 0.99)}
            for op, v in sorted(by_op.items())
        },
        "join_seconds": ours["join_seconds"],
        "join_seconds_without_envship": plain["join_seconds"],
    }
    print(
        f"registry load: {args.nodes} nanny stand-ins (one node each), "
        f"{args.envs} environments"
    )
    print(
        f"  joined in {figures['join_seconds']:.1f} s "
        f"({figures['join_seconds_without_envship']:.1f} s without envship); "
        f"scheduler CPU while joining {figures['load_cpu_percent']:.0f}% "
        f"({figures['load_cpu_percent_without_envship']:.0f}% without envship)"
    )
    for op, v in figures["handler_ms_by_op"].items():
        print(
            f"  {op:<12} n={v['n']:<5} p50 {v['p50']:7.2f} ms  p99 {v['p99']:7.2f} ms"
        )
    print(
        f"  all registry calls: p50 {figures['handler_p50_ms']:.2f} ms, "
        f"p99 {figures['handler_p99_ms']:.2f} ms (round trip, all nodes joining at once)"
    )
    print(
        "  status: "
        + ", ".join(f"{s:.2f}" for s in figures["status_times"])
        + f" s; asked again at once (shared): {figures['status_shared_seconds']:.3f} s"
    )
    print(
        f"  page: {len(figures['page_times'])} loads, median "
        f"{percentile(figures['page_times'], 0.5):.3f} s; scheduler CPU "
        f"{figures['page_cpu_percent_absolute']:.1f}% with the page open, "
        f"{figures['idle_cpu_percent']:.1f}% idle"
    )
    print(
        f"  scheduler RSS {figures['rss_mb']:.0f} MB, "
        f"{figures['rss_mb_without_envship']:.0f} MB without envship"
    )
    print(target_line("envship status (s)", figures["status_seconds"], "<", 5))
    print(target_line("dashboard page p95 (s)", figures["page_p95_seconds"], "<", 1))
    print(
        target_line(
            "scheduler CPU for the page (% of a core)",
            figures["scheduler_cpu_percent"],
            "<",
            5,
        )
    )
    print(target_line("registry RSS (MB)", figures["registry_rss_mb"], "<", 100))
    print(
        f"  registry handler p99 (ms) {figures['handler_p99_ms']:>30.2f}  (no target)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
