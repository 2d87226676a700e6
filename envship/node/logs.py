"""envship's lines in a nanny's log, and the restarts envship asks for as INFO.

distributed configures only its own loggers (``distributed.config``'s
``initialize_logging``, at import, before envship is loaded): records of the
``envship`` loggers reach no handler, and Python drops them below WARNING.
:func:`route_envship_logs` sends them wherever distributed's own go, at
distributed's level, so that a nanny's log shows what envship does (cache,
transfer, unpack, restart) as ``dask worker`` shows distributed's INFO lines,
and a ``LocalCluster``, which silences distributed below WARNING, stays quiet.

Each switch restarts the worker; distributed's nanny takes the worker's exit
for a crash and logs ``Restarting worker`` as a WARNING, which on a
``LocalCluster`` lands in the user's terminal or notebook.
:class:`EnvshipRestarts` makes those records INFO while envship restarts that
worker (:data:`envship_restart`, set by
:mod:`~envship.node.worker_process`); a crash or a memory kill warns as
before.

This module configures logging only; it must not log per piece or per file.
"""

from __future__ import annotations

import contextvars
import logging

#: What the worker restarts into, in the context where its nanny learns that
#: its process exited during a restart envship asked for; None otherwise.
#: The nanny's reaction runs in a task made there, which copies the context.
envship_restart: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "envship_restart", default=None
)

#: distributed's records that an envship restart makes, as logged
#: (``record.msg``, before formatting).
RESTART_MESSAGES = frozenset({"Restarting worker (status=%s)"})


class AsDistributed(logging.Handler):
    """Hands records to the handlers of the ``distributed`` logger, at its level.

    Whatever distributed's logging is (its default, a ``logging:`` section in
    the dask config, ``silence_logs`` of a ``LocalCluster``), envship's lines
    follow it, as they are read then, not when this was installed.
    """

    def emit(self, record: logging.LogRecord) -> None:
        distributed = logging.getLogger("distributed")
        if distributed.isEnabledFor(record.levelno):
            distributed.callHandlers(record)


class EnvshipRestarts(logging.Filter):
    """On ``distributed.nanny``: the restarts envship asks for are INFO.

    A record of :data:`RESTART_MESSAGES` logged while :data:`envship_restart`
    is set becomes INFO (dropped where that logger shows no INFO); every
    other record passes unchanged.

    Examples
    --------
    >>> record = logging.makeLogRecord(
    ...     {"name": "distributed.nanny", "levelno": logging.WARNING,
    ...      "levelname": "WARNING", "msg": "Restarting worker (status=%s)"}
    ... )
    >>> EnvshipRestarts().filter(record), record.levelname  # a crash
    (True, 'WARNING')
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.levelno > logging.INFO
            and record.msg in RESTART_MESSAGES
            and envship_restart.get() is not None
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


def route_envship_logs() -> None:
    """Show envship's log lines with distributed's; quiet envship's restarts.

    Idempotent. Leaves alone an ``envship`` logger that is configured
    already (a handler or a level of its own: a ``logging:`` section of the
    dask config that names ``envship``, or the application's).

    Examples
    --------
    >>> route_envship_logs()  # doctest: +SKIP
    >>> logging.getLogger("envship").handlers  # doctest: +SKIP
    [<AsDistributed (NOTSET)>]
    """
    nanny = logging.getLogger("distributed.nanny")
    if not any(isinstance(f, EnvshipRestarts) for f in nanny.filters):
        nanny.addFilter(EnvshipRestarts())
    envship = logging.getLogger("envship")
    if envship.handlers or envship.level != logging.NOTSET:
        return
    # Every record reaches the handler, which applies distributed's level.
    envship.setLevel(logging.DEBUG)
    envship.addHandler(AsDistributed())
    envship.propagate = False
