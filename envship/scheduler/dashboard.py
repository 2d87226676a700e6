"""The ``/envship`` page of the scheduler's dashboard.

Served by the scheduler's own HTTP server, next to distributed's pages (and
under the same ``--dashboard-prefix``): what every worker runs in since when,
the transfers in progress, each node's cache use and zygotes (the processes
workers fork from, one per environment), and which environments users may use
(``envship.allowed``, ``envship.contact``). The scheduler gathers it itself,
like ``envship.status`` does (:func:`envship.survey.survey`), giving each
nanny a few seconds, so a dead nanny never hangs the page. Page loads and
``envship.status`` calls share one gathering
(:class:`envship.survey.SharedSurvey`): browsers on the page, each reloading
it every 2 s, cost the scheduler at most ``PAGE_CPU_SHARE`` of a core; a load
waits for the nannies only when the workers or the registry changed, else it
shows the last survey while the next one is gathered.

Everything shown is escaped (environment, worker and site names come from
users), and the page allows no script at all. It reloads itself every 2 s.
"""

from __future__ import annotations

import time
import weakref
from html import escape

from dask.utils import format_bytes
from tornado import web

from envship import policy
from envship.survey import (
    EMPTY_REGISTRY,
    PAGE_CPU_SHARE,
    SharedSurvey,
    survey,
    survey_key,
)
from envship.text_table import short_name, worker_row

#: Seconds each nanny has to answer before the page shows it as unreachable.
NANNY_TIMEOUT = 5.0
#: Seconds between reloads of the page.
REFRESH = 2
#: Applications that serve the page already (a plugin registered twice).
_serving: weakref.WeakSet = weakref.WeakSet()
#: Each scheduler's shared survey, for all its page loads.
_shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_survey(scheduler) -> SharedSurvey:
    """The :class:`~envship.survey.SharedSurvey` of ``scheduler``'s page loads
    and ``envship_survey`` calls.

    Examples
    --------
    >>> shared_survey(scheduler).gathered  # doctest: +SKIP
    3
    """
    shared = _shared.get(scheduler)
    if shared is None:
        shared = _shared[scheduler] = SharedSurvey(
            cpu_share=PAGE_CPU_SHARE, serve_stale=True
        )
    return shared


async def page_survey(scheduler, registry) -> dict:
    """What the page shows: a survey of ``scheduler``'s nannies, shared.

    ``registry`` is the registry plugin, or None. The state shown is no
    older than the last change of the workers or the registry; the nannies'
    own figures (transfers, cache sizes) may be a few seconds old.

    Examples
    --------
    >>> found = await page_survey(scheduler, registry)  # doctest: +SKIP
    >>> sorted(found)  # doctest: +SKIP
    ['blobs', 'nodes', 'workers']
    """
    identity = scheduler.identity()
    state = registry.snapshot().to_msg() if registry is not None else EMPTY_REGISTRY
    return await shared_survey(scheduler).get(
        survey_key(identity, state),
        lambda: survey(scheduler.rpc, identity, state, timeout=NANNY_TIMEOUT),
    )


def add_page(scheduler, plugin_name: str) -> None:
    """Serve ``/envship`` from ``scheduler``'s dashboard, if it has an HTTP server.

    ``plugin_name`` names the registry plugin that the page reads, looked up
    at every request, so a registry registered again is the one shown.

    Examples
    --------
    >>> add_page(scheduler, "envship-registry")  # doctest: +SKIP
    >>> # then open http://scheduler:8787/envship
    """
    application = getattr(scheduler, "http_application", None)
    if application is None or application in _serving:
        return
    _serving.add(application)
    target = {"scheduler": scheduler, "plugin_name": plugin_name}
    path = dashboard_prefix(application) + "envship"
    application.add_handlers(r".*", [(path, EnvshipPage, target)])


def dashboard_prefix(application) -> str:
    """The dashboard's ``--dashboard-prefix``, read off distributed's ``health`` page.

    Examples
    --------
    >>> dashboard_prefix(scheduler.http_application)  # doctest: +SKIP
    '/'
    """
    for rule in application.wildcard_router.rules:
        pattern = getattr(rule.matcher, "regex", None)
        if pattern is not None and pattern.pattern.endswith("/health$"):
            return pattern.pattern.removesuffix("health$")
    return "/"


