"""funcX 1.0.13's config fields: the ones only funcX 1.0 had, and the list of all of them.

A funcX 1.0 ``config.py`` passes keyword arguments that this design has no
use for (ZeroMQ polling, routing knobs, values funcX 1.0 set itself).
They are fields here too, so such a file loads unchanged, each marked
:class:`~funcx_endpoint.config.fields.Unused` with what it means here: the
endpoint logs one warning for each one given (:meth:`ConfigObject.notices`).
:mod:`funcx_endpoint.config.model` adds them to its classes' fields.

:data:`FUNCX10_FIELDS` lists every keyword argument of funcX 1.0.13's
``Config``, ``HighThroughputExecutor`` and ``SimpleStrategy`` /
``KubeSimpleStrategy`` with its default there, read from that release's
source: the documentation's table of their fates is made from it, and a test
checks that each is a field of ours.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Tuple

from funcx_endpoint.config.fields import (
    Field,
    Unused,
    anything,
    choice,
    number,
    optional,
    string,
)


def _funcx10(meaning: str, *quiet: Any, partly: bool = False) -> Unused:
    return Unused(meaning, quiet, partly)


def port_pair(value: Any) -> Tuple[int, int]:
    """Two ports (funcX 1.0's task and result ports), each 0 to 65535."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or not all(0 <= v <= 65535 for v in value)
    ):
        raise TypeError(f"expected a (task port, result port) pair, got {value!r}")
    return (value[0], value[1])


#: Fields of ``Config`` that only funcX 1.0 had.
CONFIG_FIELDS: Dict[str, Field] = {
    "multi_tenant": Field(
        None,
        anything,
        "funcX 1.0: True made an endpoint that starts one endpoint per user.",
        unused=Unused(
            "multi-user endpoints are not supported: this runs as one endpoint of "
            "its owner, with the executors of this file",
            (None, False),
        ),
    ),
    "stdout": Field(
        "./endpoint.log",
        anything,
        "funcX 1.0: the file the daemon's standard output went to.",
        unused=Unused(
            "the daemon logs to endpoint.log in log_dir (what it prints goes there "
            "too); this file is not written",
            ("./endpoint.log", "endpoint.log"),
        ),
    ),
    "stderr": Field(
        "./endpoint.log",
        anything,
        "funcX 1.0: the file the daemon's standard error went to.",
        unused=Unused(
            "the daemon logs to endpoint.log in log_dir (what it prints goes there "
            "too); this file is not written",
            ("./endpoint.log", "endpoint.log"),
        ),
    ),
    "results_ws_uri": Field(
        None,
        anything,
        "funcX 1.0 (deprecated there): the websocket URL of results for its SDK.",
        unused=Unused("an endpoint needs no websocket; not used", (None,)),
    ),
    "warn_about_url_mismatch": Field(
        False,
        anything,
        "funcX 1.0 (deprecated there): warn when results_ws_uri and the service differ.",
        unused=Unused("not used (results_ws_uri is not used)", (False,)),
    ),
}

