"""docs/quickstart.md runs as written, top to bottom, against a real cluster.

Every ```python block runs, in order, in one namespace (as in a notebook);
every line of a ```bash block that runs ``envship`` runs as a command, in
its place between them. The other bash lines set up the reader's machine
(``git clone``, ``pip install``, ``conda create``/``activate``) and are not
run here: the test's machine has envship installed and the environments
built already (fixtures). Blocks without a language are output, not run.

What the reader has and this test provides instead, and the one substitution:

- The cluster: a scheduler and two nannies started as an administrator
  starts them (``dask worker --preload-nanny envship``, workers named
  ``worker-0`` and ``worker-1``, the names the doc uses). Its address
  replaces ``tcp://scheduler:8786``, the only text changed in the doc's code.
- The conda environments ``sklearn-dev`` and ``py2-sklearn-dev``: found by
  name the way conda finds them, through ``CONDA_ENVS_PATH``, a folder in
  which those names link to the fixture environments.
- A private artifact store (``DASK_ENVSHIP__STORE``), empty at the start,
  as on a fresh machine.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy

import envship
from fixtures.cluster import local_cluster

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "docs" / "quickstart.md"
DOCUMENTED_ADDRESS = "tcp://scheduler:8786"
# Bash lines that prepare the reader's machine: not run (see above).
SETUP_COMMANDS = {"git", "pip", "conda"}


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block, in order; nested fences none."""
    found, language, lines = [], None, []
    for line in text.splitlines(keepends=True):
        if language is None:
            if line.startswith("```"):
                language, lines = line[3:].strip(), []
        elif line.startswith("```"):
            found.append((language, "".join(lines)))
            language = None
        else:
            lines.append(line)
    assert language is None, "an unclosed ``` block"
    return found


def envship_commands(code: str) -> list[list[str]]:
    """The arguments of each ``envship`` command of a bash block."""
    commands = []
    for line in code.splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        if words[0] == "envship":
            commands.append(words[1:])
        else:
            assert words[0] in SETUP_COMMANDS, (
                f"a bash line this test cannot run: {line}"
            )
    return commands


def test_quickstart_runs_as_written(env_prefix, store, tmp_path, monkeypatch):
    text = QUICKSTART.read_text()
    steps = blocks(text)
    assert [lang for lang, _ in steps].count("python") >= 10

    envs = tmp_path / "conda-envs"
    envs.mkdir()
    for name in ("sklearn-dev", "py2-sklearn-dev"):
        (envs / name).symlink_to(env_prefix(name), target_is_directory=True)
    monkeypatch.setenv("CONDA_ENVS_PATH", str(envs))
    # The name packs the same content as the fixture's own prefix (same id).
    check = tmp_path / "check-store"
    by_name = envship.pack("sklearn-dev", store=check, archive=False)
    assert by_name.id == envship.pack(env_prefix("sklearn-dev"), store=check).id

    envship_cli = Path(sys.executable).parent / "envship"
    commands = set()
    namespace: dict = {"__name__": "__main__"}
    with local_cluster(tmp_path / "cluster", {"worker": 2}) as cluster:
        cli_env = {**os.environ, "CONDA_ENVS_PATH": str(envs)}
        try:
            for language, code in steps:
                code = code.replace(DOCUMENTED_ADDRESS, cluster.address)
                if language == "python":
                    exec(compile(code, str(QUICKSTART), "exec"), namespace)
                elif language == "bash":
                    for args in envship_commands(code):
                        out = subprocess.run(
                            [str(envship_cli), *args],
                            capture_output=True,
                            text=True,
                            env=cli_env,
                            timeout=300,
                        )
                        assert out.returncode == 0, (args, out.stdout, out.stderr)
                        commands.add(args[0])
            # What the doc's steps computed, on the workers.
            results = namespace["results"]
            assert len(results) == 3 and all(score > 0.99 for score in results)
            assert 0 < namespace["total"] < 2000 * 2000
            assert numpy.allclose(namespace["future"].result(), [6.0, 8.0])
        finally:
            if "client" in namespace:
                namespace["client"].close()
    # Every kind of command the quickstart shows ran.
    assert commands == {"pack", "list", "status", "use", "inspect", "rm"}
