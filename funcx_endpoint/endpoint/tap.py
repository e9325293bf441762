"""twistd plugin module for ``funcx-endpoint``: options and ``makeService``.

``twistd -n funcx-endpoint --name NAME [--config-dir DIR]`` runs an endpoint
in the foreground; ``funcx-endpoint start`` runs the same thing as a daemon.
``makeService`` only builds objects: files, sockets and processes are opened
when the services start.
"""

from __future__ import annotations

import os
import shlex
from typing import Any, Dict, List, Mapping, Optional

from twisted.application.service import IService
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.python import usage

from funcx_endpoint.amqp.spool import ResultSpool
from funcx_endpoint.config import ConfigFileError, load_runnable_config
from funcx_endpoint.config.model import Config
from funcx_endpoint.endpoint import logs
from funcx_endpoint.endpoint.auth import Authenticator, TokenStore, auth_base_url, http_client
from funcx_endpoint.endpoint.broker_info import BrokerInfo
from funcx_endpoint.endpoint.control import control_service
from funcx_endpoint.endpoint.hooks import ShellHooks
from funcx_endpoint.endpoint.idle import IdleClock, IdleShutdown
from funcx_endpoint.endpoint.layout import (
    DEFAULT_CONFIG_DIR,
    OWNER_ENV,
    AlreadyRunning,
    BadEndpointName,
    EndpointDir,
)
from funcx_endpoint.endpoint.notices import ConfigNotices
from funcx_endpoint.endpoint.registration import Registration
from funcx_endpoint.endpoint.service import EndpointService, StartupReporter
from funcx_endpoint.endpoint.states import TaskStatePublisher
from funcx_endpoint.endpoint.status import StatusReporter
from funcx_endpoint.endpoint.transport import build_transport
from funcx_endpoint.executor.blocks import BLOCK_ID
from funcx_endpoint.executor.interchange import Interchange
from funcx_endpoint.executor.interface import IResultSink
from funcx_endpoint.executor.listing import RecentResults, TaskListing
from funcx_endpoint.executor.routing_mode import hard_routing
from funcx_endpoint.executor.strategy import scaling_from_config
from funcx_endpoint.wire.environment import take_credentials


class Options(usage.Options):
    """Options of the ``funcx-endpoint`` twistd plugin."""

    synopsis = "[options]"
    lock_fd: Optional[int] = None  # the instance lock, held by makeService

    longdesc = (
        "Run a funcX endpoint: register with the funcX web service, take tasks "
        "from RabbitMQ, run them on managers and workers, send back results. "
        "The endpoint's files are in CONFIG_DIR/NAME (see `funcx-endpoint configure`)."
    )
    optParameters = [
        ["name", None, "default", "Name of the endpoint profile to run."],
        [
            "config-dir",
            "c",
            os.environ.get("FUNCX_ENDPOINT_CONFIG_DIR") or DEFAULT_CONFIG_DIR,
            "Directory holding endpoint profiles (env FUNCX_ENDPOINT_CONFIG_DIR).",
        ],
        ["ready-fd", None, None, "File descriptor to report readiness on (used by `start`).", int],
    ]
    optFlags = [
        ["debug", None, "Log debug messages."],
        ["log-stdout", None, "With --logger from this package: log to stdout, not endpoint.log."],
        ["clear-lock", None, "Its owner starts it: may clear a remote stop's lock."],
    ]

    def postOptions(self) -> None:
        try:
            self.endpoint_dir = EndpointDir(self["config-dir"], self["name"])
        except BadEndpointName as e:
            raise usage.UsageError(str(e)) from None
        if not self.endpoint_dir.exists():
            raise usage.UsageError(
                f"no endpoint {self['name']!r} in {self.endpoint_dir.config_dir}; "
                f"create it with: funcx-endpoint -c {self.endpoint_dir.config_dir} "
                f"configure {self['name']}"
            )


def log_settings(
    endpoint_dir: EndpointDir, config: Config, debug: bool, stdout: bool = False
) -> logs.LogSettings:
    return logs.LogSettings(
        path=None if stdout else endpoint_dir.log_file(config.log_dir),
        max_bytes=config.log_max_bytes,
        backup_count=config.log_backup_count,
        json=config.log_format == "json",
        debug=debug or config.debug,
        # Parsl's providers log with Python's logging: into endpoint.log too.
        python_logging=True,
    )


def manager_command(interchange: Interchange) -> str:
    """The shell command a provider runs to start one manager of a block."""
    return shlex.join(interchange.manager_command(BLOCK_ID))


