"""Getting envship in: the wheel, the commands, completion, dask's config route.

docs/install.md says how; these tests do what it says: build the wheel as
``python -m build`` does and install it, run ``python -m envship``, the shell
completion lines, ``dask config get envship...``, and a ``LocalCluster`` that
gets envship from the YAML file of the docs alone.
"""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.test_docs import DEFAULTS, marked

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _clean_environ(**extra: str) -> dict[str, str]:
    """This process's variables without dask settings (DASK_*), plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("DASK_") and k != "PYTHONPATH"
    }
    return {**env, **extra}


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", _clean_environ())
    kwargs.setdefault("timeout", 120)
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel ``python -m build --wheel`` makes of a copy of the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "envship"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("envship", "bootstrap"):
        shutil.copytree(
            ROOT / folder,
            source / folder,
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
        )
    # --no-isolation: offline, from the setuptools and wheel installed here
    # (the test extra); pip would fetch them into a fresh environment.
    out = _run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation"],
        cwd=source,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (built,) = (source / "dist").glob("envship-*-py3-none-any.whl")
    return built


def test_wheel_holds_what_envship_needs(wheel):
    import trove_classifiers

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (info,) = {n.split("/")[0] for n in names if ".dist-info/" in n}
        metadata = email.parser.Parser().parsestr(z.read(f"{info}/METADATA").decode())
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        license_text = next(
            z.read(n).decode() for n in names if n.startswith(info) and "LICENSE" in n
        )
    # bootstrap/ ships as envship/_bootstrap, every file of it.
    for path in (ROOT / "bootstrap").glob("*.py"):
        assert f"envship/_bootstrap/{path.name}" in names
    assert not any(n.startswith("bootstrap/") for n in names)
    assert {"envship/envship.yaml", "envship/py.typed", "envship/__main__.py"} <= names
    assert "BSD 3-Clause License" in license_text
    assert "envship developers" in license_text
    assert metadata["License-File"] == "LICENSE"
    classifiers = metadata.get_all("Classifier")
    assert "License :: OSI Approved :: BSD License" in classifiers
    assert "Typing :: Typed" in classifiers
    unknown = set(classifiers) - trove_classifiers.classifiers
    assert not unknown, f"not trove classifiers: {unknown}"
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert set(urls) == {"Homepage", "Documentation", "Changelog", "Issues"}
    assert all(
        u.startswith("https://github.com/envship/envship") for u in urls.values()
    )
    assert "[console_scripts]\nenvship = envship.cli:main" in entry_points
    assert "[dask_cli]\nenvship = envship.cli:main" in entry_points


def test_installed_wheel_runs_on_its_own(wheel, tmp_path):
    """Installed from the wheel alone (not this checkout), envship works."""
    target = tmp_path / "site"
    out = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ]
    )
    assert out.returncode == 0, out.stderr
    env = _clean_environ(PYTHONPATH=str(target))
    where = _run(
        [
            sys.executable,
            "-c",
            "import envship, envship._bootstrap.worker as w; "
            "print(envship.__file__); print(w.__file__)",
        ],
        env=env,
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(target)) for line in where.stdout.split())
    script = _run([str(target / "bin" / "envship"), "--help"], env=env, cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    assert script.stdout.startswith("Usage: envship ")
    dask = _run([str(BIN / "dask"), "envship", "--help"], env=env, cwd=tmp_path)
    assert dask.returncode == 0, dask.stderr
    assert dask.stdout.startswith("Usage: dask envship ")


def test_python_m_envship_is_the_cli(tmp_path):
    out = _run([sys.executable, "-m", "envship", "--help"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Usage: envship [OPTIONS] COMMAND [ARGS]...")
    for command in ("pack", "list", "inspect", "rm", "use", "status", "cache"):
        assert f"\n  {command} " in out.stdout
    version = _run([sys.executable, "-m", "envship", "--version"], cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("envship, version ")


def test_dask_config_get_shows_envship_defaults(tmp_path):
    """``dask config get`` in a fresh process: nothing imported envship first."""
    dask = str(BIN / "dask")
    for key, value in [
        ("envship.cache.max-size", DEFAULTS["envship"]["cache"]["max-size"]),
        ("envship.transfer.piece-size", DEFAULTS["envship"]["transfer"]["piece-size"]),
    ]:
        out = _run([dask, "config", "get", key], cwd=tmp_path)
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.strip() == value
    # A user's setting wins over the default, as for distributed's own keys.
    (tmp_path / "site.yaml").write_text("envship:\n  cache:\n    max-size: 5 GB\n")
    env = _clean_environ(DASK_CONFIG=str(tmp_path))
    out = _run([dask, "config", "get", "envship.cache.max-size"], env=env)
    assert out.stdout.strip() == "5 GB", out.stderr
    # And `dask envship` is the envship command.
    out = _run([dask, "envship", "--help"], cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("Usage: dask envship ")


def test_documented_completion_lines_complete(tmp_path):
    ((language, code, _),) = marked("completion")
    assert language == "bash"
    lines = [line.split("#")[0].strip() for line in code.strip().splitlines()]
    shells = {}
    for line in lines:
        for shell in ("bash", "zsh", "fish"):
            if f"_ENVSHIP_COMPLETE={shell}_source envship" in line:
                shells[shell] = line
    assert set(shells) == {"bash", "zsh", "fish"}
    env = _clean_environ(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    for shell in ("zsh", "fish"):
        out = _run(["envship"], env={**env, "_ENVSHIP_COMPLETE": f"{shell}_source"})
        assert out.returncode == 0 and "_ENVSHIP_COMPLETE" in out.stdout, out.stderr
    # bash: the documented line, then a Tab after `envship ca` and `envship cache `.
    script = textwrap.dedent(
        f"""\
        {shells["bash"]}
        COMP_WORDS=(envship ca); COMP_CWORD=1; _envship_completion envship
        echo "${{COMPREPLY[@]}}"
        COMPREPLY=(); COMP_WORDS=(envship cache ""); COMP_CWORD=2; _envship_completion envship
        echo "${{COMPREPLY[@]}}"
        """
    )
    out = _run(["bash", "-c", script], env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.split() == ["cache"]
    assert set(second.split()) == {"list", "gc", "clear"}


# The driver of test_dask_config_file_turns_envship_on: a LocalCluster with
# no preload argument; envship must come from the YAML file alone.
_DRIVER = """
import json, sys
from distributed import Client, LocalCluster


