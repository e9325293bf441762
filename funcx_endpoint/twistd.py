"""twistd with funcx-endpoint's own plugins: ``python -m funcx_endpoint.twistd``.

It takes the same arguments as ``twistd`` and behaves the same, but its
subcommands are ``funcx-endpoint`` and ``funcx-service`` only, known directly
rather than found by Twisted's plugin scan: the CLIs start their daemons with
it, so they work however the package is installed (a plugin scan only finds
``twisted/plugins/funcx_plugins.py`` in a directory on ``sys.path``).

Both daemons run with the garbage collector tuned for a large, long-lived
heap (:func:`tune_garbage_collector`).
"""

from __future__ import annotations

import gc
import sys
from typing import Any, List, Tuple

from twisted.application import app
from twisted.application.service import IServiceMaker
from twisted.scripts import twistd

from funcx_endpoint.service_makers import SERVICE_MAKERS

MODULE = "funcx_endpoint.twistd"

#: The collector's thresholds in the daemons (Python's defaults: 700, 10, 10).
GC_THRESHOLDS = (100_000, 50, 100)


def tune_garbage_collector() -> Tuple[int, int, int]:
    """Set the collector's thresholds to :data:`GC_THRESHOLDS`; the previous ones.

    A daemon holds thousands of connections and tens of thousands of tasks
    for seconds or hours.  With Python's default thresholds, the young
    generation is examined every 700 allocations, so the objects of a busy
    reactor turn (results, tasks, boxes still in use) survive into the old
    generation, and a full collection, which visits every object of every
    connection (half a second with 8,192 managers), follows every second or
    so.  Young collections every 100,000 allocations let those objects die
    first, and full collections come only after 100 middle ones (minutes
    apart under load).  Garbage without cycles is freed at once either way.
    """
    previous = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    return previous


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
    tune_garbage_collector()
    options = ServerOptions()
    options.parseOptions(argv)
    twistd.runApp(options)


def main() -> None:
    """Entry point: like ``twistd``, with the arguments in ``sys.argv``."""
    tune_garbage_collector()
    app.run(twistd.runApp, ServerOptions)


if __name__ == "__main__":
    main()
