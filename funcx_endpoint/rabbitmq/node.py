"""What a private RabbitMQ node is made of: its directory, identity, config and environment.

A node lives in one directory (its *base directory*)::

    node.json          name, ports and administrator credentials (0600), made once
    rabbitmq.conf      rewritten at each start (listeners, TLS files, admin user, ...)
    enabled_plugins    the management plugin
    home/              HOME of the node and of rabbitmqctl (the Erlang cookie)
    mnesia/            the data (durable queues, users, permissions)
    log/               <name>.log (the node's log), server.out, epmd.out, crash dumps
    rabbitmq.pid       written by the node while it runs

Everything listens on 127.0.0.1 (the AMQPS listener may be given another
address), on ports chosen at the first start and kept in ``node.json`` for the
life of the directory, so URLs handed out stay valid across restarts.  Every
process of the node is started with ``FUNCX_RABBITMQ_NODE=<node name>`` in its
environment (see :mod:`funcx_endpoint.rabbitmq.processes`).

This module only computes and writes files; starting processes is
:mod:`funcx_endpoint.rabbitmq.service`'s job (and the test harness's).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

from funcx_endpoint import tls

__all__ = [
    "HOSTNAME",
    "LISTEN_IP",
    "MARKER_ENV",
    "NodeDirectory",
    "NodeIdentity",
    "NodePorts",
    "RabbitMQCtlError",
    "RabbitMQError",
    "RabbitMQNotInstalled",
    "RabbitMQStartError",
    "free_ports",
    "tail",
]

#: Environment variable set for every OS process of a node; its value is the node name.
MARKER_ENV = "FUNCX_RABBITMQ_NODE"

#: The address the listeners bind to (the AMQPS listener may be given another).
LISTEN_IP = "127.0.0.1"
#: The host name in URLs; a generated server certificate is valid for it and LISTEN_IP.
HOSTNAME = "localhost"

# The rabbitmqctl CLI's own Erlang distribution listener takes a port from this range
# (rabbitmq-defaults); our nodes' ports stay out of it so a CLI run by anyone cannot
# grab a port between our choosing it and the node binding it.
_CLI_DIST_PORTS = range(35672, 35683)

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RabbitMQError(Exception):
    """Something went wrong running a private RabbitMQ node."""


class RabbitMQNotInstalled(RabbitMQError):
    """The ``rabbitmq-server`` (or ``rabbitmqctl``, or ``epmd``) program was not found."""


class RabbitMQStartError(RabbitMQError):
    """The node did not come up; the message includes the tail of its logs."""


class RabbitMQCtlError(RabbitMQError):
    """``rabbitmqctl`` failed."""

    def __init__(self, args: list[str], returncode: int, stdout: str, stderr: str):
        self.args_ = args
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(
            f"rabbitmqctl {' '.join(args)} exited with {returncode}: "
            f"{(stderr or stdout).strip()[-2000:]}"
        )


@dataclass(frozen=True)
class NodePorts:
    """The TCP ports of a node."""

    amqp: int
    amqps: int
    management: int
    dist: int
    epmd: int


@dataclass(frozen=True)
class NodeIdentity:
    """What stays the same for the life of a node's directory (``node.json``)."""

    name: str
    ports: NodePorts
    admin_user: str
    admin_password: str

    @property
    def short_name(self) -> str:
        """The name without ``@host``, as epmd knows it."""
        return self.name.split("@", 1)[0]

    def _credentials(self) -> str:
        return f"{quote(self.admin_user, safe='')}:{quote(self.admin_password, safe='')}"

    def amqp_url(self, host: str = HOSTNAME) -> str:
        """``amqp://admin:password@host:port/%2F`` (plain, on 127.0.0.1)."""
        return f"amqp://{self._credentials()}@{host}:{self.ports.amqp}/%2F"

    def amqps_url(self, host: str = HOSTNAME) -> str:
        """``amqps://admin:password@host:port/%2F``."""
        return f"amqps://{self._credentials()}@{host}:{self.ports.amqps}/%2F"

    def management_url(self, host: str = HOSTNAME, with_credentials: bool = False) -> str:
        """Base URL of the management HTTP API, with the admin's credentials if asked."""
        userinfo = f"{self._credentials()}@" if with_credentials else ""
        return f"http://{userinfo}{host}:{self.ports.management}/"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ports": asdict(self.ports),
            "admin_user": self.admin_user,
            "admin_password": self.admin_password,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> NodeIdentity:
        return cls(
            name=str(data["name"]),
            ports=NodePorts(**data["ports"]),
            admin_user=str(data["admin_user"]),
            admin_password=str(data["admin_password"]),
        )


