"""Benchmark: `envship pack` against conda-pack, in one run, interleaved.

Baselines: ``conda_pack.pack(prefix, output="env.tar.gz")`` with its defaults
(gzip level 4, one thread), and the same with ``n_threads=-1`` (every core, as
envship uses), each unpacked with ``tar -xzf``. envship packs the same
environment into a fresh store (zstandard level 3, all cores), unpacks with
the node cache's verifying extractor, and re-packs the unchanged environment.

Fair by construction: before every round every file of the environment is
read (its bytes, not just its metadata: ``tar -cf /dev/null`` reads no file
content), and the contenders run interleaved in an order that rotates each
round; figures are medians with their spread.

Targets: pack at least 3x faster than conda-pack's default (also shown
against conda-pack on every core), an archive no larger than conda-pack's,
re-pack under 1 s.

    python bench/pack.py [--small] [--rounds N] [FIXTURE]   # default: sklearn-dev
                                                             # (--small: py27, 2 rounds)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import conda_pack  # noqa: E402
from timing import Sample, interleave, small_parser, target_line  # noqa: E402

import envship  # noqa: E402
import fixtures  # noqa: E402
from envship.manifest import Manifest  # noqa: E402
from envship.node.extract import extract_archive  # noqa: E402

ROUNDS = 3


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def read_every_byte(prefix: Path) -> int:
    """Read the content of every regular file below ``prefix`` (a warm-up)."""
    total = 0
    for folder, _, names in os.walk(prefix):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    total += len(chunk)
    return total


class Contenders:
    """Each contender's pack and unpack, every call into fresh output paths."""

    def __init__(self, prefix: Path, name: str, tmp: Path):
        self.prefix, self.name, self.tmp = prefix, name, tmp
        self.count = 0
        self.outputs: dict[str, Path] = {}
        self.artifact: envship.Artifact | None = None

    def _fresh(self, label: str) -> Path:
        self.count += 1
        path = self.tmp / f"{label}-{self.count}"
        old = self.outputs.get(label)
        if old is not None:  # keep the disk small: only the last output stays
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink(missing_ok=True)
        self.outputs[label] = path
        return path

    def conda_pack(self, threads: int) -> None:
        label = f"cp{threads}"
        conda_pack.pack(
            prefix=str(self.prefix),
            output=str(self._fresh(label)) + ".tar.gz",
            n_threads=threads,
        )
        self.outputs[label] = Path(str(self.outputs[label]) + ".tar.gz")

    def envship_pack(self) -> None:
        store = self._fresh("store")
        self.artifact = envship.pack(self.prefix, name=self.name, store=store)

    def envship_repack(self) -> None:
        again = envship.pack(self.prefix, name=self.name, store=self.outputs["store"])
        assert self.artifact is not None and again.id == self.artifact.id

    def conda_unpack(self) -> None:
        dest = self._fresh("cp-tree")
        dest.mkdir()
        archive = self.outputs["cp1"]
        subprocess.run(["tar", "-xzf", archive, "-C", dest], check=True)

    def envship_unpack(self) -> None:
        assert self.artifact is not None and self.artifact.path is not None
        assert isinstance(self.artifact.manifest, Manifest)  # a full pack, not thin
        extract_archive(
            self.artifact.path,
            self._fresh("es-tree"),
            expected_id=self.artifact.id,
            max_unpacked_bytes=self.artifact.manifest.unpacked_size,
            env=self.name,
        )


def main() -> None:
    parser = small_parser(__doc__)
    parser.add_argument(
        "fixture", nargs="?", help="default: sklearn-dev (py27 if --small)"
    )
    parser.add_argument("--rounds", type=int, help=f"default {ROUNDS} (2 if --small)")
    args = parser.parse_args()
    name = args.fixture or ("py27" if args.small else "sklearn-dev")
    rounds = args.rounds or (2 if args.small else ROUNDS)
    prefix = fixtures.build(name)

    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        c = Contenders(prefix, name, Path(tmp))
        packs = interleave(
            {
                "conda-pack (default, 1 thread)": lambda: c.conda_pack(1),
                "conda-pack n_threads=-1": lambda: c.conda_pack(-1),
                "envship pack": c.envship_pack,
            },
            rounds,
            before_round=lambda: read_every_byte(prefix),
        )
        repack = interleave({"re-pack": c.envship_repack}, rounds)["re-pack"]
        unpacks = interleave(
            {"tar -xzf (conda-pack)": c.conda_unpack, "envship": c.envship_unpack},
            rounds,
        )
        assert c.artifact is not None and c.artifact.path is not None
        cp_size = c.outputs["cp1"].stat().st_size
        cp_all_size = c.outputs["cp-1"].stat().st_size
        es_size = c.artifact.path.stat().st_size
        m = c.artifact.manifest
        assert isinstance(m, Manifest)

    p = {k: Sample(v) for k, v in packs.items()}
    cp1, cpall, es = p.values()
    u_cp, u_es = (Sample(v) for v in unpacks.values())
    re = Sample(repack)
    print(
        f"\nenvironment {name}: {m.file_count} files, {mb(m.unpacked_size)}; "
        f"{rounds} rounds, interleaved, every file read before each round; "
        f"{os.cpu_count()} cores\nseconds: median (min-max, n)\n"
    )
    print(f"{'pack':<34}{'seconds':>24}{'archive':>12}{'ratio to this':>16}")
    sizes = [cp_size, cp_all_size, es_size]
    for (label, s), size in zip(p.items(), sizes, strict=True):
        print(f"{label:<34}{s!s:>24}{mb(size):>12}{s.median / es.median:15.2f}x")
    print(f"{'envship re-pack (unchanged)':<34}{re!s:>24}")
    print(f"\n{'unpack':<34}{'seconds':>24}")
    print(f"{'tar -xzf of conda-pack default':<34}{u_cp!s:>24}")
    print(f"{'envship verifying extractor':<34}{u_es!s:>24}")
    print(
        f"\nunpack speed-up vs tar -xzf: {u_cp.median / u_es.median:.2f}x (no target)"
    )
    print("\ntargets (medians; ratio = baseline / envship)")
    for line in (
        target_line(
            "pack speed-up vs conda-pack default (1 thread)",
            cp1.median / es.median,
            ">=",
            3,
        ),
        target_line(
            "pack speed-up vs conda-pack n_threads=-1 (same cores)",
            cpall.median / es.median,
            ">=",
            3,
        ),
        target_line("archive size / conda-pack default's", es_size / cp_size, "<=", 1),
        target_line("re-pack of unchanged env, seconds", re.median, "<", 1),
    ):
        print(line)


if __name__ == "__main__":
    main()
