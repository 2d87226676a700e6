"""What a terminal shows: 80 columns, names in full, bars that logs do not break.

Every command runs as a user runs it, ``python -m envship.cli`` with
``COLUMNS=80``; bars run under a real pseudo-terminal.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import socket
import struct
import subprocess
import sys
import tempfile
import termios
from pathlib import Path

import pytest

import envship
from envship.node.cache import EnvCache

LONG_NAME = "a-rather-long-environment-name-for-tests"
#: The glyphs of a rich bar.
BAR = re.compile("[━╸╺]")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def cli(*args, width: int = 80, **env):
    return subprocess.run(
        [sys.executable, "-m", "envship.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": str(width), **env},
    )


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def assert_fits(text: str, width: int = 80, allow: tuple[str, ...] = ()) -> None:
    """Every line within ``width``, but those that are one of ``allow`` (paths)."""
    for line in text.splitlines():
        assert len(line) <= width or line.strip() in allow, line


def in_terminal(args: list[str], env: dict, columns: int = 80) -> str:
    """Run ``args`` with stdout and stderr on a pseudo-terminal; what it showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(
        args,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "COLUMNS": str(columns), **env},
    )
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 1 << 16)
        except OSError:  # the process ended and closed its side
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert process.wait() == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def screen_lines(output: str) -> list[str]:
    """The lines a terminal keeps: per line, what follows its last carriage return."""
    return [
        ANSI.sub("", line.rstrip("\r").split("\r")[-1]) for line in output.split("\n")
    ]


@pytest.fixture
def short_tmp():
    """A short folder: the paths printed stay within 80 columns, as a user's do."""
    with tempfile.TemporaryDirectory(prefix="es", dir="/tmp") as folder:
        yield Path(folder)


def test_pack_and_list_fit_80_columns_with_names_in_full(env_prefix, short_tmp):
    store = short_tmp / "store"
    first = ok(cli("pack", env_prefix("py2-sklearn-dev"), "--store", store))
    artifact = envship.pack(env_prefix("py2-sklearn-dev"), store=store)
    name = artifact.name
    assert first.splitlines()[0] == f"packed {name} {artifact.short_id}"
    assert first.splitlines()[-1] == str(artifact.path)
    again = ok(cli("pack", env_prefix("py2-sklearn-dev"), "--store", store))
    assert re.fullmatch(
        rf"cache hit: {name} {artifact.short_id} unchanged since \d\d:\d\d:\d\d",
        again.splitlines()[0],
    )
    ok(cli("pack", env_prefix("venv"), "--name", LONG_NAME, "--store", store))
    listing = ok(cli("list", "--store", store))
    for text in (first, again, listing):
        assert_fits(text)
    rows = {line.split()[0]: line.split()[1] for line in listing.splitlines()[1:]}
    assert rows[name] == artifact.short_id and LONG_NAME in rows
    assert "…" not in listing


def test_inspect_takes_the_printed_path_and_shows_every_package(env_prefix, short_tmp):
    store = short_tmp / "store"
    prefix = env_prefix("py2-sklearn-dev")
    printed = ok(cli("pack", prefix, "--store", store))
    path = printed.splitlines()[-1]
    artifact = envship.pack(prefix, store=store)
    conda = sorted(
        p.stem.rsplit("-", 2)[0] for p in (prefix / "conda-meta").glob("*.json")
    )
    assert len(conda) > 6
    for given in (path, str(store / f"{artifact.id}.json"), artifact.name):
        shown = ok(cli("inspect", given, "--store", store))
        assert_fits(shown, allow=(f"path        {path}",))
        fields = dict(
            line.split(None, 1) for line in shown.split("\n\n")[0].splitlines()
        )
        assert fields["id"] == artifact.id and fields["kind"] == "conda"
        assert fields["python"] == artifact.manifest.python
        packages = {
            line.split()[0]: line.split()[2]
            for line in shown.split("packages:\n")[1].splitlines()[1:]
        }
        assert sorted(n for n, s in packages.items() if s == "conda") == conda
    as_json = json.loads(ok(cli("inspect", path, "--json")))
    assert as_json == artifact.manifest.to_dict()


def test_cache_list_keeps_names_whole_at_80_columns(env_prefix, short_tmp):
    artifact = envship.pack(env_prefix("venv"), name=LONG_NAME, store=short_tmp / "s")
    node = EnvCache(short_tmp / "node")
    node.add_archive(artifact.id, artifact.path, artifact.manifest)
    node.ensure(artifact.id)
    listing = ok(cli("cache", "list", "--directory", node.root))
    assert_fits(listing)
    assert f"{LONG_NAME}  {artifact.id[:12]}" in listing


