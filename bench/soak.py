"""Soak: many switches between three environments, nannies killed on the way.

On 8 workers (4 nodes of 2 nannies, one machine), SWITCHES switches cycling
through base, sklearn-dev and venv; in every fifth one a random nanny is
killed (SIGKILL, with its worker) at a random moment of the switch and a new
nanny is started on its node, as a job scheduler would. After every switch,
every worker, the new ones included, must run in the environment asked for
(asked from inside the worker); a switch that a kill made fail is called
again once.

Printed: switches, kills, retries, seconds per switch, and the leaks that
would show over a long session: RSS, threads and open files of the
scheduler and of the nannies alive throughout, worker processes, and the
bytes and files in each node cache's ``tmp/``, after a first round of the
three environments (start) and at the end. Growth must be zero beyond noise.

Targets: no error other than EnvshipError (any other ends the run with exit
status 1: a crash), no process and no file in ``tmp/`` more at the end than at
the start.

    python bench/soak.py [--small] [SWITCHES [KILL_EVERY]]   # KILL_EVERY 0: no kills

``--small``: 2 nodes of 1 nanny, base and venv, 3 switches, a nanny killed in
the third.
"""

from __future__ import annotations

import logging
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dask.config  # noqa: E402
from timing import small_parser, target_line  # noqa: E402

import envship  # noqa: E402
import fixtures  # noqa: E402
from envship import EnvshipError  # noqa: E402
from fixtures.cluster import local_cluster, wait_until  # noqa: E402

NODES = {f"n{i}": 2 for i in range(4)}
ENVS = ["base", "sklearn-dev", "venv"]
KILL_EVERY = 5
SWITCHES = 20
SMALL_NODES = {f"n{i}": 1 for i in range(2)}
SMALL_ENVS = ["base", "venv"]


def prefix() -> str:
    return sys.prefix


def running_in(client) -> dict[str, str]:
    """Worker name -> sys.prefix, asked inside each worker."""
    names = {
        a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
    }
    # A worker whose nanny was just killed may still be listed: not counted.
    answers = client.run(prefix, on_error="return")
    return {
        names[a]: p for a, p in answers.items() if a in names and isinstance(p, str)
    }


def in_place(cluster, artifact, workers: int) -> bool:
    """Every worker runs in a tree of ``artifact`` in its own node's cache.

    Only that the tree is named by the id and lies in the node's cache
    folder is assumed of the cache's layout.
    """
    found = running_in(cluster.client)
    return len(found) == workers and all(
        Path(p).name == artifact.id
        and Path(p).is_relative_to(cluster.caches[name.rsplit("-", 1)[0]])
        for name, p in found.items()
    )


def snapshot(cluster, originals: list[int]) -> dict:
    """Resource figures of the scheduler, the original nannies and the caches.

    Nannies by pid under ``"nannies"``: only those alive at both ends compare.
    """

    def proc(pid):
        p = psutil.Process(pid)
        return p.memory_info().rss, p.num_threads(), p.num_fds()

    scheduler = proc(cluster.processes[0].pid)
    nannies = {pid: proc(pid) for pid in originals if psutil.pid_exists(pid)}
    tmp = [f for cache in cluster.caches.values() for f in (cache / "tmp").iterdir()]
    # Every process of this cluster names its folder (nannies their local
    # directory, workers in an environment their prefix): orphans show here.
    folder = str(cluster.folder)
    ours = sum(
        1
        for p in psutil.process_iter(["cmdline"])
        if any(folder in arg for arg in p.info["cmdline"] or ())
    )
    return {
        "processes of the cluster": ours,
        "scheduler RSS MB": scheduler[0] / 1e6,
        "scheduler threads": scheduler[1],
        "scheduler open files": scheduler[2],
        "nannies": nannies,
        "files in tmp/": len(tmp),
        "bytes in tmp/": sum(f.stat().st_size for f in tmp if f.is_file()),
    }


def kill_one(cluster, when: float, killed: list) -> threading.Timer:
    def kill():
        alive = [
            (node, p)
            for node, ps in cluster.nannies.items()
            for p in ps
            if p.poll() is None
        ]
        node, victim = random.choice(alive)
        victim.kill()  # the nanny alone: its worker must notice and exit
        victim.wait()
        killed.append(node)

    timer = threading.Timer(when, kill)
    timer.start()
    return timer


