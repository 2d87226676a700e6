"""What Jupyter shows of envship's results (their ``_repr_html_``), in headless
Chromium, built from real things: a packed fixture environment with a hostile
name, a real switch on a small cluster, its status, a foreign environment."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest

import envship
from envship import ArtifactStore
from fixtures.browser import dump_dom
from fixtures.cluster import local_cluster

# No "/" (a name is a file in the store), so no "</script>": an open <script>
# would swallow the rest of the page. Run as markup, it would set the title.
HOSTILE = "<script>document.title='pwned';<img src=x onerror=alert(1)> & co"
PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>reprs</title></head><body>
{sections}
</body></html>"""


class Sections(HTMLParser):
    """Per ``<section id=...>``: its tables (rows of cell texts) and its text."""

    def __init__(self, html: str):
        super().__init__()
        self.tables: dict[str, list[list[list[str]]]] = {}
        self.text: dict[str, str] = {}
        self.tags: set[str] = set()
        self.title = ""
        self.section: str | None = None
        self.cell: list[str] | None = None
        self.in_title = False
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag == "section":
            self.section = dict(attrs)["id"]
            self.tables[self.section], self.text[self.section] = [], ""
        elif tag == "table":
            self.tables[self.section].append([])
        elif tag == "tr":
            self.tables[self.section][-1].append([])
        elif tag in ("td", "th"):
            self.cell = []
        elif tag == "title":
            self.in_title = True

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[self.section][-1][-1].append("".join(self.cell))
            self.cell = None
        elif tag == "title":
            self.in_title = False

    def handle_data(self, data):
        if self.in_title:
            self.title += data
        if self.cell is not None:
            self.cell.append(data)
        if self.section is not None:
            self.text[self.section] += data


def in_browser(tmp_path: Path, reprs: dict[str, object]) -> Sections:
    """Each object's ``_repr_html_`` in one page, as Chromium built it."""
    sections = "\n".join(
        f'<section id="{key}">{obj._repr_html_()}</section>'  # type: ignore[attr-defined]
        for key, obj in reprs.items()
    )
    page = tmp_path / "reprs.html"
    page.write_text(PAGE.format(sections=sections), encoding="utf-8")
    return Sections(dump_dom(page.as_uri()))


def fields(table: list[list[str]]) -> dict[str, str]:
    return {row[0]: row[1] for row in table}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("cluster"), {"a": 2}) as c:
        yield c


def test_every_repr_shows_hostile_names_as_text_in_tables(
    cluster, tmp_path, env_prefix, store
):
    client = cluster.client
    artifact = envship.pack(env_prefix("base"), name=HOSTILE, store=store)
    with pytest.warns(UserWarning, match="lacks numpy"):
        report = client.use_environment(artifact)
    assert report.ok
    status = envship.status(client)
    py27 = envship.foreign(
        client, envship.pack(env_prefix("py27"), name=HOSTILE + " 2", store=store)
    )
    page = in_browser(
        tmp_path,
        {
            "report": report,
            "status": status,
            "artifact": artifact,
            "store": ArtifactStore(store),
            "foreign": py27,
        },
    )
    # Nothing ran, nothing became markup: the names are text.
    assert page.title == "reprs"
    assert not page.tags & {"script", "img"}

    (workers,) = page.tables["report"]
    assert workers == [
        ["worker", "environment", "seconds", "status"],
        ["a-0", artifact.id[:12], workers[1][2], "ok"],
        ["a-1", artifact.id[:12], workers[2][2], "ok"],
    ]
    assert "the environment lacks numpy that this client has" in page.text["report"]

    on_workers, caches, zygotes, blobs = page.tables["status"]
    assert on_workers[0] == ["worker", "node", "site", "environment", "since"]
    assert {row[0]: row[3] for row in on_workers[1:]} == {
        "a-0": f"{HOSTILE} ({artifact.id[:8]})",
        "a-1": f"{HOSTILE} ({artifact.id[:8]})",
    }
    assert [row[2] for row in caches[1:]] == ["2"]  # one node, two nannies
    # The two nannies of the node share one zygote.
    assert zygotes[0] == ["node", "environment", "pid", "memory"]
    assert [row[1] for row in zygotes[1:]] == [f"{HOSTILE} ({artifact.id[:8]})"]
    assert f"{HOSTILE} ({artifact.id[:8]})" in [row[0] for row in blobs[1:]]

    about, packages = page.tables["artifact"]
    assert fields(about)["name"] == HOSTILE
    assert fields(about)["id"] == artifact.id
    assert fields(about)["python"] == "3.11.7"
    # Every package, from the table of entries (the manifest names a few).
    assert fields(packages[1:]) == {n: v for n, v, _ in artifact.packages()}
    assert artifact.manifest.packages.items() <= fields(packages[1:]).items()
    assert "distributed" in fields(packages[1:])

    (listed,) = page.tables["store"]
    assert listed[0] == ["names", "id", "python", "unpacked", "archive", "created"]
    assert {row[0]: row[2] for row in listed[1:]} == {
        HOSTILE: "3.11.7",
        HOSTILE + " 2": "2.7.18",
    }

    (about,) = page.tables["foreign"]
    assert fields(about) == {"name": HOSTILE + " 2", "id": py27.id, "python": "2.7.18"}
    assert "client.submit(env.call" in page.text["foreign"]


def test_the_status_repr_lists_each_zygote_or_says_none():
    from envship.client.html import cluster_status
    from envship.client.status import ClusterStatus

    worker = {"name": "a-0", "address": "tcp://h:1", "nanny": "tcp://h:2",
              "node": "h:2049:7", "site": None, "environment": None, "id": None,
              "since": None, "unreachable": None}  # fmt: skip
    node = {"node": "h:2049:7", "site": None, "nannies": 1, "cache": "/scratch",
            "cache_size": 1 << 30}  # fmt: skip
    zygote = {"id": "5f0c2d9a" + "0" * 24, "name": HOSTILE, "pid": 4242,
              "rss": 52 << 20}  # fmt: skip

    shown = cluster_status(ClusterStatus([worker], [{**node, "zygotes": [zygote]}], []))
    page = Sections(f'<section id="status">{shown}</section>')
    assert not page.tags & {"script", "img"}
    on_workers, caches, zygotes = page.tables["status"]
    assert zygotes == [
        ["node", "environment", "pid", "memory"],
        ["h:2049:7", f"{HOSTILE} (5f0c2d9a)", "4242", "52.00 MiB"],
    ]

    shown = cluster_status(ClusterStatus([worker], [{**node, "zygotes": []}], []))
    page = Sections(f'<section id="status">{shown}</section>')
    assert len(page.tables["status"]) == 2  # workers, caches
    assert "ZygotesNone." in page.text["status"]
