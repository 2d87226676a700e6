"""The ``envship`` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import warnings
from datetime import datetime
from pathlib import Path

import click
from dask.utils import format_bytes

from envship.client.store import ArtifactStore, DamagedEntry
from envship.errors import EnvshipError
from envship.manifest import Manifest
from envship.text_table import Col, TextTable, clock_time


def _width() -> int:
    """The terminal's width (``COLUMNS`` if set); 80 in a pipe."""
    return shutil.get_terminal_size((80, 24)).columns


def _home(path: Path) -> str:
    """``path`` with the home folder as ``~``: shorter, and the shell expands it."""
    home = os.path.expanduser("~")
    text = str(path)
    if home != "/" and text.startswith(home + os.sep):
        return "~" + text[len(home) :]
    return text


class _Group(click.Group):
    """Turns an EnvshipError into its message and exit status 1, no traceback."""

    def invoke(self, ctx):
        # Warnings as one line while a command runs; the caller's way after
        # (CliRunner, or a program that calls main).
        shown = warnings.showwarning
        warnings.showwarning = _show_warning
        try:
            return super().invoke(ctx)
        except EnvshipError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(1)
        finally:
            warnings.showwarning = shown


store_option = click.option(
    "--store",
    type=click.Path(file_okay=False),
    default=None,
    help="Artifact store folder (default: dask config envship.store).",
)


@click.group(cls=_Group, name="envship")
@click.version_option(package_name="envship")
def main():
    """Pack environments and ship them to Dask workers."""


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """A warning as one line on stderr, without the file and line it came from."""
    click.secho(f"warning: {message}", fg="yellow", err=True)


@main.command()
@click.argument("env")
@click.option("--name", default=None, help="Name to record (default: the folder name).")
@click.option("--level", type=int, default=None, help="zstandard level (default 3).")
@click.option(
    "--threads",
    type=int,
    default=None,
    help="Compression threads (default: all cores).",
)
@click.option(
    "--ignore-editable", is_flag=True, help="Ship editable installs without their code."
)
@store_option
def pack(env, name, level, threads, ignore_editable, store):
    """Pack ENV (a conda environment name, or a conda env or venv path)."""
    from envship.client.pack import pack as pack_env

    _report_pack(
        store,
        lambda: pack_env(
            env,
            name=name,
            store=store,
            level=level,
            threads=threads,
            ignore_editable=ignore_editable,
            progress=sys.stderr.isatty(),
        ),
    )


