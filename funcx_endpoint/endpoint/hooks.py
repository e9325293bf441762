"""``endpoint_setup`` and ``endpoint_teardown``: shell commands around the endpoint's life.

As Globus Compute's fields of the same names: ``Config.endpoint_setup`` runs
(``/bin/sh -c``, in the endpoint directory, with the daemon's environment)
before the endpoint registers and serves, and ``Config.endpoint_teardown``
after everything else has stopped.  Each line they print (stdout and
stderr) goes to ``endpoint.log``.  A setup that exits non-zero, is killed or
does not finish within ``timeout`` seconds fails the start with exit code 78
(``EX_CONFIG``) and its last lines in the message ``start`` prints; a failing
teardown is logged and does not change the daemon's exit code.

:class:`ShellHooks` is the daemon's first part (``hooks``), so that its
teardown runs last.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Deque, Dict, Optional

import attr
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from funcx_endpoint.lifecycle import EX_CONFIG, IReadyPart, StartupError
from funcx_endpoint.observer import OneShotObserver

__all__ = ["DEFAULT_HOOK_TIMEOUT", "HookProtocol", "ShellHooks"]

#: Seconds a hook may run before it is killed.
DEFAULT_HOOK_TIMEOUT = 600.0
#: Lines of a failed hook's output put in its error message.
TAIL_LINES = 5
_MAX_LINE = 4096


class HookProtocol(ProcessProtocol):
    """Logs a hook's output line by line; ``finished`` fires with its exit
    code (None if a signal ended it)."""

    log = Logger()

    def __init__(self, name: str) -> None:
        self.name = name
        self.finished: Deferred[Optional[int]] = Deferred()
        self.tail: Deque[str] = deque(maxlen=TAIL_LINES)
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        buffered = self._partial.get(childFD, b"") + data
        *lines, rest = buffered.split(b"\n")
        if len(rest) > _MAX_LINE:  # a very long line without an end: log it in pieces
            lines.append(rest)
            rest = b""
        self._partial[childFD] = rest
        for line in lines:
            self._line(line)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")[:_MAX_LINE]
        self.tail.append(line)
        self.log.info("{hook}: {line}", hook=self.name, line=line)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._line(rest)
            self._partial[fd] = b""
        code: Optional[int]
        if reason.check(ProcessDone):
            code = 0
        else:
            code = getattr(reason.value, "exitCode", None)
            if getattr(reason.value, "signal", None) is not None:
                code = None
        self.finished.callback(code)


@implementer(IReadyPart)
@attr.s(auto_attribs=True, eq=False)
class ShellHooks(Service):
    """Runs ``setup`` when started (ready once it succeeds) and ``teardown``
    when stopped (``stopService`` waits for it)."""

    log = Logger()
    name = "hooks"

    _reactor: Any
    directory: str
    setup: Optional[str]
    teardown: Optional[str]
    timeout: float = DEFAULT_HOOK_TIMEOUT
    _last_tail: Deque[str] = attr.ib(factory=deque, init=False)
    _process: Any = attr.ib(default=None, init=False)  # the hook started last
    _setup_process: Any = attr.ib(default=None, init=False)
    _setup_ended_d: Optional[Deferred[Optional[int]]] = attr.ib(default=None, init=False)
    #: Fires once the setup finished (with its failure, if it failed).
    _ready: OneShotObserver[None] = attr.ib(factory=OneShotObserver, init=False)

    def _run(self, name: str, command: str) -> Deferred[Optional[int]]:
        self.log.info("Running {hook}: {command}", hook=name, command=command)
        protocol = HookProtocol(name)
        process = self._reactor.spawnProcess(
            protocol,
            "/bin/sh",
            ["/bin/sh", "-c", command],
            env=dict(os.environ),
            path=self.directory,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        process.closeStdin()

        def kill() -> None:
            self.log.warn(
                "{hook} did not finish within {timeout:g}s; killing it",
                hook=name,
                timeout=self.timeout,
            )
            try:
                process.signalProcess("KILL")
            except Exception:  # already gone
                pass

        timer = self._reactor.callLater(self.timeout, kill)

        def ended(code: Optional[int]) -> Optional[int]:
            if timer.active():
                timer.cancel()
            return code

        protocol.finished.addCallback(ended)
        self._last_tail = protocol.tail
        self._process = process
        return protocol.finished

    def startService(self) -> None:
        super().startService()
        if not self.setup:
            self._finish_setup(None)
            return
        ended = self._run("endpoint_setup", self.setup)
        self._setup_process = self._process
        self._setup_ended_d = ended
        ended.addCallback(self._setup_ended)

    def _setup_ended(self, code: Optional[int]) -> None:
        if code == 0:
            self.log.info("endpoint_setup finished")
            self._finish_setup(None)
            return
        how = "was killed" if code is None else f"exited with code {code}"
        last = " | ".join(self._last_tail) or "no output"
        self._finish_setup(
            Failure(StartupError(f"endpoint_setup {how} (last output: {last})", EX_CONFIG))
        )

    def _finish_setup(self, failure: Optional[Failure]) -> None:
        self._ready.fire(failure)

    def when_ready(self) -> Deferred[None]:
        return self._ready.when_fired()

    def ready_info(self) -> Dict[str, Any]:
        return {}

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if not self._ready.fired and self._setup_process is not None:
            # Stopped while the setup runs: end it first, then tear down.
            self.log.info("Stopping endpoint_setup (the endpoint stops)")
            try:
                self._setup_process.signalProcess("TERM")
            except Exception:  # already gone
                pass
            waiting: Deferred[None] = Deferred()

            def then(_: Any) -> None:
                self._teardown().chainDeferred(waiting)

            assert self._setup_ended_d is not None
            self._setup_ended_d.addBoth(lambda result: None)
            self._setup_ended_d.addCallback(then)
            return waiting
        return self._teardown()

    def _teardown(self) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        if not self.teardown:
            done.callback(None)
            return done

        def ended(code: Optional[int]) -> None:
            if code == 0:
                self.log.info("endpoint_teardown finished")
            else:
                how = "was killed" if code is None else f"exited with code {code}"
                self.log.warn("endpoint_teardown {how}", how=how)
            done.callback(None)

        self._run("endpoint_teardown", self.teardown).addCallback(ended)
        return done
