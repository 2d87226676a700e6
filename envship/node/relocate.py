"""Make an unpacked environment work at its final prefix, on a node.

Conda environments carry conda-pack's ``bin/conda-unpack`` and its prefix
records; venvs carry ``.envship/unpack.json`` (written by ``envship.pack``).
Both are applied to a tree that still sits in a temporary folder, with the
FINAL prefix as the new one, so the tree can be renamed into place complete.
Neither ever writes through a hard link: a file that shares its inode (with
the node's file store) is first replaced by a private copy.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from fnmatch import fnmatchcase
from pathlib import Path

from envship.errors import EnvshipError

from .filestore import unshare

FIXUP_TIMEOUT = 600.0

# Runs conda-pack's conda-unpack inside the environment's own python, but
# with the FINAL prefix as the new one: conda-unpack itself would use its own
# folder, which is still the temp folder. Python 2 and 3.
_CONDA_DRIVER = r"""
import os, shutil, stat, sys, types
tree, final = sys.argv[1], sys.argv[2]
# conda-unpack only needs the progress bar when run as a script; its module
# is not valid Python 2 in conda-pack 0.9.
stub = types.ModuleType('conda_unpack_progress')
stub.progressbar = None
sys.modules['conda_unpack_progress'] = stub
# Executed in a namespace we keep, not with runpy: Python 2's runpy clears
# the globals of the functions it hands back.
script = os.path.join(tree, 'bin', 'conda-unpack')
with open(script, 'rb') as f:
    code = compile(f.read(), script, 'exec')
unpack = {'__name__': 'envship_conda_unpack', '__file__': script}
exec(code, unpack)
for path, placeholder, mode in unpack['_prefix_records']:
    if os.path.isabs(path) or '..' in path.replace('\\', '/').split('/'):
        sys.exit('refusing prefix record outside the environment: %r' % (path,))
    target = os.path.join(tree, path)
    st = os.lstat(target)
    if not stat.S_ISREG(st.st_mode):
        continue
    # conda-pack records every file pip installed, prefix or not: leave
    # those without it alone (and shared with the store).
    wanted = placeholder if isinstance(placeholder, bytes) else placeholder.encode('utf-8')
    with open(target, 'rb') as f:
        if wanted not in f.read():
            continue
    if st.st_nlink > 1:
        # Shared with the node's file store: rewrite a private copy.
        copy = target + '.envship-unshare'
        shutil.copy2(target, copy)
        os.rename(copy, target)
    st = os.stat(target)
    if not st.st_mode & stat.S_IWUSR:
        os.chmod(target, st.st_mode | stat.S_IWUSR)
    unpack['update_prefix'](target, final, placeholder, mode=mode)
    if not st.st_mode & stat.S_IWUSR:
        os.chmod(target, stat.S_IMODE(st.st_mode))
"""


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
    spec_path = tree / ".envship" / "unpack.json"
    repack = "pack the environment again with envship"
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EnvshipError(
            name, "the venv artifact has no .envship/unpack.json", repack
        ) from None
    except ValueError as e:
        raise EnvshipError(
            name, f".envship/unpack.json is not valid JSON ({e})", repack
        ) from None
    old = spec.get("prefix") if isinstance(spec, dict) else None
    text_files = spec.get("text_files", []) if isinstance(spec, dict) else None
    links = spec.get("links", {}) if isinstance(spec, dict) else None
    if (
        not isinstance(old, str)
        or not os.path.isabs(old)
        or not isinstance(text_files, list)
        or not all(isinstance(p, str) for p in text_files)
        or not isinstance(links, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in links.items())
    ):
        raise EnvshipError(name, ".envship/unpack.json is malformed", repack)
    root = os.path.realpath(tree)
    old_bytes = os.fsencode(old)
    new_bytes = os.fsencode(final)
    for rel in text_files:
        path = os.path.realpath(os.path.join(root, rel))
        if os.path.isabs(rel) or not path.startswith(root + os.sep):
            raise EnvshipError(
                name, f"unpack.json lists {rel!r}, outside the environment", repack
            )
        _replace_in_file(path, old_bytes, new_bytes)
    for rel, target in links.items():
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
    """Run the archive's conda-unpack with ``final`` as the new prefix."""
    if not (tree / "bin" / "conda-unpack").is_file():
        return  # packed for a fixed destination: nothing to rewrite
    python = tree / "bin" / "python"
    if not python.exists():
        raise EnvshipError(
            name,
            "the conda environment has no bin/python to run conda-unpack with",
            "pack an environment that has python installed",
        )
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PYTHON", "CONDA", "__PYVENV")) and key != "VIRTUAL_ENV"
    }
    command = [
        str(python),
        "-E",
        "-s",
        "-B",
        "-c",
        _CONDA_DRIVER,
        str(tree),
        str(final),
    ]
    try:
        done = subprocess.run(
            command,
            env=environ,
            cwd=tree,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=FIXUP_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        raise EnvshipError(
            name,
            f"conda-unpack did not finish within {FIXUP_TIMEOUT:.0f} s",
            "look for a hung process on this node and try again",
        ) from None
    except OSError as e:
        raise EnvshipError(
            name,
            f"its python could not run on this node to fix prefixes ({e})",
            "pack the environment on the platform of the nodes (same OS and CPU)",
        ) from None
    if done.returncode != 0:
        stderr = done.stderr.decode("utf-8", "replace").strip()
        raise EnvshipError(
            name,
            f"conda-unpack failed on this node (exit code {done.returncode}):\n"
            + stderr[-4000:],
            "pack the environment on the platform of the nodes; if it was, "
            "pack it again",
        )
