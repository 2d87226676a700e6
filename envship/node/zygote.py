"""Workers forked from a zygote: a process of an environment that has imported
distributed already.

:class:`Zygote` runs ``bootstrap/zygote.py`` under an environment's python
and asks it for children; :class:`ForkedWorker` is one such child running
``bootstrap/worker.py``'s ``main``, offering what
:class:`~envship.node.worker_subprocess.WorkerSubprocess` offers (``pid``,
``exitcode``, ``is_alive``, ``terminate``, ``kill``, ``join``, ``close``,
``set_exit_callback``, ``wait_report``, ``send_stop``), so that it can stand
in for one.

:mod:`envship.node.worker_process` starts workers in environments so when
``envship.zygote.enabled`` (one zygote per environment and node, or per
nanny process, kept by :mod:`envship.node.zygotes`). A zygote started with
a ``listener`` serves every process that connects to it
(:meth:`Zygote.connect`). A caller falls back to a plain start when
:meth:`Zygote.start` or :meth:`Zygote.fork` raise :class:`ZygoteError`
(:class:`ForkRefused` when the zygote is fine but must not fork: a preloaded
module started a thread, or a start-time variable differs). Start the zygote
with the environment variables its workers get (``child_environ`` and the
nanny's ``pre-spawn-environ``): those read when an interpreter or a library
starts cannot change after a fork (``OPENBLAS_NUM_THREADS=1`` also keeps
numpy's import from starting threads).

It knows nothing of nannies, caches or what the worker does; it does not
touch distributed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import psutil

from .worker_environ import bootstrap_script
from .worker_subprocess import WorkerSubprocess

_FRAME_HEADER = struct.Struct(">Q")

#: The exit code of a forked worker whose zygote went away before reporting
#: it: a process can learn the exit status of its own children only.
UNKNOWN_EXIT = 255


#: Variables read only when an interpreter or a library starts: a zygote
#: forks only for workers whose values of them are its own (the rule of
#: ``bootstrap/zygote.py``, which cannot import this).
STARTUP_PREFIXES = ("PYTHON", "LD_", "MALLOC_")
STARTUP_SUFFIXES = ("_NUM_THREADS",)


def startup_variables(env: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``env`` that a fork cannot change.

    Examples
    --------
    >>> startup_variables({"OMP_NUM_THREADS": "1", "PATH": "/bin", "LD_PRELOAD": ""})
    {'OMP_NUM_THREADS': '1', 'LD_PRELOAD': ''}
    """
    return {
        k: v
        for k, v in env.items()
        if k.startswith(STARTUP_PREFIXES) or k.endswith(STARTUP_SUFFIXES)
    }


#: The oldest Python that ``bootstrap/zygote.py`` runs under.
MIN_PYTHON = (3, 8)


def runs_under(version: str) -> bool:
    """Whether a zygote can run under the Python of ``version``.

    An environment whose Python cannot host a worker (2.7, for calls through
    the bridge) never gets one.

    Examples
    --------
    >>> runs_under("3.11.7"), runs_under("3.8"), runs_under("2.7.18")
    (True, True, False)
    """
    major, _, rest = version.partition(".")
    minor = rest.partition(".")[0]
    try:
        return (int(major), int(minor)) >= MIN_PYTHON
    except ValueError:
        return False


class ZygoteError(Exception):
    """The zygote could not start, died, or could not fork: start plainly."""


class ForkRefused(ZygoteError):
    """The zygote is running but must not fork (it says why)."""


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        data = sock.recv(size)
        if not data:
            raise EOFError("the zygote closed the connection")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


