"""The wheel ships bootstrap/ as envship._bootstrap, never as a top-level module."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_layout(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            ROOT,
            "-w",
            tmp_path,
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("envship-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "envship/_bootstrap/worker.py" in names
    assert "envship/_bootstrap/bridge.py" in names
    assert "envship/envship.yaml" in names
    assert not [n for n in names if n.startswith("bootstrap/")]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert (
        "envship = envship.cli:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


BUILDERS = [
    "fixtures",
    "fixtures.__main__",
    "fixtures.condameta",
    "fixtures.envs",
    "fixtures.errors",
    "fixtures.installer",
    "fixtures.modules",
    "fixtures.recipes",
    "fixtures.relocate",
    "fixtures.specs",
]


def test_fixture_builders_never_import_envship():
    """As fixtures/__init__.py says: they build test environments when envship is broken."""
    code = (
        "import importlib, sys\n"
        "sys.modules['envship'] = None  # any import of it fails\n"
        f"for name in {BUILDERS!r}:\n"
        "    importlib.import_module(name)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
