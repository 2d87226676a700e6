"""Atomic writes: a file appears whole, by a rename, or not at all.

Every file envship writes for another process to read (the client's store,
the node cache's manifests, records and leases, a nanny's kept record) is
written to a temporary file on the same filesystem and renamed into place
(``os.replace``) only once it is complete; a failure removes the temporary
file. Readers never see half a file.

Not fsynced, as none of these files were before: a machine that crashes
may lose the last write, which every reader treats as a file not written
yet (a store entry or cache record missing is rebuilt or refetched).

This module sits at the bottom (standard library only): client and node use
it alike. It knows nothing of where envship keeps what.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


@contextmanager
def temporary_file(
    folder: str | os.PathLike[str], *, prefix: str = ".tmp-", suffix: str = ".part"
) -> Iterator[tuple[BinaryIO, Path]]:
    """A new file in ``folder`` (mode 0600), removed if the block fails.

    For a file whose final name is known only once it is written (named by
    its digest): the caller renames it with ``os.replace`` after the block.
    Otherwise use :func:`atomic_file`, which renames it itself.

    Examples
    --------
    >>> import hashlib, os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with temporary_file(folder) as (f, tmp):
    ...     _ = f.write(b"hello")
    >>> name = hashlib.sha256(tmp.read_bytes()).hexdigest()[:8]
    >>> os.replace(tmp, os.path.join(folder, name))
    >>> os.listdir(folder)
    ['2cf24dba']
    """
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f, path
    except BaseException:
        path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(
    path: str | os.PathLike[str], *, temp_dir: str | os.PathLike[str] | None = None
) -> Iterator[BinaryIO]:
    """Write ``path``: it appears (replacing what was there) only if the block succeeds.

    Parameters
    ----------
    path : path
        The file to write.
    temp_dir : path, optional
        Where the temporary file is made; default the folder of ``path``.
        Must be on the same filesystem. A folder whose every file is read
        as an entry (names, leases) wants its temporary files elsewhere.

    Examples
    --------
    >>> import os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "greeting")
    >>> with atomic_file(target) as f:
    ...     _ = f.write(b"hello")
    >>> open(target).read()
    'hello'
    >>> with atomic_file(target) as f:
    ...     _ = f.write(b"half")
    ...     raise RuntimeError("interrupted")
    Traceback (most recent call last):
    RuntimeError: interrupted
    >>> open(target).read(), os.listdir(os.path.dirname(target))
    ('hello', ['greeting'])
    """
    final = Path(path)
    folder = final.parent if temp_dir is None else temp_dir
    with temporary_file(folder, prefix=f".tmp-{final.name}-") as (f, tmp):
        yield f
        f.close()
        os.replace(tmp, final)


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    temp_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, temp_dir=temp_dir) as f:
        f.write(data)


def write_json_atomic(
    path: str | os.PathLike[str],
    data: Any,
    *,
    indent: int | None = 1,
    temp_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Write ``data`` as JSON (keys sorted, a final newline) to ``path`` atomically.

    Examples
    --------
    >>> import os, tempfile
    >>> target = os.path.join(tempfile.mkdtemp(), "record.json")
    >>> write_json_atomic(target, {"b": 1, "a": [2]}, indent=None)
    >>> open(target).read()
    '{"a": [2], "b": 1}\\n'
    """
    text = json.dumps(data, indent=indent, sort_keys=True) + "\n"
    write_atomic(path, text.encode(), temp_dir=temp_dir)
