"""Restart a nanny's worker process inside another Python environment.

A nanny normally starts its worker with multiprocessing in its own interpreter.
:class:`EnvWorkerProcess` replaces the nanny's ``WorkerProcess``: while its
``target`` is an unpacked environment, it runs ``<prefix>/bin/python -s
bootstrap/worker.py`` as a plain subprocess instead (or, with
``envship.zygote.enabled``, forks it from that environment's zygote, see
:mod:`envship.node.zygotes`, falling back to the plain start on any zygote
failure), which builds the Worker with that environment's own distributed.
The worker keeps its name and its nanny, so ``restart_workers``, restart
after a crash and the memory monitor work as before, and the target persists
through all of them. A target whose python cannot start a worker is dropped:
the error is kept in ``last_error`` and the stock worker starts in the nanny's
interpreter, so the nanny never dies of a bad environment.

This is the only envship module that touches distributed's internals; it must
not unpack, download or verify environments. It relies on, from distributed
2026.8.0:

- ``distributed.nanny.WorkerProcess`` (replaced at module level by
  :func:`install`): its constructor arguments and attributes ``worker_kwargs``,
  ``Worker``, ``silence_logs``, ``env``, ``pre_spawn_env``, ``config``,
  ``on_exit``, ``status``, ``running``, ``stopped``, ``process``,
  ``worker_address``, ``worker_dir``; its methods ``start``, ``kill``,
  ``_on_exit`` and ``mark_stopped``, and their status transitions; its
  classmethod ``_run``, the body of the stock worker process, which
  ``start`` hands to the child as ``self._run`` (so the child runs
  :meth:`EnvWorkerProcess._run`, which exits promptly after it).
- ``WorkerProcess.mark_stopped`` calling ``on_exit``, whose
  ``Nanny._on_worker_exit`` runs in a task made there (so it inherits the
  context: see :mod:`envship.node.logs`) and logs ``Restarting worker``.
- ``Nanny.instantiate`` building a ``WorkerProcess`` only while
  ``nanny.process`` is None, so one object lives through restarts;
  ``Nanny.restart`` (kill then instantiate) and ``Nanny._on_worker_exit``
  (instantiate after a crash).
- What ``WorkerProcess``, ``Nanny`` and ``NannyMemoryManager.memory_monitor``
  use of ``AsyncProcess`` (``pid``, ``exitcode``, ``is_alive``, ``terminate``
  and ``kill`` returning awaitables, ``join``, ``close``,
  ``set_exit_callback``), offered by
  :class:`~envship.node.worker_subprocess.WorkerSubprocess`.
- ``distributed.proctitle.enable_proctitle_on_children``.

What the worker's process gets (its variables, the bootstrap script) is
built in :mod:`envship.node.worker_environ`; the process itself is
:mod:`envship.node.worker_subprocess`. Neither touches distributed.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import os
import sys
import threading
import time
from typing import Any, cast

import distributed.nanny
from dask.utils import parse_timedelta
from distributed.core import Status
from distributed.nanny import WorkerProcess
from distributed.process import AsyncProcess
from distributed.proctitle import enable_proctitle_on_children

from envship import config
from envship.identity import nanny_identity
from envship.resources import ENVIRONMENT_UNITS, resource_name

from . import zygotes
from .logs import envship_restart
from .worker_environ import TargetEnvironment, bootstrap_script, child_environ
from .worker_subprocess import WorkerSubprocess, encode_frame
from .zygote import ForkedWorker, ZygoteError

logger = logging.getLogger(__name__)


def _advertising(worker_kwargs: dict, artifact_id: str) -> dict:
    """The worker's arguments with the resource that says it runs in ``artifact_id``.

    Tasks annotated with ``envship.environment(...)`` need one unit of it; a
    worker has so many that it is never the limit (its threads are).
    """
    resources = {
        **(worker_kwargs.get("resources") or {}),
        resource_name(artifact_id): ENVIRONMENT_UNITS,
    }
    return {**worker_kwargs, "resources": resources}


def _class_path(cls: Any) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class EnvWorkerProcess(WorkerProcess):
    """A nanny's ``WorkerProcess`` that can run its worker in another environment.

    With ``target`` None everything is the stock ``WorkerProcess``. Otherwise
    ``start`` runs the worker under ``target``'s python and ``kill`` stops it
    the way the stock worker is stopped. Status transitions are the stock
    ones, so the nanny's restart, crash restart and memory monitor are
    unchanged. The nanny keeps this object across restarts, so ``target``
    persists until it is changed or dropped after a failure.

    Attributes
    ----------
    target : TargetEnvironment or None
        Where the next worker starts; None for the nanny's own interpreter.
    last_error : str or None
        Why the last start in ``target`` failed (with the child's stderr), if
        it did; ``target`` is then None.
    worker_python : str or None
        The interpreter of the current worker.
    start_timeout : float or None
        Seconds the environment's worker has to report its address; None:
        ``envship.timeouts.worker-start``.
    restarting : str or None
        While :func:`switch` restarts the worker: what into (for the log).
        The nanny's reaction to the exit then logs at INFO, not as a crash
        (see :mod:`envship.node.logs`).
    """

    # Class attributes, so that an instance converted by install() has them.
    target: TargetEnvironment | None = None
    last_error: str | None = None
    worker_python: str | None = None
    start_timeout: float | None = None
    restarting: str | None = None
    _switch_lock: asyncio.Lock | None = None

    def __init__(self, worker_kwargs, *args, **kwargs):
        super().__init__(worker_kwargs, *args, **kwargs)
        # A nanny that joined with a target set by a plugin before its first
        # worker process existed (see set_initial_target).
        self.target = _initial_targets.pop(worker_kwargs.get("nanny"), None)

    @property
    def worker_start_timeout(self) -> float:
        if self.start_timeout is not None:
            return self.start_timeout
        return parse_timedelta(config.get("timeouts.worker-start"))

    @property
    def switch_lock(self) -> asyncio.Lock:
        if self._switch_lock is None:
            self._switch_lock = asyncio.Lock()
        return self._switch_lock

    async def start(self) -> Status:
        target = self.target
        if target is None:
            self.worker_python = sys.executable
            zygotes.running(self.worker_kwargs.get("nanny", ""), None)
            return await super().start()
        if self.status == Status.running:
            return self.status
        if self.status == Status.starting:
            await self.running.wait()
            return self.status

        enable_proctitle_on_children()
        self.running = running = asyncio.Event()
        self.stopped = asyncio.Event()
        self.status = Status.starting
        self.last_error = None
        try:
            error = await self._start_in(target)
        except BaseException:
            running.set()
            raise
        if error is None:
            zygotes.running(self.worker_kwargs.get("nanny", ""), target.prefix)
            self.status = Status.running
            running.set()
            return self.status

        logger.error("%s", error)
        self.last_error = error
        self.target = None
        # Start from scratch; whoever waits on the old event wakes up below.
        self.status = Status.init
        try:
            return await self.start()
        finally:
            running.set()

    async def _start_in(self, target: TargetEnvironment) -> str | None:
        """Start the worker under ``target``'s python; an error text on failure."""
        python = target.python
        what = f"environment {target.name!r} ({target.id} at {target.prefix})"
        fallback = f"The worker runs in the nanny's interpreter ({sys.executable})."
        if not os.access(python, os.X_OK):
            return f"{what}: {python} is missing or not executable. {fallback}"

        environ = child_environ(target, os.environ, {**self.pre_spawn_env, **self.env})
        try:
            setup = encode_frame(
                {
                    "worker_kwargs": _advertising(self.worker_kwargs, target.id),
                    "worker_class": _class_path(self.Worker),
                    "silence_logs": self.silence_logs,
                    "env": {k: environ[k] for k in self.env if k in environ},
                    "config": self.config,
                }
            )
        except Exception as e:
            return f"{what}: cannot send the worker's settings: {e!r}. {fallback}"
        process: WorkerSubprocess | None = await self._fork_in(target, environ, setup)
        if process is None:
            process = WorkerSubprocess(
                [str(python), "-s", str(bootstrap_script())], environ
            )
            process.set_exit_callback(self._on_exit)
            try:
                process.start(setup)
            except OSError as e:
                return f"{what}: could not run {python}: {e!r}. {fallback}"
        # The nanny's attribute is typed AsyncProcess; a WorkerSubprocess
        # offers the part of it that distributed uses (see the docstring).
        self.process = cast(AsyncProcess, process)

        problem = missing = None
        timed_out = False
        try:
            line = await process.wait_report(self.worker_start_timeout)
        except asyncio.TimeoutError:
            seconds = self.worker_start_timeout
            problem = f"no worker address reported within {seconds:g} s"
            timed_out = True
        except BaseException:
            # Cancelled, e.g. by the nanny's death_timeout: don't leak the child.
            process.kill()
            self.status = Status.failed
            raise
        if problem is None:
            report = _parse_report(line)
            if report is None:
                problem = "the process exited before reporting a worker address"
            elif "error" in report:
                problem = "the worker failed to start:\n" + report["error"].rstrip()
                missing = report.get("missing")
            elif not process.is_alive():
                problem = "the worker exited right after starting"
            else:
                self.worker_address = report["address"]
                self.worker_dir = report["dir"]
                self.worker_python = report.get("python", str(python))
                return None

        # Detach first so that its exit is not taken for a crash of the worker.
        self.process = None
        if timed_out:
            process.kill()
        # One that reported an error exits by itself: keep its exit code.
        with contextlib.suppress(asyncio.TimeoutError):
            await process.join(5)
        if process.is_alive():
            process.kill()
            with contextlib.suppress(asyncio.TimeoutError):
                await process.join(5)
        await process.wait_stderr(2)
        process.close()
        message = f"{what}: {python} could not start a worker: {problem}"
        if missing == "distributed":
            message += (
                f"\nFix: install distributed (the cluster runs "
                f"{distributed.__version__}) in that environment."
            )
        message += f"\nExit code: {process.exitcode}."
        tail = process.stderr_tail().rstrip()
        if tail:
            message += f"\nLast lines of its stderr:\n{tail}"
        return f"{message}\n{fallback}"

    def warm_zygote(self, target: TargetEnvironment | None) -> None:
        """Start ``target``'s zygote now, in a thread, if zygotes are on and
        none runs: a switch calls this before the old worker closes, so that
        the two overlap, and a prepare once the environment is installed. A
        failure is left for the worker's start to meet (and fall back from).
        """
        if target is None or not zygotes.enabled():
            return
        environ = child_environ(target, os.environ, {**self.pre_spawn_env, **self.env})
        timeout = self.worker_start_timeout

        def start() -> None:
            try:
                zygotes.get(target, environ, timeout)
            except ZygoteError as e:
                logger.debug("envship: no zygote ready for %s: %s", target.name, e)

        name = f"envship zygote of {target.name}"
        threading.Thread(target=start, name=name, daemon=True).start()

    async def _fork_in(
        self, target: TargetEnvironment, environ: dict[str, str], setup: bytes
    ) -> ForkedWorker | None:
        """The worker forked from ``target``'s zygote; None: start it plainly.

        None when zygotes are off, or (logged) when the zygote could not
        start or fork.
        """
        if not zygotes.enabled():
            return None
        try:
            zygote = await asyncio.to_thread(
                zygotes.get, target, environ, self.worker_start_timeout
            )
            process = ForkedWorker(zygote, environ)
            process.set_exit_callback(self._on_exit)
            await asyncio.to_thread(process.start, setup)
        except (ZygoteError, OSError) as e:
            logger.warning(
                "envship: starting the worker in %s plainly, not forked: %s",
                target.name,
                str(e).strip().replace("\n", " | "),
            )
            return None
        return process

    @classmethod
    def _run(cls, *args: Any, **kwargs: Any) -> None:  # pragma: no cover
        """The stock worker process's body (in the nanny's own environment),
        then out at once: atexit handlers and the streams, not the rest of a
        spawned interpreter's finalization (0.4 s of every switch out of the
        nanny's environment here). Runs in the child."""
        super()._run(*args, **kwargs)
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(0)

    def mark_stopped(self) -> None:
        # The nanny hears of the exit in here (on_exit), and reacts in a task
        # made here: it inherits the context, so its log records can tell a
        # restart envship asked for from a crash. Also when a converted
        # WorkerProcess's old bound _on_exit calls this.
        if self.restarting is None:
            super().mark_stopped()
            return
        token = envship_restart.set(self.restarting)
        try:
            super().mark_stopped()
        finally:
            envship_restart.reset(token)

    def _on_exit(self, proc: Any) -> None:
        if (
            isinstance(proc, WorkerSubprocess)
            and proc is self.process
            and self.status == Status.starting
        ):
            return  # died while starting: start() falls back instead
        super()._on_exit(proc)

    async def kill(
        self,
        timeout: float = 5,
        executor_wait: bool = True,
        reason: str = "workerprocess-kill",
    ) -> None:
        if self.status == Status.starting:
            await self.running.wait()
        process = self.process
        if not isinstance(process, WorkerSubprocess):
            await super().kill(
                timeout=timeout, executor_wait=executor_wait, reason=reason
            )
            return

        # From here on, WorkerProcess.kill with a stop message on stdin.
        assert self.status in (
            Status.stopping,
            Status.stopped,
            Status.running,
            Status.failed,
            Status.closing_gracefully,
        ), self.status
        if self.status == Status.stopped:
            return
        if self.status == Status.stopping:
            await self.stopped.wait()
            return
        self.status = Status.stopping
        logger.info("Nanny asking worker to close. Reason: %s", reason)
        wait_timeout = timeout * 0.8
        process.send_stop(
            {
                "op": "stop",
                "timeout": wait_timeout,
                "executor_wait": executor_wait,
                "reason": reason,
            }
        )
        try:
            await process.join(wait_timeout)
            return
        except asyncio.TimeoutError:
            pass
        logger.warning(
            f"Worker process still alive after {wait_timeout:.1f} seconds, killing"
        )
        await process.kill()
        await process.join(timeout)


def _parse_report(line: bytes) -> dict | None:
    if not line.strip():
        return None
    try:
        report = json.loads(line)
    except ValueError:
        return {"error": f"unreadable report {line[:200]!r}"}
    return report if isinstance(report, dict) else None


#: nanny address -> target for the first worker process of a nanny that has
#: none yet (a nanny joining the cluster gets plugins before its worker).
_initial_targets: dict[str, TargetEnvironment | None] = {}


def set_initial_target(
    nanny: distributed.Nanny, target: TargetEnvironment | None
) -> None:
    """Start ``nanny``'s first worker process in ``target``."""
    install(nanny)
    _initial_targets[nanny.address] = target


def install(nanny: distributed.Nanny) -> EnvWorkerProcess | None:
    """Make ``nanny`` (and every nanny of this process) use EnvWorkerProcess.

    Replaces ``distributed.nanny.WorkerProcess``, which is the stock one while
    no target is set, and converts the nanny's current ``WorkerProcess``.
    Idempotent.

    Returns
    -------
    The nanny's EnvWorkerProcess, or None while the nanny has no worker
    process (not started yet, or closed): its first one will be one.
    """
    # Replacing the class the nanny instantiates is the seam itself.
    distributed.nanny.WorkerProcess = EnvWorkerProcess  # type: ignore[misc]
    _release_zygotes_on_close(nanny)
    process = nanny.process
    if process is None or isinstance(process, EnvWorkerProcess):
        return process
    if type(process) is not WorkerProcess:
        raise TypeError(
            f"nanny {nanny.address_safe} uses {type(process).__qualname__}, "
            "a WorkerProcess subclass envship does not know; cannot install"
        )
    process.__class__ = EnvWorkerProcess
    return cast(EnvWorkerProcess, process)


#: Nannies whose closing releases their zygotes (see _release_zygotes_on_close).
_watched: set[int] = set()


def _release_zygotes_on_close(nanny: distributed.Nanny) -> None:
    """Once ``nanny`` has closed, tell :mod:`envship.node.zygotes` (once per nanny).

    Its zygotes close with the last nanny of the process; a nanny that dies
    without closing takes them along (they exit at end of file).
    """
    if id(nanny) in _watched:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return  # not in the nanny's loop; its closing is not seen
    _watched.add(id(nanny))

    async def watch() -> None:
        try:
            await nanny.finished()
        finally:
            _watched.discard(id(nanny))
            try:
                address = nanny.address
            except ValueError:  # never listened: it had no worker
                address = ""
            zygotes.release(address)

    task = loop.create_task(watch(), name="envship zygotes of a nanny")
    _watch_tasks.add(task)
    task.add_done_callback(_watch_tasks.discard)


_watch_tasks: set[asyncio.Task] = set()


async def switch(
    nanny: distributed.Nanny,
    target: TargetEnvironment | None,
    reason: str = "envship-switch",
    timeout: float | None = None,
) -> dict:
    """Restart ``nanny``'s worker in ``target`` (None: the nanny's interpreter).

    The worker keeps its name and nanny but gets a new address; data held only
    by it is lost. If ``target`` cannot start a worker, the worker comes back
    in the nanny's interpreter and the result says why.

    Parameters
    ----------
    nanny : distributed.Nanny
        A running nanny of this process.
    target : TargetEnvironment or None
        The environment to run the worker in.
    reason : str
        Logged by the nanny and the worker.
    timeout : float, optional
        Seconds to wait for the restart; by default the start timeout plus 30.

    Returns
    -------
    dict with ``ok``, ``target`` (the id the worker runs in, or None), ``error``
    (str or None), ``seconds``, ``worker_address`` and ``python``.
    """
    started = time.perf_counter()
    process = install(nanny)

    def result(error: str | None) -> dict:
        current = nanny.process
        in_target = isinstance(current, EnvWorkerProcess) and current.target
        return {
            "ok": error is None,
            "target": in_target.id if in_target else None,
            "error": error,
            "seconds": time.perf_counter() - started,
            "worker_address": nanny.worker_address,
            "python": getattr(current, "worker_python", None),
        }

    if process is None or nanny.status != Status.running:
        return result(
            f"nanny {nanny.address_safe} has no running worker process "
            f"(status {nanny.status.name}); start it first"
        )
    if timeout is None:
        timeout = process.worker_start_timeout + 30
    into = f"{target.name} ({target.id[:12]})" if target else "the nanny's own Python"
    who = nanny_identity(nanny.name, nanny.address)
    async with process.switch_lock:
        process.warm_zygote(target)
        process.target = target
        process.last_error = None
        logger.info("envship: restarting worker %s into %s", who, into)
        process.restarting = into
        try:
            outcome = await nanny.restart(timeout=timeout, reason=reason)
        finally:
            process.restarting = None

    if outcome == "OK" and not process.last_error and process.status == Status.running:
        logger.info(
            "envship: worker %s runs in %s, at %s (restart took %.1f s)",
            who,
            into,
            nanny.worker_address,
            time.perf_counter() - started,
        )

    if outcome == "timed out":
        return result(f"the restart did not finish within {timeout:g} s")
    if outcome != "OK":
        text = outcome.get("exception_text") if isinstance(outcome, dict) else None
        return result(f"the restart failed: {text or outcome}")
    if process.last_error:
        return result(process.last_error)
    if process.status != Status.running:
        return result(f"the worker is {process.status.name} after the restart")
    return result(None)
