"""twistd with funcx-endpoint's own plugins: ``python -m funcx_endpoint.twistd``.

It takes the same arguments as ``twistd`` and behaves the same, but its
subcommands are ``funcx-endpoint`` and ``funcx-service`` only, known directly
rather than found by Twisted's plugin scan: the CLIs start their daemons with
it, so they work however the package is installed (a plugin scan only finds
``twisted/plugins/funcx_plugins.py`` in a directory on ``sys.path``).
"""

from __future__ import annotations

import sys
from typing import Any, List

from twisted.application import app
from twisted.application.service import IServiceMaker
from twisted.scripts import twistd

from funcx_endpoint.service_makers import SERVICE_MAKERS

MODULE = "funcx_endpoint.twistd"


def runner_command() -> List[str]:
    """The command line (before twistd's arguments) that runs this module."""
    return [sys.executable, "-m", MODULE]


def _service_makers(interface: Any, package: Any = None) -> List[Any]:
    return list(SERVICE_MAKERS) if interface is IServiceMaker else []


class ServerOptions(twistd.ServerOptions):
    """twistd's options with our ServiceMakers as the subcommands."""

    synopsis = f"Usage: python -m {MODULE} [options]"
    # twistd's seam for where plugins come from (Twisted's own tests use it).
    _getPlugins = staticmethod(_service_makers)


def run_app(argv: List[str]) -> None:
    """Parse twistd arguments ``argv`` and run the application in this process
    (daemonizing unless ``--nodaemon``); usage errors raise ``usage.UsageError``."""
    options = ServerOptions()
    options.parseOptions(argv)
    twistd.runApp(options)


def main() -> None:
    """Entry point: like ``twistd``, with the arguments in ``sys.argv``."""
    app.run(twistd.runApp, ServerOptions)


if __name__ == "__main__":
    main()
