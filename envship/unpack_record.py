"""The unpack record: what a node needs to make an environment work at its prefix.

:func:`envship.pack` writes it into every artifact, at :data:`UNPACK_FILE`;
:mod:`envship.node.relocate` reads it on the node, from a tree that came over
the network, so :meth:`VenvRecord.from_dict` and :meth:`CondaRecord.from_dict`
check every field's type and raise ``ValueError`` naming it. Paths in a record
are relative to the environment; checking that they stay inside the tree is
the reader's part (it holds the tree).

- A venv's record: its packing prefix, the text files that hold it, and the
  ``bin/python*`` links to the base interpreter that the packer left out.
- A conda environment's record: conda-pack's prefix records
  (``Packer.prefixes``, as its ``bin/conda-unpack`` lists them), so that the
  node never has to parse that script.

This module reads and writes no files and knows nothing of nodes or Dask.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

#: Where the record lives inside an unpacked environment.
UNPACK_FILE = ".envship/unpack.json"
#: conda-pack's modes of a prefix record.
PREFIX_MODES = ("text", "binary")


@dataclass(frozen=True)
class VenvRecord:
    """How to move a venv from its packing prefix to another.

    Examples
    --------
    >>> r = VenvRecord("/home/me/venv", ["bin/dask"], {"bin/python": "/usr/bin/python3"})
    >>> VenvRecord.from_dict(json.loads(r.to_json())) == r
    True
    >>> VenvRecord.from_dict({"prefix": "venv"})
    Traceback (most recent call last):
    ...
    ValueError: prefix: not an absolute path
    """

    prefix: str
    text_files: list[str] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: object) -> VenvRecord:
        """The record in ``data`` (parsed JSON), checked; ValueError if malformed."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        prefix = data.get("prefix")
        text_files = data.get("text_files", [])
        links = data.get("links", {})
        if not isinstance(prefix, str) or not os.path.isabs(prefix):
            raise ValueError("prefix: not an absolute path")
        if not isinstance(text_files, list) or not all(
            isinstance(p, str) for p in text_files
        ):
            raise ValueError("text_files: not a list of paths")
        if not isinstance(links, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in links.items()
        ):
            raise ValueError("links: not a mapping of paths to paths")
        return cls(prefix, text_files, links)


#: ``(path, placeholder, mode)``: ``path`` holds ``placeholder``, as text or binary.
PrefixRecord = tuple[str, str, str]


@dataclass(frozen=True)
class CondaRecord:
    """conda-pack's prefix records of a conda environment.

    Examples
    --------
    >>> r = CondaRecord([("bin/dask", "/opt/env", "text")])
    >>> CondaRecord.from_dict(json.loads(r.to_json())) == r
    True
    >>> CondaRecord.from_dict({"prefix_records": [["bin/dask", "/opt/env", "exec"]]})
    Traceback (most recent call last):
    ...
    ValueError: prefix_records: not a list of (path, placeholder, text|binary)
    """

    prefix_records: list[PrefixRecord]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_dict(cls, data: object) -> CondaRecord:
        """The record in ``data`` (parsed JSON), checked; ValueError if malformed."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return cls(check_prefix_records(data.get("prefix_records")))


def check_prefix_records(records: object) -> list[PrefixRecord]:
    """``records`` as a list of :data:`PrefixRecord`; ValueError if it is not one.

    For a record of JSON (lists) and for the ``_prefix_records`` literal of a
    ``conda-unpack`` script (tuples) alike.

    Examples
    --------
    >>> check_prefix_records([["etc/a.txt", "/opt/env", "binary"]])
    [('etc/a.txt', '/opt/env', 'binary')]
    """
    if not isinstance(records, list) or not all(
        isinstance(r, (list, tuple))
        and len(r) == 3
        and all(isinstance(x, str) for x in r)
        and r[1]
        and r[2] in PREFIX_MODES
        for r in records
    ):
        raise ValueError(
            "prefix_records: not a list of (path, placeholder, text|binary)"
        )
    return [(path, placeholder, mode) for path, placeholder, mode in records]
