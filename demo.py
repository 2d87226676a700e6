"""The envship demo: pack a real conda environment, ship it to a local
cluster, switch the workers into it, use it, and switch back; then fit a
model with scikit-learn 0.20 under Python 2.7, called from Python 3 tasks.

    make demo
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import dask
from distributed import Client, LocalCluster

import envship
import fixtures
from envship.node.extract import remove_tree


def where() -> str:
    """Run on a worker: which environment am I in?"""
    import sys

    try:
        import sklearn

        found = f"scikit-learn {sklearn.__version__}"
    except ImportError:
        found = "no scikit-learn"
    return f"{sys.prefix}  ({found})"


def fit_a_model() -> float:
    from sklearn.datasets import make_classification
    from sklearn.linear_model import LogisticRegression

    X, y = make_classification(n_samples=2000, random_state=0)
    return LogisticRegression(max_iter=500).fit(X, y).score(X, y)


def show(client: Client, title: str) -> None:
    print(f"\n{title}")
    for worker, answer in sorted(client.run(where).items()):
        print(f"  {worker}: {answer}")


def main() -> None:
    # The nanny logs every restart as a warning; the reports below say more.
    logging.getLogger("distributed.nanny").setLevel(logging.ERROR)
    print(
        "Building the fixture environment 'sklearn-dev' (a real conda env, "
        "built offline; cached after the first run)..."
    )
    prefix = fixtures.build("sklearn-dev")

    start = time.perf_counter()
    artifact = envship.pack(prefix, name="sklearn-dev", progress=True)
    m = artifact.manifest
    print(
        f"Packed {artifact.name} in {time.perf_counter() - start:.1f} s: id "
        f"{artifact.short_id}, {m.file_count} files, "
        f"{m.unpacked_size / 1e6:.0f} MB -> {m.packed_size / 1e6:.0f} MB"
    )

    # A cache of its own, so that every run shows the first shipment to a node.
    cache = Path(tempfile.mkdtemp(prefix="envship-demo-cache-"))
    dask.config.set({"envship.cache.directory": str(cache)})
    try:
        run_cluster(artifact)
    finally:
        remove_tree(cache)


def run_cluster(artifact: envship.Artifact) -> None:
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            host="127.0.0.1",
            dashboard_address=None,
            preload_nanny=["envship"],
        ) as cluster,
        Client(cluster) as client,
    ):
        show(client, "Workers before the switch:")

        start = time.perf_counter()
        report = client.use_environment("sklearn-dev")
        print(
            f"\nuse_environment('sklearn-dev'): shipped, unpacked and switched in "
            f"{time.perf_counter() - start:.1f} s\n{report}"
        )
        show(client, "Workers inside sklearn-dev:")
        print(
            f"\nA task that needs scikit-learn: accuracy {client.submit(fit_a_model).result():.3f}"
        )

        report = client.use_environment(None)
        print(f"\nuse_environment(None):\n{report}")
        show(client, "Workers back in the nannies' own environment:")

        report = client.use_environment("sklearn-dev")
        print(f"\nSwitching again (cached on the node: a plain restart):\n{report}")

        call_python_2(client)


def call_python_2(client: Client) -> None:
    """No worker runs under Python 2.7, but tasks can call into it."""
    print("\nBuilding the fixture environment 'py2-sklearn-dev' (Python 2.7)...")
    prefix = fixtures.build("py2-sklearn-dev")
    start = time.perf_counter()
    py2 = client.use_environment(prefix)
    print(
        f"use_environment('py2-sklearn-dev'): Python {py2.python} cannot host a "
        f"worker, so it was shipped and installed ({time.perf_counter() - start:.1f} "
        "s) and the workers stayed where they were"
    )
    X, y = [[0.0], [1.0], [2.0]], [0.0, 2.0, 4.0]
    versions = client.submit(py2.call, "legacy_model.version").result()
    predicted = client.submit(
        py2.call, "legacy_model.fit_predict", X, y, [[3.0], [4.0]]
    ).result()
    print(
        f"A task fitted a LinearRegression with scikit-learn {versions['sklearn']} "
        f"under Python {versions['python'].split()[0]}: predictions {predicted}"
    )


if __name__ == "__main__":
    main()
