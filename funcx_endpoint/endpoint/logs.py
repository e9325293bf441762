"""The daemon's log: rotated ``endpoint.log``, text or JSON lines.

twistd starts logging after it has built the service, so ``makeService``
records the settings with :func:`configure` and twistd's ``--logger`` option
names :func:`make_observer`, which reads them.  Without ``--logger`` (for
example ``twistd -n funcx-endpoint``) twistd's own logging is used.

Libraries that log with Python's ``logging`` (Parsl's providers, run in
threads) reach the same log: with ``LogSettings.python_logging`` (the
endpoint daemon's), :func:`make_observer` also installs a
:class:`PythonLoggingBridge`, through which their records become
``twisted.logger`` events in the namespace of their logger's name.
"""

from __future__ import annotations

import io
import logging
import os
import time
from typing import Any, Callable, Dict, Optional

import attr
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    formatEvent,
    formatTime,
    globalLogPublisher,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.python.threadable import isInIOThread
from zope.interface import implementer

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


@attr.s(auto_attribs=True, frozen=True)
class LogSettings:
    """Where the daemon logs and how."""

    path: Optional[str] = None  # None: standard output
    max_bytes: int = 10 * 1024 * 1024
    backup_count: int = 5
    json: bool = False
    debug: bool = False
    python_logging: bool = False  # Python's logging into this log too (PythonLoggingBridge)


_settings = LogSettings()
_bridge: Optional[PythonLoggingBridge] = None


def configure(settings: LogSettings) -> None:
    """Record the settings :func:`make_observer` will use."""
    global _settings
    _settings = settings


def format_text(event: Dict[str, Any]) -> Optional[str]:
    """One human-readable line: time, level, namespace, message (+ traceback)."""
    text = formatEvent(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        text = f"{text}\n{failure.getTraceback()}"
    if not text:
        return None
    level = event.get("log_level")
    level_name = level.name if isinstance(level, type(LogLevel.info)) else "info"
    stamp = formatTime(event.get("log_time", time.time()), _TIME_FORMAT)
    namespace = event.get("log_namespace", "-")
    return f"{stamp} [{level_name}] [{namespace}] {text}\n".replace("\n", "\n\t").rstrip("\t")


def format_json(event: Dict[str, Any]) -> Optional[str]:
    """One JSON object per line, with the formatted message added as ``text``."""
    event = dict(event)
    event.setdefault("text", formatEvent(event))
    return eventAsJSON(event) + "\n"


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one line to a file-like object."""

    def __init__(self, out: Any, formatter: Callable[[Dict[str, Any]], Optional[str]]) -> None:
        self._out = out
        self._format = formatter

    def __call__(self, event: Dict[str, Any]) -> None:
        line = self._format(event)
        if line:
            self._out.write(line)
            self._out.flush()


def rotating_file(path: str, max_bytes: int, backup_count: int) -> LogFile:
    """``path`` rotated at ``max_bytes``, keeping ``backup_count`` old files."""
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    return LogFile(
        name,
        directory,
        rotateLength=max_bytes,
        maxRotatedFiles=max(1, backup_count),
        defaultMode=0o600,
    )


def observer_for(settings: LogSettings, stdout: Optional[io.TextIOBase] = None) -> ILogObserver:
    """An observer writing per ``settings``, filtered at info (or debug)."""
    if settings.path is None:
        import sys

        out: Any = stdout or sys.stdout
    else:
        out = rotating_file(settings.path, settings.max_bytes, settings.backup_count)
    writer = LineObserver(out, format_json if settings.json else format_text)
    predicate = LogLevelFilterPredicate(
        defaultLogLevel=LogLevel.debug if settings.debug else LogLevel.info
    )
    return FilteringLogObserver(writer, [predicate])


def make_observer() -> ILogObserver:
    """twistd ``--logger`` entry point: an observer per :func:`configure`.

    With ``python_logging``, Python's logging goes to ``twisted.logger`` from
    now on too (a :class:`PythonLoggingBridge` at INFO, or DEBUG with
    ``debug``, installed once per process).
    """
    global _bridge
    observer = observer_for(_settings)
    if _settings.python_logging and _bridge is None:
        from twisted.internet import reactor

        level = logging.DEBUG if _settings.debug else logging.INFO
        _bridge = PythonLoggingBridge(reactor, level)
        _bridge.install()
    return observer


def twisted_level(levelno: int) -> LogLevel:
    """The ``twisted.logger`` level of a Python ``logging`` level number."""
    if levelno >= logging.CRITICAL:
        return LogLevel.critical
    if levelno >= logging.ERROR:
        return LogLevel.error
    if levelno >= logging.WARNING:
        return LogLevel.warn
    if levelno >= logging.INFO:
        return LogLevel.info
    return LogLevel.debug


class TwistedLogHandler(logging.Handler):
    """A ``logging`` handler that turns records into ``twisted.logger`` events.

    The event's namespace is the record's logger name (``parsl.providers...``),
    its level the matching Twisted level, its text the record's message with
    the traceback, if any.  Records made in other threads (a Parsl provider's
    calls run in the reactor's pool) are handed to ``observer`` through
    ``call_from_thread`` (``reactor.callFromThread``): the log's observers are
    not written from two threads at once.
    """

    def __init__(
        self,
        observer: ILogObserver,
        call_from_thread: Optional[Callable[..., Any]] = None,
        level: int = logging.INFO,
    ) -> None:
        super().__init__(level)
        self._observer = observer
        self._call_from_thread = call_from_thread
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        observer: Any = self._observer
        if self._call_from_thread is not None and not isInIOThread():
            call, target = self._call_from_thread, self._observer

            def observer(event: Dict[str, Any]) -> None:
                call(target, event)

        Logger(namespace=record.name, observer=observer).emit(
            twisted_level(record.levelno), "{log_text}", log_text=text
        )


class PythonLoggingBridge:
    """Once installed, Python ``logging`` records of ``level`` and above go to
    ``twisted.logger`` (see :class:`TwistedLogHandler`).

    :meth:`install` adds its handler to the root logger and lowers the root
    logger's level to ``level`` if it was higher (Python's default is
    WARNING; Parsl's providers say what they submit at INFO and run their
    commands at DEBUG); :meth:`remove` undoes both.  Records of other
    threads reach the log through ``reactor``'s ``callFromThread`` (a
    reactor without threads, a test's, gets them directly).
    """

    def __init__(
        self,
        reactor: Any,
        level: int = logging.INFO,
        observer: Optional[ILogObserver] = None,
    ) -> None:
        self.level = level
        self.handler = TwistedLogHandler(
            observer if observer is not None else globalLogPublisher,
            reactor.callFromThread if IReactorFromThreads.providedBy(reactor) else None,
            level,
        )
        self._saved_level: Optional[int] = None

    def install(self) -> None:
        """Send Python's logging records to ``twisted.logger`` from now on."""
        root = logging.getLogger()
        self._saved_level = root.level
        if root.level == logging.NOTSET or root.level > self.level:
            root.setLevel(self.level)
        root.addHandler(self.handler)

    def remove(self) -> None:
        """Stop it: the root logger's handlers and level are as before."""
        root = logging.getLogger()
        root.removeHandler(self.handler)
        if self._saved_level is not None:
            root.setLevel(self._saved_level)
            self._saved_level = None
