"""The worker's end of a bridge: run a function in a foreign environment's python.

This module travels *by value* with the tasks that use it (it is registered
with cloudpickle so): a worker runs it whether or not it can import envship,
in the nanny's own environment or in a shipped one. So it imports the
standard library and distributed only.

One bridge per worker and environment: ``<env>/bin/python bridge.py`` of
``bootstrap/``, started on first use, leased from the nanny for as long as
the worker lives (see ``NannySide.foreign``), reused by every later call;
calls of one worker's threads take turns. The protocol's functions come
from that same ``bridge.py`` file, so both ends speak one protocol.
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import subprocess
import sys
import threading

#: Attributes of the worker object that hold its bridges (the worker is the
#: one object that lives as long as they do: this module is new per task).
_BRIDGES, _LOCK = "_envship_bridges", "_envship_bridges_lock"


def call_in(env: dict, target: str, args: tuple, kwargs: dict):
    """Run ``target(*args, **kwargs)`` in ``env`` (id, name, python) on this worker."""
    from distributed import get_worker

    try:
        worker = get_worker()
    except ValueError:
        raise RuntimeError(
            f"{env['name']}.call runs in tasks: client.submit(env.call, "
            f"{target!r}, ...)"
        ) from None
    with worker.__dict__.setdefault(_LOCK, threading.Lock()):
        bridges = worker.__dict__.setdefault(_BRIDGES, {})
        bridge = bridges.get(env["id"])
        if bridge is None or bridge.process.poll() is not None:
            bridge = bridges[env["id"]] = _start(worker, env)
    return bridge.call(target, args, kwargs)


def _start(worker, env: dict) -> Bridge:
    """Ask the nanny for the environment (it leases it), then start its python."""
    from distributed.utils import sync

    if not worker.nanny:
        raise RuntimeError(
            f"calls into {env['name']} need a worker started by a nanny with "
            "envship (dask worker --nanny --preload-nanny envship)"
        )
    spec = sync(
        worker.loop,
        lambda: worker.rpc(worker.nanny).envship_foreign(
            id=env["id"], name=env["name"], pid=os.getpid()
        ),
    )
    return Bridge(spec, env, worker.local_directory)


class Bridge:
    """A foreign python serving calls over two pipes."""

    def __init__(self, spec: dict, env: dict, folder: str):
        self.env = env
        self.protocol: dict = {"__name__": "envship_bridge"}
        with open(spec["script"], encoding="utf-8") as f:
            exec(compile(f.read(), spec["script"], "exec"), self.protocol)
        requests_in, requests_out = os.pipe()
        responses_in, responses_out = os.pipe()
        try:
            self.process = subprocess.Popen(
                [spec["python"], "-s", spec["script"], str(requests_in)]
                + [str(responses_out), folder],
                env=spec["environ"],
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(requests_in, responses_out),
            )
        finally:
            os.close(requests_in)
            os.close(responses_out)
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._stderr = threading.Thread(target=self._copy_stderr, daemon=True)
        self._stderr.start()
        self.requests = open(requests_out, "wb", buffering=0)
        self.responses = open(responses_in, "rb", buffering=0)
        self.lock = threading.Lock()

    def call(self, target: str, args: tuple, kwargs: dict):
        name, python = self.env["name"], self.env["python"]
        p = self.protocol
        try:
            frames = p["dumps"]((target, args, kwargs))
        except p["CannotCross"] as e:
            raise TypeError(
                f"an argument of {target} cannot cross into {name} (Python "
                f"{python}): {e}"
            ) from None
        with self.lock:
            try:
                p["write_message"](self.requests, frames)
                response = p["read_message"](self.responses)
            except (OSError, EOFError):
                response = None
            if response is None:
                code = self._exit_code()
                self._stderr.join(timeout=2)
                raise RuntimeError(
                    f"the Python {python} interpreter of {name} died (exit code "
                    f"{code}) while it ran {target}; the next call starts a "
                    "fresh one. The end of its output:\n" + "".join(self.stderr_tail)
                )
        try:
            outcome = p["loads"](response)
        except p["NumpyMissing"]:
            raise _numpy_missing_here(self.env, target) from None
        except p["CannotCross"] as e:
            raise TypeError(
                f"the result of {target} cannot cross back from {name} (Python "
                f"{python}): {e}"
            ) from None
        except Exception as e:
            raise TypeError(
                f"the result of {target} cannot cross back from {name} (Python "
                f"{python}): {type(e).__name__}: {e}"
            ) from None
        if outcome[0] == "ok":
            return outcome[1]
        _, kind, message, text = outcome
        if kind == "NumpyMissing":
            raise _envship_error(
                name,
                f"the arguments of {target} hold a numpy array, and {name} "
                f"(Python {python}) has no numpy to receive it",
                f"install numpy into {name}, then envship.foreign(client, {name!r}) "
                "again, or pass lists instead of arrays (array.tolist())",
            )
        raise _error_like(kind)(
            f"{message}\n\nin {target}, under Python {python} of {name}:\n{text}"
        )

    def _copy_stderr(self) -> None:
        """Pass the bridge's errors on to the worker's, keeping the last lines."""
        assert self.process.stderr is not None  # started with stderr=PIPE
        for line in io.TextIOWrapper(self.process.stderr, errors="replace"):
            self.stderr_tail.append(line)
            sys.stderr.write(line)

    def _exit_code(self):
        try:
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def _numpy_missing_here(env: dict, target: str) -> Exception:
    """The error for a result holding an array, on a worker without numpy."""
    here = _worker_environment()
    lists = f"or have {target} return lists (array.tolist())"
    if here is None:
        fix = (
            "switch the workers into an environment with numpy "
            "(client.use_environment(...)), or install numpy where the nannies "
            f"run (`{sys.executable} -m pip install numpy` on each node), {lists}"
        )
    else:
        fix = (
            f"install numpy into {here} where you packed it, then "
            f"client.use_environment({here!r}) again, {lists}"
        )
    return _envship_error(
        here or "the nannies' own environment",
        f"the result of {target}, from {env['name']}, holds a numpy array, and "
        f"the environment the workers run in (python at {sys.prefix}) has no "
        "numpy to receive it",
        fix,
    )


def _worker_environment() -> str | None:
    """The name of the environment this worker runs in; None: the nannies' own."""
    from distributed import get_worker
    from distributed.utils import sync

    try:
        worker = get_worker()
        nanny = worker.nanny
        assert isinstance(nanny, str), "a bridge needs a nanny (see _start)"
        status = sync(
            worker.loop, lambda: worker.rpc(nanny).envship_status(cache=False)
        )
    except Exception:  # no nanny to ask: name it by its folder
        return os.path.basename(sys.prefix)
    return status.get("name") or status.get("running")


def _envship_error(env: str, problem: str, fix: str) -> Exception:
    """``envship.errors.EnvshipError(env, problem, fix)`` where envship imports.

    A worker in a shipped environment cannot import envship: it raises a
    :class:`_PortableEnvshipError` instead, which becomes the EnvshipError
    when the client unpickles it.
    """
    try:
        from envship.errors import EnvshipError
    except ImportError:
        return _PortableEnvshipError(env, problem, fix)
    return EnvshipError(env, problem, fix)


class _PortableEnvshipError(TypeError):
    """An EnvshipError raised where envship is not installed (same text)."""

    def __init__(self, env: str, problem: str, fix: str):
        super().__init__(f"environment {env!r}: {problem}\nFix: {fix}")
        self.fields = (env, problem, fix)

    def __reduce__(self):
        # This module travels by value: unpickling runs this function on the
        # client, where envship imports.
        return _envship_error, self.fields


def _error_like(kind: str) -> type[Exception]:
    """The built-in exception class named ``kind``, or RuntimeError."""
    if kind == "CannotCross":
        return TypeError
    found = getattr(builtins, str(kind), None)
    if isinstance(found, type) and issubclass(found, Exception):
        return found
    return RuntimeError