def _report_pack(store, make):
    """Run ``make()`` (which packs into ``store``), then say what it gave.

    "packed NAME ID" or "cache hit: ...", the sizes, and the archive's path.
    """
    from envship.client.store import StoreRepairWarning

    before = _archives(ArtifactStore(store))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StoreRepairWarning)
        artifact = make()
    for w in caught:
        if issubclass(w.category, StoreRepairWarning):  # one line, no source line
            click.echo(f"note: {w.message}", err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    m = artifact.manifest
    assert isinstance(m, Manifest)  # an environment's own artifact, never thin
    size = "no archive" if m.packed_size is None else format_bytes(m.packed_size)
    created = datetime.fromisoformat(m.created).timestamp() if m.created else None
    if before.get(artifact.path.name) == _mtime(artifact.path):
        when = clock_time(created) if created else "an earlier pack"
        click.echo(
            f"cache hit: {artifact.name} {artifact.short_id} unchanged since {when}"
        )
    else:
        click.echo(f"packed {artifact.name} {artifact.short_id}")
    click.echo(
        f"  {size} archive, {format_bytes(m.unpacked_size)} unpacked, "
        f"{m.file_count} files, python {m.python}"
    )
    click.echo(_home(artifact.path))


def _package_list_options(command):
    """``--pip``, ``-r/--requirements``, ``--lock``, ``--file``: a package list."""
    for option in reversed(
        (
            click.option(
                "--pip",
                "pip",
                multiple=True,
                metavar="SPEC",
                help='A package to add: "tabulate==0.8.10", ./myproject (repeatable).',
            ),
            click.option(
                "-r",
                "--requirements",
                type=click.Path(dir_okay=False),
                default=None,
                help="A requirements.txt to add.",
            ),
            click.option(
                "--lock",
                type=click.Path(),
                default=None,
                help="A uv.lock or pylock.toml: exactly what to install.",
            ),
            click.option(
                "--file",
                type=click.Path(dir_okay=False),
                default=None,
                help="An environment.yml: its pip part (its conda part must be in the base).",
            ),
        )
    ):
        command = option(command)
    return command


@main.command()
@click.argument("base", required=False)
@_package_list_options
@click.option("--name", default=None, help="Name to record (default: base+packages).")
@store_option
def build(base, pip, requirements, lock, file, name, store):
    """Build BASE plus packages (--pip, -r, --lock, --file), and pack it.

    BASE: a conda environment name, or a conda env or venv path; default the
    environment envship runs in. The packages are installed by uv, through the index pip's configuration
    names, with dask, distributed, cloudpickle, msgpack and toolz held at
    BASE's versions. The same BASE and list again is a cache hit.
    """
    from envship.client.packages import build as build_env

    _report_pack(
        store,
        lambda: build_env(
            list(pip),
            requirements=requirements,
            lock=lock,
            base=base,
            file=file,
            name=name,
            store=store,
            progress=sys.stderr.isatty(),
        ),
    )


def _archives(store: ArtifactStore) -> dict[str, int | None]:
    """The archives in ``store`` and their mtimes: to tell a cache hit afterwards."""
    if not store.root.is_dir():
        return {}
    return {p.name: _mtime(p) for p in store.root.glob("*.tar.zst")}


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


@main.command("list")
@store_option
def list_artifacts(store):
    """List the packed environments in the store."""
    store = ArtifactStore(store)
    names: dict[str, list[str]] = {}
    for name, artifact_id in store.names().items():
        names.setdefault(artifact_id, []).append(name)
    table = TextTable(
        Col("name", keep=True),
        Col("id", keep=True),
        Col("archive", right=True),
        Col("unpacked", right=True, drop=1),
        Col("python", drop=3),
        Col("created", drop=2),
    )
    artifacts = store.artifacts()
    damaged = store.damaged()
    if not artifacts and not damaged:
        click.echo(
            f"no environment packed in {_home(store.root)} yet: `envship pack ENV`"
        )
        return
    for a in artifacts:
        m = a.manifest
        created = datetime.fromisoformat(m.created).astimezone()
        table.add_row(
            ", ".join(names.get(a.id, [])) or "-",
            a.short_id,
            format_bytes(a.size) if a.has_archive else "(table only)",
            format_bytes(m.unpacked_size),
            m.python,
            created.strftime("%Y-%m-%d %H:%M"),
        )
    if artifacts:
        click.echo(table.render(_width()))
    for entry in damaged:
        called = ", ".join(entry.names) or "-"
        for line in (
            f"damaged: {called}  {entry.id}  {entry.problem}",
            f"Fix: {entry.fix}",
        ):
            click.echo(textwrap.fill(line, _width(), subsequent_indent="  "))


def _find(store: ArtifactStore, name_or_id: str):
    artifact = store.resolve(name_or_id)
    if artifact is None:
        raise EnvshipError(
            name_or_id,
            f"no artifact of that name or id in the store {store.root}",
            "see `envship list`, or pack it first with `envship pack`",
        )
    return artifact


@main.command()
@click.argument("name_or_id")
@click.option("--json", "as_json", is_flag=True, help="The manifest as JSON.")
@store_option
def inspect(name_or_id, as_json, store):
    """Show an artifact: by name, id, or the path `envship pack` printed."""
    from envship.client.describe import describe, find_by_path

    store = ArtifactStore(store)
    artifact = find_by_path(name_or_id)
    if artifact is None:
        artifact = _find(store, name_or_id)
    else:  # in the store that holds that path
        store = ArtifactStore(artifact.path.parent)
    if as_json:
        click.echo(json.dumps(artifact.manifest.to_dict(), indent=2, sort_keys=True))
    else:
        click.echo(describe(artifact, _width()))
    problem = store.check(artifact)
    if problem is not None:
        assert isinstance(artifact.manifest, Manifest)
        source = artifact.manifest.source_prefix or artifact.name
        click.echo(f"damaged: {problem}", err=True)
        click.echo(f"  Fix: `envship pack {source}` writes it again", err=True)


@main.command()
@click.argument("name_or_id")
@store_option
def rm(name_or_id, store):
    """Remove an artifact and the names pointing to it."""
    removed = ArtifactStore(store).remove(name_or_id)
    if isinstance(removed, DamagedEntry):
        click.echo(f"removed the damaged entry {removed.id}")
    else:
        click.echo(f"removed {removed.name} {removed.id}")


def _connect(scheduler: str):
    """A client of ``--scheduler``; an EnvshipError that says where it came from.

    Without distributed's "Mismatched versions" table: workers in environments
    of their own differ from this client by design, and a switch reports what
    an environment lacks (``SwitchReport.missing_optional``).
    """
    from envship.client.connect import connect_scheduler

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Mismatched versions found")
            return connect_scheduler(scheduler)
    except EnvshipError as e:
        source = click.get_current_context().get_parameter_source("scheduler")
        if source is not click.core.ParameterSource.ENVIRONMENT:
            raise
        fix = f"{e.fix}; it is DASK_SCHEDULER_ADDRESS's: change it, or pass --scheduler"
        raise EnvshipError(e.env, e.problem, fix, e.subject) from None


@main.command()
@click.argument("env", required=False)
@_package_list_options
@click.option(
    "--scheduler",
    envvar="DASK_SCHEDULER_ADDRESS",
    required=True,
    help="Scheduler address (or DASK_SCHEDULER_ADDRESS).",
)
@click.option(
    "--worker", "workers", multiple=True, help="Only this worker (repeatable)."
)
@click.option("--no-strict", is_flag=True, help="Warn on version differences, go on.")
@click.option("--timeout", type=float, default=None, help="Seconds to wait at most.")
def use(env, pip, requirements, lock, file, scheduler, workers, no_strict, timeout):
    """Restart the cluster's workers inside ENV ("none": the nannies' own).

    With --pip, -r, --lock or --file: inside ENV (default: envship's own
    environment) plus those packages, built and packed first.
    """
    from envship.client.foreign import ForeignEnvironment
    from envship.client.packages import spec_for
    from envship.client.use import use_environment

    listed = bool(pip) or any(x is not None for x in (requirements, lock, file))
    if env is None and not listed:
        raise click.UsageError(
            "give ENV, or a package list (--pip, -r, --lock, --file)"
        )
    if env is not None and env.lower() == "none":
        env = None
    # contradictions are refused before connecting
    spec_for(env, pip=list(pip), requirements=requirements, lock=lock, file=file)
    with _connect(scheduler) as client:
        report = use_environment(
            client,
            env,
            pip=list(pip),
            requirements=requirements,
            lock=lock,
            file=file,
            workers=list(workers) or None,
            strict=not no_strict,
            timeout=timeout,
        )
    if isinstance(report, ForeignEnvironment):
        click.echo(
            textwrap.fill(
                f"{report.name} (Python {report.python}) cannot host workers: it "
                "is installed on the nodes, and tasks call into it with "
                f"envship.foreign(client, {report.name!r}).call",
                _width(),
                break_long_words=False,
            )
        )
        return
    click.echo(report.render(_width()))


@main.command()
@click.option(
    "--scheduler",
    envvar="DASK_SCHEDULER_ADDRESS",
    required=True,
    help="Scheduler address (or DASK_SCHEDULER_ADDRESS).",
)
@click.option("--wide", is_flag=True, help="Also addresses, node ids, full ids.")
@click.option("--json", "as_json", is_flag=True, help="Everything, as JSON.")
def status(scheduler, wide, as_json):
    """What every worker runs in, each node's cache, who holds which environment."""
    from dataclasses import asdict

    from envship.client.status import status as cluster_status

    with _connect(scheduler) as client:
        found = cluster_status(client)
    if as_json:
        click.echo(json.dumps(asdict(found), indent=2, default=str))
    else:
        click.echo(found.render(_width(), wide=wide))


@main.group()
def cache():
    """The node cache of unpacked environments (run on a worker's machine)."""


directory_option = click.option(
    "--directory",
    type=click.Path(file_okay=False),
    default=None,
    help="Cache folder (default: dask config envship.cache.directory).",
)


@cache.command("list")
@directory_option
def cache_list(directory):
    """List the environments cached on this node."""
    from envship.node.cache import EnvCache

    node = EnvCache(directory, create=False)
    table = TextTable(
        Col("name", keep=True),
        Col("id", keep=True),
        Col("own", right=True),
        Col("shared", right=True, drop=1),
        Col("last used", drop=3),
        Col("in use by", drop=2),
    )
    entries = node.entries()
    for e in entries:
        table.add_row(
            e.name or "-",
            e.id[:12],
            format_bytes(e.size),
            format_bytes(e.shared),
            clock_time(e.last_used) if e.last_used else "-",
            ", ".join(map(str, e.leases)) or "-",
        )
    click.echo(table.render(_width()) if entries else "no environment cached here yet")
    files, stored = node.files.usage()
    unbounded = node.max_size == float("inf")
    budget = "no limit" if unbounded else format_bytes(int(node.max_size))
    click.echo(
        f"{node.root}:\n  {format_bytes(node.size())} of {budget}; "
        f"its file store holds {files} files, {format_bytes(stored)}"
    )


@cache.command("gc")
@directory_option
@click.option(
    "--scheduler",
    default=None,
    help="Clean every node of this cluster instead (from any machine).",
)
def cache_gc(directory, scheduler):
    """Remove leftovers of crashed installs and evict down to the budget."""
    if scheduler is None:
        from envship.node.cache import EnvCache

        evicted = EnvCache(directory, create=False).gc()
        click.echo(f"evicted {len(evicted)} environment(s)")
        return
    from envship.client.gc import gc

    with _connect(scheduler) as client:
        for node, outcome in gc(client).items():
            if "error" in outcome:
                click.echo(f"{node}: {outcome['error']}")
            else:
                click.echo(
                    f"{node}: evicted {len(outcome['evicted'])} environment(s), "
                    f"{format_bytes(outcome['size'])} in use"
                )


@cache.command("clear")
@directory_option
def cache_clear(directory):
    """Remove every cached environment that no running worker uses."""
    from envship.node.cache import EnvCache

    removed = EnvCache(directory, create=False).clear()
    click.echo(f"removed {len(removed)} environment(s)")


if __name__ == "__main__":
    main()
