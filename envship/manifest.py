"""What a packed environment says about itself, typed and checked.

A manifest travels from the client to the nodes (inside an offer) and is
stored next to each archive, so it is read from JSON written elsewhere:
:meth:`Manifest.from_dict` checks every field's type and bounds and raises
``ValueError`` naming the field, before anything uses it. A thin pack (see
:mod:`envship.table`) has a :class:`ThinManifest` that carries the
environment's own.

This module knows nothing of conda, nodes or Dask.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .archive import is_id

FORMAT_VERSION = 1
KINDS = ("conda", "venv")
#: Far beyond any real environment: a bound for what a sender may declare.
MAX_SIZE = 1 << 44
MAX_FILES = 1 << 24
MAX_TEXT = 4096
_PYTHON = re.compile(r"\d+\.\d+(\.\d+)?\S{0,16}")


@dataclass(frozen=True)
class Manifest:
    """An environment's manifest.

    Examples
    --------
    >>> m = Manifest(id="0" * 32, name="demo", kind="conda", python="3.11.7",
    ...              file_count=1, unpacked_size=3)
    >>> Manifest.from_dict(m.to_dict()) == m
    True
    >>> Manifest.from_dict({**m.to_dict(), "kind": "docker"})
    Traceback (most recent call last):
    ...
    ValueError: manifest field 'kind': one of ('conda', 'venv'), not 'docker'
    """

    id: str
    name: str
    kind: str
    python: str
    file_count: int
    unpacked_size: int
    packages: dict[str, str] = field(default_factory=dict)
    platform: dict[str, str] = field(default_factory=dict)
    source_prefix: str = ""
    created: str = ""
    #: Bytes of the compressed archive; None until it is written.
    packed_size: int | None = None
    format: int = FORMAT_VERSION
    #: How the client made it (seconds, files read, level): shown, never used.
    stats: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """A manifest from its JSON form; ValueError for anything malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"a manifest must be a dict, not {type(data).__name__}")
        get = _Fields(data)
        kind = get.text("kind")
        if kind not in KINDS:
            raise ValueError(f"manifest field 'kind': one of {KINDS}, not {kind!r}")
        python = get.text("python")
        if not _PYTHON.fullmatch(python):
            raise ValueError(f"manifest field 'python': not a version: {python!r}")
        return cls(
            id=get.id("id"),
            name=get.text("name"),
            kind=kind,
            python=python,
            file_count=get.count("file_count", MAX_FILES),
            unpacked_size=get.count("unpacked_size", MAX_SIZE),
            packages=get.texts("packages"),
            platform=get.texts("platform"),
            source_prefix=get.text("source_prefix", ""),
            created=get.text("created", ""),
            packed_size=get.count_or_none("packed_size", MAX_SIZE),
            format=get.count("format", 1 << 16, FORMAT_VERSION),
            stats=get.numbers("stats"),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> Manifest:
        return replace(self, **changes)


@dataclass(frozen=True)
class ThinManifest:
    """A thin pack's manifest: its own id and the environment it unpacks to.

    ``base`` is the environment whose files its references were chosen from,
    or None for files of the nodes' own environments (see
    :mod:`envship.node.own_files`); ``files`` and ``refs`` count the files it
    carries and refers to.
    """

    id: str
    thin_of: str
    base: str | None
    env: Manifest
    packed_size: int
    files: int
    refs: int

    @property
    def name(self) -> str:
        return self.env.name

    @classmethod
    def from_dict(cls, data: Any) -> ThinManifest:
        if not isinstance(data, dict):
            raise ValueError(f"a manifest must be a dict, not {type(data).__name__}")
        get = _Fields(data)
        env = Manifest.from_dict(data.get("env"))
        thin_of = get.id("thin_of")
        if env.id != thin_of:
            raise ValueError("manifest field 'env': not the manifest of 'thin_of'")
        return cls(
            id=get.id("id"),
            thin_of=thin_of,
            base=None if data.get("base") is None else get.id("base"),
            env=env,
            packed_size=get.count("packed_size", MAX_SIZE),
            files=get.count("files", MAX_FILES),
            refs=get.count("refs", MAX_FILES),
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "name": self.name, "env": self.env.to_dict()}


def blob_manifest(data: Any) -> Manifest | ThinManifest:
    """The manifest of a blob: a thin pack's if it names ``thin_of``."""
    if isinstance(data, dict) and "thin_of" in data:
        return ThinManifest.from_dict(data)
    return Manifest.from_dict(data)


class _Fields:
    """Typed reads of a JSON dict, each a ValueError naming the field."""

    _MISSING = object()

    def __init__(self, data: dict):
        self.data = data

    def _get(self, key: str, default):
        value = self.data.get(key, default)
        if value is self._MISSING:
            raise ValueError(f"manifest field {key!r} is missing")
        return value

    def id(self, key: str) -> str:
        value = self._get(key, self._MISSING)
        if not is_id(value):
            raise ValueError(f"manifest field {key!r}: not a content id: {value!r}")
        return value

    def text(self, key: str, default=_MISSING) -> str:
        value = self._get(key, default)
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise ValueError(f"manifest field {key!r}: not a short text: {value!r}")
        return value

    def count(self, key: str, most: int, default=_MISSING) -> int:
        value = self._get(key, default)
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not (0 <= value <= most)
        ):
            raise ValueError(f"manifest field {key!r}: not a count: {value!r}")
        return value

    def count_or_none(self, key: str, most: int) -> int | None:
        """Like :meth:`count`, but a missing field or null is None."""
        if self.data.get(key) is None:
            return None
        return self.count(key, most)

    def texts(self, key: str) -> dict[str, str]:
        value = self._get(key, {})
        if not isinstance(value, dict) or len(value) > 100_000:
            raise ValueError(f"manifest field {key!r}: not a table of texts")
        for k, v in value.items():
            if not isinstance(v, str) or len(k) > MAX_TEXT or len(v) > MAX_TEXT:
                raise ValueError(f"manifest field {key!r}: not a table of texts")
        return dict(value)

    def numbers(self, key: str) -> dict[str, float]:
        value = self._get(key, {})
        if not isinstance(value, dict) or len(value) > 64:
            raise ValueError(f"manifest field {key!r}: not a table of numbers")
        for k, v in value.items():
            if not isinstance(v, int | float) or isinstance(v, bool) or len(k) > 64:
                raise ValueError(f"manifest field {key!r}: not a table of numbers")
        return dict(value)


