"""Benchmark: a worker forked from a zygote against a plain start, in one run.

A scheduler on 127.0.0.1 (in this process), an environment (sklearn-dev:
numpy, scikit-learn; ``--env`` for another) and, per round, four workers
started at once in each of two ways:

- plain: ``<env>/bin/python -s bootstrap/worker.py 3`` per worker
  (``WorkerSubprocess``, what a nanny runs today);
- fork: one request per worker to a zygote of that environment that has
  imported what distributed's forkserver preloads (``ForkedWorker``).

Timed from the request to the worker's report, which it sends once it has
registered with the scheduler (checked). The two ways interleave, in an
order that rotates each round; figures are medians with their spread
(min-max): per worker, and until all four have registered. The zygote's own
start (its imports, paid once per environment) and its memory are printed,
and each worker's own memory (USS: pages it shares with no other process).
No nanny is involved: the switch rows with zygotes on and off are in bench/switch.py.

Then, for the same environment and number of workers, where the zygote lives
(issue 17: "share it between the nannies of a node if you can ... or one per
nanny if that is much simpler: measure and say"). Zygotes are kept per nanny
process: ``dask worker --nworkers 4`` (LocalCluster, dask-jobqueue's
``processes=4``) runs its nannies in one process, so they share one zygote
per environment; four separate ``dask worker`` processes on a node (as
fixtures/cluster.py starts them) start four. Per round, interleaved:

- per nanny: the four zygotes started at once (``Zygote.start`` in four
  threads), each forking one worker as soon as it is ready;
- per node: one zygote started, then four forks from it.

Timed from the start of the zygotes until all four workers registered: what
a switch to an environment that has no zygote yet pays (an edited or a cold
environment; a warm switch reuses its zygote either way), also against the
plain start of all four above. Memory, while the workers run: the zygotes'
RSS and PSS summed, and the node's PSS (zygotes and workers: what they take
from the machine, shared pages counted once).

Target: a forked worker registers in at most 1/3 the time of a plain one
(issue 17's ratio for a restart), printed as plain/fork at least 3. The
zygote sharing rows are figures for a decision, without a target.

    python bench/zygote.py [--small] [--env NAME]    # --small: base, 2 workers, 1 round
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
from distributed import Scheduler  # noqa: E402
from timing import Sample, rotated, small_parser, target_line  # noqa: E402

import fixtures  # noqa: E402
from envship.node.worker_environ import (  # noqa: E402
    TargetEnvironment,
    bootstrap_script,
    child_environ,
)
from envship.node.worker_subprocess import WorkerSubprocess  # noqa: E402
from envship.node.zygote import ForkedWorker, Zygote  # noqa: E402
from fixtures.worker_setup import PRE_SPAWN, setup_frame  # noqa: E402

WORKERS = 4
ROUNDS = 5
MIB = 2**20


async def start_all(make, scheduler: Scheduler, n: int, tmp: Path, tag: str):
    """Start ``n`` workers at once; seconds until each, and all, registered."""

    async def one(i: int):
        name = f"{tag}-{i}"
        began = time.perf_counter()
        process = make()
        process.start(setup_frame(scheduler.address, name, tmp / name, logging.ERROR))
        report = json.loads(await process.wait_report(120))
        took = time.perf_counter() - began
        assert report["address"] in scheduler.workers, report
        return process, took

    began = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(n)))
    everyone = time.perf_counter() - began
    # Memory of its own (pages not shared with the zygote or other workers).
    uss = [psutil.Process(p.pid).memory_full_info().uss for p, _ in results]
    for process, _ in results:
        process.send_stop({"op": "stop", "timeout": 10, "reason": "bench"})
    for process, _ in results:
        await process.join(60)
        process.close()
    return [took for _, took in results], everyone, uss


async def zygotes_and_forks(
    zygotes: int,
    python: Path,
    env: dict,
    scheduler: Scheduler,
    n: int,
    tmp: Path,
    tag: str,
) -> tuple[float, list[int], list[int], list[int]]:
    """Start ``zygotes`` zygotes at once and fork ``n`` workers from them.

    Worker ``i`` forks from zygote ``i % zygotes`` as soon as that one is
    ready. Returns the seconds from the start until all ``n`` registered, then,
    measured while they run, the zygotes' RSS and PSS and the workers' PSS.
    """
    began = time.perf_counter()
    starting = [
        asyncio.ensure_future(asyncio.to_thread(Zygote.start, python, env))
        for _ in range(zygotes)
    ]

    async def one(i: int) -> ForkedWorker:
        zygote = await starting[i % zygotes]
        if zygote.refusal:
            raise SystemExit(f"the zygote refuses to fork: {zygote.refusal}")
        name = f"{tag}-{i}"
        worker = ForkedWorker(zygote, env)
        worker.start(setup_frame(scheduler.address, name, tmp / name, logging.ERROR))
        report = json.loads(await worker.wait_report(120))
        assert report["address"] in scheduler.workers, report
        return worker

    workers = await asyncio.gather(*(one(i) for i in range(n)))
    everyone = time.perf_counter() - began
    started = [task.result() for task in starting]
    # PSS: each shared page counted in fractions, so sums are what the
    # processes take together; RSS counts a shared page in every process.
    zygote_memory = [psutil.Process(z.pid).memory_full_info() for z in started]
    worker_pss = [psutil.Process(w.pid).memory_full_info().pss for w in workers]
    for worker in workers:
        worker.send_stop({"op": "stop", "timeout": 10, "reason": "bench"})
    for worker in workers:
        await worker.join(60)
        worker.close()
    for zygote in started:
        await asyncio.to_thread(zygote.close, 30)
    return (
        everyone,
        [m.rss for m in zygote_memory],
        [m.pss for m in zygote_memory],
        worker_pss,
    )


async def where_zygotes_live(
    python: Path, env: dict, scheduler: Scheduler, n: int, rounds: int, tmp: Path
) -> dict[str, dict[str, Sample]]:
    """One zygote per nanny (``n``) against one per node, interleaved.

    By kind ("per nanny", "per node"): samples of the seconds until all
    ``n`` workers registered and, in MiB, of the zygotes' summed RSS and PSS
    and the node's PSS (zygotes and workers).
    """
    kinds = {"per nanny": n, "per node": 1}
    seen: dict[str, dict[str, list[float]]] = {
        kind: {"all": [], "rss": [], "pss": [], "node": []} for kind in kinds
    }
    for r in range(rounds):
        for kind in rotated(list(kinds), r):
            tag = f"{kind.replace(' ', '-')}{r}"
            everyone, rss, pss, worker_pss = await zygotes_and_forks(
                kinds[kind], python, env, scheduler, n, tmp, tag
            )
            seen[kind]["all"].append(everyone)
            seen[kind]["rss"].append(sum(rss) / MIB)
            seen[kind]["pss"].append(sum(pss) / MIB)
            seen[kind]["node"].append((sum(pss) + sum(worker_pss)) / MIB)
    return {
        kind: {what: Sample(values) for what, values in figures.items()}
        for kind, figures in seen.items()
    }


def whole(sample: Sample) -> str:
    """A sample of MiB, in whole MiB: median (min-max)."""
    return f"{sample.median:.0f} ({sample.low:.0f}-{sample.high:.0f})"


def print_sharing(
    sharing: dict[str, dict[str, Sample]], plain_all: Sample, n: int, rounds: int
) -> None:
    """The sharing rows; ``plain_all``: all ``n`` started plainly, for scale."""
    nanny, node = sharing["per nanny"], sharing["per node"]
    print(
        f"\nwhere the zygote lives: {n} nannies each with its own zygote (per "
        f"nanny) or one zygote they share (per node), {rounds} rounds"
    )
    print(
        f"zygotes started to all {n} workers registered, s:  "
        f"per nanny {nanny['all']}  per node {node['all']}"
    )
    print(
        f"zygotes' memory while the workers run, MiB:  "
        f"per nanny RSS {whole(nanny['rss'])} PSS {whole(nanny['pss'])}  "
        f"per node RSS {whole(node['rss'])} PSS {whole(node['pss'])}"
    )
    print(
        f"node's memory (PSS of zygotes and workers), MiB:  "
        f"per nanny {whole(nanny['node'])}  per node {whole(node['node'])}"
    )
    ratio = nanny["all"].median / node["all"].median
    print(f"ratio per nanny/per node, all {n} registered (medians): {ratio:.3f}")
    print(
        f"against all {n} started plainly (above, medians): per nanny "
        f"{nanny['all'].median / plain_all.median:.3f}, per node "
        f"{node['all'].median / plain_all.median:.3f}"
    )
    saved = nanny["all"].median - node["all"].median
    memory = nanny["pss"].median - node["pss"].median
    memory_node = nanny["node"].median - node["node"].median
    print(
        f"sharing per node, for a new environment (edited or cold; a warm switch "
        f"reuses its zygote either way): all {n} workers registered "
        + (f"{saved:.2f} s sooner" if saved >= 0 else f"{-saved:.2f} s later")
        + f" per node; one zygote per nanny costs {memory:.0f} MiB of zygote "
        f"PSS per node and kept environment ({memory_node:.0f} MiB with the "
        f"workers' PSS)"
    )


async def run(env_name: str, n: int, rounds: int) -> None:
    logging.getLogger("distributed").setLevel(logging.ERROR)
    prefix = fixtures.build(env_name)
    target = TargetEnvironment(env_name, prefix, "conda", env_name)
    quiet = {"DASK_LOGGING__DISTRIBUTED": "error"}
    env = child_environ(target, os.environ, {**PRE_SPAWN, **quiet})
    python = target.python
    began = time.perf_counter()
    zygote = await asyncio.to_thread(Zygote.start, python, env)
    zygote_start = time.perf_counter() - began
    if zygote.refusal:
        raise SystemExit(f"the zygote refuses to fork: {zygote.refusal}")
    script = str(bootstrap_script())
    makers = {
        "plain": lambda: WorkerSubprocess([str(python), "-s", script], env),
        "fork": lambda: ForkedWorker(zygote, env),
    }
    per_worker: dict[str, list[float]] = {k: [] for k in makers}
    all_of_them: dict[str, list[float]] = {k: [] for k in makers}
    own_memory: dict[str, list[float]] = {k: [] for k in makers}
    with tempfile.TemporaryDirectory(prefix="envship-bench-zygote-") as tmp:
        async with Scheduler(
            host="127.0.0.1",
            port=0,
            dashboard=False,
            dashboard_address="127.0.0.1:0",
        ) as scheduler:
            for r in range(rounds):
                for kind in rotated(list(makers), r):
                    took, everyone, uss = await start_all(
                        makers[kind], scheduler, n, Path(tmp), f"{kind}{r}"
                    )
                    per_worker[kind] += took
                    all_of_them[kind].append(everyone)
                    own_memory[kind] += uss
            rss = zygote.rss()
            full = psutil.Process(zygote.pid).memory_full_info()
            await asyncio.to_thread(zygote.close, 30)
            sharing = await where_zygotes_live(
                python, env, scheduler, n, rounds, Path(tmp)
            )

    plain, fork = Sample(per_worker["plain"]), Sample(per_worker["fork"])
    plain_all, fork_all = Sample(all_of_them["plain"]), Sample(all_of_them["fork"])
    print(f"environment {env_name} ({prefix}), {n} workers at once, {rounds} rounds")
    print(
        f"zygote: started and preloaded {zygote.preloaded} in {zygote_start:.2f} s; "
        f"RSS {rss / MIB:.0f} MiB (USS {full.uss / MIB:.0f} MiB, "
        f"PSS {full.pss / MIB:.0f} MiB)"
    )
    print(f"request to registered, per worker, s:  plain {plain}  fork {fork}")
    print(
        f"request to all {n} registered, s:        plain {plain_all}  fork {fork_all}"
    )
    uss_plain = Sample([v / MIB for v in own_memory["plain"]])
    uss_fork = Sample([v / MIB for v in own_memory["fork"]])
    print(
        f"worker's own memory (USS) once registered, MiB: "
        f"plain {uss_plain}  fork {uss_fork}"
    )
    ratio = fork.median / plain.median
    ratio_all = fork_all.median / plain_all.median
    print(f"ratio fork/plain: per worker {ratio:.3f}, all {n} {ratio_all:.3f}")
    print("\ntargets (fork at most 1/3 of plain: plain/fork at least 3)")
    print(target_line("plain/fork, per worker (medians)", 1 / ratio, ">=", 3))
    print(target_line(f"plain/fork, all {n} (medians)", 1 / ratio_all, ">=", 3))
    print_sharing(sharing, plain_all, n, rounds)


def main() -> None:
    parser = small_parser(__doc__)
    parser.add_argument("--env", default=None, help="fixture environment name")
    args = parser.parse_args()
    if args.small:
        asyncio.run(run(args.env or "base", 2, 1))
    else:
        asyncio.run(run(args.env or "sklearn-dev", WORKERS, ROUNDS))


if __name__ == "__main__":
    main()