class Zygote:
    """A running ``bootstrap/zygote.py`` under an environment's python.

    Made by :meth:`start`. Thread-safe; :meth:`start` and :meth:`fork` block
    (the start for the preloading, about as long as a worker's imports; a
    fork for milliseconds), so call them in a thread from an event loop.

    Examples
    --------
    >>> zygote = Zygote.start("/envs/base/bin/python", env)  # doctest: +SKIP
    >>> zygote.preloaded  # doctest: +SKIP
    ['distributed', 'dask', 'msgpack', 'cloudpickle', 'tornado', 'toolz']
    >>> pid = zygote.fork(["3"], env, [control_r, 1, stderr_w, report_w])  # doctest: +SKIP
    >>> zygote.wait(pid)  # doctest: +SKIP
    0
    >>> zygote.close()  # doctest: +SKIP
    """

    def __init__(self, python: str | os.PathLike, popen: subprocess.Popen | None, sock):
        self.python = Path(python)
        #: The process, if this object started it (not when it connected).
        self._popen = popen
        self._sock: socket.socket = sock
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._exits: dict[int, int] = {}
        self._exit_callbacks: dict[int, list[Callable[[int | None], None]]] = {}
        self._forked: set[int] = set()
        self._gone = False
        self.ready: dict[str, Any] = {}

    @classmethod
    def start(
        cls,
        python: str | os.PathLike,
        env: Mapping[str, str],
        preload: Sequence[str] | None = None,
        timeout: float = 120,
        listener: socket.socket | None = None,
    ) -> Zygote:
        """Run ``<python> -s zygote.py`` with ``env`` and wait until it preloaded.

        Parameters
        ----------
        python : path
            The environment's interpreter.
        env : mapping
            The zygote's environment variables: those of the workers it will
            fork (start-time variables must be the same, see the module).
        preload : list of str, optional
            Modules to import after distributed; None: what distributed's
            forkserver preloads (its required and optional packages).
        timeout : float
            Seconds for the preloading.
        listener : socket, optional
            A listening Unix socket for the zygote to serve: other processes
            then :meth:`connect` to it (the caller may close its copy).

        Raises
        ------
        ZygoteError
            It could not run, could not import distributed, or was not ready
            in time.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            popen = subprocess.Popen(
                [str(python), "-s", str(bootstrap_script("zygote.py"))],
                stdin=theirs.fileno(),
                env=dict(env),
                close_fds=True,
            )
        except OSError as e:
            ours.close()
            raise ZygoteError(f"could not run {python}: {e}") from e
        finally:
            theirs.close()
        zygote = cls(python, popen, ours)
        setup = {
            "preload": None if preload is None else list(preload),
            "listen": listener is not None,
        }
        try:
            zygote._send_frame(setup, [listener.fileno()] if listener else [])
        except OSError as e:
            zygote.kill()
            raise ZygoteError(f"the zygote under {python} did not start: {e!r}") from e
        zygote._wait_ready(timeout)
        return zygote

    @classmethod
    def connect(
        cls, path: str | os.PathLike, python: str | os.PathLike, timeout: float = 30
    ) -> Zygote:
        """The zygote listening on ``path`` (started by another process with a
        ``listener``), as if this process had started it.

        Raises
        ------
        OSError
            Nobody listens there (a zygote that exited leaves its socket file).
        ZygoteError
            It did not say it was ready (it was exiting).
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
        except OSError:
            sock.close()
            raise
        zygote = cls(python, None, sock)
        zygote._wait_ready(timeout)
        return zygote

    def _wait_ready(self, timeout: float) -> None:
        """Read the ready message, then hear replies in a thread."""
        try:
            self._sock.settimeout(timeout)
            ready = self._read_message()
            self._sock.settimeout(None)
        except (OSError, EOFError, ValueError) as e:
            self.kill()
            raise ZygoteError(
                f"the zygote under {self.python} did not get ready: {e!r}"
            ) from e
        if ready.get("op") != "ready":
            self.kill()
            raise ZygoteError(
                f"the zygote under {self.python} could not start:\n{ready.get('error')}"
            )
        self.ready = ready
        threading.Thread(
            target=self._read_replies,
            name=f"envship zygote {self.pid} replies",
            daemon=True,
        ).start()

    def __repr__(self) -> str:
        return f"<Zygote {self.python} pid={self.pid}>"

    @property
    def pid(self) -> int:
        if self._popen is not None:
            return self._popen.pid
        return int(self.ready.get("pid", 0))

    @property
    def shared(self) -> bool:
        """Whether another process started it (this one connected)."""
        return self._popen is None

    def is_alive(self) -> bool:
        """Whether it runs and still talks to us (it may have been closed)."""
        with self._cond:
            if self._gone:
                return False
        return self._popen is None or self._popen.poll() is None

    @property
    def preloaded(self) -> list[str]:
        """The modules it imported."""
        return list(self.ready.get("preloaded", []))

    @property
    def refusal(self) -> str | None:
        """Why it refuses every fork (threads after preloading), or None."""
        return self.ready.get("refusal")

    def rss(self) -> int:
        """Its resident memory in bytes (0 once it is gone)."""
        try:
            return psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return 0

    def _send_frame(self, obj: Any, fds: Sequence[int] = ()) -> None:
        data = pickle.dumps(obj, protocol=4)
        frame = _FRAME_HEADER.pack(len(data)) + data
        with self._send_lock:
            sent = self._sock.sendmsg(
                [frame],
                [
                    (
                        socket.SOL_SOCKET,
                        socket.SCM_RIGHTS,
                        struct.pack(f"{len(fds)}i", *fds),
                    )
                ]
                if fds
                else [],
            )
            if sent < len(frame):
                self._sock.sendall(frame[sent:])

    def _read_message(self) -> dict:
        (size,) = _FRAME_HEADER.unpack(_recv_exactly(self._sock, _FRAME_HEADER.size))
        return json.loads(_recv_exactly(self._sock, size))

    def _read_replies(self) -> None:
        try:
            while True:
                message = self._read_message()
                if message.get("op") == "exit":
                    self._exited(message["pid"], message["status"])
                else:
                    with self._cond:
                        self._replies[message["id"]] = message
                        self._cond.notify_all()
        except (OSError, EOFError, ValueError):
            pass
        with self._cond:
            self._gone = True
            orphans = {
                pid: self._exit_callbacks.pop(pid, [])
                for pid in self._forked
                if pid not in self._exits
            }
            self._cond.notify_all()
        for callbacks in orphans.values():
            for callback in callbacks:
                callback(None)
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._popen is not None:
            self._popen.wait()

    def _exited(self, pid: int, status: int) -> None:
        with self._cond:
            self._exits[pid] = status
            callbacks = self._exit_callbacks.pop(pid, [])
            self._cond.notify_all()
        for callback in callbacks:
            callback(status)

    def fork(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        fds: Sequence[int],
        timeout: float = 30,
    ) -> int:
        """Fork a child that runs ``bootstrap/worker.py``'s ``main``; its pid.

        The child gets ``fds`` as its descriptors 0, 1, 2, 3, ... (nothing
        else), ``env`` as its environment variables and ``[worker.py,
        *args]`` as ``sys.argv``. The caller may close its ``fds`` once this
        returns.

        Raises
        ------
        ForkRefused
            The zygote must not fork (threads, or a start-time variable of
            ``env`` differs from its own): start plainly.
        ZygoteError
            The zygote is gone or did not answer.
        """
        with self._cond:
            if self._gone:
                raise ZygoteError(f"{self!r} is gone")
            request_id = self._next_id
            self._next_id += 1
        request = {
            "op": "fork",
            "id": request_id,
            "args": list(args),
            "env": dict(env),
            "nfds": len(fds),
        }
        try:
            self._send_frame(request, fds)
        except OSError as e:
            raise ZygoteError(f"{self!r} did not take the request: {e!r}") from e
        with self._cond:
            if not self._cond.wait_for(
                lambda: request_id in self._replies or self._gone, timeout
            ):
                raise ZygoteError(f"{self!r} did not answer within {timeout:g} s")
            reply = self._replies.pop(request_id, None)
            if reply is None:
                raise ZygoteError(f"{self!r} died before forking")
            if reply["op"] == "refused":
                raise ForkRefused(f"{self!r} refused to fork: {reply['reason']}")
            self._forked.add(reply["pid"])
            return reply["pid"]

    def on_exit(self, pid: int, callback: Callable[[int | None], None]) -> None:
        """Call ``callback(status)`` in a thread of this object when child
        ``pid`` ends (now if it has): its exit code, minus the signal that
        killed it, or None if the zygote went away first."""
        with self._cond:
            status = self._exits.get(pid)
            if status is None and not self._gone:
                self._exit_callbacks.setdefault(pid, []).append(callback)
                return
        callback(status)

    def wait(self, pid: int, timeout: float | None = None) -> int | None:
        """Child ``pid``'s exit status (see :meth:`on_exit`); None if unknown."""
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or self._gone, timeout)
            return self._exits.get(pid)

    @property
    def exit_statuses(self) -> dict[int, int]:
        """The exit status of every child that ended, by pid."""
        with self._cond:
            return dict(self._exits)

    def close(self, timeout: float | None = None) -> None:
        """Ask for no more forks: the zygote exits once its last child ended
        (and, if shared, once every other process closed it too).

        Its children's exits are still reported. With ``timeout``, wait up to
        that long for the zygote to exit (if this process started it).
        """
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        if timeout is not None and self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout)

    def kill(self) -> None:
        """End the zygote at once if this process started it, else leave it
        (its children live on, until their nanny goes)."""
        if self._popen is not None:
            with contextlib.suppress(OSError):
                self._popen.kill()
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._popen is not None:
            self._popen.wait()


