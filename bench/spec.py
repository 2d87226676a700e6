"""Benchmark: from a package list to four workers computing inside it (issue 16).

One run, the same wheels for everyone from one local folder and no index (as
on a site behind a mirror: ``~/.cache/envship-fixtures/wheels/spec-bench``,
filled once by ``pip download``; every pip and uv below gets
``PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_FIND_LINKS=<folder>``), four
workers of one thread each for every contender (Ray: ``num_cpus=4``, tasks
of one CPU), the wheels read once (untimed) before each cold row so that
nobody pays for a cold page cache that another did not:

(1) cold, from the list to four workers that imported scikit-learn and fitted
    a tiny model (each timed from a running cluster to the tasks' results):
    - envship: ``client.use_environment(pip=[...])`` (base: the client's own
      environment; a fresh store, a fresh folder of builds and a fresh uv
      cache, the nodes empty);
    - distributed's ``PipInstall(packages, pip_options=["--no-index",
      "--find-links", DIR])`` on a cluster whose scheduler and nannies run in
      a throwaway venv (PipInstall installs into the running environment).
      ``restart_workers=False``, its default (its docs offer a restart after
      installing; these packages are new to the workers, nothing imported
      them before, so none is needed and the faster mode is the baseline).
      It installs on the scheduler, then on each worker in turn (a per-host
      semaphore);
    - Ray's ``runtime_env={"pip": [...]}``, cold (four tasks of one CPU with
      ``max_calls=1``) and its cache hit on new workers (four more such
      tasks: new worker processes, the environment already built). Ray runs
      from its own venv (``~/.cache/envship-bench/ray-venv``, ``pip install
      "ray[default]"`` once through the machine's package index; if that
      fails, the row says why and is skipped). ``ray.init`` (with
      ``num_cpus=4``, no dashboard) is shown apart and not counted, as the
      dask clusters' start is not. Its pip sees no index through the
      variables above alone: perf-floor's recipe also runs the driver in a
      loopback-only network namespace, which this bench does not;
(2) the same list again, on the envship cluster, from another environment:
    target at most 1.2x a warm switch (into the same built environment, by
    its id, measured on the same cluster in the same rounds);
(3) an edit of one ``.py`` of an editable project (setuptools, ``pip install
    -e``) in a copy of the sklearn-dev fixture, then ``use_environment`` of
    that environment again: target at most 1.5x a warm switch.
    The workers' result is checked to be the edited one after every edit.

(2), (3) and the warm switch interleave, in an order that rotates every
round; each starts from the editable environment (reached untimed), so the
warm switch and (2) end in the same environment. Figures are medians with
their spread (min-max). Target of (1): envship at least 4x faster than
PipInstall and than Ray's cold.

On this 2-core machine (2026-12-04, load average 9 to 12 from other work,
before use_environment(pip=) and editable shipping were on main: run on a
merge of those branches) two full runs gave PipInstall cold 67 and 136 s
(41 s in a third), Ray cold 53, 117 and 74 s (cache hit on 4 new workers
18, 33 and 34 s; ray.init 10 to 26 s), envship cold 80 and 52 s (ratios
1.7 and 0.8 to PipInstall, 1.5 and 1.4 to Ray: (1) MISS), (2) 1.10 and
1.29x a warm switch of 4 to 6 s, (3) 2.76x (one run with the real edit).

    python bench/spec.py [--small]

``--small``: tabulate only, 2 workers, one round, the base fixture for the
editable environment, no Ray: the same code paths in seconds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import dask.config  # noqa: E402
from distributed import Client  # noqa: E402
from distributed.diagnostics.plugin import PipInstall  # noqa: E402
from switch import throwaway_venv  # noqa: E402
from timing import Sample, rotated, small_parser, target_line, timed  # noqa: E402

import envship  # noqa: E402
import fixtures  # noqa: E402
from fixtures.cluster import local_cluster  # noqa: E402
from fixtures.envs import default_root  # noqa: E402

WORKERS = 4
REPEAT = 3
PACKAGES = ["scikit-learn", "tabulate"]
RAY_VENV = Path("~/.cache/envship-bench/ray-venv").expanduser()
RAY_REQUIREMENT = "ray[default]"


@dataclass
class Setup:
    """What a run measures: sizes of the full run or of ``--small``."""

    workers: int
    rounds: int
    packages: list[str]
    editable_base: str  # the fixture the editable environment is a copy of
    ray: bool


FULL = Setup(WORKERS, REPEAT, PACKAGES, "sklearn-dev", True)
SMALL = Setup(2, 1, ["tabulate"], "base", False)


def wheel_folder(packages: list[str]) -> Path:
    """The one wheel folder of this benchmark, with ``packages`` and their deps.

    Filled once by ``pip download`` (through the machine's package index, for
    this interpreter's Python), into ``<fixtures root>/wheels/spec-bench``;
    a marker file lists what was downloaded, so later runs ask nobody.

    Examples
    --------
    >>> folder = wheel_folder(["tabulate"])  # doctest: +SKIP
    >>> sorted(p.name for p in folder.glob("tabulate-*.whl"))  # doctest: +SKIP
    ['tabulate-0.10.0-py3-none-any.whl']
    """
    folder = default_root() / "wheels" / "spec-bench"
    marker = folder / ".downloaded"
    have = set(marker.read_text().split()) if marker.exists() else set()
    if not set(packages) <= have:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "-d", folder]
            + sorted(set(packages) | have),
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise RuntimeError(f"pip download failed: {done.stderr[-2000:]}")
        marker.write_text("\n".join(sorted(set(packages) | have)) + "\n")
    return folder


def offline(wheels: Path) -> dict[str, str]:
    """Environment variables for pip (and envship's uv): this folder, no index."""
    return {
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheels),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_ROOT_USER_ACTION": "ignore",  # CI runs as root
    }


def read_all(folder: Path) -> int:
    """Read every file of ``folder`` (a warm-up that reads the bytes)."""
    return sum(len(p.read_bytes()) for p in folder.iterdir() if p.is_file())


def compute(packages: list[str]) -> str:
    """Runs in a worker: use the packages (fit a tiny model); their versions."""
    from importlib.metadata import version

    import tabulate

    tabulate.tabulate([[1, 2]])
    if "scikit-learn" in packages:
        from sklearn.linear_model import LinearRegression

        LinearRegression().fit([[0.0], [1.0], [2.0]], [0.0, 1.0, 2.0])
    return " ".join(f"{p} {version(p)}" for p in sorted(packages))


def compute_everywhere(client: Client, packages: list[str]) -> set[str]:
    """One task of ``compute`` on every worker; what they reported."""
    futures = [
        client.submit(compute, packages, workers=[w], pure=False)
        for w in client.scheduler_info(n_workers=-1)["workers"]
    ]
    return set(client.gather(futures))


def edited_value() -> int:
    """Runs in a worker: the value in the editable project, as imported now."""
    from specproj import model

    return model.VALUE


def write_model(project: Path, value: int) -> None:
    """The one ``.py`` that each edit changes."""
    (project / "specproj" / "model.py").write_text(f"VALUE = {value}\n")


def editable_env(tmp: Path, fixture: str) -> tuple[Path, Path]:
    """A copy of ``fixture`` with a small setuptools project installed by
    ``pip install -e`` (built through the machine's own pip config: setup,
    untimed). Returns the environment and the project."""
    project = tmp / "specproj"
    (project / "specproj").mkdir(parents=True)
    (project / "specproj" / "__init__.py").write_text("")
    write_model(project, 0)
    (project / "pyproject.toml").write_text(
        textwrap.dedent(
            """\
            [build-system]
            requires = ["setuptools>=64"]
            build-backend = "setuptools.build_meta"

            [project]
            name = "specproj"
            version = "0.1"
            """
        )
    )
    env = tmp / "edit-env"
    subprocess.run(["cp", "-a", fixtures.build(fixture), env], check=True)
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTHON", "PIP_", "UV_"))
    }
    clean["PIP_ROOT_USER_ACTION"] = "ignore"
    clean["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    subprocess.run(
        [env / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps"]
        + ["-e", str(project)],
        check=True,
        env=clean,
    )
    return env, project


def environment_of(report: envship.SwitchReport) -> str:
    """The one environment id every worker of ``report`` runs in."""
    (env,) = {w.environment for w in report.values()}
    assert env is not None
    return env


def pipinstall_cold(tmp: Path, setup: Setup, wheels: Path) -> float:
    """distributed's PipInstall, from the list to workers computing inside it."""
    print("PipInstall: a throwaway venv for its scheduler and nannies...", flush=True)
    python = throwaway_venv(tmp / "pip-venv")
    with local_cluster(
        tmp / "pip-cluster",
        {"node": setup.workers},
        python=python,
        node_env=offline(wheels),
    ) as (client, _):
        client.run(lambda: logging.getLogger("distributed").setLevel(logging.ERROR))
        read_all(wheels)
        plugin = PipInstall(
            setup.packages, pip_options=["--no-index", "--find-links", str(wheels)]
        )
        print("(1) PipInstall, cold...", flush=True)

        def run() -> set[str]:
            client.register_plugin(plugin)
            return compute_everywhere(client, setup.packages)

        took, seen = timed(run)
        assert len(seen) == 1, seen
    return took


def ray_python() -> tuple[Path | None, str]:
    """The Ray venv's python, installing Ray there once; or None and why not."""
    python = RAY_VENV / "bin" / "python"
    if not python.exists():
        print(f"Ray: installing {RAY_REQUIREMENT} into {RAY_VENV} (once)...")
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", str(RAY_VENV)], check=True, timeout=120
            )
            subprocess.run(
                [python, "-m", "pip", "install", "--quiet", RAY_REQUIREMENT],
                check=True,
                timeout=900,
                capture_output=True,
            )
        except (subprocess.SubprocessError, OSError) as error:
            shutil.rmtree(RAY_VENV, ignore_errors=True)
            return None, f"installing {RAY_REQUIREMENT} failed: {error}"
    found = subprocess.run(
        [python, "-c", "import ray; print(ray.__version__)"],
        capture_output=True,
        text=True,
    )
    if found.returncode:
        return None, f"ray does not import in {RAY_VENV}: {found.stderr[-300:]}"
    return python, found.stdout.strip()


