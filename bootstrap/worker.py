"""Run one Dask worker for a nanny, under a shipped environment's python.

The nanny's ``envship.node.worker_process.EnvWorkerProcess`` starts
``<env>/bin/python -s worker.py REPORT_FD`` and talks to it so:

- stdin carries length-prefixed pickles (8-byte big-endian length, protocol
  4): first the setup, a dict with ``worker_kwargs``, ``worker_class``
  ("module:qualname"), ``silence_logs``, ``env`` and ``config``; later at most
  one ``{"op": "stop", "timeout", "executor_wait", "reason"}``. End of file
  means the nanny is gone: the worker closes as if asked to stop. Standard
  input proper is /dev/null, as in the nanny's stock worker process.
- REPORT_FD, inherited from the nanny, gets one JSON line, ``{"address",
  "dir", "python", "pid", "distributed"}`` once the worker runs, or
  ``{"error": <traceback text>}`` if it could not start (with ``"missing"``,
  the module's name, if an import failed); then it is closed.
- stdout and stderr are the worker's own: user code prints there.

It does what ``distributed.nanny.WorkerProcess._run`` does in the nanny's
stock worker process. Standard library and this environment's own distributed
only, never envship: this runs under whatever Python 3 the environment has.
"""

import json
import os
import pickle
import struct
import sys
import threading
import traceback

_FRAME_HEADER = struct.Struct(">Q")

# If the nanny goes away and the worker cannot close within this many
# seconds, the process exits anyway (the stock worker process exits at once).
# Closing can hang: a worker that also lost its scheduler tries to tell its
# dead nanny, retrying for the whole connect timeout.
_ORPHAN_EXIT_AFTER = 10


def _drop_own_dir_from_sys_path():
    # "python -s worker.py" puts this folder first on sys.path; nothing in it
    # is meant to be imported by the worker.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != here]


def _take_stdin():
    """The control pipe on a private descriptor; fd 0 becomes /dev/null.

    User code that reads standard input must not eat the stop message.
    """
    control = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return os.fdopen(control, "rb")


def _read_frame(stream):
    header = stream.read(_FRAME_HEADER.size)
    if len(header) < _FRAME_HEADER.size:
        raise EOFError("the nanny closed the control pipe")
    (size,) = _FRAME_HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the nanny closed the control pipe mid-message")
    return data


class _Reporter:
    """Writes the one report line to the nanny, once."""

    def __init__(self, fd):
        self.fd = fd

    def send(self, report):
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(report) + "\n")


def _import_object(path):
    import importlib

    module_name, _, qualname = path.partition(":")
    obj = importlib.import_module(module_name)
    for attribute in qualname.split("."):
        obj = getattr(obj, attribute)
    return obj


def _prepare(setup):
    """Apply the nanny's environment variables and config; return the Worker."""
    import logging

    import dask.config

    os.environ.update(setup["env"])
    dask.config.refresh()
    dask.config.set(setup["config"])
    try:
        from dask.multiprocessing import default_initializer
    except ImportError:
        pass
    else:
        default_initializer()
    if setup["silence_logs"]:
        logging.getLogger("distributed.nanny").setLevel(setup["silence_logs"])
    return _import_object(setup["worker_class"])


async def _close_worker(worker, message):
    import inspect

    accepted = inspect.signature(worker.close).parameters
    kwargs = {
        k: message[k]
        for k in ("timeout", "executor_wait", "reason")
        if k in message and k in accepted
    }
    await worker.close(nanny=False, **kwargs)


def _watch_control(control, loop, worker):
    """Wait for the nanny's stop message, or its end, then close the worker."""
    import asyncio

    try:
        message = pickle.loads(_read_frame(control))
        orphan = False
    except Exception:
        message = {"op": "stop", "reason": "nanny-gone"}
        orphan = True
    finally:
        control.close()

    def close():
        if orphan:
            worker.nanny = None  # nobody to tell
        asyncio.ensure_future(_close_worker(worker, message))

    try:
        loop.call_soon_threadsafe(close)
    except RuntimeError:
        return  # the loop is closed: the worker is done already
    if orphan:
        timer = threading.Timer(_ORPHAN_EXIT_AFTER, os._exit, (1,))
        timer.daemon = True
        timer.start()


def _run_worker(worker_class, worker_kwargs, control, reporter):
    import asyncio

    import distributed

    async def run():
        started = False
        try:
            worker = worker_class(**worker_kwargs)
            threading.Thread(
                target=_watch_control,
                args=(control, asyncio.get_running_loop(), worker),
                name="Nanny stop pipe watch",
                daemon=True,
            ).start()
            async with worker:
                started = True
                reporter.send(
                    {
                        "address": worker.address,
                        "dir": worker.local_directory,
                        "python": sys.executable,
                        "pid": os.getpid(),
                        "distributed": distributed.__version__,
                    }
                )
                await worker.finished()
        except Exception:
            if started:
                raise
            reporter.send({"error": traceback.format_exc()})
            return 1
        return 0

    try:
        from distributed.compatibility import asyncio_run
        from distributed.config import get_loop_factory
    except ImportError:
        return asyncio.run(run())
    return asyncio_run(run(), loop_factory=get_loop_factory())


def main():
    reporter = _Reporter(int(sys.argv[1]))
    control = _take_stdin()
    try:
        setup = _read_frame(control)
    except EOFError:
        return 1  # the nanny went away before sending anything
    try:
        _drop_own_dir_from_sys_path()
        import distributed  # noqa: F401  (a missing distributed fails here)

        setup = pickle.loads(setup)
        worker_class = _prepare(setup)
    except ImportError as e:
        # Which module is missing, for the nanny to say what to install.
        reporter.send({"error": traceback.format_exc(), "missing": e.name})
        return 1
    except Exception:
        reporter.send({"error": traceback.format_exc()})
        return 1
    return _run_worker(worker_class, setup["worker_kwargs"], control, reporter)


def exit_promptly(code):
    """End the process once its worker has closed: the atexit handlers (user
    code may count on them) and the streams, then ``os._exit``, without the
    rest of the interpreter's finalization, which took half a second after a
    worker here (multiprocessing's children leave the same way)."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    exit_promptly(main())