def test_status_fits_80_columns_with_hosts_and_times(env_prefix, short_tmp):
    from fixtures.cluster import local_cluster

    with local_cluster(short_tmp / "c", {"node-a": 2, "node-b": 1}) as (client, _):
        client.use_environment(env_prefix("venv"))
        address = {"DASK_SCHEDULER_ADDRESS": client.scheduler.address}
        shown = ok(cli("status", **address))
        wide = ok(cli("status", "--wide", **address))
        found = json.loads(ok(cli("status", "--json", **address)))
    assert_fits(shown)
    host = os.uname().nodename
    workers = shown.split("\n\n")[0].splitlines()
    assert workers[0].split() == ["worker", "host", "environment", "since"]
    for line, name in zip(
        workers[1:], ["node-a-0", "node-a-1", "node-b-0"], strict=True
    ):
        assert re.fullmatch(
            rf"{name}\s+{host}(\[2\])?\s+venv-\S+ [0-9a-f]{{8}}\s+\d\d:\d\d:\d\d",
            line,
        ), line
    assert "None" not in shown
    node_ids = {w["node"] for w in found["workers"]}
    assert len(node_ids) == 2 and not any(n in shown for n in node_ids)
    assert all(n in wide for n in node_ids)
    assert socket.gethostname() in shown or host in shown


def test_logs_print_above_the_bar(tmp_path):
    script = tmp_path / "bar.py"
    script.write_text(
        "import logging, time\n"
        "import dask, distributed  # dask's logging: a StreamHandler on stderr\n"
        "from envship.client.progress import progress_bar\n"
        "logging.basicConfig()\n"
        "with progress_bar('restarting workers', 2, True, counting=True) as bar:\n"
        "    for i in range(2):\n"
        "        time.sleep(0.3)\n"
        "        logging.getLogger('distributed.nanny').warning('Restarting worker')\n"
        "        logging.getLogger('envship').warning('from envship')\n"
        "        bar.advance()\n"
    )
    shown = in_terminal([sys.executable, str(script)], {})
    lines = screen_lines(shown)
    logs = [line for line in lines if "Restarting worker" in line]
    assert len(logs) >= 2 and sum("from envship" in line for line in lines) >= 2
    assert not [line for line in lines if BAR.search(line) and "Restart" in line]
    assert "2/2" in lines[-1] or any("2/2" in line for line in lines[-3:])


def test_without_ipywidgets_a_notebook_gets_plain_lines(tmp_path):
    script = tmp_path / "notebook.py"
    # What rich sees in a Jupyter kernel (its check: the shell's class name),
    # with ipywidgets not installable.
    script.write_text(
        "import builtins, sys, warnings\n"
        "warnings.simplefilter('error')\n"
        "class ZMQInteractiveShell: pass\n"
        "builtins.get_ipython = lambda: ZMQInteractiveShell()\n"
        "sys.modules['ipywidgets'] = None\n"
        "from envship.client.progress import progress_bar, widgets_missing\n"
        "assert widgets_missing()\n"
        "with progress_bar('restarting workers', 2, True, counting=True) as bar:\n"
        "    bar.advance(); bar.advance()\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "restarting workers ..."
    assert re.fullmatch(r"restarting workers: 2/2, done in \d+\.\d s", lines[1])
    assert len(lines) == 2


def test_a_switch_in_a_terminal_warns_once_and_counts_restarts(env_prefix, tmp_path):
    from fixtures.cluster import local_cluster

    script = tmp_path / "switch.py"
    script.write_text(
        "import sys, envship\n"
        "from distributed import Client\n"
        "with Client(sys.argv[1]) as client:\n"
        "    client.use_environment(sys.argv[2])\n"
    )
    with local_cluster(tmp_path / "c", {"node": 2}) as (client, _):
        kept = client.scatter(list(range(5)))
        shown = in_terminal(
            [sys.executable, str(script), client.scheduler.address, env_prefix("venv")],
            {"DASK_ENVSHIP__STORE": str(tmp_path / "store")},
        )
        assert len(kept) == 5  # held until the switch is over
    lines = screen_lines(shown)
    said = [line for line in lines if "alone hold" in line]
    assert len(said) == 1
    assert said[0].endswith(
        f"UserWarning: Switching to {env_prefix('venv').name} restarts 2 workers "
        "that alone hold 5 keys; their results will be recomputed and scattered "
        "data lost."
    )
    restarts = [line for line in lines if line.startswith("restarting workers")]
    assert restarts and re.search(r" 2/2 ", restarts[-1])
    assert all(re.search(r" [012]/2 ", line) for line in restarts)


def test_a_switch_report_fits_80_columns_with_its_failures():
    from envship.client.report import SwitchReport, WorkerReport

    long = "a-much-longer-worker-name-3"
    error = (
        "could not import distributed: ModuleNotFoundError: No module named "
        "'distributed' in /scratch/envship/5f0c2d9a1b7e9f0c/lib/python3.11"
    )
    report = SwitchReport(
        {
            "w-0": WorkerReport("w-0", "tcp://n:1", "tcp://w:2", "5f0c" * 8, 2.3, True),
            long: WorkerReport(long, "tcp://n:3", None, None, 2.3, False, error),
        },
        stages={"pack": 0.5, "check": 0.1, "ship": 1.8, "unpack": 3.1, "restart": 2},
    )
    shown = repr(report)
    assert_fits(shown)
    assert shown.splitlines()[1].split() == [long, "(nanny's", "own)", "2.30", "FAILED"]
    assert "/scratch/envship/5f0c2d9a1b7e9f0c/lib/python3.11" in shown
