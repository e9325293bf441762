"""The objects a ``config.py`` builds: :class:`Config` and its parts.

Every class here takes keyword arguments only and checks each one as it is
given, so a typo or a wrong type in ``config.py`` is reported at once, with
the field's name, what it expects and what it got, instead of surfacing later
as a mysterious failure in a daemon.
"""

from __future__ import annotations

import difflib
import math
import re
import uuid
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional, Tuple

DEFAULT_SERVICE_ADDRESS = "https://api2.funcx.org/v2"
MiB = 1024 * 1024


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong kind.

    The message names the class and the field, and says what was expected.
    """


_UNSET: Any = object()


class Field:
    """One keyword argument of a config class: its default and its check.

    ``check`` receives the value and returns it, possibly normalised; it
    raises :class:`TypeError` or :class:`ValueError` with a description of
    what it expected, which :class:`ConfigObject` turns into a
    :class:`ConfigError` naming the field.
    """

    def __init__(
        self,
        default: Any,
        check: Callable[[Any], Any],
        doc: str,
        default_factory: Optional[Callable[[], Any]] = None,
    ) -> None:
        self.default = default
        self.check = check
        self.doc = doc
        self.default_factory = default_factory

    def default_value(self) -> Any:
        if self.default_factory is not None:
            return self.default_factory()
        return self.default


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def number(
    minimum: Optional[float] = None,
    exclusive_minimum: bool = False,
    allow_inf: bool = False,
    integer: bool = False,
) -> Callable[[Any], Any]:
    """A check for an int or float within bounds."""
    kind = "an integer" if integer else "a number"
    if minimum is not None:
        kind += f" {'>' if exclusive_minimum else '>='} {minimum:g}"

    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected {kind}, got {_describe(value)}")
        if math.isnan(value):
            raise ValueError(f"expected {kind}, got NaN")
        if math.isinf(value):
            if allow_inf and value > 0:
                return value
            raise ValueError(f"expected {kind}, got {value}")
        if integer and not isinstance(value, int):
            if value != int(value):
                raise TypeError(f"expected {kind}, got {_describe(value)}")
            value = int(value)
        if minimum is not None:
            if value < minimum or (exclusive_minimum and value == minimum):
                raise ValueError(f"expected {kind}, got {value}")
        return value

    return check


def optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Allow ``None`` besides what ``check`` accepts."""

    def optional_check(value: Any) -> Any:
        if value is None:
            return None
        return check(value)

    return optional_check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected True or False, got {_describe(value)}")
    return value


def string(pattern: Optional[str] = None, what: str = "a string") -> Callable[[Any], str]:
    compiled = re.compile(pattern) if pattern else None

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(f"expected {what}, got {_describe(value)}")
        if compiled is not None and not compiled.fullmatch(value):
            raise ValueError(f"expected {what}, got {value!r}")
        return value

    return check


def choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(
                f"expected one of {', '.join(map(repr, choices))}, got {_describe(value)}"
            )
        return str(value)

    return check


def url(schemes: Tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise TypeError(f"expected a URL, got {_describe(value)}")
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in schemes:
            raise ValueError(
                f"expected a URL starting with {' or '.join(s + '://' for s in schemes)},"
                f" got {value!r}"
            )
        return value.rstrip("/")

    return check


def uuid_list(value: Any) -> List[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, set)):
        raise TypeError(f"expected a list of function UUIDs, got {_describe(value)}")
    result = []
    for item in value:
        try:
            result.append(str(uuid.UUID(str(item))))
        except ValueError:
            raise ValueError(f"expected a list of function UUIDs, {item!r} is not a UUID") from None
    return result


def string_list(value: Any) -> List[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise TypeError(f"expected a list of strings, got {_describe(value)}")
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"expected a list of strings, got an item {_describe(item)}")
    return list(value)