def build_endpoint(
    endpoint_dir: EndpointDir,
    config: Config,
    reactor: Any,
    ready_fd: Optional[int] = None,
    clear_lock: bool = False,
    credentials: Optional[Mapping[str, str]] = None,
) -> EndpointService:
    """Build the daemon's service tree from a loaded config.

    Parts start in this order and stop in reverse (after the transport has
    drained): endpoint_setup (and, stopping, endpoint_teardown) if given, warnings about
    funcX 1.0 settings, control socket,
    registration, interchange, providers (blocks of managers and the scaling
    strategy), AMQP transport, idle shutdown, status reports.  ``credentials``:
    the variables holding the client credentials (default: the environment).
    """
    endpoint = EndpointService(
        endpoint_dir, reactor, StartupReporter(ready_fd), drain_grace=config.stop_grace_period
    )
    if config.endpoint_setup or config.endpoint_teardown:
        endpoint.add(
            ShellHooks(
                reactor,
                endpoint_dir.path,
                config.endpoint_setup,
                config.endpoint_teardown,
                config.hook_timeout,
            )
        )
    endpoint.add(ConfigNotices(config.notices()))
    commands: Dict[str, Any] = {"status": endpoint.status}
    endpoint.add(control_service(reactor, endpoint_dir.control_socket, commands))
    http, pool = http_client(reactor, config.service_ca_file)
    authenticator = Authenticator(
        http,
        auth_base_url(config.funcx_service_address, config.auth_address),
        TokenStore(endpoint_dir.config_dir),
        reactor,
        credentials,
    )
    registration = Registration(
        reactor, endpoint_dir, config, http, authenticator, pool, clear_lock=clear_lock
    )
    endpoint.add(registration)

    def broker_info() -> BrokerInfo:
        assert registration.broker_info is not None, "registration must come first"
        return registration.broker_info

    recent: List[RecentResults] = []

    def make_interchange(results: IResultSink) -> Interchange:
        recent.append(RecentResults(results))  # for the `tasks` command
        return Interchange.from_config(
            reactor, os.path.join(endpoint_dir.path, "interchange"), config, recent[-1]
        )

    transport, interchange = build_transport(
        reactor,
        broker_info,
        ResultSpool(endpoint_dir.spool_dir, deferToThread),
        make_interchange,
        prefetch=config.amqp_prefetch,
        heartbeat=config.amqp_heartbeat,
        ca_file=config.amqp_ca_file or config.service_ca_file,
        allowed_functions=config.allowed_functions,
        message_batches=config.message_batches,
        on_fatal=endpoint.fail,
    )
    endpoint.add(interchange)
    commands["tasks"] = TaskListing(interchange.dispatcher, recent[-1])
    endpoint.add(
        scaling_from_config(
            config.executors[0],
            reactor=reactor,
            load=interchange,
            command_template=manager_command(interchange),
            working_dir=endpoint_dir.path,
            stop_grace_period=config.stop_grace_period,
            per_type=hard_routing(config.executors[0]),
        )
    )
    endpoint.add(transport)
    # The service's stop command drains and stops the daemon, as `stop` does.
    transport.intake.on_stop = endpoint.shut_down
    if config.task_states:
        states = TaskStatePublisher(
            reactor,
            lambda: registration.broker_info,
            transport.publish_status,
            config.task_states_interval,
        )
        interchange.dispatcher.state_listener = states
        transport.task_states = states  # stopped with the results connection
    endpoint.add(
        IdleShutdown(
            reactor,
            config.heartbeat_period,
            IdleClock(config.idle_heartbeats_soft, config.idle_heartbeats_hard),
            transport.activity,
            endpoint.shut_down,
        )
    )
    endpoint.add(
        StatusReporter(
            reactor,
            lambda: broker_info().endpoint_id,
            interchange,
            transport.publish_status,
            config.heartbeat_period,
            extra=transport.status_fields,
        )
    )
    return endpoint


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    endpoint_dir: EndpointDir = options.endpoint_dir
    try:
        config = load_runnable_config(endpoint_dir.config_file)
    except ConfigFileError as e:
        raise SystemExit(f"funcx-endpoint: bad configuration: {e}") from None
    # One daemon per endpoint: the lock is taken before twistd daemonizes (the
    # daemon inherits it) and held until the process ends, whatever the pidfile
    # says.  Two `start`s racing each other cannot both get here.
    try:
        options.lock_fd = endpoint_dir.hold_lock()
    except AlreadyRunning as e:
        raise SystemExit(f"funcx-endpoint: {e}") from None
    # Everything the daemon starts inherits this, so that `stop` can find it
    # even after the daemon died (see funcx_endpoint.procs).
    os.environ[OWNER_ENV] = endpoint_dir.path
    # ... but not the owner's client secret, nor any other credential: only
    # the authenticator keeps them (issue 12: any function could read them).
    credentials = take_credentials(os.environ)

    logs.configure(
        log_settings(endpoint_dir, config, bool(options["debug"]), bool(options["log-stdout"]))
    )
    if options.lock_fd is None:
        Logger(namespace="funcx_endpoint.endpoint").warn(
            "The file system of {path} has no file locks: only the pidfile keeps a "
            "second daemon of this endpoint from starting",
            path=endpoint_dir.lock_file,
        )
    return build_endpoint(
        endpoint_dir,
        config,
        reactor,
        options["ready-fd"],
        bool(options["clear-lock"]),
        credentials,
    )