def main(
    switches: int,
    kill_every: int = KILL_EVERY,
    nodes: dict[str, int] = NODES,
    envs: list[str] = ENVS,
) -> int:
    """Run the soak and print its report; the exit status (1: unexpected errors)."""
    logging.getLogger("distributed").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    random.seed(7)
    workers = sum(nodes.values())
    with tempfile.TemporaryDirectory(dir=Path.home()) as name:
        tmp = Path(name)
        with (
            dask.config.set({"envship.store": str(tmp / "store")}),
            local_cluster(tmp / "cluster", nodes) as cluster,
        ):
            client = cluster.client
            assert client is not None
            client.run(lambda: logging.getLogger("distributed").setLevel(logging.ERROR))
            artifacts = [envship.pack(fixtures.build(n), archive=False) for n in envs]
            for artifact in artifacts:  # a first round: what every later one reuses
                envship.use_environment(client, artifact, progress=False)
            originals = [p.pid for ps in cluster.nannies.values() for p in ps]
            start = snapshot(cluster, originals)
            seconds, kills, retries, unexpected = [], 0, 0, []
            for i in range(switches):
                artifact = artifacts[i % len(artifacts)]
                killed: list[str] = []
                timer = None
                if kill_every and (i + 1) % kill_every == 0:
                    timer = kill_one(cluster, random.uniform(0.0, 2.0), killed)
                began = time.perf_counter()
                try:
                    switched = envship.use_environment(client, artifact, progress=False)
                    ok = isinstance(switched, envship.SwitchReport) and switched.ok
                except EnvshipError:
                    ok = False
                except Exception as e:  # not envship's error: a bug to report
                    ok = False
                    unexpected.append(f"switch {i + 1}: {type(e).__name__}: {e}")
                seconds.append(time.perf_counter() - began)
                if timer is not None:
                    timer.join()
                    kills += 1
                    cluster.add_node(killed[0], 1)  # a new nanny, as SLURM would
                    client.wait_for_workers(workers, timeout=120)
                    wait_until(lambda: len(running_in(client)) == workers)
                if not ok or not in_place(cluster, artifact, workers):
                    retries += 1
                    envship.use_environment(client, artifact, progress=False)
                wait_until(
                    lambda a=artifact: in_place(cluster, a, workers), timeout=120
                )
                print(f"switch {i + 1:2d}: {envs[i % len(envs)]:<12} {seconds[-1]:5.2f} s"
                      f"{'  (a nanny killed)' if killed else ''}"
                      f"{'' if ok else '  (failed, called again)'}", flush=True)  # fmt: skip
            end = snapshot(cluster, originals)
    report(switches, workers, kills, retries, seconds, start, end, unexpected)
    return 1 if unexpected else 0


def report(switches, workers, kills, retries, seconds, start, end, unexpected) -> None:
    print(
        f"\n{switches} switches on {workers} workers, {kills} nannies killed "
        f"mid-switch (and replaced), {retries} switches called again; every "
        "switch ended with every worker in the environment asked for"
    )
    print(
        f"seconds per switch: median {statistics.median(seconds):.2f}, "
        f"max {max(seconds):.2f}"
    )
    print(f"errors other than EnvshipError: {len(unexpected)}")
    for line in unexpected:
        print(f"  {line[:300]}")
    survivors = sorted(set(start["nannies"]) & set(end["nannies"]))
    for facts in (start, end):
        by_pid = facts.pop("nannies")
        nannies = [by_pid[pid] for pid in survivors]
        facts["nanny RSS MB (mean)"] = statistics.mean(n[0] for n in nannies) / 1e6
        facts["nanny threads (total)"] = sum(n[1] for n in nannies)
        facts["nanny open files (total)"] = sum(n[2] for n in nannies)
    print(
        f"\n{'':<28} {'start':>10} {'end':>10} {'growth':>10}   "
        f"(nannies: the {len(survivors)} never killed)"
    )
    for key in start:
        a, b = start[key], end[key]
        print(f"{key:<28} {a:10.1f} {b:10.1f} {b - a:+10.1f}")
    print("\ntargets")
    for label, value in (
        ("errors other than EnvshipError", len(unexpected)),
        (
            "growth: processes of the cluster",
            end["processes of the cluster"] - start["processes of the cluster"],
        ),
        ("growth: files in tmp/", end["files in tmp/"] - start["files in tmp/"]),
    ):
        print(target_line(label, value, "<=", 0))


if __name__ == "__main__":
    parser = small_parser(__doc__)
    parser.add_argument("switches", nargs="?", type=int, help=f"default {SWITCHES}")
    parser.add_argument("kill_every", nargs="?", type=int, help=f"default {KILL_EVERY}")
    args = parser.parse_args()
    if args.small:
        kill_every = 3 if args.kill_every is None else args.kill_every
        sys.exit(main(args.switches or 3, kill_every, SMALL_NODES, SMALL_ENVS))
    kill_every = KILL_EVERY if args.kill_every is None else args.kill_every
    sys.exit(main(args.switches or SWITCHES, kill_every))
