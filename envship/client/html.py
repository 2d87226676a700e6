"""How envship's results look in Jupyter: the HTML of their ``_repr_html_``.

One function per kind of result (a switch report, the cluster's status, an
artifact or the store's list of them, a foreign environment), each a few
small tables in the manner of distributed's ``Client`` repr. Every value is
escaped: environment, worker and site names come from users. No script, no
style sheet: inline styles only, so the output looks the same wherever a
notebook is shown (JupyterLab, nbviewer, GitHub).

The classes call these functions and hold no HTML themselves; this module
only formats, it computes nothing and asks no cluster. It reads the objects
it is given by their attributes and imports none of their classes, so that
it sits below them (their ``_repr_html_`` import it, not the other way).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from html import escape
from typing import Any, TypeAlias

from dask.utils import format_bytes

from envship.manifest import Manifest
from envship.text_table import NANNY_OWN, short_name, worker_row

#: The objects rendered, named for the reader (``envship.client.report``,
#: ``.status``, ``.store``, ``.foreign``): these modules import this one.
SwitchReport: TypeAlias = Any
ClusterStatus: TypeAlias = Any
Artifact: TypeAlias = Any
ArtifactStore: TypeAlias = Any
ForeignEnvironment: TypeAlias = Any

_BOX = "font-family: sans-serif; font-size: 13px; line-height: 1.4"
_TABLE = "border-collapse: collapse; margin: 0.3em 0 0.6em; text-align: left"
_CELL = "padding: 0.15em 0.9em 0.15em 0; text-align: left; vertical-align: top"
_MUTED = "color: #666"
_BAD = "color: #b00"


def switch_report(report: SwitchReport) -> str:
    """A switch report: one row per worker, then what moved and how long it took.

    Examples
    --------
    >>> from envship.client.report import SwitchReport, WorkerReport
    >>> html = switch_report(SwitchReport(
    ...     {"<w>": WorkerReport("<w>", "tcp://n:1", None, None, 1.5, ok=True)}))
    >>> ">&lt;w&gt;</td>" in html and "<w>" not in html
    True
    """
    rows = []
    for name, r in sorted(report.workers.items(), key=lambda kv: str(kv[0])):
        env = r.environment[:12] if r.environment else NANNY_OWN
        status = "ok" if r.ok else _styled(f"FAILED: {r.error}", _BAD)
        rows.append([name, env, f"{r.seconds:.2f}", status])
    lines = report.notes()
    title = "Switch report: " + (
        "ok" if report.ok else f"{len(report.failed())} of {len(report)} failed"
    )
    return _box(
        title,
        _table(["worker", "environment", "seconds", "status"], rows),
        *map(_paragraph, lines),
    )


def cluster_status(status: ClusterStatus, now: float | None = None) -> str:
    """``envship.status(client)``: workers, nodes' caches, zygotes and blobs, a
    table each.

    Examples
    --------
    >>> from envship.client.status import ClusterStatus
    >>> worker = {"name": "a-0", "address": "tcp://h:1", "nanny": "tcp://h:2",
    ...           "node": "h", "site": None, "environment": None, "id": None,
    ...           "since": None, "unreachable": None}
    >>> "(nanny&#x27;s own)" in cluster_status(ClusterStatus([worker], [], []))
    True
    """
    now = time.time() if now is None else now
    workers = [worker_row(w, now) for w in status.workers]
    nodes = [
        [n["node"], n["site"], n["nannies"], _bytes(n["cache_size"]), n["cache"]]
        for n in status.nodes
    ]
    zygotes = [
        [n["node"], short_name(z["name"], z["id"]), z["pid"], format_bytes(z["rss"])]
        for n in status.nodes
        for z in n.get("zygotes", ())
    ]
    blobs = []
    for b in status.blobs:
        holders = f"{b['complete']} whole, {b['partial']} fetching"
        for t in b["transfers"]:
            sources = ", ".join(t["sources"]) or "–"
            holders += f"; {t['nanny']}: {t['have']}/{t['count']} pieces from {sources}"
        blobs.append([short_name(b["name"], b["id"]), _bytes(b["size"]), holders])
    return _box(
        "envship status",
        _heading("Workers"),
        _table(["worker", "node", "site", "environment", "since"], workers),
        _heading("Node caches"),
        _table(["node", "site", "nannies", "used", "cache folder"], nodes),
        _heading("Zygotes"),
        _table(["node", "environment", "pid", "memory"], zygotes),
        _heading("Environments on the nodes"),
        _table(["environment", "size", "holders"], blobs),
    )


def artifact(artifact: Artifact) -> str:
    """A packed environment: what it is, then its packages.

    Examples
    --------
    >>> from pathlib import Path
    >>> from envship.client.store import Artifact
    >>> m = Manifest(id="0" * 32, name="a&b", kind="conda", python="3.11.7",
    ...              file_count=3, unpacked_size=2048, packages={"numpy": "2.1"})
    >>> html = artifact(Artifact(m.id, m.name, Path("/nowhere"), m))
    >>> "a&amp;b" in html and ">numpy</td>" in html
    True
    """
    manifest = artifact.manifest
    env = artifact.environment
    size = (
        format_bytes(artifact.size)
        if artifact.size is not None and artifact.has_archive
        else "not written yet (pack writes it when a node needs it)"
    )
    rows: list[list[Any]] = [
        ["name", artifact.name],
        ["id", artifact.id],
        ["kind", env.kind],
        ["python", env.python],
        ["files", f"{env.file_count:,}"],
        ["unpacked", format_bytes(env.unpacked_size)],
        ["archive", size],
        ["created", env.created or None],
        ["packed from", env.source_prefix or None],
        ["platform", _platform(env.platform)],
    ]
    if not isinstance(manifest, Manifest):
        base = manifest.base or "the nodes' own environments"
        rows.append(["thin pack of", f"{manifest.thin_of} (base {base})"])
    return _box(
        f"Artifact: {artifact.name}",
        _fields(rows),
        _heading("Packages"),
        _table(["package", "version", "source"], artifact.packages()),
    )


def artifact_store(store: ArtifactStore, artifacts: Iterable[Artifact]) -> str:
    """The store's artifacts, newest first, one row each.

    Examples
    --------
    >>> from envship.client.store import ArtifactStore
    >>> "None." in artifact_store(ArtifactStore("/nowhere"), [])
    True
    """
    names: dict[str, list[str]] = {}
    for name, artifact_id in store.names().items():
        names.setdefault(artifact_id, []).append(name)
    rows = []
    for a in artifacts:
        manifest = a.manifest
        env = manifest if isinstance(manifest, Manifest) else manifest.env
        rows.append(
            [
                ", ".join(names.get(a.id, [])) or a.name,
                a.short_id,
                env.python,
                format_bytes(env.unpacked_size),
                format_bytes(a.size) if a.size is not None else "–",
                env.created or None,
            ]
        )
    return _box(
        f"Artifact store: {store.root}",
        _table(["names", "id", "python", "unpacked", "archive", "created"], rows),
    )


def foreign_environment(env: ForeignEnvironment) -> str:
    """An environment tasks call into, and how to call it.

    Examples
    --------
    >>> from envship.client.foreign import ForeignEnvironment
    >>> html = foreign_environment(ForeignEnvironment("0" * 32, "<py2>", "2.7.18"))
    >>> "&lt;py2&gt;" in html and "<py2>" not in html
    True
    """
    rows = [["name", env.name], ["id", env.id], ["python", env.python]]
    call = "client.submit(env.call, &quot;module.function&quot;, *args)"
    return _box(
        f"Foreign environment: {env.name}",
        _fields(rows),
        _paragraph_html(
            f"Workers stay where they are; tasks call into it: <code>{call}</code>"
        ),
    )


# -- pieces --------------------------------------------------------------------


def _box(title: str, *parts: str) -> str:
    return (
        f'<div style="{_BOX}"><div style="font-weight: bold; margin-bottom: 0.2em">'
        f"{escape(title)}</div>{''.join(parts)}</div>"
    )


def _heading(text: str) -> str:
    return f'<div style="font-weight: bold; margin-top: 0.4em">{escape(text)}</div>'


def _paragraph(text: str) -> str:
    return _paragraph_html(escape(text))


def _paragraph_html(html: str) -> str:
    return f'<p style="margin: 0.2em 0">{html}</p>'


class _Styled(str):
    """Text shown in a style: escaped like any cell, wrapped in a span."""

    style: str


def _styled(text: str, style: str) -> _Styled:
    styled = _Styled(text)
    styled.style = style
    return styled


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    if not rows:
        return _paragraph_html(f'<span style="{_MUTED}">None.</span>')
    head = "".join(f'<th style="{_CELL}">{escape(h)}</th>' for h in header)
    body = "".join(
        "<tr>"
        + "".join(f'<td style="{_CELL}">{_cell(cell)}</td>' for cell in row)
        + "</tr>"
        for row in rows
    )
    return (
        f'<table style="{_TABLE}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def _fields(rows: Sequence[Sequence[Any]]) -> str:
    """A two-column table of a thing's fields, names in bold."""
    body = "".join(
        f'<tr><th style="{_CELL}">{escape(name)}</th>'
        f'<td style="{_CELL}">{_cell(value)}</td></tr>'
        for name, value in rows
    )
    return f'<table style="{_TABLE}"><tbody>{body}</tbody></table>'


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, _Styled):
        return f'<span style="{value.style}">{escape(value)}</span>'
    return escape(str(value))


def _platform(platform: dict[str, str]) -> str | None:
    """``linux x86_64, glibc 2.36`` from a manifest's platform facts."""
    machine = " ".join(platform[k] for k in ("os", "machine") if platform.get(k))
    libc = " ".join(platform[k] for k in ("libc", "libc_version") if platform.get(k))
    return ", ".join(part for part in (machine, libc) if part) or None


def _bytes(size: int | None) -> str:
    return "?" if size is None else format_bytes(size)
