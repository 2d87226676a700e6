"""Benchmark: switching the workers of one node into sklearn-dev, in one run.

On one cluster (a scheduler and four nannies with one cache directory, all
running in a throwaway venv so that PipInstall may install into it):

(a) cold switch (environment not on the node) against the floor measured in
    the same run: ``cp -a`` of the unpacked tree plus a restart of the
    workers inside the environment (``client.restart_workers``);
(b) warm switch (already cached) against a restart of the workers inside
    the same environment on the same cluster (the target's yardstick: the
    same code path, a warm switch ends in that restart); a plain restart in
    the nannies' own venv is measured and shown too. The three interleave,
    in an order that rotates every round;
(c) what users do today: distributed's ``PipInstall`` adding the packages
    that sklearn-dev adds to base, with ``restart_workers=True``, against
    envship's pack plus cold switch (the pack counted: a user who edits an
    environment pays it);
(e) zygotes on and off, on the same cluster, toggled at run time in every
    nanny process (``envship.zygote.enabled``, which a nanny reads at each
    worker start); every row measured in both modes, interleaved (the order
    rotating every round):

    1. warm switch of all workers (untimed switch to None, then timed into
       the cached sklearn-dev): 5 rounds;
    2. A->B->A loop between sklearn-dev and the ``base`` fixture (both
       cached): 10 switches in 2 rounds, median per switch;
    3. ``client.restart()`` while the workers run in sklearn-dev: 5 rounds;
    4. one worker killed with SIGKILL, until the scheduler has all workers
       again and the new one answers ``client.run``: 5 rounds;
    5. cold switch: a new cluster of its own (fresh node cache, started
       untimed; zygotes on or off through ``DASK_ENVSHIP__ZYGOTE__ENABLED``),
       then a timed switch into sklearn-dev; its restart stage shown:
       2 rounds (on new clusters, after the main one closed);
    6. edited environment (issue 7's step 2): a working copy of sklearn-dev
       gets one small package per round and mode (``pip install six``, then
       idna, tomli, ...: pip reaches the registries, untimed), then re-pack
       plus switch, timed (a new tree on the node, so a new zygote): 3 rounds;
    7. the zygotes' resident memory per environment (summed over the nanny
       processes, each zygote once) after rows 1-4 and after row 6.

Figures are medians with their spread (min-max).

Targets: cold within 1.5x the floor, warm within 1.2x a restart inside the
environment, pack plus cold switch at least 3x faster than PipInstall;
zygotes on / off (medians) at most 1/3 for the warm switch, the A-B loop,
``client.restart()`` and the killed worker; the cold switch's restart stage
on / off at most 0.5 and the cold switch no slower (<= 1.0); the edited
environment with zygotes on at most 1.2x the warm switch with zygotes off.

On this 2-core machine (2026-12-04 20:50, one full run, 4 nanny processes
sharing one zygote per environment, load average 5.2 from other jobs),
zygotes on / off: warm switch 0.40 / 1.75 s (0.23), A-B loop 0.35 / 1.69 s
per switch (0.21), ``client.restart()`` 0.50 / 2.49 s (0.20), killed worker
back 0.14 / 0.91 s (0.15); cold switch 4.52 / 5.47 s (0.83), its restart
stage 0.92 / 2.03 s (0.45); edited environment 2.46 / 3.45 s, 1.41x the warm
switch with zygotes off (target 1.2: missed). A zygote's RSS: 69 MB in
sklearn-dev, 50 MB in base (one per environment and node). Where the edited
environment's time goes: re-pack 0.6-0.7, check and ship 0.25, unpack 0.55
(together 0.86x the warm switch without zygotes, before any restart), then
the restart 0.9: a new tree needs a new zygote, which imports distributed
and numpy (0.5-0.6 s) from the end of the install on, then forks. (a) and
(c) missed in this run for its cold unpack (7.3 s against 2.2 s in a run
an hour before: the disk was shared with other jobs); a worker process
now exits at once once closed, which took 0.43 s of every restart before.

    python bench/switch.py [--small] [--one-process]

``--small``: 2 workers, 2 rounds for (a)-(c); (e) with 2 rounds for rows
1, 3 and 4, 4 switches for row 2, 1 round for rows 5 and 6: the same code
paths, for CI. ``--one-process``: each node's nannies run in one ``dask
worker --nworkers N`` process, not a process each. Either way one zygote per
environment serves the node (``envship.zygote.per-node``: the nannies meet
at a socket in the node cache). The output says which layout ran.
"""

