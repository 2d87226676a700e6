"""Fork Dask workers from one process of a shipped environment that has
imported distributed already.

``envship.node.zygote.Zygote`` starts ``<env>/bin/python -s zygote.py`` with
its standard input one end of a Unix stream socket, and talks to it so:

- client to zygote: frames of an 8-byte big-endian length and a pickle
  (protocol 4). First the setup, ``{"preload": None or [module, ...],
  "listen": bool}`` (None: what distributed's own forkserver preloads, see
  :func:`default_preload`; with ``listen``, a listening Unix socket is
  attached, on which the other nannies of the node connect: see below);
  then fork requests, ``{"op": "fork", "id",
  "args", "env", "nfds"}``, each sent with its ``nfds`` descriptors attached
  (SCM_RIGHTS). End of file (the client closed, or shut down its writing
  side) means no more requests.
- zygote to client: frames of the same length and a JSON object: once
  ``{"op": "ready", "pid", "python", "distributed", "preloaded", "failed",
  "refusal"}`` (or ``{"op": "error", "error", "missing"}`` if distributed
  itself cannot be imported, then it exits); for each request ``{"op":
  "forked", "id", "pid"}`` or ``{"op": "refused", "id", "reason"}``; for each
  child that ends, ``{"op": "exit", "pid", "status"}`` (the exit code, or
  minus the signal that killed it, as ``subprocess`` says).

A child moves the descriptors it was sent to 0, 1, 2, 3, ... in that order,
closes every other descriptor it inherited, replaces its environment
variables with the request's ``env`` (and forgets the temporary folder
the zygote derived from its own), draws new random state (``random``,
``numpy.random`` if imported, ``uuid``'s clock sequence), sets ``sys.argv``
to ``[worker.py, *args]`` and runs ``bootstrap/worker.py``'s ``main``: for a
worker, ``args`` is ``["3"]`` with descriptors (control pipe, stdout,
stderr, report pipe), exactly the plain start's
``python -s worker.py 3``.

Fork hygiene:

- Before every fork the zygote checks that it has one thread
  (``/proc/self/task`` and ``threading.active_count()``); a preloaded module
  that started a thread (numpy's OpenBLAS does, unless
  ``OPENBLAS_NUM_THREADS=1``) makes it refuse every fork, saying which
  threads: the caller starts the worker plainly instead.
- Variables read only when an interpreter or a library starts (``PYTHON*``,
  ``LD_*``, ``MALLOC_*``, ``*_NUM_THREADS``) cannot change after a fork: a
  request whose value of one differs from the zygote's own is refused, so
  start the zygote with the workers' variables.
- No ``os.setsid()``: the children stay in the zygote's process group and
  session, which are its client's (the nanny's), as a plain start's worker is
  in its nanny's; a terminal's Ctrl-C or a batch system's signal to the group
  reaches them as it reaches plain workers.

Shared by the nannies of a node: a client that connects on the listening
socket (of the same user: ``SO_PEERCRED``) gets the ready message at once
and then talks as the first client does, without a setup. Each child's
exit is reported to the client that asked for it. A client that sends
anything but a well-formed fork request is dropped; the others are served
on.

Lifetime: the zygote reaps its children (SIGCHLD) and reports each exit.
A client's end of file means it asks no more; once every client has gone
and the last child has ended, the zygote exits. If a client died, the
control pipes of its children (whose writing ends only it held) are at end
of file too, so they close as a plain worker does when its nanny dies: no
orphans.

Standard library and this environment's own distributed only, never
envship: this runs under whatever Python 3.8+ the environment has.
"""

import errno
import fcntl
import importlib
import importlib.util
import json
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import traceback