def string_dict(value: Any) -> Dict[str, str]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a dict of strings to strings, got {_describe(value)}")
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise TypeError(
                f"expected a dict of strings to strings, got {key!r}: {_describe(item)}"
            )
    return dict(value)


def port_range(value: Any) -> Tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise TypeError(f"expected a (low, high) pair of ports, got {_describe(value)}")
    low, high = value
    if not 0 <= low <= high <= 65535:
        raise ValueError(f"expected 0 <= low <= high <= 65535, got {value!r}")
    return (low, high)


class ConfigObject:
    """Base of the config classes: keyword-only fields, each checked on entry.

    Subclasses declare ``fields``, a dict of name to :class:`Field`.  The
    values are available as attributes; :meth:`as_dict` gives them all.
    """

    fields: ClassVar[Dict[str, Field]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = type(self).__name__
        if args:
            raise ConfigError(
                f"{cls} takes keyword arguments only (name=value), "
                f"got {len(args)} positional argument(s)"
            )
        for name in kwargs:
            if name not in self.fields:
                close = difflib.get_close_matches(name, list(self.fields), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"{cls} got an unknown field {name!r}{hint} "
                    f"(known fields: {', '.join(sorted(self.fields))})"
                )
        for name, field in self.fields.items():
            value = kwargs[name] if name in kwargs else field.default_value()
            if name in kwargs or value is not None:
                try:
                    value = field.check(value)
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"{cls}.{name}: {e}") from None
            setattr(self, name, value)
        self.validate()

    def validate(self) -> None:
        """Check relations between fields; raise :class:`ConfigError`."""

    def as_dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in self.fields}

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, ConfigObject)
        return self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        changed = []
        for name, field in self.fields.items():
            value = getattr(self, name)
            if value != field.default_value():
                changed.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"

    @classmethod
    def describe_fields(cls) -> Iterator[Tuple[str, Any, str]]:
        """(name, default, doc) for each field, for documentation."""
        for name, field in cls.fields.items():
            yield name, field.default_value(), field.doc


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


def _worker_mode(value: Any) -> str:
    mode = choice("no_container", "docker", "podman", "singularity", "apptainer")(value)
    if mode != "no_container":
        raise ValueError(
            f"{mode!r} workers (in containers) are not supported by this version; "
            f"use 'no_container'"
        )
    return mode


def _accelerators(value: Any) -> List[str]:

    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"expected a count >= 0 or a list of device ids, got {value}")
        return [str(i) for i in range(value)]
    return string_list(value)


