"""Make an unpacked environment work at its final prefix, on a node.

Every artifact carries its unpack record, ``.envship/unpack.json`` (written by
``envship.pack``, see :mod:`envship.unpack_record`): for a venv, its text
files and base interpreter links; for a conda environment, conda-pack's prefix
records. (Conda artifacts packed before envship wrote that record carry the
same records only in conda-pack's ``bin/conda-unpack``: they are read from
there, parsed, never run.) Both are applied to a tree that still sits in a
temporary folder, with the FINAL prefix as the new one, so the tree can be
renamed into place complete.
Neither ever writes through a hard link: a file that shares its inode (with
the node's file store) is first replaced by a private copy.
"""

from __future__ import annotations

import ast
import json
import os
import stat
from fnmatch import fnmatchcase
from pathlib import Path

from conda_pack.prefixes import update_prefix

from envship.errors import EnvshipError
from envship.unpack_record import (
    UNPACK_FILE,
    CondaRecord,
    PrefixRecord,
    VenvRecord,
    check_prefix_records,
)

from .filestore import unshare

#: Largest bin/conda-unpack read for its records (conda-pack writes a few
#: kilobytes of code and one line per file with a prefix).
MAX_UNPACK_SCRIPT = 64 << 20
#: Largest unpack record read (the same records as JSON: a little larger).
MAX_UNPACK_RECORD = 2 * MAX_UNPACK_SCRIPT
_REPACK = "pack the environment again with envship"


def fixup_venv(
    tree: str | os.PathLike, final_prefix: str | os.PathLike, *, env: str | None = None
) -> None:
    """Make an unpacked venv work at ``final_prefix``.

    The packer leaves ``.envship/unpack.json`` in the tree::

        {"prefix": "/old/prefix",
         "text_files": ["bin/activate", "bin/dask", ...],
         "links": {"bin/python": "/usr/bin/python3.11", ...}}

    Every ``/old/prefix`` in the listed text files becomes ``final_prefix``,
    and the ``bin/python*`` symlinks to the base interpreter are made; that
    interpreter must exist on this node.

    Parameters
    ----------
    tree : path
        Where the venv is unpacked now (a temp folder).
    final_prefix : path
        Where it will live.
    env : str, optional
        The environment's name, for messages.

    Raises
    ------
    EnvshipError
        ``unpack.json`` is missing or malformed, or a base interpreter is
        missing on this node.

    Examples
    --------
    >>> fixup_venv("/cache/tmp/abc-install-x", "/cache/abc")  # doctest: +SKIP
    """
    tree = Path(tree)
    final = os.fspath(final_prefix)
    name = env or tree.name
    repack = _REPACK
    spec = _read_record(tree, name)
    if spec is None:
        raise EnvshipError(name, f"the venv artifact has no {UNPACK_FILE}", repack)
    try:
        record = VenvRecord.from_dict(spec)
    except ValueError:
        raise EnvshipError(name, f"{UNPACK_FILE} is malformed", repack) from None
    root = os.path.realpath(tree)
    old_bytes = os.fsencode(record.prefix)
    new_bytes = os.fsencode(final)
    for rel in record.text_files:
        path = os.path.realpath(os.path.join(root, rel))
        if os.path.isabs(rel) or not path.startswith(root + os.sep):
            raise EnvshipError(
                name, f"unpack.json lists {rel!r}, outside the environment", repack
            )
        _replace_in_file(path, old_bytes, new_bytes)
    for rel, target in record.links.items():
        if not fnmatchcase(rel, "bin/python*") or "/" in rel[len("bin/") :]:
            raise EnvshipError(
                name,
                f"unpack.json asks for a link {rel!r}; only bin/python* links are made",
                repack,
            )
        if not os.path.isabs(target) or not os.access(target, os.X_OK):
            raise EnvshipError(
                name,
                f"the venv needs the base interpreter {target} on this node, and "
                "it is not there",
                f"use a conda environment (it carries its own python), or install "
                f"{target} on every node",
            )
        link = tree / rel
        if link.is_symlink():
            link.unlink()
        elif os.path.lexists(link):
            raise EnvshipError(
                name, f"{rel} is in the archive and also listed as a link", repack
            )
        os.symlink(target, link)


