"""What is shipped and what it needs.

The wheel ships bootstrap/ as envship._bootstrap, never as a top-level module;
every package that envship/ and bootstrap/ import is declared; the fixtures'
environment builders never import envship.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


#: Imported by bootstrap/bridge.py inside a shipped environment, never by envship:
#: cPickle under Python 2, numpy only when arrays cross (and so already loaded).
SHIPPED_ENVIRONMENT_ONLY = {"cPickle", "numpy"}


def _imported_top_levels(folder: Path) -> set[str]:
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module is not None
                names.add(node.module.split(".")[0])
    return names


def test_every_import_is_declared():
    """pyproject.toml's dependencies name every distribution the code imports."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    imported = _imported_top_levels(ROOT / "envship") | _imported_top_levels(
        ROOT / "bootstrap"
    )
    third_party = imported - set(sys.stdlib_module_names) - SHIPPED_ENVIRONMENT_ONLY
    third_party -= {"envship", "__future__"}
    distributions = packages_distributions()
    missing = {
        name: distributions.get(name)
        for name in sorted(third_party)
        if not any(
            canonicalize_name(d) in declared for d in distributions.get(name, [])
        )
    }
    assert not missing, f"imported, not in [project].dependencies: {missing}"
