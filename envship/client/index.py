"""The package index a build uses: the user's pip configuration, as uv arguments.

uv reads its own configuration (``UV_INDEX_URL``, ``UV_DEFAULT_INDEX``,
``UV_EXTRA_INDEX_URL``, ``UV_INDEX``, ``UV_FIND_LINKS``, ``UV_NO_INDEX``,
``uv.toml``, ``[tool.uv]``) by itself, but not pip's. A site behind an
institution's mirror, or a machine offline with a wheel folder, has usually
told pip: this module reads what pip would (its environment variables and its
configuration files, as ``pip config list`` shows them) and says it again in
uv's words, so that a build resolves where ``pip install`` would.

It reads files and variables only: it never runs pip (the environment may have
none) and never reaches the network.
"""

from __future__ import annotations

import configparser
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

#: pip's option name -> uv's argument; the order of the arguments returned.
_OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "no-index": "--no-index",
}

#: Per pip option, the uv settings that already say the same (uv's own wins).
_UV_SAYS = {
    "index-url": ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_NO_INDEX"),
    "extra-index-url": ("UV_EXTRA_INDEX_URL", "UV_INDEX", "UV_NO_INDEX"),
    "find-links": ("UV_FIND_LINKS",),
    "no-index": ("UV_NO_INDEX",),
}

#: The same, as keys of ``uv.toml`` (or ``[tool.uv]`` of a pyproject.toml).
_UV_KEYS = {
    "index-url": ("index-url", "index", "no-index"),
    "extra-index-url": ("extra-index-url", "index", "no-index"),
    "find-links": ("find-links",),
    "no-index": ("no-index",),
}

_TRUE = {"1", "true", "yes", "on"}


def pip_config_files(environ: Mapping[str, str] | None = None) -> list[Path]:
    """pip's configuration files, lowest priority first (those that exist).

    As pip reads them: the global files (``/etc/xdg/pip/pip.conf``, or each of
    ``XDG_CONFIG_DIRS``, then ``/etc/pip.conf``), the user's
    (``~/.pip/pip.conf``, then ``~/.config/pip/pip.conf``), the running
    environment's ``pip.conf``, then ``PIP_CONFIG_FILE``. A later file's value
    wins. ``PIP_CONFIG_FILE=os.devnull`` means no file at all, as for pip.

    Examples
    --------
    >>> pip_config_files({"PIP_CONFIG_FILE": os.devnull})
    []
    """
    environ = os.environ if environ is None else environ
    config_file = environ.get("PIP_CONFIG_FILE")
    if config_file == os.devnull:
        return []
    xdg_dirs = environ.get("XDG_CONFIG_DIRS") or "/etc/xdg"
    candidates = [Path(d, "pip", "pip.conf") for d in xdg_dirs.split(os.pathsep) if d]
    candidates.append(Path("/etc/pip.conf"))
    home = Path(environ.get("HOME") or Path.home())
    xdg_home = environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    if not (config_file and Path(config_file).expanduser().is_file()):
        # pip reads the user's files only when PIP_CONFIG_FILE names none
        candidates += [home / ".pip" / "pip.conf", Path(xdg_home, "pip", "pip.conf")]
    candidates.append(Path(sys.prefix, "pip.conf"))
    if config_file:
        candidates.append(Path(config_file).expanduser())
    found: list[Path] = []
    for path in candidates:
        if path.is_file() and path not in found:
            found.append(path)
    return found


def pip_index_options(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """pip's index options, as ``pip config list`` would merge them.

    The ``[global]`` sections of the files in :func:`pip_config_files` order,
    then their ``[install]`` sections (as pip orders them), then the
    ``PIP_...`` environment variables, each later one winning.

    Examples
    --------
    >>> pip_index_options(
    ...     {"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "https://mirror/simple"}
    ... )
    {'index-url': 'https://mirror/simple'}
    """
    environ = os.environ if environ is None else environ
    parsers = []
    for path in pip_config_files(environ):
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError):
            continue  # pip refuses such a file; a build then uses uv's defaults
        parsers.append(parser)
    # As pip: every file's [global] first, then every file's [install].
    options: dict[str, str] = {}
    for section in ("global", "install"):
        for parser in parsers:
            if not parser.has_section(section):
                continue
            for key, value in parser.items(section):
                key = key.replace("_", "-")
                if key in _OPTIONS:
                    options[key] = value
    for key in _OPTIONS:
        variable = environ.get("PIP_" + key.upper().replace("-", "_"))
        if variable is not None:
            options[key] = variable
    return options


