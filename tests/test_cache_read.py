"""Reading a node cache never creates one, and the fix for an unsafe root harms nothing.

Real folders under ``tmp_path`` and the real ``envship cache`` command line
(in a subprocess, as a user runs it).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from envship.errors import EnvshipError
from envship.node.cache import EnvCache
from envship.node.layout import private_folder


def cache_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "envship.cli", "cache", *map(str, args)],
        capture_output=True,
        text=True,
    )


def tree(root) -> list[str]:
    """Everything under ``root``, relative, sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            found.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(found)


@pytest.mark.parametrize("command", ["list", "gc", "clear"])
def test_reading_a_missing_cache_creates_nothing(tmp_path, command):
    missing = tmp_path / "no" / "such" / "dir"
    result = cache_cli(command, "--directory", missing)
    assert result.returncode == 1
    assert not (tmp_path / "no").exists()
    assert f"node cache '{missing}': no cache there: the path does not exist" in (
        result.stderr
    )
    assert "Fix: check the path (--directory), or envship.cache.directory" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["list", "gc", "clear"])
def test_a_folder_without_a_cache_is_left_as_it_was(tmp_path, command):
    folder = tmp_path / "papers"
    folder.mkdir(mode=0o700)
    (folder / "thesis.tex").write_text("\\begin{document}")
    result = cache_cli(command, "--directory", folder)
    assert result.returncode == 1
    assert "no cache there: the folder has no archives/ folder" in result.stderr
    assert tree(folder) == ["thesis.tex"]


def test_a_file_is_no_cache(tmp_path):
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(EnvshipError, match="no cache there: the path is not a folder"):
        EnvCache(path, create=False)


def test_an_existing_cache_is_read_without_change(tmp_path):
    root = tmp_path / "cache"
    EnvCache(root)  # a nanny made it
    before = tree(root)
    assert "archives" in before and "files" in before
    listing = cache_cli("list", "--directory", root)
    assert listing.returncode == 0, listing.stderr
    assert f"{root}:\n  0 B of" in listing.stdout
    assert tree(root) == before


def _refusal(root) -> str:
    with pytest.raises(EnvshipError) as info:
        EnvCache(root, create=False)
    with pytest.raises(EnvshipError) as writing:
        EnvCache(root)
    assert str(writing.value) == str(info.value)  # readers and writers alike
    return str(info.value)


def test_a_shared_sticky_folder_is_never_a_cache_and_never_chmodded(tmp_path):
    # What /tmp, /var/tmp and /dev/shm are: world-writable, sticky.
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    message = _refusal(shared)
    assert "may be written by other users (mode 1777)" in message
    assert "chmod" not in message
    user = os.environ.get("USER") or str(os.getuid())
    private = shared / f"envship-{user}"
    assert (
        f"Fix: set envship.cache.directory (or --directory) to a folder only you may write, such as {private}"
        in message
    )
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert tree(shared) == []

    # The fix works: that folder is a cache, made private.
    EnvCache(private)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    listing = cache_cli("list", "--directory", private)
    assert listing.returncode == 0, listing.stderr

    # The command line says the same, and creates nothing.
    before = tree(shared)
    result = cache_cli("list", "--directory", shared)
    assert result.returncode == 1
    assert "chmod" not in result.stderr and str(private) in result.stderr
    assert tree(shared) == before


def test_the_fix_for_a_non_sticky_writable_folder(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o777)
    message = _refusal(folder)
    assert "(mode 777)" in message
    if os.geteuid() == 0:
        # root owns system folders: no chmod is ever suggested to it.
        assert "chmod" not in message
    else:
        assert f"Fix: chmod go-w {folder}, or set envship.cache.directory" in message
    # Never inside a folder others may rename things in.
    assert f"such as {folder}/" not in message
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777


def test_a_folder_of_another_user_is_never_chmodded(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("making a folder owned by another user needs root")
    folder = tmp_path / "theirs"
    folder.mkdir()
    os.chown(folder, 65534, 65534)  # nobody
    folder.chmod(0o775)
    message = _refusal(folder)
    assert "chmod" not in message
    assert "may be written by other users (mode 775)" in message


def test_the_private_folder_suggested_is_never_the_refused_one(tmp_path):
    assert private_folder(tmp_path, sticky=True).parent == tmp_path
    assert private_folder(tmp_path) != tmp_path
    default = private_folder(tmp_path)  # <tmp>/envship-<user>
    assert private_folder(default) != default
