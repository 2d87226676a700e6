"""Benchmark: calls from tasks into scikit-learn 0.20 under Python 2.7, in one run.

On a cluster of one nanny (127.0.0.1), with ``py2-sklearn-dev`` installed by
``client.use_environment`` (nobody restarts), measured inside one task so
that Dask's own task overhead does not count:

(a) start: the first call of a worker, which starts the bridge (the
    environment's python, importing numpy and scikit-learn), against the
    second call of the same function;
(b) call overhead, small arguments (``legacy_model.echo(1, "x")``), median
    of 1000 calls, against what a task does without a bridge: start that
    python for each call (``subprocess.run``, same import). Target: under
    5 ms;
(c) throughput of a 100 MB float64 array sent and returned
    (``legacy_model.roundtrip``), against copying it twice in this process
    (the memory floor).

    python bench/bridge.py
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import envship  # noqa: E402, F401
import fixtures  # noqa: E402
from fixtures.cluster import local_cluster  # noqa: E402

CALLS = 1000
MB = 100


def measure(py2, python: str) -> dict:
    """Runs in a task: every figure, taken inside the worker."""
    import subprocess
    import time

    import numpy as np

    def timed(fn, *args):
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start

    first = timed(py2.call, "legacy_model.version")
    second = timed(py2.call, "legacy_model.version")
    small = [timed(py2.call, "legacy_model.echo", 1, "x") for _ in range(CALLS)]
    command = [python, "-c", "import legacy_model; legacy_model.echo(1, 'x')"]
    spawned = [timed(subprocess.run, command) for _ in range(10)]
    array = np.random.default_rng(0).standard_normal(MB * 10**6 // 8)
    through = [timed(py2.call, "legacy_model.roundtrip", array) for _ in range(3)]
    floor = [timed(lambda: array.copy().copy()) for _ in range(3)]
    assert np.array_equal(
        py2.call("legacy_model.roundtrip", array[:1000]), array[:1000]
    )
    return {
        "first": first,
        "second": second,
        "small": statistics.median(small),
        "spawned": statistics.median(spawned),
        "through": min(through),
        "floor": min(floor),
    }


def main() -> None:
    logging.getLogger("distributed").setLevel(logging.ERROR)
    prefix = fixtures.build("py2-sklearn-dev")
    with tempfile.TemporaryDirectory(prefix="envship-bench-bridge-") as tmp:
        with local_cluster(Path(tmp), {"node": 1}) as (client, caches):
            started = time.perf_counter()
            py2 = client.use_environment(prefix, progress=False)
            installed = time.perf_counter() - started
            python = str(caches["node"] / py2.id / "bin" / "python")
            f = client.submit(measure, py2, python, pure=False).result()
    ms = 1000
    print(f"use_environment({py2.name}): shipped and installed in {installed:.1f} s")
    print(
        f"(a) first call (starts python {py2.python}, imports scikit-learn): "
        f"{f['first'] * ms:.0f} ms; the second: {f['second'] * ms:.2f} ms"
    )
    print(
        f"(b) call with small arguments: {f['small'] * ms:.3f} ms (median of "
        f"{CALLS}); a python started per call: {f['spawned'] * ms:.0f} ms; "
        f"ratio {f['spawned'] / f['small']:.0f}x; target < 5 ms: "
        f"{'pass' if f['small'] < 0.005 else 'MISS'}"
    )
    sent = 2 * MB  # there and back
    print(
        f"(c) {MB} MB array there and back: {f['through']:.2f} s, "
        f"{sent / f['through']:.0f} MB/s; two copies in memory: "
        f"{f['floor']:.3f} s ({sent / f['floor']:.0f} MB/s); ratio "
        f"{f['through'] / f['floor']:.1f}x the floor"
    )


if __name__ == "__main__":
    main()
