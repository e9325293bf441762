"""The objects a ``config.py`` builds: :class:`Config` and its parts.

Every class here takes keyword arguments only and checks each one as it is
given, so a typo or a wrong type in ``config.py`` is reported at once, with
the field's name, what it expects and what it got, instead of surfacing later
as a mysterious failure in a daemon.

Every keyword argument of funcX 1.0.13's ``Config``, ``HighThroughputExecutor``
and ``SimpleStrategy`` is a field here too, so a funcX 1.0 ``config.py`` loads
unchanged (:mod:`funcx_endpoint.config.funcx10` lists them): most are
honoured; the few that have no meaning in this design are marked
:class:`~funcx_endpoint.config.fields.Unused` and the endpoint logs a warning
for each one given, saying what it means here.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

from funcx_endpoint.config import funcx10, sandbox
from funcx_endpoint.config.bounds import (
    AMQP_SHORT_MAX,
    check_workers_per_node,
    host_address,
)
from funcx_endpoint.config.containers import (
    CONTAINER_FIELDS,
    container_notices,
    resolve_containers,
)
from funcx_endpoint.config.fields import (
    ConfigError,
    ConfigObject,
    Field,
    Notice,
    Unused,
    _describe,
    boolean,
    choice,
    number,
    optional,
    port_range,
    string,
    string_dict,
    string_list,
    url,
    uuid_list,
)
from funcx_endpoint.config.scaling import LocalProvider, SimpleStrategy
from funcx_endpoint.environments import DEFAULT_SERVICE_ADDRESS, ENVIRONMENT_ADDRESSES
from funcx_endpoint.worker.mpi import LAUNCHER_VARIABLE, LAUNCHERS

__all__ = [
    "DEFAULT_SERVICE_ADDRESS",
    "Config",
    "ConfigError",
    "ConfigObject",
    "Field",
    "HighThroughputExecutor",
    "LocalProvider",
    "MiB",
    "Notice",
    "SimpleStrategy",
    "Unused",
]

MiB = 1024 * 1024


def _provider(value: Any) -> Any:
    """Any object with the Parsl provider interface is accepted."""
    for method in ("submit", "status", "cancel"):
        if not callable(getattr(value, method, None)):
            raise TypeError(
                f"expected an execution provider (LocalProvider(), or a Parsl "
                f"provider such as SlurmProvider), got {_describe(value)} "
                f"which has no {method}() method"
            )
    return value


def _strategy(value: Any) -> Any:
    if not isinstance(value, SimpleStrategy):
        raise TypeError(f"expected SimpleStrategy(...), got {_describe(value)}")
    return value


def _idle_count(value: Any) -> int:
    """A count of heartbeats, as funcX 1.0 took it: a number, negative meaning 0."""
    return int(max(0, number()(value)))


def _mpi_launcher(value: Any) -> str:
    """An MPI launcher :mod:`funcx_endpoint.worker.mpi` knows, or ``auto``."""
    if value not in ("auto", *LAUNCHERS):
        raise ValueError(f"must be one of {['auto', *sorted(LAUNCHERS)]}, not {value!r}")
    return str(value)


def _label(value: Any) -> str:
    label = string(r".+", "a non-empty label")(value)
    if "/" in label or "\x00" in label:
        raise ValueError(f"expected a label without '/', got {label!r}")
    return label


def _accelerators(value: Any) -> List[str]:

    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"expected a count >= 0 or a list of device ids, got {value}")
        return [str(i) for i in range(value)]
    return string_list(value)


class HighThroughputExecutor(ConfigObject):
    """Where and how tasks run: the provider of manager blocks and the workers."""

    fields = {
        "label": Field("htex", _label, "Name in logs and in the provider's job names."),
        "provider": Field(
            None, _provider, "Starts blocks of managers.", default_factory=lambda: LocalProvider()
        ),
        "strategy": Field(
            None, _strategy, "Scaling strategy.", default_factory=lambda: SimpleStrategy()
        ),
        "max_workers_per_node": Field(
            math.inf,
            number(1, allow_inf=True),
            "Upper bound on workers per manager (node); inf means one per cores_per_worker.",
        ),
        "cores_per_worker": Field(
            1.0, number(0, exclusive_minimum=True), "CPU cores each worker is given."
        ),
        "mem_per_worker": Field(
            None, optional(number(0, exclusive_minimum=True)), "GB of memory per worker, or None."
        ),
        "available_accelerators": Field(
            None,
            optional(_accelerators),
            "Accelerators to pin workers to: a count or a list of device ids; "
            "each worker gets one through CUDA_VISIBLE_DEVICES and friends.",
            default_factory=list,
        ),
        "prefetch_capacity": Field(
            8,
            number(0, integer=True),
            "Tasks a manager holds per worker beyond the one running, so workers never wait.",
        ),
        "max_retries_on_system_failure": Field(
            1,
            number(0, integer=True),
            "Times a task lost with its manager is retried before it fails with ManagerLost.",
        ),
        "walltime_drain_margin": Field(
            None,
            optional(number(0)),
            "Seconds before a block's walltime ends that its managers stop taking new "
            "tasks (and a replacement is running); None: 10% of the walltime, at most 60.",
        ),
        "address": Field(
            "127.0.0.1",
            host_address,
            "Address managers connect back to; must be reachable from batch nodes.",
        ),
        "interchange_port_range": Field(
            (0, 0),
            port_range,
            "Ports the interchange may listen on for managers; (0, 0) picks any free "
            "port. When worker_port_range or worker_ports is given, that is used instead "
            "(and, this given too, a warning says it is not used).",
        ),
        "worker_port_range": Field(
            None,
            optional(port_range),
            "funcX 1.0's name for the ports managers connect to: when given, the "
            "interchange listens in this range (instead of interchange_port_range).",
        ),
        "heartbeat_period": Field(
            None,
            optional(number(0, exclusive_minimum=True)),
            "Seconds between heartbeats of the interchange and its managers; None: "
            "Config.heartbeat_period.",
        ),
        "heartbeat_threshold": Field(
            None,
            optional(number(0, exclusive_minimum=True)),
            "Seconds of silence after which a manager (or, for a manager, the "
            "interchange) is lost; None: Config.heartbeat_threshold.",
        ),
        "working_dir": Field(
            None,
            optional(string()),
            "Directory of the blocks' output and submit scripts (relative: to the "
            "endpoint directory); None: the endpoint directory.",
        ),
        "worker_debug": Field(False, boolean, "Debug logging in managers and workers."),
        "worker_environment": Field(
            None, string_dict, "Environment variables set for workers.", default_factory=dict
        ),
        "mpi_launcher": Field(
            "auto",
            _mpi_launcher,
            "How tasks with a resource specification (MPIFunction) start their ranks: "
            "'srun', 'mpiexec' (MPICH, Intel MPI), 'mpirun' (Open MPI), 'aprun', or "
            "'auto': srun inside a Slurm job, else mpiexec.",
        ),
        **sandbox.EXECUTOR_FIELDS,
        # The fields only funcX 1.0 had (accepted; a warning when given).
        **funcx10.EXECUTOR_FIELDS,
        # How workers run: directly or in containers (worker_mode and the rest).
        **CONTAINER_FIELDS,
    }

    label: str
    provider: Any
    strategy: SimpleStrategy
    max_workers_per_node: float
    cores_per_worker: float
    mem_per_worker: Optional[float]
    available_accelerators: List[str]
    prefetch_capacity: int
    max_retries_on_system_failure: int
    walltime_drain_margin: Optional[float]
    address: str
    interchange_port_range: Tuple[int, int]
    worker_port_range: Optional[Tuple[int, int]]
    worker_ports: Optional[Tuple[int, int]]
    heartbeat_period: Optional[float]
    heartbeat_threshold: Optional[float]
    working_dir: Optional[str]
    worker_debug: bool
    worker_mode: str
    container_cmd_options: Optional[str]
    container_type: Optional[str]
    container_uri: Optional[str]
    container_image: Optional[str]
    scheduler_mode: Optional[str]
    cold_routing_interval: Optional[float]
    launch_cmd: Optional[str]
    poll_period: Optional[float]
    suppress_failure: Any
    storage_access: Any
    run_dir: Any
    endpoint_id: Any
    passthrough: Any
    task_status_queue: Any
    worker_environment: Dict[str, str]
    mpi_launcher: str
    run_in_sandbox: bool
    tasks_working_dir: str

    def validate(self) -> None:
        if self.available_accelerators is None:
            self.available_accelerators = []
        resolve_containers(self)
        too_many = check_workers_per_node(self.max_workers_per_node, self.cores_per_worker)
        if too_many:
            raise ConfigError(f"HighThroughputExecutor: {too_many}")
        if self.heartbeat_period is not None and self.heartbeat_threshold is not None:
            _check_heartbeats(
                "HighThroughputExecutor", self.heartbeat_period, self.heartbeat_threshold
            )
        if (
            self.scheduler_mode == "soft"
            and self.worker_mode != "no_container"
            and "Kubernetes" in type(self.provider).__name__
        ):
            raise ConfigError(
                "HighThroughputExecutor.scheduler_mode='soft' is not supported with "
                "Kubernetes: a pod runs its manager and workers in one image, so a manager "
                "cannot start containers of other types; use scheduler_mode='hard'"
            )

    def manager_worker_environment(self) -> Dict[str, str]:
        """The environment workers get: ``worker_environment``, the MPI launcher
        and, with ``run_in_sandbox``, the sandboxes' directory."""
        return {
            **self.worker_environment,
            LAUNCHER_VARIABLE: self.mpi_launcher,
            **sandbox.sandbox_environment(self.run_in_sandbox, self.tasks_working_dir),
        }

    @property
    def container_engine(self) -> Optional[str]:
        """The engine that runs this executor's workers, or None (no container)."""
        return None if self.worker_mode == "no_container" else self.worker_mode

    def listen_port_range(self) -> Tuple[int, int]:
        """The ports the interchange may listen on for managers: ``worker_ports[0]``,
        else ``worker_port_range``, else ``interchange_port_range``."""
        if self.worker_ports is not None:
            return (self.worker_ports[0], self.worker_ports[0])
        if self.worker_port_range is not None:
            return self.worker_port_range
        return self.interchange_port_range

    #: Fields whose notice (they do nothing) holds only without containers.
    ROUTING_FIELDS = ("scheduler_mode", "cold_routing_interval")

    def notices(self) -> List[Notice]:
        found = super().notices()
        if self.worker_mode == "no_container":
            return found
        routing = {f"HighThroughputExecutor.{name}" for name in self.ROUTING_FIELDS}
        found = [notice for notice in found if notice.setting not in routing]
        if "cold_routing_interval" in self.given and (self.scheduler_mode or "hard") == "hard":
            found.append(
                Notice(
                    "HighThroughputExecutor.cold_routing_interval",
                    self.given["cold_routing_interval"],
                    "only soft routing (scheduler_mode='soft') uses it; no effect",
                )
            )
        return found

    def relation_notices(self) -> List[Notice]:
        found: List[Notice] = container_notices(self)
        if "interchange_port_range" in self.given and (
            self.worker_ports is not None or self.worker_port_range is not None
        ):
            chosen = "worker_ports" if self.worker_ports is not None else "worker_port_range"
            found.append(
                Notice(
                    "HighThroughputExecutor.interchange_port_range",
                    self.given["interchange_port_range"],
                    f"funcX 1.0's internal ports; managers connect on {chosen} and there are "
                    f"no internal ports here: not used",
                )
            )
        return found


