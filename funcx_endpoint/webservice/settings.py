"""The settings of a funcX web service, and the files of its state directory.

One table (:data:`OPTIONS`) names every setting once; the twistd plugin's
options and the ``funcx-service start`` options are both built from it.
Settings given at a start are saved in ``<state dir>/service.json`` (mode
0600: it may hold broker and database passwords), so the next start without
options runs the same service (same port, same broker, same database) and the
client commands (``create-client`` & co.) find the storage while the service
is stopped.

Files of a state directory (default ``~/.funcx-service``, mode 0700)::

    service.json          settings (above)
    funcx-service.pid     the daemon's pid while it runs
    daemon.json           the daemon's pid and the session it owns
    runtime.json          where the running service answers (written when ready)
    funcx-service.log     the log, rotated
    funcx-service.sqlite3 the SQLite database (unless --database-url)
    tls/                  the generated CA and server certificate
    rabbitmq/             the embedded RabbitMQ node (unless --amqp-url)
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import attr

from funcx_endpoint import tls
from funcx_endpoint.amqp.failover import parse_hosts

DEFAULT_STATE_DIR = os.path.join("~", ".funcx-service")
STATE_DIR_ENV = "FUNCX_SERVICE_STATE_DIR"
#: The funcX scope of Globus Auth (``FUNCX_SCOPE`` overrides it for the service too).
DEFAULT_FUNCX_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
SCOPE_ENV = "FUNCX_SCOPE"
MIB = 1024 * 1024


def resolve_state_dir(state_dir: Optional[str]) -> str:
    """The absolute state directory: the argument, ``FUNCX_SERVICE_STATE_DIR``, the default."""
    chosen = state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    return os.path.abspath(os.path.expanduser(chosen))


class Option(NamedTuple):
    """One setting: its attribute (which names its command-line flag), type and help.

    ``env`` names an environment variable that gives the value when the
    option is not given: URLs with passwords belong there (or in the saved
    settings), not on a command line that ``ps`` shows.
    """

    attribute: str
    kind: Callable[[str], Any]
    help: str
    is_flag: bool = False
    env: Optional[str] = None

    @property
    def flag(self) -> str:
        """The command-line name: the attribute with dashes (``--public-host``)."""
        return self.attribute.replace("_", "-")


def _size(text: str) -> int:
    """A size in bytes; ``10M``/``10MiB``/``512K`` suffixes accepted."""
    value = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    factor = 1
    if value and value[-1] in "KMG":
        factor = {"K": 1024, "M": MIB, "G": 1024 * MIB}[value[-1]]
        value = value[:-1]
    size = int(float(value) * factor)
    if size <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return size


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"a port is 0..65535, got {text!r}")
    return port


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(f"must be positive, got {text!r}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(f"must be a positive whole number, got {text!r}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise ValueError(f"must be a number of seconds, 0 or more, got {text!r}")
    return value


QUEUE_TYPES = ("classic", "quorum")


def _queue_type(text: str) -> str:
    if text not in QUEUE_TYPES:
        raise ValueError(f"the queue type is classic or quorum, not {text!r}")
    return text


def _existing_file(text: str) -> str:
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.isfile(path):
        raise ValueError(f"no such file: {path}")
    return path


#: Every setting a start accepts (``--flag VALUE``; ``is_flag`` ones take no value).
OPTIONS: List[Option] = [
    Option("port", _port, "HTTPS port (0: a free port chosen at the first start, kept)"),
    Option(
        "interface",
        str,
        "Address to listen on (HTTPS, and the embedded broker's AMQPS)",
    ),
    Option(
        "public_host",
        str,
        "Host name clients and endpoints use to reach this machine (in URLs and certificates)",
    ),
    Option(
        "tls_cert",
        _existing_file,
        "Server certificate (PEM) instead of a generated one",
    ),
    Option("tls_key", _existing_file, "Private key (PEM) of --tls-cert"),
    Option("tls_ca", _existing_file, "CA file clients should trust for --tls-cert"),
    Option("insecure_http", bool, "Serve plain HTTP instead of HTTPS (unsafe)", True),
    Option(
        "database_url",
        str,
        "postgresql://user:password@host:port/db (default: SQLite in the state directory)",
        env="FUNCX_SERVICE_DATABASE_URL",
    ),
    Option(
        "amqp_url",
        str,
        "amqp(s)://user:password@host:port/vhost of an existing RabbitMQ (an administrator)",
        env="FUNCX_SERVICE_AMQP_URL",
    ),
    Option(
        "management_url",
        str,
        "http(s)://user:password@host:port/ of that broker's management API",
        env="FUNCX_SERVICE_MANAGEMENT_URL",
    ),
    Option("broker_ca_file", _existing_file, "CA file to verify that broker with"),
    Option(
        "broker_public_url",
        str,
        "amqps://host:port/vhost that endpoints and clients use to reach the broker",
    ),
    Option("max_request_size", _size, "Largest request body accepted (e.g. 10M)"),
    Option(
        "heartbeat_threshold",
        _positive,
        "Seconds without a status report after which an endpoint is offline",
    ),
    Option("token_lifetime", int, "Seconds an access token is valid"),
    Option("max_functions", _count, "Functions a user may register"),
    Option(
        "max_stored_bytes",
        _size,
        "Bytes a user may store: function code plus payloads of unfinished tasks (e.g. 1G)",
    ),
    Option("max_endpoints", _count, "Endpoints a user may have (not deleted)"),
    Option(
        "max_tasks_in_flight",
        _count,
        "Unfinished tasks a user may have",
    ),
    Option(
        "task_retention",
        _seconds,
        "Seconds a finished task and its result are kept",
    ),
    Option(
        "fetched_result_retention",
        _seconds,
        "Seconds a result is kept after it was first fetched (0: deleted at the next purge)",
    ),
    Option(
        "amqp_hosts",
        str,
        "host:port,host:port,... of every node of a RabbitMQ cluster, reached with "
        "--amqp-url's scheme, user, password and virtual host (the service fails over)",
    ),
    Option(
        "management_hosts",
        str,
        "host:port,... of the cluster nodes' management APIs, reached with "
        "--management-url's scheme and credentials (the service fails over)",
    ),
    Option(
        "queue_type",
        _queue_type,
        "classic (default) or quorum: the type of the queues the service declares "
        "(quorum: replicated over a cluster's nodes)",
    ),
    Option(
        "trusted_proxies",
        str,
        "Addresses (a,b,...) of load balancers whose X-Forwarded-For header names the "
        "caller (for login back-off and endpoint addresses)",
    ),
    Option(
        "instance_id",
        str,
        "Name of this instance among several sharing a database (default: host name "
        "and port); tasks it stores are its to publish until it is silent for a while",
    ),
]


@attr.s(auto_attribs=True)
class ServiceSettings:
    """Everything a service needs to know to run; see :data:`OPTIONS`."""

    state_dir: str
    port: int = 0
    interface: str = "127.0.0.1"
    public_host: str = "localhost"
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_ca: Optional[str] = None
    insecure_http: bool = False
    database_url: Optional[str] = None
    amqp_url: Optional[str] = None
    management_url: Optional[str] = None
    broker_ca_file: Optional[str] = None
    broker_public_url: Optional[str] = None
    max_request_size: int = 10 * MIB
    heartbeat_threshold: float = 120.0
    token_lifetime: int = 48 * 3600
    amqp_hosts: Optional[str] = None
    management_hosts: Optional[str] = None
    queue_type: str = "classic"
    instance_id: Optional[str] = None
    trusted_proxies: Optional[str] = None
    #: Seconds a task stored by one instance is left for it to publish before
    #: another instance sharing the database publishes it (several instances).
    claim_seconds: float = 15.0
    #: How often unsent tasks and result copies are sent again (seconds).
    resend_interval: float = 2.0
    #: Status reports kept per endpoint for ``GET /endpoints/<id>/status``.
    status_log_size: int = 20
    #: Per-task-group result queues expire after this long unused (seconds).
    result_queue_ttl: int = 7 * 24 * 3600
    #: Quotas per user (:mod:`funcx_endpoint.webservice.quotas`).
    max_functions: int = 10_000
    max_stored_bytes: int = 1024 * MIB
    max_endpoints: int = 20
    max_tasks_in_flight: int = 100_000
    #: Retention (:mod:`funcx_endpoint.webservice.retention`), in seconds.
    task_retention: float = 14 * 24 * 3600.0
    fetched_result_retention: float = 3600.0

    # -- files ----------------------------------------------------------------

    @property
    def settings_file(self) -> str:
        return os.path.join(self.state_dir, "service.json")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.state_dir, "funcx-service.pid")

    @property
    def daemon_info_file(self) -> str:
        return os.path.join(self.state_dir, "daemon.json")

    @property
    def runtime_file(self) -> str:
        return os.path.join(self.state_dir, "runtime.json")

    @property
    def log_file(self) -> str:
        return os.path.join(self.state_dir, "funcx-service.log")

    @property
    def tls_dir(self) -> str:
        return os.path.join(self.state_dir, "tls")

    @property
    def broker_dir(self) -> str:
        return os.path.join(self.state_dir, "rabbitmq")

    @property
    def sqlite_path(self) -> str:
        return os.path.join(self.state_dir, "funcx-service.sqlite3")

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite://{self.sqlite_path}"

    @property
    def embedded_broker(self) -> bool:
        return not self.amqp_url

    @property
    def effective_instance_id(self) -> str:
        """This instance's name among those sharing the database (stable across restarts)."""
        import socket

        return self.instance_id or f"{socket.gethostname()}:{self.port}"

    @property
    def funcx_scope(self) -> str:
        return os.environ.get(SCOPE_ENV) or DEFAULT_FUNCX_SCOPE

    @property
    def scheme(self) -> str:
        return "http" if self.insecure_http else "https"

    def check(self) -> None:
        """ValueError naming what is inconsistent."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.management_url and not self.amqp_url:
            raise ValueError("--management-url needs --amqp-url (an existing broker)")
        if self.amqp_url and not self.amqp_url.startswith(("amqp://", "amqps://")):
            raise ValueError("--amqp-url must be an amqp:// or amqps:// URL")
        if self.amqp_hosts and not self.amqp_url:
            raise ValueError("--amqp-hosts needs --amqp-url (its scheme, user and password)")
        for hosts in (self.amqp_hosts, self.management_hosts):
            if hosts:
                parse_hosts(hosts, 1)
        if self.management_hosts and not self.amqp_url:
            raise ValueError("--management-hosts needs --amqp-url (an existing broker)")
        if self.instance_id and not self.amqp_url:
            raise ValueError(
                "--instance-id needs --amqp-url: instances share one broker (the embedded "
                "broker is one instance's own)"
            )
        if self.queue_type == "quorum" and not self.amqp_url:
            raise ValueError("--queue-type quorum needs --amqp-url (a RabbitMQ cluster)")
        if self.database_url and not self.database_url.startswith(
            ("postgresql://", "postgres://", "sqlite:")
        ):
            raise ValueError("--database-url must be a postgresql:// (or sqlite:///path) URL")

    # -- persistence ----------------------------------------------------------

    def stored(self) -> Dict[str, Any]:
        """The settings that are saved (all of :data:`OPTIONS`)."""
        return {option.attribute: getattr(self, option.attribute) for option in OPTIONS}

    def save(self) -> None:
        """Write ``service.json`` (0600) in the state directory (made 0700)."""
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        tls.write_private_file(
            self.settings_file, json.dumps(self.stored(), indent=2, sort_keys=True).encode()
        )

    @classmethod
    def load(cls, state_dir: str, overrides: Optional[Dict[str, Any]] = None) -> ServiceSettings:
        """The saved settings of ``state_dir`` (defaults if none), with ``overrides``."""
        values: Dict[str, Any] = {}
        path = os.path.join(state_dir, "service.json")
        try:
            with open(path) as f:
                saved = json.load(f)
        except FileNotFoundError:
            saved = {}
        except ValueError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from None
        known = {option.attribute for option in OPTIONS}
        values.update({k: v for k, v in saved.items() if k in known})
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        settings = cls(state_dir=state_dir, **values)
        settings.check()
        return settings

    # -- runtime information -----------------------------------------------------

    def write_runtime(self, info: Dict[str, Any]) -> None:
        tls.write_private_file(self.runtime_file, json.dumps(info, indent=2).encode())

    def read_runtime(self) -> Dict[str, Any]:
        try:
            with open(self.runtime_file) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def remove_runtime(self) -> None:
        for path in (self.runtime_file,):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def client_env_lines(info: Dict[str, Any]) -> List[str]:
    """``export`` lines a client (our SDK, the real funcX SDK and endpoint) needs."""
    lines = [
        f"export FUNCX_SERVICE_ADDRESS={info['base_url']}",
        f"export GLOBUS_SDK_SERVICE_URL_AUTH={info['auth_url']}",
    ]
    ca_file = info.get("ca_file")
    if ca_file:
        lines += [
            f"export FUNCX_SERVICE_CA_FILE={ca_file}",
            f"export GLOBUS_SDK_VERIFY_SSL={ca_file}",
        ]
    broker_ca = info.get("broker_ca_file")
    if broker_ca:
        # pika (the real funcX endpoint and FuncXExecutor) trusts SSL_CERT_FILE.
        lines.append(f"export SSL_CERT_FILE={broker_ca}")
    return lines
