"""`envship cache` on a node: list, gc, clear."""

from __future__ import annotations

import subprocess
import sys

import envship
from envship.cache import EnvCache


def cache_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "envship.cli", "cache", *map(str, args)],
        capture_output=True,
        text=True,
    )


def test_cache_list_gc_clear(env_prefix, store, tmp_path):
    artifact = envship.pack(env_prefix("venv"), name="tools", store=store)
    node = EnvCache(tmp_path / "node")
    node.add_archive(artifact.id, artifact.path, artifact.manifest)
    node.ensure(artifact.id)

    listing = cache_cli("list", "--directory", node.root)
    assert listing.returncode == 0, listing.stderr
    assert "tools" in listing.stdout and artifact.id[:12] in listing.stdout

    assert cache_cli("gc", "--directory", node.root).stdout.startswith("evicted 0")
    assert node.has(artifact.id)

    cleared = cache_cli("clear", "--directory", node.root)
    assert cleared.stdout.startswith("removed 1")
    assert not node.has(artifact.id)
    assert "tools" not in cache_cli("list", "--directory", node.root).stdout
