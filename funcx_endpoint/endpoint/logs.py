"""The daemon's log: rotated ``endpoint.log``, text or JSON lines.

twistd starts logging after it has built the service, so ``makeService``
records the settings with :func:`configure` and twistd's ``--logger`` option
names :func:`make_observer`, which reads them.  Without ``--logger`` (for
example ``twistd -n funcx-endpoint``) twistd's own logging is used.
"""

from __future__ import annotations

import io
import os
import time
from typing import Any, Callable, Dict, Optional

import attr
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsJSON,
    formatEvent,
    formatTime,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
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


_settings = LogSettings()


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
    """twistd ``--logger`` entry point: an observer per :func:`configure`."""
    return observer_for(_settings)