from __future__ import annotations

import logging
import os
import signal
import site
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dask.config  # noqa: E402
from distributed import Client  # noqa: E402
from distributed.diagnostics.plugin import PipInstall  # noqa: E402
from iterate import pip_install  # noqa: E402
from timing import Sample, rotated, small_parser, target_line, timed  # noqa: E402

import envship  # noqa: E402
import fixtures  # noqa: E402
from envship.manifest import Manifest  # noqa: E402
from fixtures.cluster import local_cluster  # noqa: E402

WORKERS = 4
REPEAT = 3
#: (e) 6: one small package per round and mode, none of them in sklearn-dev.
EDITS = ["six", "idna", "tomli", "iniconfig", "pyparsing", "attrs"]


@dataclass(frozen=True)
class Rows:
    """How often each row of (e) runs per mode."""

    warm: int
    loop_rounds: int
    loop_switches: int  # per round
    restart: int
    kill: int
    cold: int
    edited: int


FULL = Rows(warm=5, loop_rounds=2, loop_switches=5, restart=5, kill=5, cold=2, edited=3)
SMALL = Rows(
    warm=2, loop_rounds=2, loop_switches=2, restart=2, kill=2, cold=1, edited=1
)


def sklearn_version() -> str | None:
    """The scikit-learn installed where this runs (in a worker), if any."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scikit-learn")
    except PackageNotFoundError:
        return None


def switch(client: Client, env) -> envship.SwitchReport:
    """``envship.use_environment`` of a Python 3 environment, without progress bars."""
    report = envship.use_environment(client, env, progress=False)
    assert isinstance(report, envship.SwitchReport)
    return report


def all_workers(client):
    return list(client.scheduler_info(n_workers=-1)["workers"])


def quiet() -> None:
    """Runs in a worker or nanny: distributed logs errors only."""
    logging.getLogger("distributed").setLevel(logging.ERROR)


def set_zygotes(on: bool) -> None:
    """Runs in a nanny: zygotes on or off for its next worker starts."""
    dask.config.set({"envship.zygote.enabled": on})


def zygote_states() -> list[dict]:
    """Runs in a nanny: the zygotes of its process (env, pid, RSS)."""
    from envship.node import zygotes

    return zygotes.states()


def throwaway_venv(folder: Path) -> str:
    """A venv for nannies that PipInstall may modify: its own site-packages
    (where PipInstall installs), with this interpreter's packages (envship,
    distributed) visible beneath them through a ``.pth`` file.

    Nothing is installed into it here, and pip never removes packages
    outside the venv's own prefix.
    """
    subprocess.run([sys.executable, "-m", "venv", folder], check=True)
    python = str(folder / "bin" / "python")
    own = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    lines = [f"import site; site.addsitedir({p!r})" for p in parents]
    Path(own, "bench_parent_packages.pth").write_text("\n".join(lines) + "\n")
    return python


@contextmanager
def node_cluster(
    folder: Path,
    workers: int,
    python: str,
    one_process: bool,
    node_env: dict[str, str] | None = None,
) -> Iterator[Client]:
    """A scheduler and one node of ``workers`` nannies: a process each, or
    all in one ``dask worker --nworkers`` process (``one_process``)."""
    nodes = {} if one_process else {"node": workers}
    with local_cluster(folder, nodes, python=python, node_env=node_env) as cluster:
        client = cluster.client
        assert client is not None
        if one_process:
            cluster.add_node("node", workers, one_process=True)
            client.wait_for_workers(workers, timeout=60)
        client.run(quiet)
        client.run(quiet, nanny=True)
        yield client


def both_modes(
    client: Client, rounds: int, measure: Callable[[bool], list[float]]
) -> dict[bool, list[float]]:
    """``measure(on)`` ``rounds`` times with zygotes on and off in every
    nanny, interleaved (the order rotating every round); seconds by mode."""
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for on in rotated([True, False], r):
            client.run(set_zygotes, on, nanny=True)
            seconds[on] += measure(on)
    return seconds


def kill_one(client: Client, workers: int, timeout: float = 120) -> float:
    """SIGKILL one worker; seconds until the scheduler has ``workers`` again
    and the new one answers ``client.run``.

    The new worker is told by its address (a new port): ``client.run`` is
    never sent to the dead one, whose connection attempts would be retried
    for distributed's connect timeout (30 s) and counted.
    """
    before = sorted(all_workers(client))
    victim = before[0]
    pid = client.run(os.getpid, workers=[victim])[victim]
    start = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    while time.perf_counter() - start < timeout:
        now = all_workers(client)
        new = [a for a in now if a not in before]
        if len(now) == workers and len(new) == 1 and victim not in now:
            if client.run(os.getpid, workers=new)[new[0]] != pid:
                return time.perf_counter() - start
        time.sleep(0.01)
    raise TimeoutError(f"worker {victim} not back within {timeout} s")


def memory(client: Client) -> dict[str, tuple[int, int]]:
    """The zygotes of all nannies, each once: name -> (count, RSS bytes)."""
    seen: dict[int, dict] = {}
    for states in client.run(zygote_states, nanny=True).values():
        for state in states:
            seen[state["pid"]] = state
    by_name: dict[str, list[int]] = defaultdict(list)
    for state in seen.values():
        by_name[state["name"]].append(state["rss"])
    return {name: (len(v), sum(v)) for name, v in sorted(by_name.items())}


def zygotes_on_off(
    client: Client,
    tmp: Path,
    rows: Rows,
    workers: int,
    sklearn: envship.Artifact,
    base: envship.Artifact,
    sklearn_dev: Path,
) -> dict:
    """(e) rows 1-4, 6 and 7 on the cluster of (a)-(c): seconds by row and mode."""
    results: dict = {}
    switch(client, base)  # installed on the node (and a zygote started), untimed
    switch(client, sklearn)

    print("(e) 1. warm switches, zygotes on and off...", flush=True)

    warm_stages: dict[bool, list[dict]] = {True: [], False: []}

    def warm(on: bool) -> list[float]:
        switch(client, None)
        took, report = timed(switch, client, sklearn)
        warm_stages[on].append(report.stages)
        return [took]

    results["warm"] = both_modes(client, rows.warm, warm)
    results["warm stages"] = warm_stages

    print("(e) 2. A-B-A loop...", flush=True)
    where = [sklearn]  # the workers are in sklearn-dev now

    def loop(on: bool) -> list[float]:
        took = []
        for _ in range(rows.loop_switches):
            other = base if where[0] is sklearn else sklearn
            took.append(timed(switch, client, other)[0])
            where[0] = other
        return took

    results["loop"] = both_modes(client, rows.loop_rounds, loop)
    if where[0] is not sklearn:
        switch(client, sklearn)
    assert set(client.run(sklearn_version).values()) == {"1.9.1"}

    print("(e) 3. client.restart()...", flush=True)
    results["restart"] = both_modes(
        client, rows.restart, lambda on: [timed(client.restart)[0]]
    )
    print("(e) 4. a worker killed with SIGKILL...", flush=True)
    results["kill"] = both_modes(
        client, rows.kill, lambda on: [kill_one(client, workers)]
    )
    assert set(client.run(sklearn_version).values()) == {"1.9.1"}
    client.run(set_zygotes, True, nanny=True)
    results["memory before"] = memory(client)

    print("(e) 6. edited environment: pip install, re-pack, switch...", flush=True)
    work = tmp / "work"
    subprocess.run(["cp", "-a", sklearn_dev, work], check=True)
    edits = iter(EDITS)
    details: dict[bool, list[dict]] = {True: [], False: []}

    def repack_switch() -> dict:
        with dask.config.set({"envship.store": str(tmp / "edit-store")}):
            start = time.perf_counter()
            artifact = envship.pack(work, name="work", archive=False)
            packed = time.perf_counter() - start
            report = switch(client, artifact)
            took = time.perf_counter() - start
        return {"seconds": took, "pack": packed, "stages": report.stages}

    repack_switch()  # the working copy's first switch: untimed

    def edited(on: bool) -> list[float]:
        package = next(edits)
        pip_install(work, [package])  # the edit itself is not timed
        run = {**repack_switch(), "package": package}
        details[on].append(run)
        return [run["seconds"]]

    results["edited"] = both_modes(client, rows.edited, edited)
    results["edited runs"] = details
    client.run(set_zygotes, True, nanny=True)
    results["memory after"] = memory(client)
    return results


def cold_switches(
    tmp: Path, rows: Rows, workers: int, python: str, one_process: bool, artifact
) -> dict[bool, list[tuple[float, float]]]:
    """(e) 5: per mode, (seconds, restart stage) of cold switches, each on a
    new cluster with a fresh node cache, zygotes set in its nannies' env."""
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for r in range(rows.cold):
        for on in rotated([True, False], r):
            env = {"DASK_ENVSHIP__ZYGOTE__ENABLED": str(on)}
            folder = tmp / f"cold-{r}-{on}"
            with node_cluster(folder, workers, python, one_process, env) as client:
                took, report = timed(switch, client, artifact)
                assert set(client.run(sklearn_version).values()) == {"1.9.1"}
            runs[on].append((took, report.stages["restart"]))
    return runs


