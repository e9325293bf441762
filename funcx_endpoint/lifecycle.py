"""What both daemons (the endpoint and the web service) share about starting up.

* :class:`StartupError`: a part could not start; carries the exit code.
* :class:`StartupReporter`: JSON lines to whoever started the daemon on a
  pipe (``--ready-fd``): progress, then ``ready`` or ``failed``, then EOF.
  twistd itself reports only failures raised while services start; this
  reports the asynchronous ones (registration, broker) too.
* :data:`exit_status`: the code a foreground run should exit with.
* :class:`Phase`: where a daemon is in its life.
* :func:`start_loop`, :func:`stop_loop`: a part's periodic call, on the
  clock the part was given; :func:`cancel_call`: a part's pending delayed call.

Exit codes are BSD sysexits.
"""

from __future__ import annotations

import enum
import json
import os
from typing import Any, Callable, Dict, Optional

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

EX_OK = 0
EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CANTCREAT = 73
EX_TEMPFAIL = 75
EX_NOPERM = 77
EX_CONFIG = 78


class StartupError(Exception):
    """A part of a daemon could not start; ``exit_code`` says how to exit."""

    def __init__(self, message: str, exit_code: int = EX_SOFTWARE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class StartupReporter:
    """JSON lines to the starter on ``fd``: progress, then ready or failed (then closed).

    ``{"state": "progress", "message": ...}`` any number of times, then one of
    ``{"state": "ready", ...}`` or ``{"state": "failed", "exit_code": n,
    "message": ...}``.  If the daemon dies first, the reader sees end-of-file.
    """

    log = Logger()

    def __init__(self, fd: Optional[int]) -> None:
        self._fd = fd

    def _write(self, message: Dict[str, Any], close: bool) -> None:
        if self._fd is None:
            return
        fd = self._fd
        try:
            os.write(fd, json.dumps(message).encode() + b"\n")
        except OSError as e:
            self.log.warn("Could not report to the starter: {error}", error=e)
            close = True
        if close:
            self._fd = None
            try:
                os.close(fd)
            except OSError:
                pass

    def progress(self, message: str) -> None:
        self._write({"state": "progress", "message": message}, close=False)

    def ready(self, **info: Any) -> None:
        self._write({"state": "ready", **info}, close=True)

    def failed(self, message: str, exit_code: int) -> None:
        self._write(
            {"state": "failed", "exit_code": exit_code, "message": message, "pid": os.getpid()},
            close=True,
        )


class ExitStatus:
    """The exit code the daemon process should end with (for foreground runs)."""

    code = EX_OK


exit_status = ExitStatus()


class Phase(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    FAILED = "failed"


# -- the parts of a daemon ----------------------------------------------------


class IReadyPart(IService):
    """A part that is ready some time after it started (the next part waits)."""

    def when_ready() -> Deferred[None]:
        """A new Deferred firing once ready; failing (StartupError) if it cannot be."""

    def ready_info() -> Dict[str, Any]:
        """What ``funcx-endpoint start`` reports of it once the daemon is ready."""


class IDrainingPart(IService):
    """A part that holds work to finish before the daemon stops."""

    def drain(grace: float) -> Deferred[None]:
        """Stop taking work; finish what runs, within ``grace`` seconds."""


class IStatusPart(IService):
    """A part with something to show in ``funcx-endpoint status``."""

    def status_fields() -> Any:
        """A dict of fields (or a Deferred of one)."""


# -- periodic calls of a part -------------------------------------------------


def start_loop(
    call: Callable[[], Any],
    clock: IReactorTime,
    interval: float,
    *,
    now: bool,
    on_failure: Optional[Callable[[Failure], None]] = None,
) -> LoopingCall:
    """A :class:`LoopingCall` of ``call`` every ``interval`` seconds of ``clock``,
    started (with a first call at once if ``now``); ``on_failure`` hears of a
    call's failure, which ends the loop."""
    loop = LoopingCall(call)
    loop.clock = clock
    ended = loop.start(interval, now=now)
    if on_failure is not None:
        ended.addErrback(on_failure)
    return loop


def stop_loop(loop: Optional[LoopingCall]) -> None:
    """Stop ``loop`` if it runs (None: there is none)."""
    if loop is not None and loop.running:
        loop.stop()


def cancel_call(call: Optional[IDelayedCall]) -> None:
    """Cancel ``call`` if it is still pending (None: there is none)."""
    if call is not None and call.active():
        call.cancel()


class PeriodicService(Service):
    """A service that calls :meth:`check` every ``interval`` seconds of its
    ``_clock`` while it runs, the first time one interval after it starts.

    A call that fails ends the calls, logged as ``stopped_message``.  Subclasses
    set ``_clock`` and ``interval`` (in their constructor) and define ``check``.
    """

    log = Logger()
    stopped_message = "A periodic check stopped"
    _clock: IReactorTime
    interval: float
    _loop: Optional[LoopingCall] = None

    def check(self) -> Any:
        """The periodic work (a Deferred: the next call waits for it)."""
        raise NotImplementedError

    def startService(self) -> None:
        super().startService()
        self._loop = start_loop(
            self.check,
            self._clock,
            self.interval,
            now=False,
            on_failure=lambda f: self.log.failure(self.stopped_message, f),
        )

    def stopService(self) -> Any:
        super().stopService()
        stop_loop(self._loop)
        self._loop = None
