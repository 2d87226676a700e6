"""The ``/envship`` dashboard page, in headless Chromium, on a real cluster."""

from __future__ import annotations

import os
import signal
import time
from html.parser import HTMLParser

import envship
from envship.scheduler.dashboard import NANNY_TIMEOUT, render
from envship.scheduler.registry import Registry
from fixtures.browser import dashboard_url, dump_dom
from fixtures.cluster import local_cluster, wait_until

HOSTILE_ENV = "<img src=x onerror=alert(1)>"  # no "/": a name is a file in the store
HOSTILE_SITE = "<script>alert(1)</script>"


class Tables(HTMLParser):
    """Each table's rows of cell texts, each heading, and every tag seen."""

    def __init__(self, html: str):
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.headings: list[str] = []
        self.tags: set[str] = set()
        self.text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th", "h2"):
            self.text = []

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self.text))
        elif tag == "h2":
            self.headings.append("".join(self.text))

    def handle_data(self, data):
        self.text.append(data)


def workers_table(url: str) -> dict[str, list[str]]:
    """The page's workers: name -> [node, site, environment, since]."""
    page = Tables(dump_dom(url))
    assert page.headings == [
        "Workers",
        "Transfers in progress",
        "Node caches",
        "Zygotes",
    ]
    assert "script" not in page.tags and "img" not in page.tags
    header, *rows = page.tables[0]
    assert header == ["worker", "node", "site", "environment", "since"]
    return {row[0]: row[1:] for row in rows}


def test_the_page_shows_each_worker_and_its_environment(tmp_path, env_prefix, store):
    artifact = envship.pack(env_prefix("base"), name=HOSTILE_ENV, store=store)
    assert artifact.name == HOSTILE_ENV
    with local_cluster(tmp_path / "c", {"a": 2}, dashboard=True) as cluster:
        client = cluster.client
        cluster.add_node("b", 1, env={"DASK_ENVSHIP__SITE": HOSTILE_SITE})
        client.wait_for_workers(3, timeout=60)
        # As `dask scheduler --preload envship` would, before anyone switches.
        client.register_plugin(Registry(), name=Registry.name)
        url = dashboard_url(client) + "envship"

        workers = workers_table(url)
        assert sorted(workers) == ["a-0", "a-1", "b-0"]
        assert {w[2] for w in workers.values()} == {"(nanny's own)"}
        assert workers["b-0"][1] == HOSTILE_SITE  # shown as text

        assert client.use_environment(artifact).ok
        wait_until(lambda: len(client.scheduler_info()["workers"]) == 3)
        workers = workers_table(url)
        assert sorted(workers) == ["a-0", "a-1", "b-0"]
        shown = f"{HOSTILE_ENV} ({artifact.id[:8]})"
        assert {w[2] for w in workers.values()} == {shown}
        assert all(w[3].endswith(" ago)") for w in workers.values())

        # A nanny that hangs delays the page by its timeout, no more; the
        # workers unchanged, a load shows the last survey while the next one
        # waits for that nanny, and a later load shows it unreachable.
        (hung,) = cluster.nannies["b"]
        os.kill(hung.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            workers = workers_table(url)
            assert time.monotonic() - started < NANNY_TIMEOUT + 10
            wait_until(
                lambda: workers_table(url)["b-0"][2].startswith("(unreachable"),
                timeout=NANNY_TIMEOUT + 60,
            )
            workers = workers_table(url)
        finally:
            os.kill(hung.pid, signal.SIGCONT)
        assert workers["b-0"][2].startswith("(unreachable: timed out")
        assert workers["a-0"][2] == shown


def test_the_allowed_list_and_contact_are_escaped():
    found = {"workers": [], "nodes": [], "blobs": []}
    html = render(found, ["base", HOSTILE_ENV], "<b>ops</b>", now=0)
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and HOSTILE_ENV not in html
    assert "Ask &lt;b&gt;ops&lt;/b&gt; for another." in html
    assert "Users may ship their own" in render(found, None, None, now=0)


def test_a_transfer_in_progress_is_a_row():
    worker = {
        "name": "a-0",
        "nanny": "tcp://127.0.0.1:4000",
        "node": "n",
        "site": None,
        "environment": None,
        "id": None,
        "since": None,
        "unreachable": None,
    }
    transfer = {
        "nanny": "tcp://127.0.0.1:4000",
        "have": 3,
        "count": 11,
        "bytes": 45 * 2**20,
        "sources": ["client", "tcp://127.0.0.1:4001"],
    }
    blob = {"id": "74ba32d6" + "0" * 24, "name": HOSTILE_ENV, "transfers": [transfer]}
    found = {"workers": [worker], "nodes": [], "blobs": [blob]}
    page = Tables(render(found, None, None, now=0))
    assert page.tables[1] == [
        ["environment", "nanny", "pieces", "size", "sources"],
        [
            f"{HOSTILE_ENV} (74ba32d6)",
            "a-0",
            "3 / 11",
            "45.00 MiB",
            "client, tcp://127.0.0.1:4001",
        ],
    ]


def test_each_zygote_is_a_row_with_its_node():
    node = {
        "node": "n:2049:7",
        "site": None,
        "nannies": 2,
        "cache": "/scratch",
        "cache_size": 1 << 30,
        "zygotes": [
            {"id": "74ba32d6" + "0" * 24, "name": HOSTILE_ENV, "pid": 4242,
             "rss": 52 << 20},
        ],
    }  # fmt: skip
    found = {"workers": [], "nodes": [node], "blobs": []}
    page = Tables(render(found, None, None, now=0))
    assert "img" not in page.tags
    assert page.tables[-1] == [
        ["node", "environment", "pid", "memory"],
        ["n:2049:7", f"{HOSTILE_ENV} (74ba32d6)", "4242", "52.00 MiB"],
    ]
    found["nodes"] = [{**node, "zygotes": []}]
    page = Tables(render(found, None, None, now=0))
    assert page.headings[-1] == "Zygotes" and len(page.tables) == 1  # nodes only