def main() -> None:
    parser = small_parser(__doc__)
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="each node's nannies in one `dask worker --nworkers N` process",
    )
    args = parser.parse_args()
    workers, rounds = (2, 2) if args.small else (WORKERS, REPEAT)
    rows = SMALL if args.small else FULL
    one_process = args.one_process
    layout = (
        f"one `dask worker --nworkers {workers}` process for the node's nannies"
        if one_process
        else f"{workers} nanny processes"
    )
    logging.getLogger("distributed").setLevel(logging.ERROR)
    # The A-B loop's base has no numpy; nothing here sends numpy objects.
    warnings.filterwarnings("ignore", message="base lacks numpy")
    sklearn_dev = fixtures.build("sklearn-dev")
    added = sorted(
        set(fixtures.SPECS["sklearn-dev"].packages)
        - set(fixtures.SPECS["base"].packages)
    )
    print(f"layout: {layout}", flush=True)
    with tempfile.TemporaryDirectory(dir=Path.home()) as name:
        tmp = Path(name)
        print("preparing a throwaway venv for the nannies...", flush=True)
        python = throwaway_venv(tmp / "venv")
        print("packing sklearn-dev into a fresh store...", flush=True)
        t_pack, artifact = timed(
            envship.pack, sklearn_dev, name="sklearn-dev", store=tmp / "store"
        )
        base = envship.pack(fixtures.build("base"), name="base", store=tmp / "store")

        with node_cluster(tmp / "cluster", workers, python, one_process) as client:
            print("(a) cold switch...", flush=True)
            t_cold, cold = timed(switch, client, artifact)
            assert set(client.run(sklearn_version).values()) == {"1.9.1"}
            copies = []
            for r in range(rounds):
                took, _ = timed(
                    subprocess.run,
                    ["cp", "-a", sklearn_dev, tmp / f"copy-{r}"],
                    check=True,
                )
                copies.append(took)
            t_copy = Sample(copies)

            # (b) warm, against restarts inside the environment and outside it.
            print("(b) warm switches and restarts, interleaved...", flush=True)
            inside = [True]  # where the workers run now: the environment

            def into(env_inside: bool) -> None:
                if inside[0] != env_inside:
                    switch(client, artifact if env_inside else None)
                    inside[0] = env_inside

            def warm() -> float:
                into(False)
                took, _ = timed(switch, client, artifact)
                inside[0] = True
                return took

            def restart(env_inside: bool) -> float:
                into(env_inside)
                took, _ = timed(client.restart_workers, all_workers(client))
                return took

            runs = {
                "warm": warm,
                "restart inside": lambda: restart(True),
                "restart outside": lambda: restart(False),
            }
            seconds: dict[str, list[float]] = {name: [] for name in runs}
            for r in range(rounds):
                for name in rotated(list(runs), r):
                    seconds[name].append(runs[name]())
            t_warm, t_inside, t_outside = (Sample(v) for v in seconds.values())
            into(True)
            assert set(client.run(sklearn_version).values()) == {"1.9.1"}
            floor = t_copy.median + t_inside.median

            # (c) PipInstall into the nannies' own environment.
            print("(c) PipInstall...", flush=True)
            into(False)
            assert set(client.run(sklearn_version).values()) == {None}
            t_pip, _ = timed(
                client.register_plugin, PipInstall(added, restart_workers=True)
            )
            client.wait_for_workers(workers)
            assert set(client.run(sklearn_version).values()) == {"1.9.1"}

            # (e) zygotes on and off, on this same cluster.
            zyg = zygotes_on_off(
                client, tmp, rows, workers, artifact, base, sklearn_dev
            )

        print("(e) 5. cold switches on new clusters...", flush=True)
        colds = cold_switches(tmp, rows, workers, python, one_process, artifact)

    m = artifact.manifest
    assert isinstance(m, Manifest)  # a full pack, not thin
    print(
        f"\n{workers} workers on one node, environment sklearn-dev "
        f"({m.file_count} files, {m.unpacked_size / 1e6:.0f} MB); {rounds} rounds; "
        "seconds: median (min-max, n)"
    )
    print(f"layout: {layout}; load average {os.getloadavg()[0]:.2f} (1 min)")
    print(f"pack into a fresh store             {t_pack:6.2f}")
    print(f"(a) cold switch (once)              {t_cold:6.2f}")
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in cold.stages.items())
    print(f"    its stages: {stages}")
    print(f"    cp -a of the tree               {t_copy}")
    print(
        f"    floor: cp -a + restart inside   {floor:6.2f}   ratio cold / floor "
        f"{t_cold / floor:.2f}"
    )
    print(f"(b) warm switch                     {t_warm}")
    print(
        f"    restart inside the environment  {t_inside}   ratio warm / this "
        f"{t_warm.median / t_inside.median:.2f} (the target's yardstick)"
    )
    print(
        f"    restart in the nannies' venv    {t_outside}   ratio warm / this "
        f"{t_warm.median / t_outside.median:.2f} (shown only)"
    )
    print(
        f"(c) PipInstall {' '.join(added)}: {t_pip:.2f}; envship pack + cold "
        f"switch {t_pack + t_cold:.2f}; ratio PipInstall / envship "
        f"{t_pip / (t_pack + t_cold):.2f} (without the pack: {t_pip / t_cold:.2f})"
    )
    ratios = report_zygotes(zyg, colds)
    print("\ntargets")
    for line in (
        target_line("(a) cold switch / floor", t_cold / floor, "<=", 1.5),
        target_line(
            "(b) warm switch / restart inside the env (medians)",
            t_warm.median / t_inside.median,
            "<=",
            1.2,
        ),
        target_line(
            "(c) PipInstall / (envship pack + cold switch)",
            t_pip / (t_pack + t_cold),
            ">=",
            3,
        ),
        target_line("(e1) warm switch, zygotes on / off", ratios["warm"], "<=", 0.333),
        target_line("(e2) A-B loop per switch, on / off", ratios["loop"], "<=", 0.333),
        target_line("(e3) client.restart(), on / off", ratios["restart"], "<=", 0.333),
        target_line("(e4) killed worker back, on / off", ratios["kill"], "<=", 0.333),
        target_line(
            "(e5) cold switch restart stage, on / off",
            ratios["cold restart"],
            "<=",
            0.5,
        ),
        target_line("(e5) cold switch, on / off", ratios["cold"], "<=", 1.0),
        target_line(
            "(e6) edited env on / warm switch off", ratios["edited"], "<=", 1.2
        ),
    ):
        print(line)


