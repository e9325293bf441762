"""twistd plugin module for ``funcx-service``: options and ``makeService``.

``twistd -n funcx-service [--state-dir DIR] [options]`` runs the service in the
foreground; ``funcx-service start`` runs the same thing as a daemon.  Every
setting of :data:`funcx_endpoint.webservice.settings.OPTIONS` is an option;
settings not given are those saved in the state directory by the last start
(or the defaults).  ``makeService`` only builds objects; files, sockets and
processes are opened when the service starts.
"""

from __future__ import annotations

import os
from typing import Any, Dict

from twisted.application.service import IService
from twisted.python import usage

from funcx_endpoint.endpoint import logs
from funcx_endpoint.webservice.settings import OPTIONS, ServiceSettings, resolve_state_dir


class Options(usage.Options):
    """Options of the ``funcx-service`` twistd plugin."""

    synopsis = "[options]"
    longdesc = (
        "Run a private funcX web service: the funcX REST API v2 and the Globus Auth "
        "calls funcX clients make, over HTTPS, with SQLite (or PostgreSQL) storage and "
        "an embedded (or existing) RabbitMQ broker.  Settings not given are the ones "
        "saved in the state directory by the last start."
    )
    optParameters = [
        [
            "state-dir",
            "d",
            None,
            "State directory (default ~/.funcx-service, env FUNCX_SERVICE_STATE_DIR).",
        ],
        ["ready-fd", None, None, "File descriptor to report progress and readiness on.", int],
        ["stop-on-eof-fd", None, None, "Stop when this file descriptor (a pipe) closes.", int],
    ] + [
        [option.flag, None, None, option.help, option.kind]
        for option in OPTIONS
        if not option.is_flag
    ]
    optFlags = [
        ["debug", None, "Log debug messages."],
        ["log-stdout", None, "Log to stdout instead of funcx-service.log."],
    ] + [[option.flag, None, option.help] for option in OPTIONS if option.is_flag]

    def postOptions(self) -> None:
        overrides: Dict[str, Any] = {}
        for option in OPTIONS:
            value = self[option.flag]
            if option.is_flag:
                value = True if value else None
            elif value is None and option.env and os.environ.get(option.env):
                try:
                    value = option.kind(os.environ[option.env])
                except ValueError as e:
                    raise usage.UsageError(f"{option.env}: {e}") from None
            overrides[option.attribute] = value
        try:
            self.settings = ServiceSettings.load(resolve_state_dir(self["state-dir"]), overrides)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from funcx_endpoint.webservice.service import StartupReporter, WebService

    settings: ServiceSettings = options.settings
    logs.configure(
        logs.LogSettings(
            path=None if options["log-stdout"] else settings.log_file,
            debug=bool(options["debug"]),
        )
    )
    return WebService(
        settings,
        reactor,
        StartupReporter(options["ready-fd"]),
        stop_on_eof_fd=options["stop-on-eof-fd"],
    )