def _read_record(tree: Path, name: str) -> object | None:
    """The parsed JSON of the tree's unpack record; None if it has none."""
    path = tree / UNPACK_FILE
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_UNPACK_RECORD + 1)
    except FileNotFoundError:
        return None
    if len(data) > MAX_UNPACK_RECORD:
        raise EnvshipError(name, f"{UNPACK_FILE} is too large", _REPACK)
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as e:
        raise EnvshipError(
            name, f"{UNPACK_FILE} is not valid JSON ({e})", _REPACK
        ) from None


def _replace_in_file(path: str, old: bytes, new: bytes) -> None:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        return
    unshare(path)
    mode = stat.S_IMODE(st.st_mode)
    if not mode & stat.S_IWUSR:
        os.chmod(path, mode | stat.S_IWUSR)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "r+b") as f:
            data = f.read()
            if old in data:
                f.seek(0)
                f.write(data.replace(old, new))
                f.truncate()
    finally:
        if not mode & stat.S_IWUSR:
            os.chmod(path, mode)


def fixup_conda(tree: Path, final: Path, name: str) -> None:
    """Apply the archive's conda-pack prefix records with ``final`` as the new prefix.

    The records ``(path, placeholder, mode)`` of files that hold the packing
    prefix are the ones conda-pack writes into ``bin/conda-unpack``; they are
    read from the unpack record, or for an artifact packed before envship
    wrote it, from the script (parsed, never run). They are applied with the
    nanny's own conda-pack (``update_prefix``), so no interpreter of the
    environment runs here and nothing can write outside the tree. conda-pack
    lists every file pip installed; only those that do hold their placeholder
    are rewritten (as private copies, see
    :func:`~envship.node.filestore.unshare`).

    Raises
    ------
    EnvshipError
        The record is malformed or the script is not conda-pack's, a record
        names a path outside the environment or missing from it, or a binary
        rewrite would change a file's length.
    """
    spec = _read_record(tree, name)
    if spec is not None:
        try:
            records = CondaRecord.from_dict(spec).prefix_records
        except ValueError:
            raise EnvshipError(name, f"{UNPACK_FILE} is malformed", _REPACK) from None
        lister = "unpack.json"
    else:
        script = tree / "bin" / "conda-unpack"
        if not script.is_file():
            return  # packed for a fixed destination: nothing to rewrite
        records = _prefix_records(script, name)
        lister = "conda-unpack"
    root = os.path.realpath(tree)
    for path, placeholder, mode in records:
        target = os.path.realpath(os.path.join(root, path))
        if os.path.isabs(path) or not target.startswith(root + os.sep):
            raise EnvshipError(
                name,
                f"{lister} lists {path!r}, outside the environment",
                _REPACK,
            )
        try:
            st = os.stat(target)
            if not stat.S_ISREG(st.st_mode):
                continue
            with open(target, "rb") as f:
                if placeholder.encode() not in f.read():
                    continue
            unshare(target)
            mode_bits = stat.S_IMODE(st.st_mode)
            os.chmod(target, mode_bits | stat.S_IWUSR)
            try:
                update_prefix(target, os.fspath(final), placeholder, mode=mode)
            finally:
                os.chmod(target, mode_bits)
        except FileNotFoundError:
            raise EnvshipError(
                name, f"{lister} lists {path!r}, which it does not hold", _REPACK
            ) from None
        except ValueError as e:  # a binary rewrite that changes the length
            raise EnvshipError(
                name, f"its prefix could not be rewritten in {path}: {e}", _REPACK
            ) from None


def _prefix_records(script: Path, name: str) -> list[PrefixRecord]:
    """The ``_prefix_records`` literal of a conda-unpack script, checked."""
    bad = EnvshipError(
        name, "its bin/conda-unpack is not one that conda-pack writes", _REPACK
    )
    if script.stat().st_size > MAX_UNPACK_SCRIPT:
        raise bad
    try:
        module = ast.parse(script.read_bytes(), filename=str(script))
        (value,) = [
            node.value
            for node in module.body
            if isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["_prefix_records"]
        ]
        records = ast.literal_eval(value)
        if not isinstance(records, list) or not all(
            isinstance(r, tuple) for r in records
        ):
            raise ValueError("not conda-pack's list of tuples")
        return check_prefix_records(records)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        raise bad from None
