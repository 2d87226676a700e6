"""The documentation in docs/ says what the code does: config keys, YAML, commands.

Code is taken from the markdown itself: a fenced block preceded by a marker
comment ``<!-- test: NAME -->`` is run by the test of that name.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import dask.config
import pytest
import yaml
from distributed import Client

import envship
from fixtures.cluster import nanny_args, scheduler_args, spawn, stop, wait_until

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
DEFAULTS = yaml.safe_load((ROOT / "envship" / "envship.yaml").read_text())

_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_MARKED = re.compile(r"<!-- test: ([\w-]+) -->\n```(\w*)\n(.*?)^```", re.M | re.S)
_KEY = re.compile(r"`(envship(?:\.[a-z][a-z0-9-]*)+)`")
_ENV_VAR = re.compile(r"\bDASK_ENVSHIP__([A-Z0-9_]+)")


def _leaves(tree: dict, prefix: str) -> set[str]:
    keys = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            keys |= _leaves(value, f"{prefix}.{key}")
        else:
            keys.add(f"{prefix}.{key}")
    return keys


YAML_KEYS = _leaves(DEFAULTS["envship"], "envship")
# Mappings (``envship.cache``) may be named as well as their leaves.
KNOWN = YAML_KEYS | {k.rsplit(".", i)[0] for k in YAML_KEYS for i in (1, 2)}


def _is_known(key: str) -> bool:
    return key in KNOWN


def marked(name: str) -> list[tuple[str, str, Path]]:
    """(language, code, file) of every block marked ``<!-- test: name -->``."""
    found = []
    for path in DOCS:
        for mark, language, code in _MARKED.findall(path.read_text()):
            if mark == name:
                found.append((language, code, path))
    return found


def test_config_keys_named_in_docs_exist():
    for path in DOCS:
        text = path.read_text()
        named = set(_KEY.findall(text))
        for var in _ENV_VAR.findall(text):
            named.add("envship." + ".".join(p.lower() for p in var.split("__")))
        for key in named:
            first = key.split(".")[1]
            if key.count(".") == 1 and hasattr(envship, first):
                if first not in DEFAULTS["envship"]:
                    continue  # a function (envship.status), not a key
            key = key.replace("_", "-")
            assert _is_known(key), f"{path.name} names {key}, not in envship.yaml"


def test_every_config_key_is_documented_for_administrators():
    text = (ROOT / "docs" / "administrators.md").read_text()
    for key in sorted(YAML_KEYS):
        assert f"`{key}`" in text, f"{key} is not in docs/administrators.md"


def test_yaml_blocks_parse_and_their_envship_keys_are_known():
    blocks = 0
    for path in DOCS:
        for language, code in _BLOCK.findall(path.read_text()):
            if language not in ("yaml", "yml"):
                continue
            blocks += 1
            data = yaml.safe_load(code)
            assert isinstance(data, dict), f"{path.name}: {code}"
            for key in _leaves(data.get("envship") or {}, "envship"):
                assert _is_known(key), f"{path.name}: unknown key {key}"
    assert blocks >= 2


QUEUES = {"slurm", "sge", "lsf", "pbs"}


def test_jobqueue_examples_put_the_nanny_preload_in_job_scripts():
    pytest.importorskip("dask_jobqueue")
    from dask_jobqueue.core import JobQueueCluster

    examples = marked("jobqueue")
    assert len(examples) == 4
    options = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}
    made = set()
    # The scheduler these clusters start in this process: on 127.0.0.1 only.
    local = {f"jobqueue.{n}.scheduler-options": options for n in made | QUEUES}
    with dask.config.set(local):
        for language, code, path in examples:
            assert language == "python", path
            namespace: dict = {}
            exec(compile(code, str(path), "exec"), namespace)
            clusters = [v for v in namespace.values() if isinstance(v, JobQueueCluster)]
            assert len(clusters) == 1, code
            cluster = clusters[0]
            try:
                script = cluster.job_script()
                assert "--preload-nanny envship" in script, script
                assert "DASK_ENVSHIP__CACHE__DIRECTORY" in script, script
                made.add(type(cluster).__name__)
            finally:
                cluster.close()
    assert made == {"SLURMCluster", "SGECluster", "LSFCluster", "PBSCluster"}


def _commands(code: str, program: str) -> list[list[str]]:
    """The arguments after ``dask PROGRAM`` on each line that runs it."""
    found = []
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["dask", program]:
            found.append(words[2:])
    return found


def test_plain_cluster_commands_start_a_cluster_with_envship(tmp_path):
    ((language, code, _),) = marked("plain-cluster")
    assert language == "bash"
    (scheduler,) = _commands(code, "scheduler")
    (worker,) = _commands(code, "worker")
    documented_address = worker[0]
    assert documented_address.startswith("tcp://")

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
        ),
        "DASK_ENVSHIP__CACHE__DIRECTORY": str(tmp_path / "cache"),
    }
    scheduler_file = tmp_path / "scheduler.json"
    processes = [
        spawn(
            sys.executable,
            scheduler_args(0, [*scheduler, "--scheduler-file", str(scheduler_file)]),
            env,
            tmp_path / "scheduler.log",
        )
    ]
    try:
        wait_until(lambda: scheduler_file.exists() and scheduler_file.read_text())
        address = json.loads(scheduler_file.read_text())["address"]
        args = nanny_args(
            address, "doc-0", tmp_path / "work", preload=False, extra=worker[1:]
        )
        processes.append(spawn(sys.executable, args, env, tmp_path / "nanny.log"))
        with Client(address, timeout=30) as client:
            client.wait_for_workers(1, timeout=60)
            (info,) = client.scheduler_info()["workers"].values()
            info = client.sync(client.rpc(info["nanny"]).envship_info)
            assert isinstance(info, dict) and "node" in info
            # The scheduler preload started envship's registry.
            registry = client.sync(client.scheduler.envship_registry)
            assert isinstance(registry, dict)
    finally:
        stop(processes)