def nanny_state(dask_worker):
    return {
        "preloads": [p.name for p in dask_worker.preloads],
        "handlers": "envship_info" in dask_worker.handlers,
        "plugins": sorted(dask_worker.plugins),
    }


def prefix():
    import sklearn

    return sys.prefix


if __name__ == "__main__":
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True,
        host="127.0.0.1", dashboard_address=None,
    ) as cluster, Client(cluster) as client:
        before = {
            "nannies": list(client.run(nanny_state, nanny=True).values()),
            "scheduler": client.run_on_scheduler(
                lambda dask_scheduler: sorted(dask_scheduler.plugins)
            ),
        }
        import envship

        artifact = envship.pack(sys.argv[1])
        client.use_environment(sys.argv[1])
        print(json.dumps({
            "before": before,
            "id": artifact.id,
            "prefixes": list(client.run(prefix).values()),
        }))
"""


def test_dask_config_file_turns_envship_on(env_prefix, tmp_path):
    """The YAML of docs/install.md, in a folder DASK_CONFIG names, is enough."""
    ((language, code, _),) = marked("dask-config")
    assert language == "yaml"
    config = tmp_path / "dask-config"
    config.mkdir()
    (config / "envship.yaml").write_text(code)
    assert yaml.safe_load(code)["distributed"]["nanny"]["preload"] == ["envship"]
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    cache = tmp_path / "cache"
    env = _clean_environ(
        DASK_CONFIG=str(config),
        DASK_ENVSHIP__CACHE__DIRECTORY=str(cache),
        DASK_ENVSHIP__STORE=str(tmp_path / "store"),
        PYTHONPATH=str(ROOT),
    )
    prefix = env_prefix("sklearn-dev")
    out = _run([sys.executable, str(driver), str(prefix)], env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    # Before any switch: each nanny loaded envship as its preload (its
    # handlers are there, no plugin had to install them), and the scheduler
    # runs envship's registry.
    for nanny in result["before"]["nannies"]:
        assert nanny == {"preloads": ["envship"], "handlers": True, "plugins": []}
    assert "envship-registry" in result["before"]["scheduler"]
    # After: both workers run inside the shipped environment, from the cache.
    assert result["prefixes"] == [str(cache / result["id"])] * 2


def test_documented_local_cluster_preloads_envship(env_prefix, tmp_path):
    """The LocalCluster example of docs/install.md, as a notebook runs it.

    Substituted: the cluster binds 127.0.0.1 without a dashboard (by default
    it serves one on port 8787, which other clusters of the machine may
    hold), and ``sklearn-dev`` is found by name through ``CONDA_ENVS_PATH``,
    a folder where that name links to the fixture.
    """
    ((language, code, _),) = marked("local-cluster")
    assert language == "python"
    call = "LocalCluster(n_workers=2, "
    assert call in code
    code = code.replace(
        call, call + 'host="127.0.0.1", dashboard_address=None, threads_per_worker=1, '
    )
    envs = tmp_path / "envs"
    envs.mkdir()
    (envs / "sklearn-dev").symlink_to(env_prefix("sklearn-dev"))
    # Run as a notebook cell runs: code without a file, so that the nannies'
    # spawned processes do not run it again (a script needs __main__ guards).
    script = code + textwrap.dedent(
        """
            import json, sys
            preloads = client.run(
                lambda dask_worker: [p.name for p in dask_worker.preloads],
                nanny=True,
            )
            prefixes = client.run(lambda: sys.prefix)
            print(json.dumps([list(preloads.values()), list(prefixes.values())]))
            client.close()
            cluster.close()
            """
    )
    cache = tmp_path / "cache"
    env = _clean_environ(
        CONDA_ENVS_PATH=str(envs),
        DASK_CONFIG=str(tmp_path / "no-config"),
        DASK_ENVSHIP__CACHE__DIRECTORY=str(cache),
        DASK_ENVSHIP__STORE=str(tmp_path / "store"),
        PYTHONPATH=str(ROOT),
    )
    out = _run([sys.executable, "-c", script], env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    preloads, prefixes = json.loads(out.stdout.splitlines()[-1])
    assert preloads == [["envship"], ["envship"]]
    (installed,) = {Path(p) for p in prefixes}
    assert installed.parent == cache and len(prefixes) == 2
