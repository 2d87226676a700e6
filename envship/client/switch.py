"""A switch, step by step: the calls behind ``use_environment`` and its kin.

:class:`Switch` holds one call's state (its deadline, progress setting, stage
times, the workers it concerns and what their nannies said) and runs its
steps in the order they happen, one method each. Packing happens in the
calling thread (a cache hit when the environment is unchanged); every other
step runs on the client's event loop, within what is left of the call's
timeout. This module decides nothing about what users call: see
:mod:`envship.client.use`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
import warnings
import weakref
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from distributed import Client
from distributed.comm import CommClosedError, get_address_host_port
from distributed.core import clean_exception
from distributed.protocol.pickle import dumps
from distributed.versions import get_package_info

from envship import policy
from envship.errors import EnvshipError, UnpublishedError
from envship.ids import check_id
from envship.manifest import Manifest
from envship.messages import NannyStatus, Status
from envship.node.messages import Wanted
from envship.node.nanny import UseEnvironment
from envship.registry_messages import Claim, ClaimAnswer, Desire, Release
from envship.transfer import ShipReport

from .compat import (
    OPTIONAL_PACKAGES,
    check_compatibility,
    missing_optional,
    optional_warning,
)
from .deliver import deliver, publish_archive
from .pack import pack
from .progress import progress_bar
from .report import SwitchFailedError, SwitchReport, WorkerReport, timing
from .store import Artifact
from .targets import (
    Infos,
    Targets,
    ensure_registry,
    find_targets,
    keys_only_on,
    nanny_side,
    scheduler_of,
)

PLUGIN_NAME = "envship"
#: Seconds for a nanny to say how its switch went; to wait for the workers of
#: a switch whose plugin call the scheduler dropped (a nanny died in it).
STATUS_TIMEOUT, SETTLE_TIMEOUT = 10.0, 20.0
#: ``warnings.warn``'s stacklevel from a step to the user's call: the step,
#: ``Switch.to`` or ``Switch.prepare``, the public function, its caller.
_USER = 4

T = TypeVar("T")

#: Per client, the environments it warned of lacking optional packages: once each.
_WARNED_OPTIONAL: weakref.WeakKeyDictionary[Client, set[str]] = (
    weakref.WeakKeyDictionary()
)


class Switch:
    """One call of ``use_environment``, ``prepare_environment`` or ``foreign``.

    Its steps, in the order they happen (the methods below, in this order):

    1. :meth:`pack`: the environment, into the local store.
    2. :meth:`check`: which workers; envship on their nannies and on the
       scheduler; the scheduler's policy; the environment's compatibility
       with the cluster. Nothing has moved yet.
    3. :meth:`claim` the workers, so that no other switch restarts them
       meanwhile (a switch only).
    4. :meth:`deliver`: ship it to every node that lacks it, peer to peer,
       and install it there.
    5. :meth:`restart` every worker in it (a switch only); when a nanny
       died meanwhile, :meth:`settle`: wait for the others' workers.
    6. :meth:`report` what each worker runs in now; :meth:`release` the claim.

    :meth:`to` (a switch) and :meth:`prepare` (no restart) run them.

    Examples
    --------
    >>> switch = Switch(client, workers=None, strict=True, timeout=None,
    ...                 progress=False)  # doctest: +SKIP
    >>> switch.to(switch.pack("sklearn-dev"))  # doctest: +SKIP
    worker       environment    seconds  status
    0            5f0c2d9a1b7e      2.31  ok
    """

    def __init__(
        self,
        client: Client,
        *,
        workers: Iterable[str] | None,
        strict: bool,
        timeout: float | None,
        progress: bool | None,
    ) -> None:
        self.client = client
        self.scheduler = scheduler_of(client)
        self.workers = None if workers is None else list(workers)
        self.strict = strict
        self.deadline = None if timeout is None else time.monotonic() + timeout
        if progress is None:
            progress = sys.stderr.isatty() or "ipykernel" in sys.modules
        self.progress: bool = progress
        self.stages: dict[str, float] = {}
        self.owner = f"{client.id}/{uuid.uuid4().hex}"
        # Set by the steps as they go.
        self.artifact: Artifact | None = None
        self.label = "the nannies' own environment"
        self.targets: Targets = {}
        self.infos: Infos = {}
        self.shipped = ShipReport()
        self.unpacked: dict[str, dict] | None = None
        self.missing_optional: tuple[str, ...] = ()

    # -- whole calls ---------------------------------------------------------

    def to(self, artifact: Artifact | None) -> SwitchReport:
        """Switch the workers to ``artifact`` (None: the nannies' own environment)."""
        with timing(self.stages, "check"):
            lost = self.run(self.check(artifact))
        self.warn_of_lost_keys(lost)
        self.warn_of_missing_optional()
        self.run(self.claim())
        try:
            if artifact is not None:
                self.run(self.deliver())
            self.run(self.restart())
            expected = None if artifact is None else artifact.id
            report = self.run(self.report(self.stages["restart"], expected=expected))
        finally:
            self.release()
        self.raise_for_failed(report)
        self.warn_of_left_out(report, "switched")
        return report

    def prepare(self, artifact: Artifact, call_only: bool = False) -> SwitchReport:
        """Ship and install ``artifact`` on the workers' nodes; restart nobody.

        ``call_only``: tasks call into it rather than run workers in it, so
        only its platform must suit the nodes.
        """
        with timing(self.stages, "check"):
            self.run(self.check(artifact, call_only))
        started = time.perf_counter()
        self.run(self.deliver())
        report = self.run(self.report(time.perf_counter() - started, prepared=True))
        self.warn_of_left_out(report, "prepared")
        return report

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a step on the client's loop within what is left of the timeout."""
        left = self.deadline
        if left is not None:
            left = max(left - time.monotonic(), 0)
        return self.client.sync(asyncio.wait_for, coro, left)

    # -- the steps, in order -------------------------------------------------

    def pack(self, env: Any) -> Artifact:
        """The artifact of ``env`` (see :func:`as_artifact`)."""
        with timing(self.stages, "pack"):
            return as_artifact(env, self.progress)

    async def check(self, artifact: Artifact | None, call_only: bool = False) -> int:
        """Everything that must hold before anything moves or restarts.

        Returns how many keys in memory only the target workers hold.
        """
        self.artifact = artifact
        if artifact is not None:
            self.label = artifact.name
        self.targets = await find_targets(self.client, self.workers, self.label)
        self.infos = await nanny_side(self.client, self.targets, artifact, self.label)
        await ensure_registry(self.client, self.label)
        if artifact is not None:
            await self.check_environment(artifact, call_only)
        return await keys_only_on(self.client, self.targets)

    async def check_environment(self, artifact: Artifact, call_only: bool) -> None:
        """The scheduler's policy, then compatibility with the cluster."""
        policy.check(artifact.name, artifact.id, await self.scheduler.envship_policy())
        versions = await self.scheduler.versions(packages=[])
        check_compatibility(
            artifact.name,
            manifest_of(artifact),
            client_python=".".join(map(str, sys.version_info[:3])),
            scheduler_packages=versions["packages"],
            node_platforms=[info.platform for info in self.infos.values()],
            strict=self.strict,
            call_only=call_only,
        )
        if not call_only:
            table = artifact.table()
            self.missing_optional = missing_optional(
                manifest_of(artifact),
                get_package_info(OPTIONAL_PACKAGES),
                None if table is None else (e.path for e in table.files),
            )

    def warn_of_lost_keys(self, lost: int) -> None:
        """Warn, in one sentence, that restarting loses the ``lost`` keys only the targets hold."""
        if lost:
            warnings.warn(
                lost_keys_sentence(self.label, len(self.targets), lost),
                stacklevel=_USER,
            )

    def warn_of_missing_optional(self) -> None:
        """Warn, once per client and environment, of what ``missing_optional`` found."""
        if not self.missing_optional or self.artifact is None:
            return
        warned = _WARNED_OPTIONAL.setdefault(self.client, set())
        if self.artifact.id not in warned:
            warned.add(self.artifact.id)
            warnings.warn(
                optional_warning(self.label, self.missing_optional), stacklevel=_USER
            )

    async def claim(self) -> None:
        """Claim the workers for this switch; refuse if another switch holds any."""
        names = {t["nanny"]: t["name"] for t in self.targets.values()}
        claim = Claim(self.owner, self.client.id, tuple(names), self.label)
        answer = await self.scheduler.envship_claim(**claim.to_msg())
        conflicts = ClaimAnswer.from_msg(answer).conflicts
        if conflicts:
            now = time.time()
            lines = "\n".join(
                f"  {names.get(nanny, nanny)}: to {c.name}, by {c.client}, for "
                f"{now - c.since:.0f} s"
                for nanny, c in conflicts.items()
            )
            raise EnvshipError(
                self.label,
                "another switch of the same workers is under way, so this one did "
                f"not start:\n{lines}",
                "call use_environment again once it has ended, or switch other "
                "workers (workers=[...])",
            )

    async def deliver(self) -> None:
        """Ship it to every node of the targets and install it there.

        Workers whose nanny left meanwhile are taken out of the targets.
        """
        assert self.artifact is not None, "the nannies' own environment is there"
        self.shipped, self.unpacked = await deliver(
            self.client,
            self.artifact,
            self.targets,
            self.infos,
            self.progress,
            self.stages,
        )

    async def restart(self) -> None:
        """Restart every target worker in the environment, through its nanny."""
        artifact, targets = self.artifact, self.targets
        names = (
            None
            if self.workers is None
            else tuple(str(t["name"]) for t in targets.values())
        )
        wanted = (
            None if artifact is None else Wanted(check_id(artifact.id), artifact.name)
        )
        desire = Desire(None if wanted is None else wanted.id, names)
        try:
            await self.scheduler.envship_desire(**desire.to_msg())
        except UnpublishedError:
            # Every node held it, and this scheduler knows no offer of it
            # (it restarted since, or knows only a thin pack's).
            assert artifact is not None
            await publish_archive(self.client, artifact)
            await self.scheduler.envship_desire(**desire.to_msg())
        started = time.perf_counter()
        plugin = UseEnvironment(
            None if wanted is None else wanted.to_msg(),
            nannies=(
                None if self.workers is None else [t["nanny"] for t in targets.values()]
            ),
        )
        with progress_bar(
            "restarting workers", len(targets), self.progress, counting=True
        ) as bar:
            counter = asyncio.ensure_future(self.count_restarted(bar))
            try:
                responses = await self.scheduler.register_nanny_plugin(
                    plugin=dumps(plugin), name=PLUGIN_NAME, idempotent=False
                )
            except CommClosedError:
                # A nanny left while the scheduler passed the plugin on, and the
                # scheduler dropped the call: each nanny is asked below instead,
                # once the others' workers are back.
                responses = {}
                await self.settle()
            finally:
                counter.cancel()
            bar.update(len(targets))
        for response in responses.values():
            if response.get("status") == "error":
                _, exc, _ = clean_exception(
                    response["exception"], response["traceback"]
                )
                raise EnvshipError(
                    self.label, f"a nanny could not switch: {exc}"
                ) from exc
        self.stages["restart"] = time.perf_counter() - started

    async def count_restarted(self, bar, interval: float = 0.2) -> None:
        """Advance ``bar`` as each target's worker is back (a new address), until cancelled."""
        if not self.progress:
            return
        old = {t["nanny"]: address for address, t in self.targets.items()}
        back: set[str] = set()
        while True:
            await asyncio.sleep(interval)
            try:
                info = await self.scheduler.identity()
            except Exception:  # only a bar: the restart itself says what failed
                return
            back |= {
                w.get("nanny")
                for address, w in info["workers"].items()
                if w.get("nanny") in old and address != old[w.get("nanny")]
            }
            bar.update(len(back))

    async def settle(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Wait until every target nanny has a worker again or is gone, or ``timeout`` s."""
        waiting = {t["nanny"] for t in self.targets.values()}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            info = await self.scheduler.identity()
            waiting -= {w.get("nanny") for w in info["workers"].values()}
            for nanny in list(waiting):
                if not await _listening(nanny):
                    waiting.discard(nanny)  # dead: nothing to wait for
            await asyncio.sleep(0.2)

    async def report(
        self, seconds: float, prepared: bool = False, expected: str | None = None
    ) -> SwitchReport:
        """What each worker runs in; how its switch went (unless only ``prepared``).

        A switch is ok for a worker only if its nanny says so and the worker
        runs in ``expected`` now: never ok while it runs elsewhere.
        """
        info = await self.scheduler.identity()
        present = {w.get("nanny") for w in info["workers"].values()}

        async def status(target: dict) -> WorkerReport | str:
            # A nanny gone from the scheduler is given a short while only:
            # connecting to a closed port is retried until the connect timeout.
            wait = STATUS_TIMEOUT if target["nanny"] in present else 2
            rpc = self.client.rpc(target["nanny"])
            try:
                s = NannyStatus.from_msg(
                    await asyncio.wait_for(
                        rpc.envship_status(**Status().to_msg()), wait
                    )
                )
            except (CommClosedError, OSError, asyncio.TimeoutError, ValueError):
                # Its nanny left the cluster, or is no envship nanny any more.
                return str(target["name"])
            return _worker_report(target, s, seconds, prepared, expected)

        results = await asyncio.gather(*map(status, self.targets.values()))
        report = SwitchReport(
            {r.name: r for r in results if isinstance(r, WorkerReport)},
            stages=self.stages,
            transfer=self.shipped,
            unpacked=self.unpacked,
            gone=tuple(r for r in results if isinstance(r, str)),
            missing_optional=self.missing_optional,
        )
        report.transfer.left_out.extend(report.gone)
        return report

    def release(self) -> None:
        """End the claim (it ends with the client anyway, hence no error)."""
        with contextlib.suppress(Exception):
            self.client.sync(
                self.scheduler.envship_release, **Release(self.owner).to_msg()
            )

    # -- what the user is told -----------------------------------------------

    def raise_for_failed(self, report: SwitchReport) -> None:
        """Raise, with the report, if some workers could not start in it."""
        failed = report.failed()
        if failed:
            details = "\n".join(f"  {r.name}: {r.error}" for r in failed)
            raise SwitchFailedError(
                self.label,
                f"{len(failed)} of {len(report)} workers could not start in it and "
                f"run in the nannies' own environment again:\n{details}",
                "fix the environment (does `python -c 'import distributed'` work "
                "in it?), pack it again and call use_environment again",
                report,
            )

    def warn_of_left_out(self, report: SwitchReport, done: str) -> None:
        """Warn of the workers left out because their nanny left meanwhile."""
        if report.transfer.left_out:
            warnings.warn(
                f"not {done}: workers {', '.join(report.transfer.left_out)}, whose "
                "nanny left the cluster during the call",
                stacklevel=_USER,
            )


def lost_keys_sentence(label: str, workers: int, keys: int) -> str:
    """The warning of a switch that restarts workers holding the only copy of keys.

    Examples
    --------
    >>> lost_keys_sentence("sklearn-dev", 2, 5)
    'Switching to sklearn-dev restarts 2 workers that alone hold 5 keys; their results will be recomputed and scattered data lost.'
    >>> lost_keys_sentence("venv", 1, 1)
    'Switching to venv restarts 1 worker that alone holds 1 key; its results will be recomputed and scattered data lost.'
    """
    if workers == 1:
        who = "1 worker that alone holds"
    else:
        who = f"{workers} workers that alone hold"
    what = "1 key; its" if keys == 1 else f"{keys} keys; their"
    return (
        f"Switching to {label} restarts {who} {what} results will be recomputed "
        "and scattered data lost."
    )


def as_artifact(env: Any, progress: bool) -> Artifact:
    """``env`` itself if it is an artifact, else what packing it gives."""
    if isinstance(env, Artifact):
        return env
    return pack(env, progress=progress, archive=False)


def manifest_of(artifact: Artifact) -> Manifest:
    """The manifest of the environment ``artifact`` is (a thin pack: the one it carries)."""
    return artifact.environment


def _worker_report(
    target: dict,
    status: NannyStatus,
    seconds: float,
    prepared: bool,
    expected: str | None,
) -> WorkerReport:
    """One worker's line of the report, from its nanny's ``envship_status``."""
    ok, error = status.ok, status.error
    # None: the nannies' own environment, or their administrator's default.
    wanted = status.default if expected is None else expected
    if ok and status.running != wanted:
        ok = False
        runs = status.name or status.running or "the nannies' own environment"
        error = f"it runs in {runs}, not in what was asked: switched again meanwhile?"
    return WorkerReport(
        name=target["name"],
        nanny=target["nanny"],
        address=status.worker,
        environment=status.running,
        seconds=seconds if prepared else status.seconds or seconds,
        ok=prepared or ok,
        error=None if prepared else error,
    )


async def _listening(address: str) -> bool:
    """Whether anything accepts connections at ``address`` (a dead nanny: no)."""
    try:
        host, port = get_address_host_port(address)
    except ValueError:
        return True  # not TCP (inproc, ucx): no way to tell, so wait
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True
