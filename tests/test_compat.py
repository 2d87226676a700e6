"""The compatibility check on plain manifests: what is refused, what only warns."""

from __future__ import annotations

import pytest

from envship.client.compat import check_compatibility, find_mismatches
from envship.errors import IncompatibleEnvironmentError
from envship.manifest import Manifest

SCHEDULER = {
    "dask": "2026.8.0",
    "distributed": "2026.8.0",
    "cloudpickle": "3.1.3",
    "msgpack": "1.2.4",
    "toolz": "1.2.0",
}
NODE = {"os": "linux", "machine": "x86_64", "libc": "glibc", "libc_version": "2.36"}


def manifest(python="3.11.7", platform=None, **packages):
    return Manifest(
        id="0" * 32,
        name="env",
        kind="conda",
        python=python,
        file_count=1,
        unpacked_size=1,
        packages={**SCHEDULER, **packages},
        platform={**NODE, **(platform or {})},
    )


def check(m, strict=True):
    return check_compatibility("env", m, "3.11.4", SCHEDULER, [NODE, NODE], strict)


def test_matching_environment_passes():
    assert check(manifest()) == []


def test_python_minor_version_is_refused_unless_not_strict():
    with pytest.raises(IncompatibleEnvironmentError) as info:
        check(manifest("3.12.1"))
    text = str(info.value)
    assert "python" in text and "3.12.1" in text and "3.11.4" in text
    assert "strict=False" in text
    with pytest.warns(UserWarning, match="3.12.1"):
        assert [m.what for m in check(manifest("3.12.1"), strict=False)] == ["python"]


def test_package_versions_give_a_table_and_the_pins_to_install():
    with pytest.raises(IncompatibleEnvironmentError) as info:
        check(manifest(distributed="2025.1.0", cloudpickle="2.0.0"))
    text = str(info.value)
    assert "distributed  2025.1.0" in text
    assert "distributed==2026.8.0" in text and "cloudpickle==3.1.3" in text


def test_python_2_is_refused_even_when_not_strict():
    m = manifest("2.7.18").replace(packages={})
    with pytest.raises(IncompatibleEnvironmentError, match="cannot run on Python 2.7"):
        check(m, strict=False)


def test_missing_distributed_and_other_platforms_are_fatal():
    m = manifest()
    del m.packages["distributed"]
    with pytest.raises(IncompatibleEnvironmentError, match="not installed"):
        check(m, strict=False)
    with pytest.raises(IncompatibleEnvironmentError, match="darwin"):
        check(manifest(platform={"os": "darwin"}), strict=False)


def test_newer_libc_than_the_nodes_only_warns_when_not_strict():
    newer = manifest(platform={"libc_version": "2.39"})
    assert [m.what for m in find_mismatches(newer, "3.11.4", SCHEDULER, [NODE])] == [
        "libc"
    ]
    older = manifest(platform={"libc_version": "2.28"})
    assert find_mismatches(older, "3.11.4", SCHEDULER, [NODE]) == []
    with pytest.warns(UserWarning, match="libc"):
        check(newer, strict=False)
