"""``envship.foreign``: call into an environment whose Python cannot host a worker.

No Dask worker runs under Python 2.7 (or talks to a client of another Python
minor version), but a task can hand work to such an interpreter::

    py2 = client.use_environment("py2-sklearn-dev")  # ships and installs it;
                                                     # workers stay as they are
    fut = client.submit(py2.call, "legacy_model.fit_predict", X, y, X_new)

Each worker starts the environment's python once, on first use, and keeps
it (:mod:`envship.client.bridge`); arguments and results cross as pickles of
protocol 2, numpy arrays beside them as raw bytes (``bootstrap/bridge.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from envship.manifest import Manifest

from . import bridge

# Tasks carry the worker's end by value: workers need not import envship.
cloudpickle.register_pickle_by_value(bridge)


@dataclass(frozen=True)
class ForeignEnvironment:
    """An environment on the cluster's nodes that tasks call into.

    Attributes
    ----------
    id, name : str
        The environment's content id and name.
    python : str
        Its Python version.

    Examples
    --------
    >>> py2 = envship.foreign(client, "py2-sklearn-dev")  # doctest: +SKIP
    >>> client.submit(py2.call, "legacy_model.version").result()  # doctest: +SKIP
    {'python': '2.7.18 ...', 'numpy': '1.16.6', 'sklearn': '0.20.4'}
    """

    id: str
    name: str
    python: str

    def _repr_html_(self) -> str:
        from .html import foreign_environment

        return foreign_environment(self)

    @property
    def call(self) -> Callable[..., Any]:
        """``call(target, *args, **kwargs)``, a function for tasks to run.

        ``target`` is ``"module.function"`` or ``"module:Class.method"``,
        imported in the environment's python (modules of the environment, or
        sent with ``client.upload_file``). Its exceptions arrive as the
        built-in exception of the same name (else RuntimeError), with the
        foreign traceback in the message.
        """
        env = {"id": self.id, "name": self.name, "python": self.python}

        def call(target: str, *args: Any, **kwargs: Any) -> Any:
            return bridge.call_in(env, target, args, kwargs)

        call.__qualname__ = call.__name__ = f"call-{self.name}"
        return call


def hosts_no_worker(manifest: Manifest) -> bool:
    """Whether no Dask worker can run in it: Python 2."""
    return not manifest.python.startswith("3.")
