"""Clone an environment to a new prefix by hard links, never writing into it.

A hard link shares the file with the base: writing into it would change the
base. So the clone links only files that installers replace rather than edit
(uv and pip unlink a file before writing one at its path; Python writes
``.pyc`` files to a temporary name and renames it), and copies the rest:

- files that hold the base's prefix (conda's ``paths_data`` entries with a
  ``prefix_placeholder``, scripts in ``bin/``, ``pyvenv.cfg``, activation
  scripts), rewritten for the new prefix;
- ``conda-meta/`` (conda appends to ``history`` in place).

Symlinks are recreated; one that points into the base points into the clone.
This module never runs an installer and never writes under the base.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

#: Files in bin/ larger than this are binaries (python itself), linked as is.
_SCRIPT_LIMIT = 1 << 20


def clone_environment(base: Path, target: Path, kind: str) -> dict[str, int]:
    """Make ``target`` a copy of the environment ``base`` that points at itself.

    Returns counts: ``linked``, ``copied`` (of which ``rewritten``) files.

    Examples
    --------
    >>> import sys, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     base = Path(folder) / "base"
    ...     _ = (base / "bin").mkdir(parents=True)
    ...     _ = (base / "pyvenv.cfg").write_text(f"command = venv {base}\\n")
    ...     counts = clone_environment(base, Path(folder) / "clone", "venv")
    ...     text = (Path(folder) / "clone" / "pyvenv.cfg").read_text()
    ...     counts["rewritten"], str(base) in text
    (1, False)
    """
    old = os.fsencode(base)
    new = os.fsencode(target)
    text_files, binary_files = _prefix_files(base, kind)
    counts = {"linked": 0, "copied": 0, "rewritten": 0}
    for folder, dirs, files in os.walk(base):
        rel_folder = os.path.relpath(folder, base)
        out_folder = target / rel_folder
        out_folder.mkdir(parents=True, exist_ok=True)
        shutil.copymode(folder, out_folder)
        for name in list(dirs) + files:
            source = os.path.join(folder, name)
            rel = os.path.normpath(os.path.join(rel_folder, name))
            out = out_folder / name
            if os.path.islink(source):
                link = os.readlink(source)
                if os.fsencode(link).startswith(old + b"/"):
                    link = os.fsdecode(new + os.fsencode(link)[len(old) :])
                os.symlink(link, out)
                if name in dirs:
                    dirs.remove(name)  # not walked: it is a link
                continue
            if name in dirs:
                continue
            if rel == ".lock":
                continue  # uv's lock of the environment: the clone gets its own
            if rel in text_files or _is_script(rel, source, kind, old):
                counts["rewritten"] += _copy_rewritten(source, out, old, new, text=True)
                counts["copied"] += 1
            elif rel in binary_files:
                counts["rewritten"] += _copy_rewritten(
                    source, out, old, new, text=False
                )
                counts["copied"] += 1
            elif rel.split(os.sep, 1)[0] == "conda-meta":
                shutil.copy2(source, out)
                counts["copied"] += 1
            else:
                try:
                    os.link(source, out)
                    counts["linked"] += 1
                except OSError:  # another filesystem, or links not allowed
                    shutil.copy2(source, out)
                    counts["copied"] += 1
    return counts


def _prefix_files(base: Path, kind: str) -> tuple[set[str], set[str]]:
    """Paths (relative) that hold the base's prefix, as text and as binary."""
    text: set[str] = set()
    binary: set[str] = set()
    if kind == "venv":
        text.add("pyvenv.cfg")
        return text, binary
    for record in (base / "conda-meta").glob("*.json"):
        try:
            meta = json.loads(record.read_text())
        except ValueError:
            continue
        for entry in (meta.get("paths_data") or {}).get("paths", []):
            if "prefix_placeholder" in entry:
                mode = entry.get("file_mode", "text")
                (binary if mode == "binary" else text).add(
                    os.path.normpath(entry["_path"])
                )
    return text, binary


def _is_script(rel: str, source: str, kind: str, old: bytes) -> bool:
    """A text file that names the base: in bin/ (shebangs, activate scripts),
    or a ``.pth`` file (paths the clone must import from itself, not the base)."""
    if os.path.dirname(rel) != "bin" and not rel.endswith(".pth"):
        return False
    if os.path.getsize(source) > _SCRIPT_LIMIT:
        return False
    with open(source, "rb") as f:
        head = f.read(_SCRIPT_LIMIT)
    return old in head and b"\0" not in head


def _copy_rewritten(source: str, out: Path, old: bytes, new: bytes, text: bool) -> int:
    """Copy ``source`` to ``out`` with ``old`` replaced; 1 if it was replaced.

    Binary files keep their length (the new prefix padded with NULs, as conda
    does); one whose new prefix is longer is copied unchanged.
    """
    with open(source, "rb") as f:
        data = f.read()
    if text:
        changed = data.replace(old, new)
    elif len(new) <= len(old):
        changed = _replace_padded(data, old, new)
    else:
        changed = data
    with open(out, "wb") as f:
        f.write(changed)
    shutil.copystat(source, out)
    return int(changed != data)


def _replace_padded(data: bytes, old: bytes, new: bytes) -> bytes:
    """Replace ``old`` in each NUL-terminated string, padding to the same length."""
    parts = data.split(b"\0")
    out = []
    extra = 0
    for part in parts:
        count = part.count(old)
        if count:
            part = part.replace(old, new)
            extra = count * (len(old) - len(new))
            out.append(part + b"\0" * extra)
        else:
            out.append(part)
    return b"\0".join(out)