#: Fields of ``HighThroughputExecutor`` that only funcX 1.0 had.
EXECUTOR_FIELDS: Dict[str, Field] = {
    "worker_ports": Field(
        None,
        optional(port_pair),
        "funcX 1.0's (task port, result port): when given, the interchange "
        "listens on the first (instead of a range).",
        unused=Unused(
            "the interchange listens on the first port; managers send results over the "
            "same connection, so the second port is not used",
            (None,),
            partly=True,
        ),
    ),
    # Honoured with containers (worker_mode other than no_container): their
    # notice is given only without them (HighThroughputExecutor.notices).
    "scheduler_mode": Field(
        "hard",
        optional(choice("hard", "soft")),
        "Routing of tasks by container type: 'hard' (each manager serves one type; blocks "
        "are started per type) or 'soft' (managers start containers of any type; a task "
        "goes first to a manager with a warm container of its type). None: 'hard'.",
        unused=_funcx10(
            "without containers every task goes to any free worker; no effect", partly=True
        ),
    ),
    "cold_routing_interval": Field(
        10.0,
        optional(number(0)),
        "Soft routing: seconds a container type's tasks may wait with none routed before "
        "they may go to any manager with room, even behind busy workers of other types "
        "(0: at once). None: 10.",
        unused=_funcx10("without containers there is no cold routing; no effect", partly=True),
    ),
    "launch_cmd": Field(
        None,
        optional(string()),
        "funcX 1.0: the command line that started a manager (process_worker_pool.py ...).",
        unused=_funcx10(
            "managers are started by this package's own command (<python> -m "
            "funcx_endpoint.manager ...), which a funcX 1.0 command line cannot start; "
            "not used. To run commands before it, use the provider's worker_init",
            None,
        ),
    ),
    "poll_period": Field(
        10,
        optional(number(0)),
        "funcX 1.0: milliseconds its interchange and managers waited in each poll.",
        unused=_funcx10("this endpoint is event-driven and does not poll; no effect"),
    ),
    "suppress_failure": Field(
        True,
        anything,
        "funcX 1.0: whether its interchange kept running after a failure.",
        unused=_funcx10(
            "the interchange always keeps running when a manager fails; no effect", True
        ),
    ),
    "storage_access": Field(
        None,
        anything,
        "funcX 1.0: data staging providers (it never used them).",
        unused=_funcx10("no data staging here; not used", None, []),
    ),
    "run_dir": Field(
        None,
        anything,
        "funcX 1.0: set by the endpoint itself (its interchange's log directory).",
        unused=_funcx10(
            "logs are under the endpoint directory (endpoint.log, interchange/); not used",
            None,
        ),
    ),
    "endpoint_id": Field(
        None,
        anything,
        "funcX 1.0: set by the endpoint itself.",
        unused=_funcx10("the endpoint id comes from registration (endpoint.json); not used", None),
    ),
    "passthrough": Field(
        True,
        anything,
        "funcX 1.0: set by the endpoint itself (results passed straight through).",
        unused=_funcx10("results always go straight to the service here; no effect", True),
    ),
    "task_status_queue": Field(
        None,
        anything,
        "funcX 1.0: set by the endpoint itself (task state changes).",
        unused=_funcx10(
            "task state changes reach the service in the endpoint's status reports; not used",
            None,
        ),
    ),
}

#: Fields of ``SimpleStrategy`` that only funcX 1.0 had.
STRATEGY_FIELDS: Dict[str, Field] = {
    "threshold": Field(
        20,
        number(0),
        "funcX 1.0: task events that made its strategy run before the interval ended.",
        unused=Unused(
            "the strategy runs every `interval` seconds; arriving tasks do not make it "
            "run sooner (no effect)"
        ),
    ),
}

#: Every keyword argument of funcX 1.0.13's classes and its default there
#: (``funcx_endpoint/endpoint/utils/config.py``, ``executors/high_throughput/
#: executor.py``, ``strategies/simple.py`` and ``kube_simple.py`` of that release).
FUNCX10_FIELDS: Dict[str, Dict[str, Any]] = {
    "Config": {
        "executors": "[HighThroughputExecutor()]",
        "environment": None,
        "funcx_service_address": None,
        "multi_tenant": None,
        "heartbeat_period": 30,
        "heartbeat_threshold": 120,
        "idle_heartbeats_soft": 0,
        "idle_heartbeats_hard": 5760,
        "detach_endpoint": True,
        "log_dir": None,
        "stdout": "./endpoint.log",
        "stderr": "./endpoint.log",
        # Deprecated in 1.0.13 (warned about and dropped there):
        "results_ws_uri": None,
        "warn_about_url_mismatch": False,
    },
    "HighThroughputExecutor": {
        "label": "HighThroughputExecutor",
        "strategy": "SimpleStrategy()",
        "max_workers_per_node": math.inf,
        "mem_per_worker": None,
        "launch_cmd": None,
        "available_accelerators": None,
        "worker_mode": "no_container",
        "scheduler_mode": "hard",
        "container_type": None,
        "container_cmd_options": "",
        "cold_routing_interval": 10.0,
        "prefetch_capacity": 10,
        "provider": "LocalProvider()",
        "address": "127.0.0.1",
        "worker_ports": None,
        "worker_port_range": (54000, 55000),
        "interchange_port_range": (55000, 56000),
        "storage_access": None,
        "working_dir": None,
        "worker_debug": False,
        "cores_per_worker": 1.0,
        "heartbeat_threshold": 120,
        "heartbeat_period": 30,
        "poll_period": 10,
        "container_image": None,
        "suppress_failure": True,
        "run_dir": None,
        "endpoint_id": None,
        "passthrough": True,
        "task_status_queue": None,
    },
    "SimpleStrategy": {
        "threshold": 20,
        "interval": 1,
        "max_idletime": 60,
    },
}