class LocalProvider(ConfigObject):
    """Runs blocks of managers as processes on this machine.

    The scaling fields are those of Parsl's providers, so a Parsl provider
    (``SlurmProvider`` and friends) can take its place.
    """

    fields = {
        "init_blocks": Field(
            1, number(0, integer=True), "Blocks started when the endpoint starts."
        ),
        "min_blocks": Field(0, number(0, integer=True), "Fewest blocks kept while idle."),
        "max_blocks": Field(1, number(0, integer=True), "Most blocks ever running at once."),
        "nodes_per_block": Field(1, number(1, integer=True), "Managers per block (one per node)."),
        "parallelism": Field(
            1.0,
            number(0),
            "Ratio of workers to pending tasks the strategy aims for (0 to 1; 0 keeps "
            "one block while there is work).",
        ),
        "worker_init": Field("", string(), "Shell commands run before each manager starts."),
        "cmd_timeout": Field(30, number(0, exclusive_minimum=True), "Seconds a submit may take."),
    }

    label = "local"

    init_blocks: int
    min_blocks: int
    max_blocks: int
    nodes_per_block: int
    parallelism: float
    worker_init: str
    cmd_timeout: float

    def validate(self) -> None:
        if self.parallelism > 1:
            raise ConfigError(
                f"LocalProvider.parallelism: expected a number from 0 to 1, got {self.parallelism}"
            )
        if self.min_blocks > self.max_blocks:
            raise ConfigError(
                f"LocalProvider: min_blocks ({self.min_blocks}) is larger than "
                f"max_blocks ({self.max_blocks})"
            )
        if not (self.min_blocks <= self.init_blocks <= self.max_blocks):
            raise ConfigError(
                "LocalProvider: init_blocks must be between min_blocks and max_blocks"
            )

    # The provider interface is implemented by the executor package, which
    # binds this configuration to a reactor; these exist so a config object is
    # recognisably a provider.
    def submit(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("LocalProvider is run by the endpoint's executor")

    def status(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("LocalProvider is run by the endpoint's executor")

    def cancel(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("LocalProvider is run by the endpoint's executor")


class SimpleStrategy(ConfigObject):
    """funcX's scaling strategy: scale out to the load, in after idling."""

    fields = {
        "interval": Field(
            5.0, number(0, exclusive_minimum=True), "Seconds between scaling decisions."
        ),
        "max_idletime": Field(
            120.0,
            number(0),
            "Seconds a block may stay idle before it is scaled in (down to min_blocks).",
        ),
    }

    interval: float
    max_idletime: float


class HighThroughputExecutor(ConfigObject):
    """Where and how tasks run: the provider of manager blocks and the workers."""

    fields = {
        "label": Field(
            "htex", string(r"[A-Za-z0-9_.-]+", "a label of letters, digits, _ . -"), "Name in logs."
        ),
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
            _accelerators,
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
        "address": Field(
            "127.0.0.1",
            string(),
            "Address managers connect back to; must be reachable from batch nodes.",
        ),
        "interchange_port_range": Field(
            (0, 0),
            port_range,
            "Ports the interchange may listen on; (0, 0) picks any free port.",
        ),
        "worker_debug": Field(False, boolean, "Debug logging in managers and workers."),
        "worker_mode": Field(
            "no_container",
            _worker_mode,
            "How workers are started; only 'no_container' (directly) in this version.",
        ),
        "container_cmd_options": Field("", string(), "Extra options for the container command."),
        "worker_environment": Field(
            None, string_dict, "Environment variables set for workers.", default_factory=dict
        ),
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
    address: str
    interchange_port_range: Tuple[int, int]
    worker_debug: bool
    worker_mode: str
    container_cmd_options: str
    worker_environment: Dict[str, str]


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
            url(("https", "http")),
            "Base URL of the funcX web service, ending in /v2.",
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
            number(1, integer=True),
            "Tasks the broker sends before the endpoint acknowledges any (AMQP prefetch).",
        ),
        "amqp_heartbeat": Field(
            30,
            number(0, integer=True),
            "AMQP heartbeat interval in seconds (0 turns heartbeats off).",
        ),
        "message_batches": Field(
            True,
            boolean,
            "Offer the service several tasks and results per broker message (used only "
            "if the service agrees at registration; funcX 1.0 services never do).",
        ),
        "heartbeat_period": Field(
            30.0,
            number(0, exclusive_minimum=True),
            "Seconds between status reports to the service and heartbeats with managers.",
        ),
        "heartbeat_threshold": Field(
            120.0,
            number(0, exclusive_minimum=True),
            "Seconds of silence after which a manager is declared lost.",
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
            None, optional(string()), "Directory for endpoint.log; None: the endpoint's directory."
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
    }

    executors: List[HighThroughputExecutor]
    funcx_service_address: str
    auth_address: Optional[str]
    service_ca_file: Optional[str]
    amqp_ca_file: Optional[str]
    amqp_prefetch: int
    amqp_heartbeat: int
    message_batches: bool
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

    def validate(self) -> None:
        if self.heartbeat_threshold <= self.heartbeat_period:
            raise ConfigError(
                f"Config: heartbeat_threshold ({self.heartbeat_threshold:g}) must be larger "
                f"than heartbeat_period ({self.heartbeat_period:g})"
            )
        labels = [e.label for e in self.executors]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"Config.executors: labels must be unique, got {labels}")


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