# The driver, run by the Ray venv's python. Functions defined here are sent by
# value. ``max_calls=1``: every task gets a new worker process.
RAY_DRIVER = """\
import json, os, sys, time
packages, workers = json.loads(sys.argv[1]), int(sys.argv[2])

def fit(packages):
    from importlib.metadata import version
    import tabulate
    tabulate.tabulate([[1, 2]])
    if "scikit-learn" in packages:
        from sklearn.linear_model import LinearRegression
        LinearRegression().fit([[0.0], [1.0], [2.0]], [0.0, 1.0, 2.0])
    return os.getpid(), " ".join(f"{p} {version(p)}" for p in sorted(packages))

start = time.perf_counter()
import ray
ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
init = time.perf_counter() - start
task = ray.remote(num_cpus=1, max_calls=1)(fit).options(
    runtime_env={"pip": packages}
)
times, pids, seen = [], set(), set()
for _ in range(2):  # cold, then the cache hit on new workers
    start = time.perf_counter()
    results = ray.get([task.remote(packages) for _ in range(workers)])
    times.append(time.perf_counter() - start)
    pids |= {pid for pid, _ in results}
    seen |= {versions for _, versions in results}
ray.shutdown()
print(json.dumps({"init": init, "cold": times[0], "hit": times[1],
                  "processes": len(pids), "seen": sorted(seen)}))
"""


