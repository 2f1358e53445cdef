"""Named points where a process kills itself with SIGKILL, for fault tests only.

A fault test starts a worker with ``STREAMSTORE_CRASH_POINT=<name>``; the first time the code
reaches that point, the process dies at once, exactly as a kill -9 there would leave it. With
the variable unset (always, outside tests) :func:`crash_if` is one string comparison.
"""

from __future__ import annotations

import logging
import os
import signal

__all__ = ["CRASH_POINT_ENV", "crash_if"]

CRASH_POINT_ENV = "STREAMSTORE_CRASH_POINT"
"""``after_read``, ``after_commit``, ``during_claim`` (persister) or ``in_transaction``
(SQLite history, between the inserts and COMMIT)."""

_POINT = os.environ.get(CRASH_POINT_ENV)

log = logging.getLogger(__name__)


def crash_if(point: str) -> None:
    """SIGKILL this process if ``point`` is the configured crash point."""
    if point == _POINT:
        log.warning("crash point %s reached, SIGKILL", point)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