def uv_config_keys(
    start: Path | None = None, environ: Mapping[str, str] | None = None
) -> set[str]:
    """The index keys uv's own configuration files set (``uv.toml``, ``[tool.uv]``).

    The files uv reads: ``uv.toml`` or ``pyproject.toml`` (``[tool.uv]``) in
    ``start`` or its nearest parent holding one, the user's
    ``~/.config/uv/uv.toml``, ``/etc/uv/uv.toml``, and ``UV_CONFIG_FILE``.
    ``UV_NO_CONFIG`` turns them off.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     _ = Path(folder, "uv.toml").write_text('index-url = "https://m/simple"')
    ...     sorted(uv_config_keys(Path(folder)))
    ['index-url']
    """
    environ = os.environ if environ is None else environ
    if environ.get("UV_NO_CONFIG"):
        return set()
    keys: set[str] = set()
    files: list[tuple[Path, bool]] = []
    folder = (start or Path.cwd()).resolve()
    for parent in (folder, *folder.parents):
        if (parent / "uv.toml").is_file():
            files.append((parent / "uv.toml", False))
            break
        if (parent / "pyproject.toml").is_file():
            files.append((parent / "pyproject.toml", True))
            break
    home = Path(environ.get("HOME") or Path.home())
    xdg_home = environ.get("XDG_CONFIG_HOME") or str(home / ".config")
    files.append((Path(xdg_home, "uv", "uv.toml"), False))
    for d in (environ.get("XDG_CONFIG_DIRS") or "/etc/xdg").split(os.pathsep):
        files.append((Path(d, "uv", "uv.toml"), False))
    files.append((Path("/etc/uv/uv.toml"), False))
    if environ.get("UV_CONFIG_FILE"):
        files.append((Path(environ["UV_CONFIG_FILE"]), False))
    for path, in_pyproject in files:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        keys |= _toml_keys(text, "tool.uv" if in_pyproject else "")
    return keys


def _toml_keys(text: str, table: str) -> set[str]:
    """The keys set in ``table`` ("": the top level) and its ``pip`` sub-table.

    Read from the ``key =`` lines under the table's headers: enough to tell
    which keys are set, on every Python (``tomllib`` is 3.11+).

    Examples
    --------
    >>> text = '[project]\\nname = "x"\\n[tool.uv]\\nindex-url = "u"\\n'
    >>> sorted(_toml_keys(text, "tool.uv"))
    ['index-url']
    >>> sorted(_toml_keys('no-index = true\\n[pip]\\nfind-links = ["w"]', ""))
    ['find-links', 'no-index', 'pip']
    >>> sorted(_toml_keys('[[tool.uv.index]]\\nurl = "https://m/simple"', "tool.uv"))
    ['index']
    """
    keys: set[str] = set()
    inside = table == ""
    tables = {table, f"{table}.pip".lstrip(".")}
    for line in text.splitlines():
        header = re.match(r"\s*\[+\s*([^\]]+?)\s*\]", line)
        if header:
            name = header.group(1)
            inside = name in tables
            prefix = f"{table}." if table else ""
            if name.startswith(prefix):  # [[index]]: the key "index" is set
                keys.add(name[len(prefix) :].split(".")[0])
            continue
        key = re.match(r"\s*([A-Za-z0-9_-]+)\s*=", line)
        if inside and key:
            keys.add(key.group(1))
    return keys


def index_args(
    environ: Mapping[str, str] | None = None, start: Path | None = None
) -> list[str]:
    """The uv arguments that make a build use the index pip is configured with.

    pip's ``index-url``, ``extra-index-url`` (several, space separated),
    ``find-links`` (the same) and ``no-index``, from its files and ``PIP_...``
    variables; each left out when uv's own configuration (``UV_...`` variables,
    ``uv.toml``, ``[tool.uv]``) already says it, because uv reads that itself
    and it wins. With extra indexes, ``--index-strategy unsafe-best-match``
    too: pip takes the best version of every index, uv by default only the
    first index's (unless ``UV_INDEX_STRATEGY`` or uv's config says).

    Parameters
    ----------
    environ : mapping, optional
        The environment variables; default ``os.environ``.
    start : path, optional
        Where uv would look for a project's ``uv.toml``/``pyproject.toml``;
        default the current folder.

    Returns
    -------
    list of str
        Arguments for ``uv pip install`` / ``uv venv`` (empty: uv's defaults).

    Examples
    --------
    >>> index_args({
    ...     "PIP_CONFIG_FILE": os.devnull,
    ...     "PIP_FIND_LINKS": "/srv/wheels",
    ...     "PIP_NO_INDEX": "1",
    ... })
    ['--find-links', '/srv/wheels', '--no-index']
    >>> index_args({  # doctest: +NORMALIZE_WHITESPACE
    ...     "PIP_CONFIG_FILE": os.devnull,
    ...     "PIP_INDEX_URL": "https://pypi.example.org/simple",
    ...     "PIP_EXTRA_INDEX_URL": "https://a/simple https://b/simple",
    ...     "UV_INDEX_URL": "https://uv.example.org/simple",
    ... })
    ['--extra-index-url', 'https://a/simple', '--extra-index-url', 'https://b/simple',
     '--index-strategy', 'unsafe-best-match']
    """
    environ = os.environ if environ is None else environ
    options = pip_index_options(environ)
    if not options:
        return []
    uv_keys = uv_config_keys(start, environ)
    args: list[str] = []
    for key, flag in _OPTIONS.items():
        if key not in options:
            continue
        if any(environ.get(name) for name in _UV_SAYS[key]):
            continue
        if any(k in uv_keys for k in _UV_KEYS[key]):
            continue
        value = options[key]
        if key == "no-index":
            if value.strip().lower() in _TRUE:
                args.append(flag)
            continue
        for item in value.split():
            args += [flag, item]
    # pip takes the best version any index has; uv by default only the first
    # index that has the package. Where pip's extra indexes are passed, pass
    # pip's way too, unless uv is told its own.
    if "--extra-index-url" in args and not (
        environ.get("UV_INDEX_STRATEGY") or "index-strategy" in uv_keys
    ):
        args += ["--index-strategy", "unsafe-best-match"]
    return args
