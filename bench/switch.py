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
(d) the same warm switch on a second cluster of the same node cache with
    zygotes off (``DASK_ENVSHIP__ZYGOTE__ENABLED=False``): (b) forks its
    workers from a zygote of the environment, (d) starts each plainly.

Figures are medians with their spread (min-max).

Targets: cold within 1.5x the floor, warm within 1.2x a restart inside the
environment, pack plus cold switch at least 3x faster than PipInstall.

    python bench/switch.py [--small]     # --small: 2 workers, 2 rounds
"""

from __future__ import annotations

import logging
import site
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distributed import Client  # noqa: E402
from distributed.diagnostics.plugin import PipInstall  # noqa: E402
from timing import Sample, rotated, small_parser, target_line, timed  # noqa: E402

import envship  # noqa: E402
import fixtures  # noqa: E402
from envship.manifest import Manifest  # noqa: E402
from fixtures.cluster import local_cluster  # noqa: E402

WORKERS = 4
REPEAT = 3


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


def main() -> None:
    args = small_parser(__doc__).parse_args()
    workers, rounds = (2, 2) if args.small else (WORKERS, REPEAT)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    sklearn_dev = fixtures.build("sklearn-dev")
    added = sorted(
        set(fixtures.SPECS["sklearn-dev"].packages)
        - set(fixtures.SPECS["base"].packages)
    )
    with tempfile.TemporaryDirectory(dir=Path.home()) as name:
        tmp = Path(name)
        print("preparing a throwaway venv for the nannies...", flush=True)
        python = throwaway_venv(tmp / "venv")
        print("packing sklearn-dev into a fresh store...", flush=True)
        t_pack, artifact = timed(
            envship.pack, sklearn_dev, name="sklearn-dev", store=tmp / "store"
        )

        with local_cluster(tmp / "cluster", {"node": workers}, python=python) as (
            client,
            _,
        ):
            client.run(lambda: logging.getLogger("distributed").setLevel(logging.ERROR))
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

        # (d) the same warm switch on a cluster of the same cache without
        # zygotes: every worker a fresh interpreter.
        print("(d) warm switches with zygotes off...", flush=True)
        off = {"DASK_ENVSHIP__ZYGOTE__ENABLED": "False"}
        with local_cluster(
            tmp / "cluster", {"node": workers}, python=python, node_env=off
        ) as (client, _):
            client.run(lambda: logging.getLogger("distributed").setLevel(logging.ERROR))
            switch(client, artifact)  # installed on the node already
            plain = []
            for _r in range(rounds):
                switch(client, None)
                took, _ = timed(switch, client, artifact)
                plain.append(took)
            assert set(client.run(sklearn_version).values()) == {"1.9.1"}
            t_plain = Sample(plain)

    m = artifact.manifest
    assert isinstance(m, Manifest)  # a full pack, not thin
    print(
        f"\n{workers} workers on one node, environment sklearn-dev "
        f"({m.file_count} files, {m.unpacked_size / 1e6:.0f} MB); {rounds} rounds; "
        "seconds: median (min-max, n)"
    )
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
    print(
        f"(d) warm switch, zygotes off       {t_plain}   ratio zygotes on / off "
        f"{t_warm.median / t_plain.median:.2f} (medians; (b) is with zygotes on)"
    )
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
    ):
        print(line)


if __name__ == "__main__":
    main()
