"""A watchdog process: it cleans up what its owner started if the owner dies first.

The watchdog is a tiny separate Python process (no imports beyond the standard
library, so it works whatever sys.path the owner had). It blocks reading its stdin,
a pipe whose only writer is the owner. "release" means the owner stopped things
itself; EOF without it means the owner died, so the watchdog runs its cleanup.
Used by the RabbitMQ nodes (:mod:`~funcx_endpoint.testing.rabbitmq`) and the
PostgreSQL server (:mod:`~funcx_endpoint.testing.postgres`) of the tests.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Mapping, Optional, Sequence

__all__ = ["CLEANUP_HELPERS", "WATCHDOG_WAIT", "Watchdog"]

# Returns only once the owner is gone; the cleanup script after it runs then.
WATCHDOG_WAIT = r"""
import os, shutil, signal, sys, time
for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)
data = b""
while True:
    try:
        chunk = os.read(0, 512)
    except InterruptedError:
        continue
    if not chunk:
        break
    data += chunk
if b"release" in data:
    sys.exit(0)
"""


# Defined for every cleanup script: signal_all(pids, sig) and remove_paths(paths)
# (directories with what they hold; errors ignored).
CLEANUP_HELPERS = r"""
def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass

def remove_paths(paths):
    for path in paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass
"""


class Watchdog:
    """A running watchdog: once its owner is gone, it runs ``cleanup`` (Python
    source, with ``os``, ``shutil``, ``signal``, ``sys`` and ``time`` imported and
    :data:`CLEANUP_HELPERS` defined)
    with ``args`` as ``sys.argv[1:]``, in a session of its own, in ``env``
    (None: the owner's environment)."""

    def __init__(
        self, cleanup: str, args: Sequence[str], env: Optional[Mapping[str, str]] = None
    ) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-I", "-c", WATCHDOG_WAIT + CLEANUP_HELPERS + cleanup, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )

    def stand_down(self) -> None:
        """Tell it the owner cleans up itself; does not wait (fit for a signal handler)."""
        stdin = self._process.stdin
        try:
            assert stdin is not None
            stdin.write(b"release\n")
            stdin.close()
        except (OSError, ValueError):  # ValueError: told already
            pass

    def release(self, timeout: float) -> None:
        """:meth:`stand_down`, and wait up to ``timeout`` seconds for it to exit
        (then kill it)."""
        self.stand_down()
        try:
            self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
