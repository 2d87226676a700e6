"""Where everything of a node cache lives: every path named once.

Layout under the root (nannies that share it form one node)::

    <id>/                         an installed environment; exists only when complete
    files/<k>/<key>               the node's file store: contents that installed
                                  environments share by hard links (filestore.py)
    archives/<id>.tar.zst         a received artifact ...
    archives/<id>.json            ... and its manifest (name, kind, unpacked_size, ...)
    tmp/<id>-install-<random>/    an install in progress
    tmp/<id>-remove-<random>/     a removal in progress
    tmp/<id>.<pid>.<random>.part  an artifact being written by process <pid>
    tmp/<id>.<digest>.partial     a download from peers (resumable; transfer)
    locks/<k>.lock                the lock of every id starting with <k> (two hex
                                  digits): install, lease and removal take it
    locks/<k>.fetch.lock          held by the one nanny of the node downloading
    leases/<id>/<pid>             a process using the environment: its create time
    used/<id>                     touched on every use: its mtime orders eviction
    installed/<id>.json           what the install found: size on disk, file count
    installs.log                  one JSON line per extraction
    nannies/<hash>.json           what the worker of a nanny (by the hash of its
                                  name) runs in, to start it there again
    zygotes/<key>.sock, .lock     where the nannies of the node meet the zygote
                                  of an environment (node/zygotes.py)

Everything is made in ``tmp/`` (same filesystem) and renamed into place, so
nobody ever sees half an environment, and a crashed install leaves only a
temp folder that the next one for that id removes.

This module names paths and reads names back; it decides nothing and reads
or writes no file (it only makes the folders, checking who may write them,
and only for writers: reading a cache never creates one).
As uv's cache buckets, each kind of entry has one method here: nobody else
spells a path of the cache.
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import xxhash

from envship.archive import ID_PATTERN, check_id
from envship.errors import EnvshipError

ARCHIVE_SUFFIX = ".tar.zst"
PARTIAL_SUFFIX = ".partial"
INCOMING_SUFFIX = ".part"


def bucket(id: str) -> str:
    """Which of 256 lock files guards ``id``: its first two hex digits.

    A lock file per id would pile up for every id ever tried, and one can't
    be deleted safely (a process waiting on it would hold a lock on a file
    nobody else sees). Ids of one bucket merely take turns.

    Examples
    --------
    >>> bucket("6f" + "0" * 30)
    '6f'
    """
    return check_id(id)[:2]


def private_folder(shared: Path, *, sticky: bool = False) -> Path:
    """A cache folder of the user's own to suggest instead of ``shared``.

    Inside ``shared`` if it has the sticky bit (as ``/tmp``: others may not
    rename or remove what is yours there), else in the temp folder, else
    (that is ``shared`` itself) in ``~/.cache``.

    Examples
    --------
    >>> private_folder(Path("/tmp"), sticky=True).parent.as_posix()
    '/tmp'
    """
    user = os.environ.get("USER") or str(os.getuid())
    if sticky:
        return shared / f"envship-{user}"
    suggestion = Path(tempfile.gettempdir()) / f"envship-{user}"
    if suggestion == shared:
        suggestion = Path.home() / ".cache" / "envship"
    return suggestion


def _is_id(text: str) -> bool:
    return ID_PATTERN.fullmatch(text) is not None


@dataclass(frozen=True)
class CacheLayout:
    """The paths of a node cache rooted at ``root``.

    Examples
    --------
    >>> layout = CacheLayout(Path("/c"))
    >>> id = "6f" + "0" * 30
    >>> layout.archive(id).relative_to("/c").as_posix()
    'archives/6f000000000000000000000000000000.tar.zst'
    >>> layout.partial(id, "ab" * 16).name
    '6f000000000000000000000000000000.abababababababab.partial'
    >>> layout.lock(id).name, layout.fetch_lock(id).name
    ('6f.lock', '6f.fetch.lock')
    >>> layout.partial_id(layout.partial(id, "ab" * 16).name) == id
    True
    """

    root: Path

    #: The folders made with the cache (``files/`` is the file store's own,
    #: see :class:`envship.node.filestore.FileStore`; ``nannies/`` is made by
    #: the first nanny that keeps a record).
    FOLDERS: ClassVar[tuple[str, ...]] = (
        "archives",
        "tmp",
        "locks",
        "leases",
        "used",
        "installed",
    )

    def create(self, *, check_owner: bool) -> None:
        """Make the cache's folders (mode 0700); refuse a root others may write.

        ``check_owner``: refuse a root that another user made (the default
        root lives in the shared temp folder). Only writers call this: a
        nanny, an install. Readers call :meth:`open`.
        """
        root = self.root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._check_safe(check_owner=check_owner)
        for sub in self.FOLDERS:
            (root / sub).mkdir(mode=0o700, exist_ok=True)

    def open(self, *, check_owner: bool) -> None:
        """Check that a cache is here, for reading it: makes nothing.

        Raises
        ------
        EnvshipError
            The folder does not exist or holds no envship cache (as ``ls``
            of a missing folder fails, listing it is an error, not an empty
            cache), or other users may write it.
        """
        root = self.root
        fix = (
            "check the path (--directory), or envship.cache.directory; a "
            "nanny makes its cache when it starts"
        )
        if not root.is_dir():
            what = "is not a folder" if root.exists() else "does not exist"
            raise EnvshipError(
                str(root), f"no cache there: the path {what}", fix, subject="node cache"
            )
        self._check_safe(check_owner=check_owner)
        missing = [s for s in (*self.FOLDERS, "files") if not (root / s).is_dir()]
        if missing:
            raise EnvshipError(
                str(root),
                f"no cache there: the folder has no {missing[0]}/ folder, so "
                "no nanny has used it as its cache",
                fix,
                subject="node cache",
            )

    def _check_safe(self, *, check_owner: bool) -> None:
        """Refuse a root that another user owns (``check_owner``) or may write.

        The fix never loosens or tightens a folder that is not the user's
        own: a shared folder with the sticky bit (``/tmp``, ``/var/tmp``,
        ``/dev/shm``) is meant to be writable by all, and changing it would
        break the machine for everyone. Such a folder is never a cache
        root; a private folder inside it is (the sticky bit keeps others
        from renaming it away).
        """
        root = self.root
        st = root.stat()
        mine = st.st_uid == os.geteuid()
        if check_owner and not mine:
            # The default lives in the shared temp folder: never use one
            # that another user made for us.
            raise EnvshipError(
                str(root),
                "the cache folder belongs to another user",
                "set envship.cache.directory (DASK_ENVSHIP__CACHE__DIRECTORY) "
                f"to a folder of your own, such as {private_folder(root)}",
                subject="node cache",
            )
        if not st.st_mode & 0o022:
            return
        # Others could plant trees or archives that workers then run.
        mode = stat.S_IMODE(st.st_mode)
        private = private_folder(root, sticky=bool(st.st_mode & stat.S_ISVTX))
        fix = (
            f"set envship.cache.directory (or --directory) to a folder only "
            f"you may write, such as {private}"
        )
        if mine and not st.st_mode & stat.S_ISVTX and os.geteuid() != 0:
            # The user's own folder, not a shared one: tightening it is safe.
            fix = f"chmod go-w {root}, or {fix}"
        raise EnvshipError(
            str(root),
            f"the cache folder may be written by other users (mode {mode:o}), "
            "who could plant environments that workers then run",
            fix,
            subject="node cache",
        )

    # -- what the cache holds for an id -----------------------------------------

    def env(self, id: str) -> Path:
        """``<id>/``: the final prefix of an installed environment."""
        return self.root / check_id(id)

    def install_record(self, id: str) -> Path:
        """``installed/<id>.json``: written just before the tree is renamed in."""
        return self.root / "installed" / f"{check_id(id)}.json"

    def archive(self, id: str) -> Path:
        """``archives/<id>.tar.zst``: a received artifact."""
        return self.root / "archives" / f"{check_id(id)}{ARCHIVE_SUFFIX}"

    def manifest(self, id: str) -> Path:
        """``archives/<id>.json``: the manifest of a received artifact."""
        return self.root / "archives" / f"{check_id(id)}.json"

    def used(self, id: str) -> Path:
        """``used/<id>``: its mtime is the last use."""
        return self.root / "used" / check_id(id)

    def leases(self, id: str) -> Path:
        """``leases/<id>/``: one file per process using the environment."""
        return self.root / "leases" / check_id(id)

    def lease(self, id: str, pid: int) -> Path:
        """``leases/<id>/<pid>``: holds the process's create time."""
        return self.leases(id) / str(pid)

    def lock(self, id: str) -> Path:
        """``locks/<k>.lock``: install, lease and removal of ``id`` take it."""
        return self.root / "locks" / f"{bucket(id)}.lock"

    def fetch_lock(self, id: str) -> Path:
        """``locks/<k>.fetch.lock``: held by the one nanny downloading ``id``."""
        return self.root / "locks" / f"{bucket(id)}.fetch.lock"

    # -- work in progress: tmp/ --------------------------------------------------

    @property
    def tmp(self) -> Path:
        """``tmp/``: everything is made here, on the cache's filesystem."""
        return self.root / "tmp"

    def incoming(self, id: str) -> Path:
        """``tmp/<id>.<pid>.<random>.part``: an artifact this process writes."""
        name = f"{check_id(id)}.{os.getpid()}.{secrets.token_hex(4)}{INCOMING_SUFFIX}"
        return self.tmp / name

    def partial(self, id: str, digest: str) -> Path:
        """``tmp/<id>.<digest[:16]>.partial``: a resumable download from peers."""
        return self.tmp / f"{check_id(id)}.{digest[:16]}{PARTIAL_SUFFIX}"

    def make_install_dir(self, id: str) -> Path:
        """A new, empty ``tmp/<id>-install-<random>/`` (made, mode 0700)."""
        return Path(tempfile.mkdtemp(prefix=f"{check_id(id)}-install-", dir=self.tmp))

    def removal(self, id: str) -> Path:
        """``tmp/<id>-remove-<random>``: where a tree goes to be deleted."""
        return self.tmp / f"{check_id(id)}-remove-{secrets.token_hex(4)}"

    # -- node-wide ---------------------------------------------------------------

    @property
    def installs_log(self) -> Path:
        """``installs.log``: one JSON line per extraction."""
        return self.root / "installs.log"

    def zygotes(self) -> Path:
        """``zygotes/``: where the nannies of the node meet a zygote, by a
        socket ``<key>.sock`` and a lock ``<key>.lock`` (see
        :mod:`envship.node.zygotes`; made by the first nanny that starts one)."""
        return self.root / "zygotes"

    def nanny_record(self, nanny_name: str) -> Path:
        """``nannies/<hash of the nanny's name>.json``: what its worker runs in."""
        key = xxhash.xxh3_128_hexdigest(nanny_name.encode())
        return self.root / "nannies" / f"{key}.json"

    # -- reading names back ------------------------------------------------------

    def ids(self) -> list[str]:
        """Every id with a tree or an archive here, sorted."""
        ids = {name for name in os.listdir(self.root) if _is_id(name)}
        for name in os.listdir(self.root / "archives"):
            stem = name.removesuffix(ARCHIVE_SUFFIX)
            if stem != name and _is_id(stem):
                ids.add(stem)
        return sorted(ids)

    def leased_ids(self) -> list[str]:
        """Every id with a ``leases/<id>/`` folder."""
        return [name for name in os.listdir(self.root / "leases") if _is_id(name)]

    @staticmethod
    def is_partial(name: str) -> bool:
        """Whether ``name`` in ``tmp/`` is a download from peers."""
        return name.endswith(PARTIAL_SUFFIX)

    @staticmethod
    def partial_id(name: str) -> str | None:
        """The id of the download ``name`` in ``tmp/``, if it is one."""
        id = name.split(".", 1)[0]
        return id if name.endswith(PARTIAL_SUFFIX) and _is_id(id) else None

    @staticmethod
    def is_incoming(name: str) -> bool:
        """Whether ``name`` in ``tmp/`` is an artifact being written."""
        return name.endswith(INCOMING_SUFFIX)

    @staticmethod
    def incoming_writer(name: str) -> int | None:
        """The pid writing the artifact ``name`` in ``tmp/``, if it says."""
        fields = name.split(".")
        if len(fields) == 4 and fields[1].isdigit():
            return int(fields[1])
        return None

    @staticmethod
    def work_id(name: str) -> str | None:
        """The id of an install or removal ``name`` in ``tmp/``, if it is one."""
        id = name.split("-", 1)[0]
        return id if _is_id(id) else None

    def work_of(self, id: str) -> list[Path]:
        """Installs and removals of ``id`` in ``tmp/`` (leftovers, lock held)."""
        prefix = f"{check_id(id)}-"
        return [self.tmp / n for n in os.listdir(self.tmp) if n.startswith(prefix)]