def free_ports(count: int, ip: str = LISTEN_IP) -> list[int]:
    """``count`` distinct ports free on ``ip`` right now, outside rabbitmqctl's range."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(s)
            s.bind((ip, 0))
            port = s.getsockname()[1]
            if port not in _CLI_DIST_PORTS and port not in ports:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


def tail(path: str, lines: int = 40) -> str:
    """The last ``lines`` lines of a (log) file, or why it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"({path}: {e.strerror})"
    # The server's banner is coloured: keep the text only.
    return "\n".join(_ANSI_ESCAPE.sub("", line) for line in data.splitlines()[-lines:])


def _first_errors(path: str, count: int = 10) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read(256 * 1024).decode("utf-8", "replace")
    except OSError as e:
        return f"({path}: {e.strerror})"
    errors = [line for line in text.splitlines() if "[error]" in line][:count]
    return "\n".join(errors) or "(none)"


class NodeDirectory:
    """The files of a node in ``base_dir``: paths, identity, config, environments."""

    def __init__(self, base_dir: str) -> None:
        self.base_dir = os.path.abspath(base_dir)

    def __repr__(self) -> str:
        return f"NodeDirectory({self.base_dir!r})"

    def path(self, *parts: str) -> str:
        return os.path.join(self.base_dir, *parts)

    @property
    def state_file(self) -> str:
        """``node.json``: the identity."""
        return self.path("node.json")

    @property
    def log_dir(self) -> str:
        return self.path("log")

    @property
    def pid_file(self) -> str:
        """Written by the node (the Erlang VM's pid) while it runs."""
        return self.path("rabbitmq.pid")

    @property
    def server_output(self) -> str:
        """Where ``rabbitmq-server``'s stdout and stderr go."""
        return self.path("log", "server.out")

    @property
    def epmd_output(self) -> str:
        return self.path("log", "epmd.out")

    def log_file(self, identity: NodeIdentity) -> str:
        """The node's main log file."""
        return self.path("log", f"{identity.name}.log")

    # -- identity -----------------------------------------------------------------

    def load_identity(self) -> NodeIdentity | None:
        """The identity in ``node.json``; None if there is none (or it is unreadable)."""
        try:
            with open(self.state_file) as f:
                return NodeIdentity.from_json(json.load(f))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def ensure_identity(
        self, name: str | None = None, ports: NodePorts | None = None
    ) -> NodeIdentity:
        """The node's identity: the one in ``node.json``, or a new one saved there.

        A new identity has ``name`` (default ``funcx-<random>@localhost``), ``ports``
        (default: free ones), user ``funcx-admin`` and a random password.  An
        existing one is kept whatever ``ports`` says; a different ``name`` is an error.
        """
        if name is not None and "@" not in name:
            name = f"{name}@{HOSTNAME}"
        os.makedirs(self.base_dir, mode=0o700, exist_ok=True)
        if os.path.exists(self.state_file):
            identity = self.load_identity()
            if identity is None:
                raise RabbitMQError(f"{self.state_file} is unreadable")
            if name is not None and identity.name != name:
                raise RabbitMQError(f"{self.base_dir} holds node {identity.name}, not {name}")
            return identity
        identity = NodeIdentity(
            name=name or f"funcx-{secrets.token_hex(4)}@{HOSTNAME}",
            ports=ports or NodePorts(*free_ports(5)),
            admin_user="funcx-admin",
            admin_password=secrets.token_urlsafe(24),
        )
        tls.write_private_file(self.state_file, json.dumps(identity.to_json()).encode())
        return identity

    # -- config ---------------------------------------------------------------------

    def write_config(
        self,
        identity: NodeIdentity,
        tls_files: tls.TLSFiles,
        extra_config: Mapping[str, str] | None = None,
        amqps_address: str = LISTEN_IP,
    ) -> None:
        """Create the subdirectories and (re)write ``rabbitmq.conf`` (listeners, TLS,
        management, the admin user, logging) and ``enabled_plugins``."""
        for sub in ("home", "log", "mnesia"):
            os.makedirs(self.path(sub), mode=0o700, exist_ok=True)
        ports = identity.ports
        settings = {
            "listeners.tcp.default": f"{LISTEN_IP}:{ports.amqp}",
            "listeners.ssl.default": f"{amqps_address}:{ports.amqps}",
            "ssl_options.cacertfile": tls_files.ca_cert,
            "ssl_options.certfile": tls_files.server_cert,
            "ssl_options.keyfile": tls_files.server_key,
            "ssl_options.verify": "verify_none",
            "ssl_options.fail_if_no_peer_cert": "false",
            "management.tcp.ip": LISTEN_IP,
            "management.tcp.port": str(ports.management),
            # The admin user is created at first boot from these (instead of
            # `rabbitmqctl add_user`, which would show the password in `ps`).
            "default_vhost": "/",
            "default_user": identity.admin_user,
            "default_pass": identity.admin_password,
            "default_user_tags.administrator": "true",
            "default_permissions.configure": ".*",
            "default_permissions.read": ".*",
            "default_permissions.write": ".*",
            "log.file.level": "info",
            "log.console": "false",
            # Management statistics every second instead of every 5 s, so that
            # queue counts read over HTTP are fresh.
            "collect_statistics_interval": "1000",
        }
        settings.update(extra_config or {})
        lines = ["# Written by funcx_endpoint.rabbitmq; rewritten at each start."]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        text = "\n".join(lines) + "\n"
        tls.write_private_file(self.path("rabbitmq.conf"), text.encode())
        tls.write_private_file(self.path("enabled_plugins"), b"[rabbitmq_management].\n")

    # -- environments -------------------------------------------------------------------

    def ctl_env(
        self, identity: NodeIdentity, base: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """Environment for ``rabbitmqctl``: the node's HOME (cookie), name and epmd.

        Built on ``base`` (default ``os.environ``) without its ``RABBITMQ_*`` and
        ``ERL_*`` variables, so nothing from ``/etc/rabbitmq`` or the caller applies.
        """
        source = os.environ if base is None else base
        env = {
            key: value
            for key, value in source.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
            and key not in (MARKER_ENV, "NOTIFY_SOCKET")
        }
        env.update(
            {
                "HOME": self.path("home"),
                "RABBITMQ_NODENAME": identity.name,
                "ERL_EPMD_PORT": str(identity.ports.epmd),
                "ERL_EPMD_ADDRESS": LISTEN_IP,
                "RABBITMQ_CONF_ENV_FILE": self.path("rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": self.path("rabbitmq.conf"),
                "RABBITMQ_ADVANCED_CONFIG_FILE": self.path("advanced.config"),
                "RABBITMQ_CONFIG_FILES": self.path("conf.d"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": self.path("enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": self.path("mnesia"),
                "RABBITMQ_LOG_BASE": self.log_dir,
            }
        )
        return env

    def server_env(
        self, identity: NodeIdentity, base: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        """Environment for ``rabbitmq-server`` and ``epmd``: :meth:`ctl_env` plus the marker.

        ``RABBITMQ_ALLOW_INPUT`` makes the ``rabbitmq-server`` script ``exec`` the
        Erlang VM instead of running it in the background and waiting: the process
        started is ``beam.smp`` itself, so its exit status is the node's (the
        script's would be 0 whatever happened to the node) and SIGTERM reaches the
        node directly (RabbitMQ shuts down cleanly on it).  ``-noinput`` keeps the
        VM from reading stdin, as the script does otherwise.
        """
        env = self.ctl_env(identity, base)
        env.update(
            {
                MARKER_ENV: identity.name,
                "RABBITMQ_DIST_PORT": str(identity.ports.dist),
                "RABBITMQ_FEATURE_FLAGS_FILE": self.path("feature_flags"),
                "RABBITMQ_PID_FILE": self.pid_file,
                "RABBITMQ_PLUGINS_EXPAND_DIR": self.path("plugins-expand"),
                "RABBITMQ_ALLOW_INPUT": "1",
                # Erlang distribution on loopback only, like the listeners.
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                    "-noinput -kernel inet_dist_use_interface {127,0,0,1}"
                ),
                "ERL_CRASH_DUMP": self.path("log", "erl_crash.dump"),
            }
        )
        return env

    # -- diagnostics --------------------------------------------------------------------

    def failure_report(self, identity: NodeIdentity, what: str) -> str:
        """``RabbitMQ node NAME <what>.`` and the evidence: first errors, log tails.

        Boot errors (say, a bad config setting) come first in the output, followed
        by a long crash report: so the first errors, then the tails.
        """
        out = self.server_output
        log_file = self.log_file(identity)
        return (
            f"RabbitMQ node {identity.name} {what}.\n"
            f"--- first errors in {out} ---\n{_first_errors(out)}\n"
            f"--- {out} (tail) ---\n{tail(out)}\n"
            f"--- {log_file} (tail) ---\n{tail(log_file)}"
        )
