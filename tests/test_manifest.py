"""Manifests are typed and checked field by field before anything uses them:
they arrive from other machines (offers) and from JSON on disk."""

from __future__ import annotations

import json

import pytest

from envship.manifest import Manifest, ThinManifest, blob_manifest
from envship.node.cache import EnvCache

GOOD = Manifest(
    id="a" * 32,
    name="sklearn-dev",
    kind="conda",
    python="3.11.7",
    file_count=12_000,
    unpacked_size=413_000_000,
    packages={"distributed": "2026.8.0"},
    platform={"os": "linux", "machine": "x86_64"},
    packed_size=119_000_000,
    stats={"pack_seconds": 0.5},
)


def test_a_manifest_round_trips_through_json():
    data = json.loads(json.dumps(GOOD.to_dict()))
    assert Manifest.from_dict(data) == GOOD
    assert blob_manifest(data) == GOOD
    # Fields an older envship wrote, and ones a newer one may add, are ignored.
    assert Manifest.from_dict({**data, "level": 3, "future": [1]}) == GOOD


@pytest.mark.parametrize(
    "field, value",
    [
        ("id", "a" * 32 + "\n"),
        ("id", "../../etc"),
        ("name", None),
        ("name", "x" * 5000),
        ("kind", "docker"),
        ("python", "3.11; rm -rf /"),
        ("file_count", -1),
        ("file_count", True),
        ("unpacked_size", 10**15 * 100),
        ("unpacked_size", "413000000"),
        ("packed_size", 1.5),
        ("packages", {"numpy": 1}),
        ("platform", ["linux"]),
        ("stats", {"pack_seconds": "fast"}),
    ],
)
def test_each_lie_is_refused_naming_its_field(field, value):
    with pytest.raises(ValueError, match=f"'{field}'"):
        Manifest.from_dict({**GOOD.to_dict(), field: value})


@pytest.mark.parametrize("field", ["id", "name", "kind", "python", "unpacked_size"])
def test_a_missing_field_is_refused(field):
    data = GOOD.to_dict()
    del data[field]
    with pytest.raises(ValueError, match=f"'{field}'"):
        Manifest.from_dict(data)


def test_a_thin_manifest_carries_its_environment():
    thin = ThinManifest(
        id="b" * 32,
        thin_of=GOOD.id,
        base="c" * 32,
        env=GOOD,
        packed_size=600_000,
        files=8,
        refs=11_936,
    )
    data = json.loads(json.dumps(thin.to_dict()))
    assert blob_manifest(data) == thin and thin.name == GOOD.name
    with pytest.raises(ValueError, match="'env'"):
        ThinManifest.from_dict({**data, "thin_of": "d" * 32})
    with pytest.raises(ValueError, match="'kind'"):
        ThinManifest.from_dict({**data, "env": {**data["env"], "kind": "docker"}})


def test_the_node_cache_ignores_a_bad_manifest_on_disk(tmp_path, caplog):
    cache = EnvCache(tmp_path / "cache")
    cache.manifest_path(GOOD.id).write_text(
        json.dumps({**GOOD.to_dict(), "unpacked_size": -5})
    )
    assert cache.manifest(GOOD.id) is None
    assert "unpacked_size" in caplog.text
