"""The unpack record: what the packer writes, what the node applies."""

from __future__ import annotations

import json
import subprocess

import pytest

import envship
from envship.errors import EnvshipError
from envship.node.relocate import _prefix_records, fixup_conda
from envship.unpack_record import UNPACK_FILE, CondaRecord

PLACEHOLDER = "/opt/anaconda1anaconda2anaconda3/placeholder_" + "p" * 40


@pytest.mark.parametrize("name", ["base", "py27"])
def test_a_conda_record_is_conda_unpacks_records(name, env_prefix, store, tmp_path):
    """The record holds conda-pack's own data: what its conda-unpack would apply."""
    artifact = envship.pack(env_prefix(name), name=name, store=store)
    out = tmp_path / "out"
    out.mkdir()
    members = [UNPACK_FILE, "bin/conda-unpack"]
    subprocess.run(
        ["tar", "-I", "zstd", "-xf", artifact.path, "-C", out, *members], check=True
    )
    record = CondaRecord.from_dict(json.loads((out / UNPACK_FILE).read_text()))
    assert record.prefix_records
    script = out / "bin" / "conda-unpack"
    assert record.prefix_records == _prefix_records(script, name)


def conda_tree(root, record=None, script="print('conda-unpack')\n"):
    """A file holding the placeholder, a conda-unpack script and maybe a record."""
    (root / "etc").mkdir(parents=True)
    (root / "bin").mkdir()
    (root / "etc" / "config.txt").write_text(f"prefix={PLACEHOLDER}\n")
    (root / "bin" / "conda-unpack").write_text(script)
    if record is not None:
        (root / ".envship").mkdir()
        (root / UNPACK_FILE).write_text(
            record if isinstance(record, str) else json.dumps(record)
        )
    return root


def test_the_record_is_applied_and_the_script_never_read(tmp_path):
    # A script that is not conda-pack's: refused if it were read.
    record = {"prefix_records": [["etc/config.txt", PLACEHOLDER, "text"]]}
    tree = conda_tree(tmp_path / "tree", record, script="import os\n")
    fixup_conda(tree, tmp_path / "final", "recorded")
    assert (tree / "etc" / "config.txt").read_text() == f"prefix={tmp_path}/final\n"


def test_without_a_record_the_script_is_read(tmp_path):
    tree = conda_tree(tmp_path / "tree", script="import os\n")
    with pytest.raises(EnvshipError, match="not one that conda-pack writes"):
        fixup_conda(tree, tmp_path / "final", "old")


@pytest.mark.parametrize(
    "record, problem",
    [
        ("{", "unpack.json is not valid JSON"),
        ({"prefix_records": [["etc/config.txt", PLACEHOLDER, "exec"]]}, "malformed"),
        ({"prefix_records": [["etc/config.txt", "", "text"]]}, "malformed"),
        ({"prefix": "/old", "text_files": []}, "malformed"),
        (
            {"prefix_records": [["../escape.txt", PLACEHOLDER, "text"]]},
            "unpack.json lists '../escape.txt', outside the environment",
        ),
        (
            {"prefix_records": [["etc/missing.txt", PLACEHOLDER, "text"]]},
            "unpack.json lists 'etc/missing.txt', which it does not hold",
        ),
    ],
)
def test_a_forged_record_is_refused(tmp_path, record, problem):
    tree = conda_tree(tmp_path / "tree", record)
    with pytest.raises(EnvshipError, match=problem):
        fixup_conda(tree, tmp_path / "final", "forged")
    assert (tree / "etc" / "config.txt").read_text() == f"prefix={PLACEHOLDER}\n"
