"""envship's dask configuration: defaults from ``envship.yaml``.

Keys live under ``envship.*`` so that ``DASK_ENVSHIP__CACHE__DIRECTORY`` and
cluster-wide YAML files set them as they set distributed's own.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import dask.config
import yaml

_defaults_file = Path(__file__).with_name("envship.yaml")
with _defaults_file.open() as f:
    defaults = yaml.safe_load(f)

dask.config.update_defaults(defaults)


def get(key: str):
    """Read ``envship.<key>`` from dask config."""
    return dask.config.get(f"envship.{key}")


def store_directory() -> Path:
    """The local artifact store, ``envship.store`` or ``~/.cache/envship/store``."""
    configured = get("store")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "envship" / "store"


def build_directory() -> Path:
    """Derived environments, ``envship.build.directory`` or ``~/.cache/envship/builds``."""
    configured = get("build.directory")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "envship" / "builds"


def cache_directory() -> Path:
    """The node cache root, ``envship.cache.directory`` or a private temp folder."""
    configured = get("cache.directory")
    if configured:
        return Path(configured).expanduser()
    user = os.environ.get("USER") or str(os.getuid())
    return Path(tempfile.gettempdir()) / f"envship-{user}"


def usable_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # macOS


def default_threads() -> int:
    """Threads for compression: ``envship.pack.threads`` or the usable cores."""
    configured = get("pack.threads")
    if configured:
        return int(configured)
    return usable_cores()