def ray_cold(tmp: Path, setup: Setup, wheels: Path) -> dict | str:
    """Ray's runtime_env pip: seconds of init, cold and cache hit; or why not."""
    python, version = ray_python()
    if python is None:
        return version
    driver = tmp / "ray_driver.py"
    driver.write_text(RAY_DRIVER)
    env = {**os.environ, **offline(wheels), "RAY_USAGE_STATS_ENABLED": "0"}
    read_all(wheels)
    print(f"(1) Ray {version}, runtime_env pip: cold and cache hit...", flush=True)
    done = subprocess.run(
        [python, driver, json.dumps(setup.packages), str(setup.workers)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
        timeout=900,
    )
    if done.returncode:
        return f"Ray's driver failed: {done.stderr[-500:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["processes"] == 2 * setup.workers, result
    assert len(result["seen"]) == 1, result
    result["version"] = version
    return result


def envship_runs(tmp: Path, setup: Setup, wheels: Path) -> dict:
    """envship cold, then (2), (3) and warm switches interleaved, one cluster."""
    edit_env, project = editable_env(tmp, setup.editable_base)
    os.environ.update(offline(wheels))  # read by envship's build (uv)
    os.environ["UV_CACHE_DIR"] = str(tmp / "uv-cache")  # cold: a fresh cache
    out: dict = {}
    with (
        # cold: a fresh store and a fresh folder of builds (a build left by
        # an earlier run would make the first row a cache hit)
        dask.config.set(
            {
                "envship.store": str(tmp / "store"),
                "envship.build.directory": str(tmp / "builds"),
            }
        ),
        local_cluster(tmp / "cluster", {"node": setup.workers}) as (client, _),
    ):
        client.run(lambda: logging.getLogger("distributed").setLevel(logging.ERROR))
        read_all(wheels)
        print("(1) envship, cold...", flush=True)

        def cold() -> tuple[envship.SwitchReport, set[str]]:
            report = client.use_environment(pip=setup.packages, progress=False)
            return report, compute_everywhere(client, setup.packages)

        out["cold"], (report, seen) = timed(cold)
        assert len(seen) == 1, seen
        out["seen"] = seen.pop()
        out["cold stages"] = report.stages
        built = environment_of(report)

        where = ["built"]
        edits = [0]
        stages: dict[str, list[dict[str, float]]] = {
            "warm": [],
            "again": [],
            "edit": [],
        }

        def into_edit_env() -> None:
            if where[0] != "edit":
                client.use_environment(str(edit_env), progress=False)
                where[0] = "edit"

        def warm() -> float:
            into_edit_env()
            took, report = timed(client.use_environment, built, progress=False)
            assert environment_of(report) == built
            where[0] = "built"
            stages["warm"].append(report.stages)
            return took

        def again() -> float:
            into_edit_env()
            took, report = timed(
                client.use_environment, pip=setup.packages, progress=False
            )
            assert environment_of(report) == built, "the same list: the same env"
            where[0] = "built"
            stages["again"].append(report.stages)
            return took

        def edit() -> float:
            into_edit_env()
            edits[0] += 1
            write_model(project, edits[0])
            took, report = timed(client.use_environment, str(edit_env), progress=False)
            assert set(client.run(edited_value).values()) == {edits[0]}
            stages["edit"].append(report.stages)
            return took

        print("(2), (3) and warm switches, interleaved...", flush=True)
        into_edit_env()
        assert set(client.run(edited_value).values()) == {0}
        runs = {"warm": warm, "again": again, "edit": edit}
        seconds: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(setup.rounds):
            for name in rotated(list(runs), r):
                seconds[name].append(runs[name]())
        out.update({name: Sample(v) for name, v in seconds.items()})
        out["stages"] = {name: median_stages(v) for name, v in stages.items()}
        client.use_environment(None, progress=False)
    return out


def median_stages(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each stage's median seconds over ``runs`` (0 where a run lacks it).

    Examples
    --------
    >>> median_stages([{"pack": 0.1, "ship": 0.3}, {"pack": 0.3}])
    {'pack': 0.2, 'ship': 0.15}
    """
    names = list(dict.fromkeys(name for run in runs for name in run))
    return {
        name: statistics.median(run.get(name, 0.0) for run in runs) for name in names
    }


def stage_line(stages: dict[str, float]) -> str:
    """The stages of a row, as printed under it: ``its stages: pack 0.12, ...``."""
    return "        its stages: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())


def main() -> None:
    args = small_parser(__doc__).parse_args()
    setup = SMALL if args.small else FULL
    logging.getLogger("distributed").setLevel(logging.ERROR)
    wheels = wheel_folder(PACKAGES)  # one folder for both sizes
    with tempfile.TemporaryDirectory(dir=Path.home()) as name:
        tmp = Path(name)
        t_pip = pipinstall_cold(tmp, setup, wheels)
        es = envship_runs(tmp, setup, wheels)
        ray = (
            ray_cold(tmp, setup, wheels)
            if setup.ray
            else "not run in --small (a cold Ray takes tens of seconds)"
        )
    report(setup, wheels, t_pip, es, ray)


def report(setup: Setup, wheels: Path, t_pip: float, es: dict, ray) -> None:
    listing = " + ".join(setup.packages)
    print(
        f"\n{setup.workers} workers of one thread, one node; {listing} from "
        f"{wheels} (no index); workers report: {es['seen']}; "
        f"{setup.rounds} rounds; seconds: median (min-max, n)"
    )
    print("(1) from the list to the workers computing inside it, cold")
    print(f"    envship use_environment(pip=...)        {es['cold']:6.2f}")
    print(stage_line(es["cold stages"]))
    print(
        f"    PipInstall (restart_workers=False)      {t_pip:6.2f}   ratio "
        f"PipInstall / envship {t_pip / es['cold']:.2f}"
    )
    if isinstance(ray, dict):
        print(
            f"    Ray {ray['version']} runtime_env pip, cold      {ray['cold']:6.2f}   "
            f"ratio Ray / envship {ray['cold'] / es['cold']:.2f} "
            f"(ray.init apart: {ray['init']:.2f})"
        )
        print(
            f"    Ray, cache hit on {setup.workers} new workers     {ray['hit']:6.2f}   "
            f"ratio Ray hit / envship cold {ray['hit'] / es['cold']:.2f} (shown only)"
        )
    else:
        print(f"    Ray: skipped: {ray}")
    warm = es["warm"]
    print(f"(w) warm switch into the built env        {warm}")
    print(stage_line(es["stages"]["warm"]))
    print(
        f"(2) the same list again                   {es['again']}   ratio / warm "
        f"{es['again'].median / warm.median:.2f}"
    )
    print(stage_line(es["stages"]["again"]))
    print(
        f"(3) one .py edited, use_environment again {es['edit']}   ratio / warm "
        f"{es['edit'].median / warm.median:.2f}"
    )
    print(stage_line(es["stages"]["edit"]))
    print("\ntargets")
    lines = [target_line("(1) PipInstall / envship, cold", t_pip / es["cold"], ">=", 4)]
    if isinstance(ray, dict):
        lines.append(
            target_line(
                "(1) Ray cold / envship cold", ray["cold"] / es["cold"], ">=", 4
            )
        )
    lines += [
        target_line(
            "(2) same list again / warm switch (medians)",
            es["again"].median / warm.median,
            "<=",
            1.2,
        ),
        target_line(
            "(3) edit of one .py / warm switch (medians)",
            es["edit"].median / warm.median,
            "<=",
            1.5,
        ),
    ]
    for line in lines:
        print(line)


if __name__ == "__main__":
    main()