_CONDA_META = re.compile(r"conda-meta/([^/]+)-([^-/]+)-([^-/]+)\.json")
_DIST_INFO = re.compile(
    r"site-packages/([A-Za-z0-9_.]+?)-([0-9][^-/]*?)(?:-py[0-9.]+)?\.(?:dist|egg)-info"
)


def normalize_name(name: str) -> str:
    """A distribution's name as PEP 503 compares them.

    Examples
    --------
    >>> normalize_name("Scikit_Learn")
    'scikit-learn'
    """
    return re.sub(r"[-_.]+", "-", name).lower()


def packages_of(paths: Iterable[str]) -> list[tuple[str, str, str]]:
    """Packages from the paths of an environment's entries: (name, version, source).

    Each ``conda-meta/<name>-<version>-<build>.json`` is a conda package, each
    ``<name>-<version>.dist-info`` (or ``.egg-info``) that conda did not
    install is a pip package.

    Examples
    --------
    >>> packages_of([
    ...     "conda-meta/numpy-1.26.4-py311h64a7726_0.json",
    ...     "lib/python3.11/site-packages/numpy-1.26.4.dist-info",
    ...     "lib/python3.11/site-packages/cloudpickle-3.0.0.dist-info/RECORD",
    ... ])
    [('cloudpickle', '3.0.0', 'pip'), ('numpy', '1.26.4', 'conda')]
    """
    conda: dict[str, str] = {}
    pip: dict[str, str] = {}
    for path in paths:
        m = _CONDA_META.fullmatch(path)
        if m:
            conda[m.group(1)] = m.group(2)
            continue
        m = _DIST_INFO.search(path)
        if m:
            pip.setdefault(normalize_name(m.group(1)), m.group(2))
    by_normal = {normalize_name(n) for n in conda}
    found = [(n, v, "conda") for n, v in conda.items()]
    found += [(n, v, "pip") for n, v in pip.items() if n not in by_normal]
    return sorted(found, key=lambda p: p[0].lower())
