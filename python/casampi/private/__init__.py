"""What casa-node's casampi modules share: where this process stands in
the cluster, and CASA's log."""

import os
import threading


def server_rank():
    """The rank of the server this process works for, or None in a driver:
    casa-node gives each worker its server's rank as CASA_NODE_RANK."""
    try:
        rank = int(os.environ.get("CASA_NODE_RANK") or 0)
    except ValueError:
        return None
    return rank or None


_casalog = None


def casalog():
    """CASA's logger: casatasks' own when it is imported, else a casatools
    logsink; None without casatools (then `post` uses `logging`)."""
    global _casalog
    if _casalog is None:
        try:
            import sys

            tasks = sys.modules.get("casatasks")
            if tasks is not None and hasattr(tasks, "casalog"):
                _casalog = tasks.casalog
            else:
                from casatools import logsink

                _casalog = logsink()
        except ImportError:
            return None
    return _casalog


def post(message, priority="INFO", origin="casampi"):
    """Posts to CASA's log, as casampi does."""
    log = casalog()
    if log is not None:
        log.post(message, priority, origin)
        return
    import logging

    levels = {"SEVERE": logging.ERROR, "WARN": logging.WARNING, "DEBUG": logging.DEBUG}
    logging.getLogger("casampi").log(levels.get(priority, logging.INFO), "%s: %s", origin, message)


class Singleton:
    """casampi's singletons: every instance of a subclass is a handle on one
    object, which the subclass's `_make` builds on first use."""

    # Reentrant: one singleton's object makes others (the command client
    # its monitor).
    _lock = threading.RLock()

    def __init__(self):
        cls = type(self)
        with Singleton._lock:
            if cls.__dict__.get("_impl") is None:
                cls._impl = cls._make()

    def __getattr__(self, attr):
        return getattr(type(self)._impl, attr)

    def __setattr__(self, attr, value):
        setattr(type(self)._impl, attr, value)
