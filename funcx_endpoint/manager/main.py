"""``funcx-manager``: the manager process, started by a provider on each node.

::

    funcx-manager --info-file PATH --block-id BLOCK [--manager-id ID]
                  [--max-workers N] [--cores-per-worker C] [--mem-per-worker GB]
                  [--available-accelerators 0,1,...] [--prefetch-capacity N]
                  [--worker-mode MODE] [--container-uri IMAGE]
                  [--container-type TYPE] [--warm-per-type N] [--max-warm N]
                  [--log-dir DIR] [--debug]

Where to connect (address, port, CA certificate, secret) and the endpoint's
worker settings come from the info file the interchange wrote (0600), so no
secret is on the command line; the options override the worker settings.
The manager logs to ``manager.log`` in its log directory (default:
``managers/<manager id>`` beside the info file), and each worker's output
goes to ``worker-<n>.out`` / ``.err`` there.

``--worker-mode`` and ``--container-uri`` override the endpoint's container
settings (``--container-uri``: every worker runs that image).
``--container-type`` is the type the manager registers with (hard routing:
the interchange then sends it only tasks of that type, and its workers start
with the first task's image).  A manager of a container engine without it
serves every type (soft routing, :mod:`funcx_endpoint.manager.warm`): its
slots start workers of any image on demand and keep them warm
(``--warm-per-type``, ``--max-warm``), and it reports them to the
interchange (``WarmContainers``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, List, Optional

import attr

from funcx_endpoint.wire.info import (
    ConnectionInfo,
    InfoFileError,
    ManagerSettings,
    info_file_is_private,
)

__all__ = ["apply_options", "main", "parse_args"]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The manager's command line."""
    parser = argparse.ArgumentParser(
        prog="funcx-manager",
        description="Run funcX tasks from an endpoint's interchange on this node's workers.",
    )
    parser.add_argument("--info-file", required=True, help="The interchange's manager info file.")
    parser.add_argument("--block-id", required=True, help="The block this manager belongs to.")
    parser.add_argument("--manager-id", default=None, help="This manager's id (default: random).")
    parser.add_argument("--max-workers", type=float, default=None, help="At most N workers.")
    parser.add_argument(
        "--worker-count", type=int, default=None, help="Exactly N workers (overrides the sizing)."
    )
    parser.add_argument("--cores-per-worker", type=float, default=None)
    parser.add_argument("--mem-per-worker", type=float, default=None, help="GB per worker.")
    parser.add_argument(
        "--available-accelerators",
        default=None,
        help="Comma-separated device ids; one worker per device.",
    )
    parser.add_argument("--prefetch-capacity", type=int, default=None)
    parser.add_argument(
        "--worker-mode", default=None, help="no_container, or a container engine (podman...)."
    )
    parser.add_argument("--container-uri", default=None, help="The image every worker runs.")
    parser.add_argument(
        "--container-type",
        default=None,
        help="The one container type this manager serves (hard routing; RAW: tasks "
        "without one).  Without it, a manager of a container engine serves every type "
        "(soft routing).",
    )
    parser.add_argument(
        "--warm-per-type",
        type=int,
        default=None,
        help="Soft routing: most workers of one container type (default: all slots).",
    )
    parser.add_argument(
        "--max-warm",
        type=int,
        default=None,
        help="Soft routing: most warm workers in all (default: all slots).",
    )
    parser.add_argument("--log-dir", default=None, help="Where manager.log and worker logs go.")
    parser.add_argument("--debug", action="store_true", help="Log debug messages.")
    return parser.parse_args(argv)


