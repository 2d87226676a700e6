"""Serve calls from a Dask worker, inside an environment whose Python cannot
host one (Python 2.7, or another Python 3).

A worker starts ``<env>/bin/python -s bridge.py REQUESTS_FD RESPONSES_FD
[PATH ...]`` once, on first use, and keeps it; the PATHs (the worker's
folder, where ``client.upload_file`` puts modules) go at the end of
``sys.path``. Each request is ``(target, args, kwargs)``, ``target`` naming a
function by import path (``"package.module.function"`` or
``"package.module:Class.method"``); each response is ``("ok", result)`` or
``("error", type name, message, traceback text)``, the type name
``NumpyMissing`` when the arguments hold a numpy array and this environment
has no numpy. End of file on the
requests means the worker is gone: the bridge exits.

Messages, both ways: a 4-byte big-endian count of frames, then each frame as
an 8-byte big-endian length and its bytes. The first frame is a pickle of
protocol 2, which Python 2 and 3 both read; numpy arrays and scalars travel
beside it, each as a frame of its raw bytes (no copy into the pickle), named
in the pickle by a persistent id ``("ndarray", dtype, shape, frame)``. On
either side a Python 2 ``str`` is a Python 3 ``str`` decoded as latin-1;
opaque bytes cross as ``bytearray``.

The worker side runs this same file's functions (it reads and runs it
without ``__main__``), so both ends speak one protocol. Python 2.7 and 3,
standard library only (numpy if the caller sends arrays), never envship.
"""

import importlib
import io
import os
import struct
import sys
import traceback

if sys.version_info[0] == 2:  # the fast pickler; Python 3's pickle is already
    import cPickle as pickle
else:
    import pickle

PROTOCOL = 2
_COUNT = struct.Struct(">I")
_LENGTH = struct.Struct(">Q")
_CHUNK = 1 << 24


class CannotCross(TypeError):
    """A value that cannot travel between the two interpreters."""


class NumpyMissing(CannotCross):
    """A value holds a numpy array, and this side has no numpy to rebuild it."""


# -- messages --------------------------------------------------------------------


def write_message(stream, frames):
    """Send ``frames`` (bytes or buffers) as one message."""
    stream.write(_COUNT.pack(len(frames)))
    for frame in frames:
        view = memoryview(frame)
        stream.write(_LENGTH.pack(len(view)))
        for start in range(0, len(view), _CHUNK):
            _write_all(stream, view[start : start + _CHUNK])
    stream.flush()


def _write_all(stream, view):
    while len(view):
        written = stream.write(view)
        view = view[written:] if written is not None else view[len(view) :]


def read_message(stream):
    """The frames of one message (bytearrays), or None at end of file."""
    head = _read_exactly(stream, _COUNT.size)
    if head is None:
        return None
    (count,) = _COUNT.unpack(bytes(head))
    frames = []
    for _ in range(count):
        (length,) = _LENGTH.unpack(bytes(_read_exactly(stream, _LENGTH.size, True)))
        frames.append(_read_exactly(stream, length, True))
    return frames


def _read_exactly(stream, size, required=False):
    buffer = bytearray(size)
    view = memoryview(buffer)
    done = 0
    while done < size:
        got = stream.readinto(view[done:])
        if not got:
            if done == 0 and not required:
                return None
            raise EOFError("the other side closed in the middle of a message")
        done += got
    return buffer


# -- values ------------------------------------------------------------------------


def dumps(value):
    """The frames of ``value``: a protocol-2 pickle, then the arrays' bytes."""
    numpy = sys.modules.get("numpy")  # a value holds arrays only if numpy is loaded
    buffers = []

    def persistent_id(obj):
        if numpy is None:
            return None
        if isinstance(obj, numpy.ndarray) and type(obj) is numpy.ndarray:
            array = obj
            kind = "ndarray"
        elif isinstance(obj, numpy.generic):
            array = numpy.asarray(obj)
            kind = "scalar"
        else:
            return None
        if array.dtype.hasobject:
            raise CannotCross(
                "a numpy array of Python objects (dtype object) cannot cross: "
                "convert it to a plain dtype or a list"
            )
        # Flat bytes: a 1-d memoryview of bytes on Python 2 and 3 alike.
        buffers.append(numpy.ascontiguousarray(array).reshape(-1).view(numpy.uint8))
        spec = array.dtype.descr if array.dtype.names else array.dtype.str
        return (kind, spec, tuple(array.shape), len(buffers))

    out = io.BytesIO()
    pickler = pickle.Pickler(out, PROTOCOL)
    # The one way cPickle (Python 2) takes it; Python 3's pickle takes it too.
    pickler.persistent_id = persistent_id  # type: ignore[method-assign]
    try:
        pickler.dump(value)
    except CannotCross:
        raise
    except Exception as e:
        raise CannotCross("%s: %s" % (type(e).__name__, e))  # noqa: B904 (Python 2)
    return [out.getvalue()] + buffers


