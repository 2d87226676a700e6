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

Target: a forked worker registers in at most 1/3 the time of a plain one
(issue 17's ratio for a restart), printed as plain/fork at least 3.

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
from envship.node.worker_subprocess import WorkerSubprocess, encode_frame  # noqa: E402
from envship.node.zygote import ForkedWorker, Zygote  # noqa: E402

WORKERS = 4
ROUNDS = 5
#: distributed.nanny.pre-spawn-environ: what a nanny's workers get.
PRE_SPAWN = {
    "MALLOC_TRIM_THRESHOLD_": "65536",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
}


def setup(scheduler: str, name: str, directory: Path) -> bytes:
    return encode_frame(
        {
            "worker_kwargs": {
                "scheduler_ip": scheduler,
                "nthreads": 1,
                "host": "127.0.0.1",
                "dashboard_address": "127.0.0.1:0",
                "name": name,
                "local_directory": str(directory),
            },
            "worker_class": "distributed:Worker",
            "silence_logs": logging.ERROR,
            "env": {},
            "config": {},
        }
    )


async def start_all(make, scheduler: Scheduler, n: int, tmp: Path, tag: str):
    """Start ``n`` workers at once; seconds until each, and all, registered."""

    async def one(i: int):
        name = f"{tag}-{i}"
        began = time.perf_counter()
        process = make()
        process.start(setup(scheduler.address, name, tmp / name))
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
    zygote.close(timeout=30)

    plain, fork = Sample(per_worker["plain"]), Sample(per_worker["fork"])
    plain_all, fork_all = Sample(all_of_them["plain"]), Sample(all_of_them["fork"])
    mib = 2**20
    print(f"environment {env_name} ({prefix}), {n} workers at once, {rounds} rounds")
    print(
        f"zygote: started and preloaded {zygote.preloaded} in {zygote_start:.2f} s; "
        f"RSS {rss / mib:.0f} MiB (USS {full.uss / mib:.0f} MiB, "
        f"PSS {full.pss / mib:.0f} MiB)"
    )
    print(f"request to registered, per worker, s:  plain {plain}  fork {fork}")
    print(
        f"request to all {n} registered, s:        plain {plain_all}  fork {fork_all}"
    )
    uss_plain = Sample([v / mib for v in own_memory["plain"]])
    uss_fork = Sample([v / mib for v in own_memory["fork"]])
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
