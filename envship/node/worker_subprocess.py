"""A worker running under another environment's python, seen as a process.

:class:`WorkerSubprocess` runs ``bootstrap/worker.py`` as a plain
subprocess and offers what distributed's ``WorkerProcess``, ``Nanny`` and
the nanny's memory monitor use of ``AsyncProcess`` (listed in
:mod:`envship.node.worker_process`'s docstring). The nanny talks to the
child in length-prefixed pickle frames on its stdin (:func:`encode_frame`);
the child answers with one JSON line on a pipe of its own.

It knows nothing of environments, caches or what the worker does.
"""

from __future__ import annotations

import asyncio
import collections
import os
import pickle
import struct
import subprocess
import threading
from collections.abc import Callable
from typing import IO, Any

_FRAME_HEADER = struct.Struct(">Q")
_STDERR_TAIL_LINES = 30


def encode_frame(obj: Any) -> bytes:
    """``obj`` pickled, after its length: what the child reads from stdin."""
    data = pickle.dumps(obj, protocol=4)
    return _FRAME_HEADER.pack(len(data)) + data


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


class WorkerSubprocess:
    """The environment's python running ``bootstrap/worker.py``.

    Offers what ``WorkerProcess``, ``Nanny`` and the nanny's memory monitor use
    of ``AsyncProcess``. Threads wait for the exit, read the one-line report
    and copy stderr to the nanny's stderr while keeping its last lines; they
    hand results to the event loop that created this object.
    """

    def __init__(self, args: list[str], env: dict[str, str]):
        self.args = args
        self.env = env
        self.pid: int | None = None
        self.exitcode: int | None = None
        self._loop = asyncio.get_running_loop()
        self._popen: subprocess.Popen | None = None
        self._exit_callback: Callable[[WorkerSubprocess], None] | None = None
        self._exit = self._loop.create_future()
        self._report = self._loop.create_future()
        self._stderr_done = self._loop.create_future()
        self._stderr_tail: collections.deque[bytes] = collections.deque(
            maxlen=_STDERR_TAIL_LINES
        )
        self._stdin_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<WorkerSubprocess {self.args[0]} pid={self.pid}>"

    def start(self, setup: bytes) -> None:
        """Launch the child and send it ``setup`` (a frame); OSError if it can't."""
        read_fd, write_fd = os.pipe()
        try:
            self._popen = subprocess.Popen(
                [*self.args, str(write_fd)],
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                pass_fds=(write_fd,),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.pid = self._popen.pid
        for target, args in (
            (self._wait_exit, ()),
            (self._read_report, (read_fd,)),
            (self._copy_stderr, ()),
            (self._send, (setup,)),
        ):
            name = f"envship worker {self.pid} {target.__name__.strip('_')}"
            threading.Thread(target=target, args=args, name=name, daemon=True).start()

    def _call_in_loop(self, func: Callable, *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(func, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    def _wait_exit(self) -> None:
        assert self._popen is not None
        self.exitcode = self._popen.wait()
        self._call_in_loop(self._on_exit)

    def _on_exit(self) -> None:
        # Same order as AsyncProcess: callback first, then wake join().
        if self._exit_callback is not None:
            self._exit_callback(self)
        _set_result(self._exit, self.exitcode)

    def _read_report(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as f:
            line = f.readline()
        self._call_in_loop(_set_result, self._report, line)

    def _stderr_stream(self) -> IO[bytes]:
        assert self._popen is not None and self._popen.stderr is not None
        return self._popen.stderr

    def _copy_stderr(self) -> None:
        stream = self._stderr_stream()
        for line in iter(stream.readline, b""):
            self._stderr_tail.append(line)
            view = memoryview(line)
            try:
                while view:
                    view = view[os.write(2, view) :]
            except OSError:
                pass
        stream.close()
        self._call_in_loop(_set_result, self._stderr_done, None)

    def _send(self, frame: bytes) -> None:
        assert self._popen is not None and self._popen.stdin is not None
        with self._stdin_lock:
            try:
                self._popen.stdin.write(frame)
                self._popen.stdin.flush()
            except (OSError, ValueError):
                pass  # the child is gone; its exit tells the rest

    async def wait_report(self, timeout: float) -> bytes:
        """The child's report line; empty if it exited without reporting."""
        return await asyncio.wait_for(asyncio.shield(self._report), timeout)

    async def wait_stderr(self, timeout: float) -> None:
        """Wait until the child's stderr is read to its end."""
        try:
            await asyncio.wait_for(asyncio.shield(self._stderr_done), timeout)
        except asyncio.TimeoutError:
            pass

    def stderr_tail(self) -> str:
        return b"".join(self._stderr_tail).decode(errors="replace")

    def send_stop(self, message: dict) -> None:
        """Ask the worker to close; closing stdin afterwards is harmless."""
        self._send(encode_frame(message))
        self._close_stdin()

    def _close_stdin(self) -> None:
        if self._popen is not None and self._popen.stdin is not None:
            with self._stdin_lock:
                try:
                    self._popen.stdin.close()
                except OSError:
                    pass

    def _done(self) -> asyncio.Future[None]:
        # AsyncProcess returns futures; the memory monitor calls without await.
        future = self._loop.create_future()
        future.set_result(None)
        return future

    def terminate(self) -> asyncio.Future[None]:
        if self._popen is not None and self.exitcode is None:
            self._popen.terminate()
        return self._done()

    def kill(self) -> asyncio.Future[None]:
        if self._popen is not None and self.exitcode is None:
            self._popen.kill()
        return self._done()

    async def join(self, timeout: float | None = None) -> None:
        assert self.pid is not None, "can only join a started process"
        await asyncio.wait_for(asyncio.shield(self._exit), timeout)

    def is_alive(self) -> bool:
        return self.pid is not None and self.exitcode is None

    def close(self) -> None:
        """Release the pipe to the child; does not wait for it to exit."""
        if not self._closed:
            self._closed = True
            self._close_stdin()

    def set_exit_callback(self, func: Callable[[WorkerSubprocess], None]) -> None:
        assert self.pid is None, "cannot set exit callback when process already started"
        self._exit_callback = func
