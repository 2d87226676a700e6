"""What a node cache holds for each id before it installs: artifacts and manifests.

An artifact enters the cache complete, by a rename from ``tmp/`` (written
here by :meth:`Archives.writer`, or downloaded from peers by
:mod:`envship.transfer` and handed over with :meth:`Archives.adopt`), and
what is held for an id is never replaced. Each use of an id is stamped
(``used/<id>``) for eviction, least recently used first.

This module decides nothing about installing or evicting.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from envship.archive import check_id
from envship.blob_id import UNREADABLE, blob_id
from envship.errors import CorruptArchiveError
from envship.files import write_json_atomic
from envship.manifest import Manifest, ThinManifest, blob_manifest

from .layout import CacheLayout
from .locks import CacheLocks

logger = logging.getLogger("envship.cache")


class Archives:
    """The received artifacts of a node cache and their manifests."""

    def __init__(self, layout: CacheLayout, locks: CacheLocks) -> None:
        self.layout = layout
        self.locks = locks

    def has(self, id: str) -> bool:
        """Whether the artifact and its manifest of ``id`` are both here."""
        return self.layout.archive(id).is_file() and self.layout.manifest(id).is_file()

    def manifest(self, id: str) -> Manifest | ThinManifest | None:
        """The manifest of ``id``, or None if there is none (or it is unreadable)."""
        path = self.layout.manifest(id)
        try:
            with open(path, encoding="utf-8") as f:
                return blob_manifest(json.load(f))
        except FileNotFoundError:
            return None
        except ValueError as e:
            logger.warning("ignoring bad manifest %s: %s", path, e)
            return None

    def put_manifest(self, id: str, manifest: Manifest | ThinManifest) -> None:
        """Store the manifest of ``id`` (atomically)."""
        if manifest.id != id:
            raise ValueError(f"manifest of {manifest.id} given for {id}")
        write_json_atomic(self.layout.manifest(id), manifest.to_dict())

    @contextmanager
    def writer(
        self, id: str, manifest: Manifest | ThinManifest | None = None
    ) -> Iterator[BinaryIO]:
        """Write the artifact of ``id``; it appears only if the block succeeds."""
        check_id(id)
        if manifest is not None and manifest.id != id:
            raise ValueError(f"manifest of {manifest.id} given for {id}")
        part = self.layout.incoming(id)
        f = open(part, "xb")
        try:
            yield f
            f.close()
            self.adopt(id, part, manifest)
        except BaseException:
            f.close()
            part.unlink(missing_ok=True)
            raise

    def adopt(
        self,
        id: str,
        partial: str | os.PathLike[str],
        manifest: Manifest | ThinManifest | None,
    ) -> None:
        """Move a complete artifact file from ``tmp/`` into place (a rename).

        The one way an incoming blob enters the cache. What is held for an id
        is never replaced: if the archive is here already, ``partial`` is
        dropped.
        """
        with self.locks.held(id):
            if self.has(id):
                os.unlink(partial)
            else:
                if manifest is not None:
                    self.put_manifest(id, manifest)
                os.replace(partial, self.layout.archive(id))
            self.mark_used(id)

    def adopt_received(
        self,
        id: str,
        partial: str | os.PathLike[str],
        manifest: Manifest | ThinManifest,
    ) -> None:
        """Adopt a blob that came from other machines, once it proves to be ``id``.

        Its pieces matched the piece table of the offer, which binds them to
        the offer's sender only: here the whole is bound to the id. An
        archive must hash to its content id (read once, nothing written), a
        thin pack's bytes to its own id. Otherwise ``partial`` is removed and
        nothing is held for ``id``, so the genuine blob can still come, from
        another offer.

        Raises
        ------
        CorruptArchiveError
            The blob is not what its id names; it is gone.
        """
        thin = isinstance(manifest, ThinManifest)
        try:
            got: str | None = blob_id(partial, thin=thin)
            problem = f"its content hashes to {got}"
        except UNREADABLE as e:
            got, problem = None, f"it does not read as an archive ({e})"
        if got != id:
            os.unlink(partial)
            logger.warning("envship: refused a blob offered as %s: %s", id, problem)
            raise CorruptArchiveError(
                manifest.name,
                f"the {'thin pack' if thin else 'archive'} offered as {id} is not "
                f"it: {problem}; its sender's bytes were another environment's or "
                "damaged, and this node keeps nothing of them",
                "call use_environment again from the client that packed it",
            )
        self.adopt(id, partial, manifest)

    def discard(self, id: str) -> None:
        """Remove the artifact of ``id``, its manifest and its use stamp."""
        for path in (self.layout.archive(id), self.layout.manifest(id)):
            path.unlink(missing_ok=True)
        self.layout.used(id).unlink(missing_ok=True)

    def mark_used(self, id: str) -> None:
        """Stamp ``id`` as used now (what eviction orders by)."""
        path = self.layout.used(id)
        try:
            os.utime(path)
        except FileNotFoundError:
            path.touch()

    def last_used(self, id: str) -> float:
        """Unix time of the last use of ``id``; 0.0 if nothing of it is here."""
        layout = self.layout
        for path in (layout.used(id), layout.archive(id), layout.env(id)):
            try:
                return os.stat(path).st_mtime
            except FileNotFoundError:
                pass
        return 0.0
