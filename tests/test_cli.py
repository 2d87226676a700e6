"""`envship cache` on a node: list, gc, clear."""

from __future__ import annotations

import os
import subprocess
import sys

import envship
from envship.node.cache import EnvCache


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
    files, _ = node.files.usage()
    assert files > 0 and f"its file store holds {files} files" in listing.stdout

    assert cache_cli("gc", "--directory", node.root).stdout.startswith("evicted 0")
    assert node.has(artifact.id)

    cleared = cache_cli("clear", "--directory", node.root)
    assert cleared.stdout.startswith("removed 1")
    assert not node.has(artifact.id)
    listing = cache_cli("list", "--directory", node.root).stdout
    assert "tools" not in listing and "its file store holds 0 files" in listing


def test_use_from_the_command_line(env_prefix, store, tmp_path):
    from fixtures.cluster import local_cluster

    with local_cluster(tmp_path / "c", {"node": 1}) as (client, caches):
        result = subprocess.run(
            [sys.executable, "-m", "envship.cli", "use", env_prefix("venv")],
            capture_output=True,
            text=True,
            env={**os.environ, "DASK_SCHEDULER_ADDRESS": client.scheduler.address},
        )
        assert result.returncode == 0, result.stderr
        artifact_id = envship.pack(env_prefix("venv"), store=store).id
        assert artifact_id[:12] in result.stdout and "ok" in result.stdout
        assert set(client.run(lambda: __import__("sys").prefix).values()) == {
            str(caches["node"] / artifact_id)
        }
        back = subprocess.run(
            [sys.executable, "-m", "envship.cli", "use", "none"],
            capture_output=True,
            text=True,
            env={**os.environ, "DASK_SCHEDULER_ADDRESS": client.scheduler.address},
        )
        assert back.returncode == 0, back.stderr
        assert set(client.run(lambda: __import__("sys").prefix).values()) == {
            sys.prefix
        }
