"""Benchmark: switching four workers of one node into sklearn-dev, in one run.

On one cluster (a scheduler and four nannies with one cache directory, all
running in a throwaway venv so that PipInstall may install into it):

(a) cold switch (environment not on the node) against the floor measured in
    the same run: ``cp -a`` of the unpacked tree plus
    ``client.restart_workers``;
(b) warm switch (already cached) against ``restart_workers`` alone;
(c) what users do today: distributed's ``PipInstall`` adding the packages
    that sklearn-dev adds to base, with ``restart_workers=True``.

Targets: cold within 1.5x the floor, warm within 1.2x a plain restart, cold
at least 3x faster than PipInstall.

    python bench/switch.py
"""

from __future__ import annotations

import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distributed.diagnostics.plugin import PipInstall  # noqa: E402

import envship  # noqa: E402
import fixtures  # noqa: E402
from fixtures.cluster import local_cluster  # noqa: E402

WORKERS = 4
REPEAT = 3


def sklearn_version():
    try:
        import sklearn
    except ImportError:
        return None
    return sklearn.__version__


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def all_workers(client):
    return list(client.scheduler_info(n_workers=-1)["workers"])


def throwaway_venv(folder: Path) -> str:
    """A venv with envship installed, for nannies that PipInstall may modify."""
    subprocess.run([sys.executable, "-m", "venv", folder], check=True)
    python = str(folder / "bin" / "python")
    pip = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "-e", ROOT],
        capture_output=True,
        text=True,
    )
    if pip.returncode:
        sys.exit(f"pip install failed:\n{pip.stdout}{pip.stderr}")
    return python


def main() -> None:
    logging.getLogger("distributed").setLevel(logging.ERROR)
    sklearn_dev = fixtures.build("sklearn-dev")
    added = sorted(
        set(fixtures.SPECS["sklearn-dev"].packages)
        - set(fixtures.SPECS["base"].packages)
    )
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        tmp = Path(tmp)
        print("preparing a throwaway venv for the nannies...", flush=True)
        python = throwaway_venv(tmp / "venv")
        start = time.perf_counter()
        artifact = envship.pack(sklearn_dev, name="sklearn-dev", store=tmp / "store")
        t_pack = time.perf_counter() - start

        with local_cluster(tmp / "cluster", {"node": WORKERS}, python=python) as (
            client,
            _,
        ):
            client.run(lambda: logging.getLogger("distributed").setLevel(logging.ERROR))
            # (a) cold
            start = time.perf_counter()
            cold = client.use_environment(artifact, progress=False)
            t_cold = time.perf_counter() - start
            assert set(client.run(sklearn_version).values()) == {"1.9.1"}
            t_copy = timed(
                subprocess.run, ["cp", "-a", sklearn_dev, tmp / "copy"], check=True
            )
            t_restart = statistics.median(
                timed(client.restart_workers, all_workers(client))
                for _ in range(REPEAT)
            )
            floor = t_copy + t_restart

            # (b) warm: back to the nannies' own environment, then in again.
            warm = []
            for _ in range(REPEAT):
                client.use_environment(None, progress=False)
                warm.append(timed(client.use_environment, artifact, progress=False))
            t_warm = statistics.median(warm)
            assert set(client.run(sklearn_version).values()) == {"1.9.1"}
            client.use_environment(None, progress=False)
            t_plain = statistics.median(
                timed(client.restart_workers, all_workers(client))
                for _ in range(REPEAT)
            )

            # (c) PipInstall into the nannies' own environment.
            assert set(client.run(sklearn_version).values()) == {None}
            t_pip = timed(
                client.register_plugin, PipInstall(added, restart_workers=True)
            )
            client.wait_for_workers(WORKERS)
            assert set(client.run(sklearn_version).values()) == {"1.9.1"}

    print(
        f"\n{WORKERS} workers on one node, environment sklearn-dev "
        f"({artifact.manifest.file_count} files, "
        f"{artifact.manifest.unpacked_size / 1e6:.0f} MB); packed once in {t_pack:.2f} s (not counted below)"
    )
    print(
        f"(a) cold switch              {t_cold:6.2f} s   floor (cp -a {t_copy:.2f} s + restart {t_restart:.2f} s) {floor:.2f} s   ratio {t_cold / floor:.2f} (target <= 1.5)"
    )
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in cold.stages.items())
    print(f"    cold switch stages: {stages}")
    print(
        f"(b) warm switch (median {REPEAT})   {t_warm:6.2f} s   restart_workers {t_plain:.2f} s   ratio {t_warm / t_plain:.2f} (target <= 1.2)"
    )
    print(
        f"(c) PipInstall {' '.join(added)}   {t_pip:6.2f} s   cold switch is {t_pip / t_cold:.1f}x faster (target >= 3)"
    )


if __name__ == "__main__":
    main()