def _check_heartbeats(owner: str, period: float, threshold: float) -> None:
    if threshold <= period:
        raise ConfigError(
            f"{owner}: heartbeat_threshold ({threshold:g}) must be larger "
            f"than heartbeat_period ({period:g})"
        )


class Config(ConfigObject):
    """An endpoint's configuration: what ``config.py`` assigns to ``config``."""

    fields = {
        "executors": Field(
            None,
            lambda v: _executors(v),
            "Executors that run tasks (one HighThroughputExecutor today).",
            default_factory=lambda: [HighThroughputExecutor()],
        ),
        "funcx_service_address": Field(
            DEFAULT_SERVICE_ADDRESS,
            optional(url(("https", "http"))),
            "Base URL of the funcX web service, ending in /v2; None (or not given): "
            "the URL of `environment`.",
        ),
        "environment": Field(
            None,
            optional(string()),
            "funcX 1.0's name of a public service, used when funcx_service_address is "
            "not given: 'production' (the default), 'dev' or 'local'.",
            unused=Unused(
                "not a funcX 1.0 environment name: the production service is used (as "
                "funcX 1.0 did), unless funcx_service_address is given",
                (None, *ENVIRONMENT_ADDRESSES),
                partly=True,
            ),
        ),
        "auth_address": Field(
            None,
            optional(url(("https", "http"))),
            "Base URL of the Globus-Auth-compatible login service; None: "
            "GLOBUS_SDK_SERVICE_URL_AUTH, else the funcX service's own root (a private "
            "service answers the login calls there), or Globus Auth for the public service.",
        ),
        "service_ca_file": Field(
            None,
            optional(string()),
            "PEM file of the CA that signed the web service's certificate (a private "
            "service); None trusts the system's CAs.",
        ),
        "amqp_ca_file": Field(
            None,
            optional(string()),
            "PEM file of the CA that signed the broker's certificate; defaults to "
            "service_ca_file, then the system's CAs.",
        ),
        "amqp_prefetch": Field(
            512,
            number(1, integer=True, maximum=AMQP_SHORT_MAX),
            "Tasks the broker sends before the endpoint acknowledges any (AMQP prefetch).",
        ),
        "amqp_heartbeat": Field(
            30,
            number(0, integer=True, maximum=AMQP_SHORT_MAX),
            "AMQP heartbeat interval in seconds (0 turns heartbeats off).",
        ),
        "message_batches": Field(
            True,
            boolean,
            "Offer the service several tasks and results per broker message (used only "
            "if the service agrees at registration; funcX 1.0 services never do).",
        ),
        "task_states": Field(
            True,
            boolean,
            "Send task state changes (running, ...) to the service as they happen, "
            "batched; off: they travel only with the status reports.",
        ),
        "task_states_interval": Field(
            0.5,
            number(0, exclusive_minimum=True),
            "Seconds a task stays in a state (waiting, running) before that state is sent "
            "(task_states); shorter states travel only with the result.",
        ),
        "heartbeat_period": Field(
            30.0,
            number(0, exclusive_minimum=True),
            "Seconds between status reports to the service, beats of the idle clock, and "
            "heartbeats with managers (unless the executor sets its own).",
        ),
        "heartbeat_threshold": Field(
            120.0,
            number(0, exclusive_minimum=True),
            "Seconds of silence after which a manager is declared lost (unless the "
            "executor sets its own).",
        ),
        "allowed_functions": Field(
            None,
            optional(uuid_list),
            "Function UUIDs this endpoint may run; None allows all. Others are "
            "answered FunctionNotAllowed without running.",
        ),
        "task_timeout": Field(
            None,
            optional(number(0, exclusive_minimum=True)),
            "Seconds a task may run before its worker is killed (TaskTimeout); None: no limit.",
        ),
        "result_size_limit": Field(
            10 * MiB,
            number(1, integer=True),
            "Largest serialized result in bytes; larger ones fail with MaxResultSizeExceeded.",
        ),
        "stop_grace_period": Field(
            10.0,
            number(0),
            "Seconds managers and workers get after TERM before they are killed.",
        ),
        "log_dir": Field(
            None,
            optional(string()),
            "Directory for endpoint.log (relative: to the endpoint's directory); None: the "
            "endpoint's directory.",
        ),
        "log_max_bytes": Field(
            10 * MiB, number(1024, integer=True), "Size at which endpoint.log is rotated."
        ),
        "log_backup_count": Field(
            5, number(1, integer=True), "Rotated logs kept (endpoint.log.1 ...), at least 1."
        ),
        "log_format": Field(
            "text",
            choice("text", "json"),
            "endpoint.log lines: 'text' or 'json' (one object per line).",
        ),
        "debug": Field(False, boolean, "Debug logging in the daemon."),
        "detach_endpoint": Field(
            True, boolean, "Run as a daemon on start (False: stay in the foreground)."
        ),
        "idle_heartbeats_soft": Field(
            0,
            _idle_count,
            "Shut down after this many heartbeat periods idle (no task or result "
            "moved, none outstanding, at least one handled); 0: never (funcX 1.0).",
        ),
        "idle_heartbeats_hard": Field(
            5760,
            _idle_count,
            "With idle_heartbeats_soft on: shut down after this many heartbeat periods "
            "in which no task or result moved, even with tasks outstanding (funcX 1.0).",
        ),
        **sandbox.CONFIG_FIELDS,
        # The fields only funcX 1.0 had (accepted; a warning when given).
        **funcx10.CONFIG_FIELDS,
    }

    executors: List[HighThroughputExecutor]
    funcx_service_address: str
    environment: Optional[str]
    auth_address: Optional[str]
    service_ca_file: Optional[str]
    amqp_ca_file: Optional[str]
    amqp_prefetch: int
    amqp_heartbeat: int
    message_batches: bool
    task_states: bool
    task_states_interval: float
    heartbeat_period: float
    heartbeat_threshold: float
    allowed_functions: Optional[List[str]]
    task_timeout: Optional[float]
    result_size_limit: int
    stop_grace_period: float
    log_dir: Optional[str]
    log_max_bytes: int
    log_backup_count: int
    log_format: str
    debug: bool
    detach_endpoint: bool
    idle_heartbeats_soft: int
    idle_heartbeats_hard: int
    endpoint_setup: Optional[str]
    endpoint_teardown: Optional[str]
    hook_timeout: float
    multi_tenant: Any
    stdout: Any
    stderr: Any
    results_ws_uri: Any
    warn_about_url_mismatch: Any

    def validate(self) -> None:
        if self.given.get("funcx_service_address") is None:
            # funcX 1.0: an address given wins, else the environment's, else production.
            self.funcx_service_address = ENVIRONMENT_ADDRESSES.get(
                self.environment or "production", DEFAULT_SERVICE_ADDRESS
            )
        _check_heartbeats("Config", self.heartbeat_period, self.heartbeat_threshold)
        for executor in self.executors:
            _check_heartbeats(
                f"HighThroughputExecutor (label {executor.label!r})",
                self.manager_heartbeat_period(executor),
                self.manager_heartbeat_threshold(executor),
            )
        labels = [e.label for e in self.executors]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"Config.executors: labels must be unique, got {labels}")

    def manager_heartbeat_period(self, executor: HighThroughputExecutor) -> float:
        """Seconds between heartbeats of ``executor``'s interchange and managers."""
        return executor.heartbeat_period or self.heartbeat_period

    def manager_heartbeat_threshold(self, executor: HighThroughputExecutor) -> float:
        """Seconds of silence after which a manager of ``executor`` is lost."""
        return executor.heartbeat_threshold or self.heartbeat_threshold


def _executors(value: Any) -> List[HighThroughputExecutor]:
    if isinstance(value, HighThroughputExecutor):
        raise TypeError(
            "expected a list of executors: write executors=[HighThroughputExecutor(...)]"
        )
    if not isinstance(value, (list, tuple)) or not value:
        raise TypeError(f"expected a non-empty list of executors, got {_describe(value)}")
    for item in value:
        if not isinstance(item, HighThroughputExecutor):
            raise TypeError(f"expected HighThroughputExecutor(...) items, got {_describe(item)}")
    if len(value) > 1:
        raise ValueError(
            "only one executor per endpoint is supported; use one endpoint per executor"
        )
    return list(value)
