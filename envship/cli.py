"""The ``envship`` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import sys
from datetime import datetime

import click
from dask.utils import format_bytes

from envship.client.store import ArtifactStore
from envship.errors import EnvshipError
from envship.manifest import Manifest


class _Group(click.Group):
    """Turns an EnvshipError into its message and exit status 1, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EnvshipError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(1)


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
    "--ignore-editable", is_flag=True, help="Pack even with editable installs."
)
@store_option
def pack(env, name, level, threads, ignore_editable, store):
    """Pack ENV (a conda environment name, or a conda env or venv path)."""
    from envship.client.pack import pack as pack_env

    artifact = pack_env(
        env,
        name=name,
        store=store,
        level=level,
        threads=threads,
        ignore_editable=ignore_editable,
        progress=sys.stderr.isatty(),
    )
    m = artifact.manifest
    assert isinstance(m, Manifest)  # an environment's own artifact, never thin
    size = "no archive" if m.packed_size is None else format_bytes(m.packed_size)
    click.echo(
        f"{artifact.name}  {artifact.id}  {size} "
        f"({format_bytes(m.unpacked_size)} unpacked, {m.file_count} files, "
        f"python {m.python})"
    )
    click.echo(str(artifact.path))


@main.command("list")
@store_option
def list_artifacts(store):
    """List the packed environments in the store."""
    from rich.console import Console
    from rich.table import Table

    store = ArtifactStore(store)
    names: dict[str, list[str]] = {}
    for name, artifact_id in store.names().items():
        names.setdefault(artifact_id, []).append(name)
    table = Table("name", "id", "archive", "unpacked", "python", "created", box=None)
    for a in store.artifacts():
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
    Console().print(table)


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
@store_option
def inspect(name_or_id, store):
    """Print the manifest of an artifact."""
    artifact = _find(ArtifactStore(store), name_or_id)
    click.echo(json.dumps(artifact.manifest.to_dict(), indent=2, sort_keys=True))


@main.command()
@click.argument("name_or_id")
@store_option
def rm(name_or_id, store):
    """Remove an artifact and the names pointing to it."""
    artifact = ArtifactStore(store).remove(name_or_id)
    click.echo(f"removed {artifact.name} {artifact.id}")


@main.command()
@click.argument("env")
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
def use(env, scheduler, workers, no_strict, timeout):
    """Restart the cluster's workers inside ENV ("none": the nannies' own)."""
    from distributed import Client

    from envship.client.foreign import ForeignEnvironment
    from envship.client.use import use_environment

    with Client(scheduler, timeout=timeout or 30) as client:
        report = use_environment(
            client,
            None if env.lower() == "none" else env,
            workers=list(workers) or None,
            strict=not no_strict,
            timeout=timeout,
        )
    if isinstance(report, ForeignEnvironment):
        click.echo(
            f"{report.name} (Python {report.python}) cannot host workers: it is "
            "installed on the nodes, and tasks call into it with "
            f"envship.foreign(client, {report.name!r}).call"
        )
        return
    click.echo(repr(report))


@main.command()
@click.option(
    "--scheduler",
    envvar="DASK_SCHEDULER_ADDRESS",
    required=True,
    help="Scheduler address (or DASK_SCHEDULER_ADDRESS).",
)
def status(scheduler):
    """What every worker runs in, each node's cache, who holds which environment."""
    from distributed import Client

    from envship.client.status import status as cluster_status

    with Client(scheduler, timeout=30) as client:
        click.echo(repr(cluster_status(client)))


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
    from rich.console import Console
    from rich.table import Table

    from envship.node.cache import EnvCache

    node = EnvCache(directory)
    table = Table("name", "id", "own", "shared", "last used", "in use by", box=None)
    for e in node.entries():
        used = datetime.fromtimestamp(e.last_used) if e.last_used else None
        table.add_row(
            e.name or "-",
            e.id[:12],
            format_bytes(e.size),
            format_bytes(e.shared),
            used.strftime("%Y-%m-%d %H:%M") if used else "-",
            ", ".join(map(str, e.leases)) or "-",
        )
    Console().print(table)
    files, stored = node.files.usage()
    unbounded = node.max_size == float("inf")
    budget = "no limit" if unbounded else format_bytes(int(node.max_size))
    click.echo(
        f"{node.root}: {format_bytes(node.size())} of {budget}; "
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

        evicted = EnvCache(directory).gc()
        click.echo(f"evicted {len(evicted)} environment(s)")
        return
    from distributed import Client

    from envship.client.gc import gc

    with Client(scheduler, timeout=30) as client:
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

    removed = EnvCache(directory).clear()
    click.echo(f"removed {len(removed)} environment(s)")


if __name__ == "__main__":
    main()