def loads(frames):
    """The value of ``frames`` made by :func:`dumps` on either side."""

    def persistent_load(pid):
        kind, spec, shape, index = pid
        try:
            import numpy
        except ImportError:
            raise NumpyMissing(  # noqa: B904 (Python 2)
                "it holds a numpy array, and the Python here (%s) has no numpy"
                % (sys.prefix,)
            )

        dtype = numpy.dtype(_native(spec))
        array = numpy.frombuffer(frames[index], dtype=dtype).reshape(shape)
        return array[()] if kind == "scalar" else array

    stream = io.BytesIO(bytes(frames[0]))
    if sys.version_info[0] >= 3:
        unpickler = _Unpickler(stream, encoding="latin1")
    else:
        unpickler = pickle.Unpickler(stream)
        unpickler.find_global = _find_class
    # As for persistent_id in dumps: Python 2's cPickle takes nothing else.
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    return unpickler.load()


def _find_class(module, name, find=None):
    """The class (or function) a pickle names; ``CannotCross`` naming it if absent."""
    try:
        if find is not None:
            return find(module, name)
        __import__(module)
        found = sys.modules[module]
        for part in name.split("."):
            found = getattr(found, part)
        return found
    except Exception as e:
        message = "it holds a %s.%s, which Python %d.%d here cannot import (%s: %s)" % (
            module,
            name,
            sys.version_info[0],
            sys.version_info[1],
            type(e).__name__,
            e,
        )
        raise CannotCross(message)  # noqa: B904 (Python 2)


if sys.version_info[0] >= 3:

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):  # with Python 2's names mapped
            return _find_class(module, name, super().find_class)


def _native(spec):
    """A dtype spec with the text type numpy of this Python wants in names."""
    if isinstance(spec, list):
        return [tuple(_native(part) for part in field) for field in spec]
    if isinstance(spec, tuple):
        return tuple(_native(part) for part in spec)
    if sys.version_info[0] < 3 and isinstance(spec, type("")):
        return spec.encode("latin-1")
    return spec


# -- serving ----------------------------------------------------------------------


def resolve(target):
    """The function ``"pkg.module.function"`` or ``"pkg.module:Class.method"`` names."""
    if ":" in target:
        module_name, _, path = target.partition(":")
    else:
        module_name, _, path = target.rpartition(".")
    if not module_name or not path:
        raise ValueError(
            "%r names no function: write 'module.function' or 'module:function'"
            % (target,)
        )
    obj = importlib.import_module(module_name)
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _error(kind, message):
    return ("error", kind, message, traceback.format_exc())


def handle(frames):
    """The response to one request's frames."""
    try:
        target, args, kwargs = loads(frames)
    except NumpyMissing as e:
        return _error("NumpyMissing", _text(e))
    except CannotCross as e:
        return _error("CannotCross", "an argument cannot cross: %s" % (e,))
    except Exception as e:
        return _error("CannotCross", "the arguments cannot cross: %r" % (e,))
    try:
        return ("ok", resolve(target)(*args, **kwargs))
    except Exception as e:
        return _error(type(e).__name__, _text(e))


def _text(error):
    try:
        return str(error)
    except Exception:
        return repr(error)


def serve(requests, responses):
    """Answer requests until the worker closes them."""
    while True:
        frames = read_message(requests)
        if frames is None:
            return
        response = handle(frames)
        try:
            out = dumps(response)
        except CannotCross as e:
            out = dumps(
                _error("CannotCross", "the result cannot cross back: %s" % (e,))
            )
        write_message(responses, out)


def main(argv):
    requests = io.open(int(argv[1]), "rb", buffering=0)
    responses = io.open(int(argv[2]), "wb", buffering=0)
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != here]
    sys.path.extend(argv[3:])
    serve(requests, responses)


if __name__ == "__main__":
    main(sys.argv)
