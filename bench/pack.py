"""Benchmark: `envship pack` against conda-pack's default, in one run.

Baseline: ``conda_pack.pack(prefix, output="env.tar.gz")`` with its defaults
(gzip level 4, one thread), unpacked with ``tar -xzf``. envship packs the same
environment into a fresh store (zstandard level 3, all cores), unpacks with
the node cache's verifying extractor, and re-packs the unchanged environment.

Targets: at least 3x faster than conda-pack, an archive no larger, re-pack
under 1 s.

    python bench/pack.py [FIXTURE]      # default: sklearn-dev
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import conda_pack  # noqa: E402

import envship  # noqa: E402
import fixtures  # noqa: E402
from envship.node.extract import extract_archive  # noqa: E402


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def main(name: str = "sklearn-dev") -> None:
    prefix = fixtures.build(name)
    # Read every file once so neither contender pays for a cold page cache.
    subprocess.run(["tar", "-cf", "/dev/null", "-C", prefix, "."], check=True)
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        tmp = Path(tmp)
        t_cp, cp_path = timed(
            conda_pack.pack, prefix=str(prefix), output=str(tmp / "env.tar.gz")
        )
        t_es, artifact = timed(envship.pack, prefix, store=tmp / "store")
        t_re, again = timed(envship.pack, prefix, store=tmp / "store")
        assert again.id == artifact.id

        (tmp / "cp").mkdir()
        t_cp_unpack, _ = timed(
            subprocess.run, ["tar", "-xzf", cp_path, "-C", tmp / "cp"], check=True
        )
        t_es_unpack, _ = timed(
            extract_archive,
            artifact.path,
            tmp / "es",
            expected_id=artifact.id,
            max_unpacked_bytes=artifact.manifest.unpacked_size,
            env=name,
        )
        cp_size = Path(cp_path).stat().st_size
        es_size = artifact.path.stat().st_size

    m = artifact.manifest
    print(f"environment {name}: {m['file_count']} files, {mb(m['unpacked_size'])}")
    print(f"{'':28}{'pack':>9}{'archive':>12}{'unpack':>9}")
    print(
        f"{'conda-pack tar.gz (default)':28}{t_cp:8.2f}s{mb(cp_size):>12}{t_cp_unpack:8.2f}s"
    )
    print(f"{'envship tar.zst L3':28}{t_es:8.2f}s{mb(es_size):>12}{t_es_unpack:8.2f}s")
    print(f"{'envship re-pack (unchanged)':28}{t_re:8.2f}s")
    print()
    print(f"pack speed-up vs conda-pack: {t_cp / t_es:.2f}x   (target >= 3x)")
    print(f"archive size vs conda-pack:  {es_size / cp_size:.2f}    (target <= 1.00)")
    print(f"unpack speed-up:             {t_cp_unpack / t_es_unpack:.2f}x")
    print(f"re-pack of unchanged env:    {t_re:.3f} s (target < 1 s)")


if __name__ == "__main__":
    main(*sys.argv[1:])