def apply_options(settings: ManagerSettings, options: argparse.Namespace) -> ManagerSettings:
    """``settings`` with the command line's overrides."""
    # Setting: the option (None: not given, the setting stays).
    given: dict[str, Any] = {
        "max_workers_per_node": options.max_workers,
        "cores_per_worker": options.cores_per_worker,
        "mem_per_worker": options.mem_per_worker,
        "prefetch_capacity": options.prefetch_capacity,
        "worker_debug": True if options.debug else None,
        "worker_mode": getattr(options, "worker_mode", None),
    }
    if options.available_accelerators is not None:
        given["available_accelerators"] = [
            a.strip() for a in options.available_accelerators.split(",") if a.strip()
        ]
    changes = {k: v for k, v in given.items() if v is not None}
    if getattr(options, "container_uri", None) is not None:
        changes["container_uri"] = options.container_uri or None  # "": none
    return attr.evolve(settings, **changes)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _memory_gb() -> Optional[float]:
    try:
        import psutil

        return float(psutil.virtual_memory().available) / 2**30
    except Exception:
        return None


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of ``funcx-manager``."""
    options = parse_args(argv)
    try:
        info = ConnectionInfo.read(options.info_file)
    except InfoFileError as exc:
        print(f"funcx-manager: {exc}", file=sys.stderr)
        sys.exit(2)
    settings = apply_options(info.settings, options)

    from funcx_endpoint.manager.service import ManagerIdentity
    from funcx_endpoint.manager.workers_env import count_workers

    if options.worker_count is not None:
        worker_count = max(1, options.worker_count)
    else:
        memory = _memory_gb() if settings.mem_per_worker else None
        worker_count = count_workers(settings, _cpu_count(), memory)
    identity = ManagerIdentity(
        block_id=options.block_id,
        worker_type=settings.worker_mode,
        container_type=options.container_type or "RAW",
    )
    if options.manager_id:
        identity = attr.evolve(identity, manager_id=options.manager_id)
    log_dir = options.log_dir or os.path.join(
        os.path.dirname(os.path.abspath(options.info_file)), "managers", identity.manager_id
    )
    os.makedirs(log_dir, mode=0o700, exist_ok=True)
    _start_logging(os.path.join(log_dir, "manager.log"), settings.worker_debug)
    if not info_file_is_private(options.info_file):
        from twisted.logger import Logger

        Logger().warn(
            "The info file {path} is readable by others: its secret is exposed",
            path=options.info_file,
        )

    from twisted.internet import reactor
    from twisted.internet.task import react

    placement = placement_for(settings, options)
    react(_run, (info, identity, worker_count, log_dir, settings, placement), _reactor=reactor)


def soft_routing(settings: ManagerSettings, options: argparse.Namespace) -> bool:
    """Whether this manager serves every container type, with warm workers of
    several (soft routing): it runs a container engine, no endpoint-wide image,
    and was given no ``--container-type``."""
    return (
        settings.worker_mode != "no_container"
        and not settings.container_uri
        and getattr(options, "container_type", None) is None
    )


def placement_for(settings: ManagerSettings, options: argparse.Namespace) -> Any:
    """The placement policy of soft routing (:class:`WarmPlacement`), or None (the
    manager's default: one image at a time)."""
    if not soft_routing(settings, options):
        return None
    from funcx_endpoint.manager.warm import WarmPlacement

    return WarmPlacement(per_type=options.warm_per_type, total=options.max_warm)


def _start_logging(path: str, debug: bool) -> None:
    from twisted.logger import globalLogBeginner

    from funcx_endpoint.endpoint.logs import LogSettings, observer_for

    observer = observer_for(LogSettings(path=path, debug=debug))
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def _run(
    reactor: Any,
    info: ConnectionInfo,
    identity: Any,
    worker_count: int,
    log_dir: str,
    settings: ManagerSettings,
    placement: Any = None,
) -> Any:
    from twisted.internet.defer import Deferred

    from funcx_endpoint.manager.service import ManagerService

    service = ManagerService(
        reactor, info, identity, worker_count, log_dir, settings=settings, placement=placement
    )
    # SIGTERM/SIGINT stop the reactor, which first waits for this.
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    service.startService()

    async def finish() -> None:
        code = await service.when_stopped()
        if code:
            raise SystemExit(code)

    return Deferred.fromCoroutine(finish())