_FRAME_HEADER = struct.Struct(">Q")
_MAX_FDS = 16
_STARTUP_PREFIXES = ("PYTHON", "LD_", "MALLOC_")
_STARTUP_SUFFIXES = ("_NUM_THREADS",)

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_worker_module():
    """``bootstrap/worker.py`` as a module of a private name (not ``worker``)."""
    path = os.path.join(_HERE, "worker.py")
    spec = importlib.util.spec_from_file_location("_envship_bootstrap_worker", path)
    if spec is None or spec.loader is None:
        raise ImportError("cannot load " + path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_worker = _load_worker_module()


def default_preload():
    """What distributed's forkserver preloads: distributed, then every one of
    its required and optional packages that imports (``distributed.utils.
    get_mp_context``)."""
    names = ["distributed"]
    try:
        from distributed.versions import optional_packages, required_packages
    except ImportError:
        return names
    return names + [p for p in list(required_packages) + list(optional_packages)]


def _is_startup_variable(name):
    return name.startswith(_STARTUP_PREFIXES) or name.endswith(_STARTUP_SUFFIXES)


def _startup_variables(env):
    return {k: v for k, v in env.items() if _is_startup_variable(k)}


def _threads():
    """How many threads this process has (the kernel's count) and their names."""
    try:
        tasks = len(os.listdir("/proc/self/task"))
    except OSError:
        tasks = threading.active_count()
    return max(tasks, threading.active_count()), [t.name for t in threading.enumerate()]


def thread_refusal():
    """Why this process must not fork, or None: it has more than one thread."""
    count, names = _threads()
    if count <= 1:
        return None
    return (
        "the zygote has %d threads (Python threads: %s; the others are native, "
        "e.g. a BLAS pool): a fork would copy locks they hold"
        % (count, ", ".join(names))
    )


def env_refusal(startup, env):
    """Why a child with ``env`` cannot be forked from a zygote started with
    ``startup``, or None."""
    wanted = _startup_variables(env)
    differ = sorted(
        k for k in set(wanted) | set(startup) if wanted.get(k) != startup.get(k)
    )
    if not differ:
        return None
    return (
        "variables read at interpreter or library start differ from the "
        "zygote's: %s; start a zygote with the worker's variables" % ", ".join(differ)
    )


def _send(sock, message):
    data = json.dumps(message).encode()
    sock.sendall(_FRAME_HEADER.pack(len(data)) + data)


def _recv_exactly(sock, size, fds):
    chunks = []
    while size:
        data, ancdata, _flags, _addr = sock.recvmsg(
            size, socket.CMSG_SPACE(_MAX_FDS * 4)
        )
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % 4
                fds.extend(struct.unpack("%di" % (usable // 4), payload[:usable]))
        if not data:
            raise EOFError("the client closed the connection")
        chunks.append(data)
        size -= len(data)
    return b"".join(chunks)


def _recv(sock):
    """The next request and the descriptors sent with it."""
    fds = []  # type: list[int]
    try:
        (size,) = _FRAME_HEADER.unpack(_recv_exactly(sock, _FRAME_HEADER.size, fds))
        message = pickle.loads(_recv_exactly(sock, size, fds))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return message, fds


def _exit_status(status):
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _log(text):
    sys.stderr.write("envship zygote %d: %s\n" % (os.getpid(), text))
    sys.stderr.flush()


class _Serving:
    """The zygote's loop: accept clients, fork on request, reap, report."""

    def __init__(self, sock, startup, ready, listener=None):
        self.startup = startup
        self.ready = ready
        self.listener = listener
        self.clients = set([sock])
        #: child pid -> the client that asked for it (None: that client left)
        self.children = {}
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            fcntl.fcntl(
                fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK
            )
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def report(self, client, message):
        if client is None or client not in self.clients:
            return
        try:
            _send(client, message)
        except OSError:
            self.drop(client)  # nobody listens there any more; keep reaping

    def drop(self, client):
        self.clients.discard(client)
        for pid, owner in self.children.items():
            if owner is client:
                self.children[pid] = None
        try:
            client.close()
        except OSError:
            pass

    def accept(self):
        """A nanny of the node connected: same user only; it gets the ready message."""
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        credentials = client.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
        _pid, uid, _gid = struct.unpack("3i", credentials)
        if uid != os.getuid():
            _log("refused a connection of user %d" % uid)
            client.close()
            return
        self.clients.add(client)
        self.report(client, self.ready)

    def reap(self):
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            owner = self.children.pop(pid, None)
            self.report(
                owner, {"op": "exit", "pid": pid, "status": _exit_status(status)}
            )

    def serve(self):
        """Serve until every client has gone and the last child ended; in a
        child, return its request and descriptors."""
        while self.clients or self.children:
            watched = [self.wake_r] + list(self.clients)
            if self.listener is not None:
                watched.append(self.listener)
            ready, _, _ = select.select(watched, [], [])
            if self.wake_r in ready:
                try:
                    while os.read(self.wake_r, 512):
                        pass
                except OSError as e:
                    if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                        raise
            self.reap()
            if self.listener is not None and self.listener in ready:
                self.accept()
            for client in ready:
                if client not in self.clients:
                    continue
                try:
                    request, fds = _recv(client)
                except (EOFError, OSError, ValueError, pickle.UnpicklingError):
                    self.drop(client)
                    continue
                if not _is_request(request):
                    _log("dropped a client that sent %r" % (type(request),))
                    for fd in fds:
                        os.close(fd)
                    self.drop(client)
                    continue
                child = self.handle(client, request, fds)
                if child is not None:
                    return child
        return None

    def handle(self, client, request, fds):
        try:
            reason = thread_refusal() or env_refusal(self.startup, request["env"])
            if reason is None and len(fds) != request.get("nfds"):
                reason = "expected %s descriptors, got %d" % (
                    request.get("nfds"),
                    len(fds),
                )
            if reason is None and len(fds) < 3:
                reason = "a child needs at least 3 descriptors (stdin, stdout, stderr)"
            if reason is not None:
                self.report(
                    client, {"op": "refused", "id": request["id"], "reason": reason}
                )
                return None
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                return self.become_child(request, fds)
            self.children[pid] = client
            self.report(client, {"op": "forked", "id": request["id"], "pid": pid})
            return None
        finally:
            # In the zygote: the child holds them now (or there is none).
            if not getattr(self, "is_child", False):
                for fd in fds:
                    os.close(fd)

    def become_child(self, request, fds):
        self.is_child = True
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # The socket objects must never close their numbers again: another
        # file may get a number once the descriptors are closed below.
        for sock in list(self.clients) + [self.listener]:
            if sock is not None:
                sock.detach()
        _place_descriptors(fds)
        os.environ.clear()
        os.environ.update(request["env"])
        _forget_environment_derived_state()
        _new_random_state()
        sys.argv = [_worker.__file__] + list(request["args"])
        return request


def _is_request(request):
    """Whether ``request`` is a fork request this zygote can read."""
    return (
        isinstance(request, dict)
        and request.get("op") == "fork"
        and isinstance(request.get("id"), int)
        and isinstance(request.get("args"), list)
        and all(isinstance(a, str) for a in request["args"])
        and isinstance(request.get("env"), dict)
        and all(
            isinstance(k, str) and isinstance(v, str) for k, v in request["env"].items()
        )
    )


def _place_descriptors(fds):
    """``fds`` onto 0, 1, 2, ...; every other descriptor closed."""
    n = len(fds)
    # Out of the way first: a sent descriptor may have a number below n.
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, n) for fd in fds]
    for target, fd in enumerate(high):
        os.dup2(fd, target, inheritable=True)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd >= n:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, closed already


def _forget_environment_derived_state():
    """What the zygote derived from its own variables, to derive anew."""
    tempfile = sys.modules.get("tempfile")
    if tempfile is not None:
        vars(tempfile)["tempdir"] = None  # from TMPDIR, at the first gettempdir()


def _new_random_state():
    """Random state of the child's own: a fork copies the zygote's."""
    import random

    random.seed()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()
    uuid = sys.modules.get("uuid")
    if uuid is not None and hasattr(uuid, "_last_timestamp"):
        vars(uuid)["_last_timestamp"] = None  # uuid1's clock sequence is drawn anew


def _preload(names):
    """Import ``names``; the ones that imported, and the errors of the others."""
    preloaded, failed = [], {}
    for name in names:
        if name in preloaded:
            continue
        try:
            importlib.import_module(name)
        except Exception as e:
            failed[name] = "%s: %s" % (type(e).__name__, e)
        else:
            preloaded.append(name)
    return preloaded, failed


def _take_socket():
    """The client's socket, off descriptor 0 (which becomes /dev/null)."""
    sock = socket.socket(fileno=os.dup(0))
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return sock


def main():
    sock = _take_socket()
    # A Ctrl-C meant for the group reaches the workers; the zygote goes when
    # its client does.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        setup, fds = _recv(sock)
    except (EOFError, OSError):
        return 1
    listener = None
    if setup.get("listen") and fds:
        listener = socket.socket(fileno=fds.pop(0))
    for fd in fds:
        os.close(fd)
    _worker._drop_own_dir_from_sys_path()
    try:
        import distributed
    except ImportError as e:
        _send(sock, {"op": "error", "error": traceback.format_exc(), "missing": e.name})
        return 1
    preload = setup.get("preload")
    preloaded, failed = _preload(
        ["distributed"] + list(default_preload() if preload is None else preload)
    )
    for name, error in failed.items():
        if preload is not None:  # the default list names optional packages
            _log("could not preload %s: %s" % (name, error))
    refusal = thread_refusal()
    if refusal is not None:
        _log("refusing to fork after preloading %s: %s" % (preloaded, refusal))
    ready = {
        "op": "ready",
        "pid": os.getpid(),
        "python": sys.executable,
        "distributed": distributed.__version__,
        "preloaded": preloaded,
        "failed": failed,
        "refusal": refusal,
    }
    _send(sock, ready)
    serving = _Serving(sock, _startup_variables(os.environ), ready, listener)
    child = serving.serve()
    if child is None:
        return 0
    _worker.exit_promptly(_worker.main())


if __name__ == "__main__":
    sys.exit(main())