class ForkedWorker(WorkerSubprocess):
    """A worker forked by a :class:`Zygote`, seen as a process.

    Made in an event loop, like :class:`WorkerSubprocess`; ``start(setup)``
    forks instead of running a python: the child gets a control pipe as
    stdin, the nanny's stdout, a pipe of its stderr (copied to the nanny's and
    its last lines kept) and the report pipe as descriptor 3. Its exit comes
    from the zygote's report; signals go through a pidfd, so they never reach
    another process that got the pid later.

    Examples
    --------
    >>> worker = ForkedWorker(zygote, env)  # doctest: +SKIP
    >>> worker.start(encode_frame(setup))  # doctest: +SKIP
    >>> json.loads(await worker.wait_report(60))["address"]  # doctest: +SKIP
    'tcp://127.0.0.1:40123'
    """

    def __init__(self, zygote: Zygote, env: dict[str, str]):
        super().__init__([str(zygote.python), "-s", "zygote.py"], env)
        self.zygote = zygote
        self._stdin: IO[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._pidfd: int | None = None

    def __repr__(self) -> str:
        return f"<ForkedWorker from {self.zygote!r} pid={self.pid}>"

    def start(self, setup: bytes) -> None:
        """Fork the worker and send it ``setup``; ZygoteError if it can't."""
        control_r, control_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        report_r, report_w = os.pipe()
        try:
            pid = self.zygote.fork(["3"], self.env, [control_r, 1, stderr_w, report_w])
        except BaseException:
            for fd in (control_w, stderr_r, report_r):
                os.close(fd)
            raise
        finally:
            for fd in (control_r, stderr_w, report_w):
                os.close(fd)
        self.pid = pid
        with contextlib.suppress(OSError):
            self._pidfd = os.pidfd_open(pid)
        self._stdin = os.fdopen(control_w, "wb")
        self._stderr = os.fdopen(stderr_r, "rb")
        self.zygote.on_exit(pid, self._exited)
        for target, args in (
            (self._read_report, (report_r,)),
            (self._copy_stderr, ()),
            (self._send, (setup,)),
        ):
            name = f"envship worker {pid} {target.__name__.strip('_')}"
            threading.Thread(target=target, args=args, name=name, daemon=True).start()

    def _exited(self, status: int | None) -> None:
        if status is None:
            # The zygote went first: only the pidfd tells when the child ends.
            threading.Thread(
                target=self._wait_pidfd,
                name=f"envship worker {self.pid} pidfd",
                daemon=True,
            ).start()
            return
        self._set_exitcode(status)

    def _wait_pidfd(self) -> None:
        if self._pidfd is not None:
            select.select([self._pidfd], [], [])
        self._set_exitcode(UNKNOWN_EXIT)

    def _set_exitcode(self, status: int) -> None:
        self.exitcode = status
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
        self._call_in_loop(self._on_exit)

    def _stderr_stream(self) -> IO[bytes]:
        assert self._stderr is not None
        return self._stderr

    def _send(self, frame: bytes) -> None:
        with self._stdin_lock:
            try:
                assert self._stdin is not None
                self._stdin.write(frame)
                self._stdin.flush()
            except (OSError, ValueError):
                pass  # the child is gone; its exit tells the rest

    def _close_stdin(self) -> None:
        if self._stdin is not None:
            with self._stdin_lock:
                with contextlib.suppress(OSError):
                    self._stdin.close()

    def _signal(self, sig: int) -> None:
        if self.pid is None or self.exitcode is not None:
            return
        with contextlib.suppress(ProcessLookupError, OSError):
            if self._pidfd is not None:
                signal.pidfd_send_signal(self._pidfd, sig)
            else:
                os.kill(self.pid, sig)

    def terminate(self) -> asyncio.Future[None]:
        self._signal(signal.SIGTERM)
        return self._done()

    def kill(self) -> asyncio.Future[None]:
        self._signal(signal.SIGKILL)
        return self._done()