class EnvshipPage(web.RequestHandler):
    """``GET /envship``: the page, gathered afresh unless another load just did."""

    def initialize(self, scheduler, plugin_name: str) -> None:
        self.scheduler = scheduler
        self.plugin_name = plugin_name

    async def get(self) -> None:
        registry = self.scheduler.plugins.get(self.plugin_name)
        found = await page_survey(self.scheduler, registry)
        rules = registry.policy if registry is not None else policy.current()
        allowed, contact = rules.allowed, rules.contact
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header(
            "Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"
        )
        self.write(render(found, allowed, contact, now=time.time()))


def render(found: dict, allowed, contact, now: float) -> str:
    """The page's HTML for a :func:`~envship.survey.survey`, every value escaped.

    Parameters
    ----------
    found : dict
        ``workers``, ``nodes``, ``blobs`` as :func:`~envship.survey.survey` gives.
    allowed : list of str or None
        ``envship.allowed``: environment names or ids users may use; None:
        users may ship their own.
    contact : str or None
        ``envship.contact``: whom to ask for another environment.
    now : float
        Unix time, for "since".

    Examples
    --------
    >>> worker = {"name": "<b>w</b>", "nanny": "tcp://10.0.0.1:4000",
    ...           "node": None, "site": None, "environment": None, "id": None,
    ...           "since": None, "unreachable": None}
    >>> found = {"workers": [worker], "nodes": [], "blobs": []}
    >>> "&lt;b&gt;w&lt;/b&gt;" in render(found, None, None, now=0)
    True
    """
    names = {w["nanny"]: w["name"] for w in found["workers"]}
    workers = [worker_row(w, now) for w in found["workers"]]
    transfers = [
        [
            short_name(b["name"], b["id"]),
            names.get(t["nanny"], t["nanny"]),
            f"{t['have']} / {t['count']}",
            format_bytes(t["bytes"]),
            ", ".join(t["sources"]) or "–",
        ]
        for b in found["blobs"]
        for t in b["transfers"]
    ]
    nodes = [
        [n["node"], n["site"], n["nannies"], n["cache"], _bytes(n["cache_size"])]
        for n in found["nodes"]
    ]
    zygotes = [
        [n["node"], short_name(z["name"], z["id"]), z["pid"], format_bytes(z["rss"])]
        for n in found["nodes"]
        for z in n.get("zygotes", ())
    ]
    return PAGE.format(
        refresh=REFRESH,
        allowed=_allowed(allowed, contact),
        workers=_table(["worker", "node", "site", "environment", "since"], workers),
        transfers=_table(
            ["environment", "nanny", "pieces", "size", "sources"], transfers
        ),
        nodes=_table(["node", "site", "nannies", "cache folder", "used"], nodes),
        zygotes=_table(["node", "environment", "pid", "memory"], zygotes),
    )


def _bytes(size: int | None) -> str:
    return "?" if size is None else format_bytes(size)


def _allowed(allowed, contact) -> str:
    if allowed is None:
        text = "Users may ship their own environments."
    else:
        names = [allowed] if isinstance(allowed, str) else list(allowed)
        listed = ", ".join(f"<code>{escape(str(n))}</code>" for n in names)
        text = f"Users may use only: {listed or 'none'}."
    if contact:
        text += f" Ask {escape(str(contact))} for another."
    return text


def _table(header: list[str], rows: list[list]) -> str:
    if not rows:
        return '<p class="none">None.</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(cell)}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value) -> str:
    return "–" if value is None else escape(str(value))


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh}">
<title>envship</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; color: #222; margin: 1.5em 2em; }}
nav a {{ color: #555; margin-right: 1em; }}
h1 {{ font-size: 1.5em; margin: 0.6em 0 0.2em; }}
h2 {{ font-size: 1.1em; margin: 1.6em 0 0.4em; }}
.allowed {{ color: #444; }}
table {{ border-collapse: collapse; }}
th, td {{ text-align: left; padding: 0.25em 1.2em 0.25em 0; vertical-align: top; }}
th {{ border-bottom: 1px solid #bbb; font-weight: 600; }}
tbody tr:nth-child(even) {{ background: #f4f5f7; }}
.none {{ color: #888; }}
</style>
</head>
<body>
<nav><a href="status">Dashboard</a><a href="info/main/workers.html">Workers</a></nav>
<h1>envship</h1>
<p class="allowed">{allowed}</p>
<h2>Workers</h2>
{workers}
<h2>Transfers in progress</h2>
{transfers}
<h2>Node caches</h2>
{nodes}
<h2>Zygotes</h2>
{zygotes}
</body>
</html>
"""