def median_stages(zyg: dict, on: bool) -> str:
    """The stages of the warm switch of median time (the lower middle) in a mode."""
    seconds = zyg["warm"][on]
    middle = sorted(range(len(seconds)), key=seconds.__getitem__)[
        (len(seconds) - 1) // 2
    ]
    stages = zyg["warm stages"][on][middle]
    return ", ".join(f"{k} {v:.2f}" for k, v in stages.items() if k != "pack")


def report_zygotes(zyg: dict, colds: dict[bool, list[tuple[float, float]]]) -> dict:
    """Print (e)'s table; the ratios its targets judge."""
    print("(e) zygotes on and off, interleaved; seconds: median (min-max, n)")
    print(f"    {'':<34} {'zygotes on':<24} {'zygotes off':<24} on / off")
    ratios = {}
    labels = {
        "warm": "1. warm switch",
        "loop": "2. A-B-A loop, per switch",
        "restart": "3. client.restart()",
        "kill": "4. SIGKILLed worker back",
    }
    for key, label in labels.items():
        on, off = Sample(zyg[key][True]), Sample(zyg[key][False])
        ratios[key] = on.median / off.median
        print(f"    {label:<34} {on!s:<24} {off!s:<24} {ratios[key]:.3f}")
        if key == "warm":
            for mode in (True, False):
                print(f"       {'on ' if mode else 'off'}: {median_stages(zyg, mode)}")
    total = {on: Sample(t for t, _ in runs) for on, runs in colds.items()}
    stage = {on: Sample(s for _, s in runs) for on, runs in colds.items()}
    ratios["cold"] = total[True].median / total[False].median
    ratios["cold restart"] = stage[True].median / stage[False].median
    print(
        f"    {'5. cold switch (new cluster)':<34} {total[True]!s:<24} "
        f"{total[False]!s:<24} {ratios['cold']:.3f}"
    )
    print(
        f"    {'   its restart stage':<34} {stage[True]!s:<24} "
        f"{stage[False]!s:<24} {ratios['cold restart']:.3f}"
    )
    edited = {on: Sample(zyg["edited"][on]) for on in (True, False)}
    warm_off = Sample(zyg["warm"][False]).median
    ratios["edited"] = edited[True].median / warm_off
    print(
        f"    {'6. edited env: re-pack + switch':<34} {edited[True]!s:<24} "
        f"{edited[False]!s:<24} {edited[True].median / edited[False].median:.3f}"
    )
    for on in (True, False):
        for run in zyg["edited runs"][on]:
            stages = ", ".join(
                f"{k} {v:.2f}"
                for k, v in {"re-pack": run["pack"], **run["stages"]}.items()
                if k != "pack"
            )
            print(f"       {'on ' if on else 'off'} +{run['package']}: {stages}")
    print(
        f"       on / warm switch off: {ratios['edited']:.3f} (warm off {warm_off:.2f})"
    )
    for when in ("memory before", "memory after"):
        mem = zyg[when]
        shown = "; ".join(
            f"{name}: {n} zygote{'s' if n != 1 else ''}, {rss / 1e6:.0f} MB"
            for name, (n, rss) in mem.items()
        )
        after = "rows 1-4" if when == "memory before" else "row 6"
        print(f"    7. zygotes' RSS after {after}: {shown or 'none'}")
    return ratios


if __name__ == "__main__":
    main()
