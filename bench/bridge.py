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

Compared runs interleave (batches of small calls between the pythons
started per call; round trips between the copies), in an order that rotates
each round; figures are medians with their spread (min-max).

    python bench/bridge.py [--small]     # --small: 60 calls, an 8 MB array
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from timing import Sample, small_parser, target_line  # noqa: E402

import envship  # noqa: E402
import fixtures  # noqa: E402
from fixtures.cluster import local_cluster  # noqa: E402

CALLS = 1000
SPAWNS = 10
ROUNDS = 3
MB = 100


def measure(py2, calls: int, spawns: int, rounds: int, mb: int) -> dict:
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
    # The environment's python, as the bridge runs it: no cache layout assumed.
    python = py2.call("os.readlink", "/proc/self/exe")
    command = [python, "-c", "import legacy_model; legacy_model.echo(1, 'x')"]
    small: list[float] = []
    spawned: list[float] = []
    for r in range(spawns):  # a batch of small calls, then a spawn; rotating
        batch = lambda: [  # noqa: E731
            timed(py2.call, "legacy_model.echo", 1, "x") for _ in range(calls // spawns)
        ]
        if r % 2 == 0:
            small += batch()
            spawned.append(timed(subprocess.run, command))
        else:
            spawned.append(timed(subprocess.run, command))
            small += batch()
    array = np.random.default_rng(0).standard_normal(mb * 10**6 // 8)
    through: list[float] = []
    floor: list[float] = []
    for r in range(rounds):
        pair = [
            lambda: through.append(timed(py2.call, "legacy_model.roundtrip", array)),
            lambda: floor.append(timed(lambda: array.copy().copy())),
        ]
        for run in pair if r % 2 == 0 else pair[::-1]:
            run()
    assert np.array_equal(
        py2.call("legacy_model.roundtrip", array[:1000]), array[:1000]
    )
    return {
        "first": first,
        "second": second,
        "small": small,
        "spawned": spawned,
        "through": through,
        "floor": floor,
    }


def main() -> None:
    args = small_parser(__doc__).parse_args()
    calls, spawns, rounds, mb = (
        (60, 3, 2, 8) if args.small else (CALLS, SPAWNS, ROUNDS, MB)
    )
    logging.getLogger("distributed").setLevel(logging.ERROR)
    prefix = fixtures.build("py2-sklearn-dev")
    with tempfile.TemporaryDirectory(prefix="envship-bench-bridge-") as tmp:
        with local_cluster(Path(tmp), {"node": 1}) as (client, _):
            started = time.perf_counter()
            py2 = envship.use_environment(client, prefix, progress=False)
            assert isinstance(py2, envship.ForeignEnvironment)
            installed = time.perf_counter() - started
            f = client.submit(measure, py2, calls, spawns, rounds, mb, pure=False)
            f = f.result()
    small, spawned = Sample(f["small"]), Sample(f["spawned"])
    through, floor = Sample(f["through"]), Sample(f["floor"])
    ms = 1000
    print(f"use_environment({py2.name}): shipped and installed in {installed:.1f} s")
    print(
        f"(a) first call (starts python {py2.python}, imports scikit-learn): "
        f"{f['first'] * ms:.0f} ms; the second: {f['second'] * ms:.2f} ms"
    )
    print(
        f"(b) call with small arguments: median {small.median * ms:.3f} ms "
        f"({small.low * ms:.3f}-{small.high * ms:.3f}, n={len(small.values)}); "
        f"a python started per call: median {spawned.median * ms:.0f} ms "
        f"({spawned.low * ms:.0f}-{spawned.high * ms:.0f}, n={len(spawned.values)}); "
        f"ratio {spawned.median / small.median:.0f}x"
    )
    sent = 2 * mb  # there and back
    print(
        f"(c) {mb} MB array there and back: {through} s, "
        f"{sent / through.median:.0f} MB/s; two copies in memory: {floor} s "
        f"({sent / floor.median:.0f} MB/s); ratio "
        f"{through.median / floor.median:.1f}x the floor (no target)"
    )
    print("\ntargets")
    print(
        target_line(
            "(b) call with small arguments, ms (median)", small.median * ms, "<", 5
        )
    )


if __name__ == "__main__":
    main()
