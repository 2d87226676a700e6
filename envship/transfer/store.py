"""What transfer needs of the node cache that incoming blobs go to: a Protocol.

Transfer sits below the node side: it never imports the node cache, it takes
one that has these members (``envship.node.cache.EnvCache`` does) and uses no
others. Only the cache names files: transfer writes a download to the
``partial_path`` the cache gives, and hands it over complete with
``adopt_archive``, which refuses (an ``EnvshipError``, the partial file gone)
a blob whose bytes are not the id it was offered as.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from filelock import FileLock

from envship.manifest import Manifest, ThinManifest


class BlobStore(Protocol):
    """Where a node keeps complete blobs and the downloads of blobs."""

    root: Path  # named in disk-error messages

    def has_archive(self, id: str) -> bool: ...

    def archive_path(self, id: str) -> Path: ...

    def partial_path(self, id: str, digest: str) -> Path: ...

    def fetch_lock(self, id: str) -> FileLock: ...

    def adopt_archive(
        self, id: str, partial: Path, manifest: Manifest | ThinManifest
    ) -> None: ...
