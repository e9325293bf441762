"""A private RabbitMQ node for tests, demos and benchmarks.

:class:`RabbitMQNode` runs the Debian ``rabbitmq-server`` as a child of this process
with everything (config, data, logs, Erlang cookie, TLS files) in one directory, its
own ``epmd`` and free ports on 127.0.0.1: plain AMQP, AMQPS with a certificate made at
run time by :mod:`funcx_endpoint.tls`, and the management HTTP API. An administrator
user with a random password is created at first boot.

What a node is made of (its directory, ``node.json``, ``rabbitmq.conf``, the
environments and command lines of its programs, the readiness probe, finding its
processes) is the runtime's: :mod:`funcx_endpoint.rabbitmq`, which ``funcx-service``
also runs, as a Twisted service. This module adds what tests need around it: a
synchronous API usable without a running reactor (and from threads), and the
guarantee that no node outlives the test process.

:func:`shared_node` gives every test of a process the same node, started on first use
and stopped when the process ends, however it ends:

- normal exit (tests passed, failed or errored, or Ctrl-C / SIGINT, which Python and
  trial turn into KeyboardInterrupt and so into a normal exit): an ``atexit`` hook;
- SIGTERM, SIGHUP: a signal handler kills the node, then passes the signal on (to the
  previous handler, or to the default action: the process still dies of it). A
  reactor that installs its own SIGTERM handler later (trial's does) replaces ours;
  it stops the reactor, the process exits normally and ``atexit`` stops the node;
- SIGKILL or anything else: each node has a watchdog process that holds the read end
  of a pipe from its owner; when the owner dies the pipe reaches EOF and the watchdog
  kills the node, its epmd and their helpers and removes the temporary files;
- and if even that failed, the next node started on this machine by this module reaps
  nodes whose owner is dead, from a registry directory of one JSON file per node.

Every process of a node (``beam.smp``, ``erl_child_setup``, ``inet_gethost``,
``epmd``) carries the environment variable ``FUNCX_RABBITMQ_NODE=<node name>``. That
marker is how the node's processes are found and killed: ``erl_child_setup`` and
``inet_gethost`` call ``setsid()``, so killing the server's process group or session
would miss them.

Blocking methods are for scripts and for threads; inside a running reactor use the
``*_async(reactor, ...)`` variants, which run the blocking call in the reactor's
thread pool and return a Deferred.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from types import FrameType
from typing import Any, TypeVar

import psutil
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from funcx_endpoint import tls
from funcx_endpoint.rabbitmq.node import (
    HOSTNAME,
    LISTEN_IP,
    MARKER_ENV,
    NodeDirectory,
    NodeIdentity,
    NodePorts,
    RabbitMQCtlError,
    RabbitMQError,
    RabbitMQNotInstalled,
    RabbitMQStartError,
    tail,
)
from funcx_endpoint.rabbitmq.processes import DEFAULT_SERVER, Programs, node_processes
from funcx_endpoint.testing.owners import (
    OwnerRegistry,
    owner_alive,
    progress,
    registry_dir,
    remove_entry,
)
from funcx_endpoint.testing.shared import SharedInstance
from funcx_endpoint.testing.watchdog import Watchdog

__all__ = [
    "MARKER_ENV",
    "NodePorts",
    "RabbitMQCtlError",
    "RabbitMQError",
    "RabbitMQNode",
    "RabbitMQNotInstalled",
    "RabbitMQStartError",
    "node_processes",
    "reap_stale_nodes",
    "shared_node",
    "shared_node_async",
    "stop_shared_node",
]

_T = TypeVar("_T")

#: Where a different ``rabbitmq-server`` script can be named; ``rabbitmqctl`` is
#: expected beside it.
SERVER_ENV = "FUNCX_TEST_RABBITMQ_SERVER"
#: Seconds to wait for a node to boot (default 120).
START_TIMEOUT_ENV = "FUNCX_TEST_RABBITMQ_START_TIMEOUT"

_INSTALL_HINT = (
    "Run `make test` (which installs rabbitmq-server from the OS packages) or "
    f"`apt-get install rabbitmq-server`, or set {SERVER_ENV} to the path of "
    "rabbitmq-server."
)

log = Logger(namespace="funcx_endpoint.testing.rabbitmq")


def _progress(message: str) -> None:
    progress("rabbitmq", message)
    log.info("{message}", message=message)  # also for test.log


def _registry_dir() -> str:
    return registry_dir("rabbitmq")


def _port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((LISTEN_IP, port), timeout=timeout):
            return True
    except OSError:
        return False


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True


def _wait_gone(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited (zombies count); return those still alive."""
    remaining = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        remaining = [p for p in remaining if not _gone(p)]
        if not remaining or time.monotonic() >= deadline:
            return remaining
        time.sleep(0.05)


def _kill_node_processes(name: str) -> None:
    """SIGKILL every process of node ``name`` and wait until they are gone."""
    for _ in range(3):
        procs = node_processes(name)
        if not procs:
            return
        for proc in procs:
            try:
                # psutil refuses (NoSuchProcess) if the pid was reused by another process.
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        _wait_gone(procs, 5.0)


# What a node's watchdog does once its owner is gone: stop the node's processes
# (found by their marker), then remove its files.
_WATCHDOG_CLEANUP = r"""
marker = sys.argv[1].encode()
grace = float(sys.argv[2])
remove = sys.argv[3:]

def ours():
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open("/proc/%s/environ" % entry, "rb") as f:
                env = f.read().split(b"\0")
            with open("/proc/%s/comm" % entry, "rb") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if marker in env:
            found.append((int(entry), comm))
    return found

beams = [pid for pid, comm in ours() if comm == b"beam.smp"]
signal_all(beams, signal.SIGTERM)
deadline = time.monotonic() + grace
while time.monotonic() < deadline and any(c == b"beam.smp" for _, c in ours()):
    time.sleep(0.1)
for _ in range(20):
    left = ours()
    if not left:
        break
    signal_all([pid for pid, _ in left], signal.SIGKILL)
    time.sleep(0.1)
remove_paths(remove)
"""


def reap_stale_nodes(registry: str | None = None) -> list[str]:
    """Kill nodes started by this module in processes that have died.

    Looks at the registry directory (one JSON file per running node, holding the
    owner's pid and start time); for each entry whose owner is gone it kills the
    node's processes, removes its temporary directory if the node owned it, and
    drops the entry. Nodes of live owners are left alone. Returns the reaped names.
    """
    reaped = []
    for path, entry in OwnerRegistry(registry or _registry_dir()).orphans():
        name = str(entry.get("name", ""))
        if name:
            owner = entry.get("owner_pid")
            _progress(f"Reaping RabbitMQ node {name} left by dead process {owner}")
            _kill_node_processes(name)
        base_dir = entry.get("base_dir")
        if entry.get("remove_base_dir") and isinstance(base_dir, str):
            shutil.rmtree(base_dir, ignore_errors=True)
        remove_entry(path)
        reaped.append(name)
    return reaped


#: Starts tried with new free ports when one was taken meanwhile.
PORT_ATTEMPTS = 3


class RabbitMQNode:
    """A RabbitMQ node of our own, with TLS, the management API and an admin user.

    ``base_dir`` holds everything of the node (default: a new temporary directory,
    removed by :meth:`destroy`). A ``base_dir`` that already holds a node made by this
    class is reused with its name, ports and credentials (``node.json``), so a demo
    broker keeps its URLs across runs. Ports are chosen at the first :meth:`start`
    and kept for the life of the data directory, so they are the same after
    :meth:`restart`.

    ``name`` is the Erlang node name (default ``funcx-<random>@localhost``);
    ``ports`` fixes the ports instead of picking free ones; ``extra_config`` adds or
    overrides ``rabbitmq.conf`` settings (e.g. ``{"consumer_timeout": "60000"}``);
    ``shared_epmd`` says the epmd on ``ports.epmd`` is someone else's (a cluster's,
    :mod:`~funcx_endpoint.testing.rabbitmq_cluster`): the node registers there and
    neither starts nor stops one; ``start_timeout`` bounds :meth:`start` (default 120 s, or
    ``$FUNCX_TEST_RABBITMQ_START_TIMEOUT``); ``server_path`` names
    ``rabbitmq-server`` (default ``$FUNCX_TEST_RABBITMQ_SERVER``, else the Debian
    path); ``registry_dir`` is where running nodes are recorded for the reaper.

    Nothing happens in the constructor; :meth:`start` does the work. A node never
    outlives this process: at exit, nodes still running are stopped and temporary
    directories removed (:meth:`destroy`); if the process dies without running its
    exit hooks, the node's watchdog kills it.
    """

    def __init__(
        self,
        base_dir: str | None = None,
        name: str | None = None,
        *,
        ports: NodePorts | None = None,
        extra_config: Mapping[str, str] | None = None,
        start_timeout: float | None = None,
        registry_dir: str | None = None,
        server_path: str | None = None,
        shared_epmd: bool = False,
    ) -> None:
        self._shared_epmd = shared_epmd
        self._requested_base_dir = base_dir
        self._requested_name = name
        self._requested_ports = ports
        self._extra_config = dict(extra_config or {})
        if start_timeout is None:
            start_timeout = float(os.environ.get(START_TIMEOUT_ENV) or 120.0)
        self._start_timeout = start_timeout
        self._registry = OwnerRegistry(registry_dir or _registry_dir())
        self._server_path = server_path
        self._lock = threading.RLock()

        self._directory: NodeDirectory | None = None
        self._owns_base_dir = False
        self._identity: NodeIdentity | None = None
        self._tls_files: tls.TLSFiles | None = None

        self._server: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._watchdog: Watchdog | None = None

    # -- properties -------------------------------------------------------------

    def _need(self, value: _T | None, what: str) -> _T:
        if value is None:
            raise RabbitMQError(f"{what} is known once the node has been started")
        return value

    @property
    def identity(self) -> NodeIdentity:
        """Name, ports and admin credentials (``node.json``)."""
        return self._need(self._identity, "the node's identity")

    @property
    def directory(self) -> NodeDirectory:
        return self._need(self._directory, "the base directory")

    @property
    def name(self) -> str:
        """The Erlang node name, ``funcx-<random>@localhost``."""
        return self._need(self._identity, "the node name").name

    @property
    def base_dir(self) -> str:
        """The directory holding config, data, logs and TLS files."""
        return self._need(self._directory, "the base directory").base_dir

    @property
    def host(self) -> str:
        """The host name to connect to (the certificate is valid for it)."""
        return HOSTNAME

    @property
    def ip(self) -> str:
        """The address the listeners are bound to."""
        return LISTEN_IP

    @property
    def ports(self) -> NodePorts:
        """All ports of the node."""
        return self._need(self._identity, "the ports").ports

    @property
    def amqp_port(self) -> int:
        return self.ports.amqp

    @property
    def amqps_port(self) -> int:
        return self.ports.amqps

    @property
    def management_port(self) -> int:
        return self.ports.management

    @property
    def admin_user(self) -> str:
        """The administrator (tag ``administrator``, all permissions on ``/``)."""
        return self._need(self._identity, "the admin user").admin_user

    @property
    def admin_password(self) -> str:
        return self._need(self._identity, "the admin password").admin_password

    @property
    def ca_cert_path(self) -> str:
        """PEM file of the CA that signed the AMQPS server certificate."""
        return self._need(self._tls_files, "the CA certificate").ca_cert

    @property
    def tls_files(self) -> tls.TLSFiles:
        """The CA and server certificate files of the AMQPS listener."""
        return self._need(self._tls_files, "the TLS files")

    @property
    def amqp_url(self) -> str:
        """``amqp://admin:password@localhost:port/%2F`` (plain, no TLS)."""
        return self.identity.amqp_url()

    @property
    def amqps_url(self) -> str:
        """``amqps://admin:password@localhost:port/%2F``; verify with :attr:`ca_cert_path`."""
        return self.identity.amqps_url()

    @property
    def management_url(self) -> str:
        """Base URL of the management HTTP API, e.g. ``http://localhost:15672/``."""
        return self.identity.management_url()

    @property
    def log_path(self) -> str:
        """The node's main log file."""
        return self.directory.log_file(self.identity)

    @property
    def running(self) -> bool:
        """Whether the server process is alive (it may still be booting)."""
        return self._server is not None and self._server.poll() is None

    @property
    def beam_pid(self) -> int | None:
        """OS pid of the Erlang VM (``beam.smp``: the server process) while running."""
        return self._server.pid if self._server is not None and self.running else None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        name = self._identity.name if self._identity else "(not started)"
        return f"<RabbitMQNode {name} {state}>"

    # -- preparation ------------------------------------------------------------

    def _programs(self) -> Programs:
        server = self._server_path or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
        return Programs.find(server, hint=_INSTALL_HINT)

    def _prepare(self) -> None:
        """Create (or load) the base directory, identity, TLS files and config."""
        if self._directory is None:
            if self._requested_base_dir is None:
                base = tempfile.mkdtemp(prefix="funcx-rabbitmq-")
                self._owns_base_dir = True
            else:
                base = os.path.abspath(self._requested_base_dir)
                self._check_base_dir_free(base)
                os.makedirs(base, mode=0o700, exist_ok=True)
            self._directory = NodeDirectory(base)
        directory = self._directory
        if self._identity is None:
            self._identity = directory.ensure_identity(self._requested_name, self._requested_ports)
        self._tls_files = tls.ensure_ca_and_server_cert(
            directory.path("tls"), [HOSTNAME], [LISTEN_IP]
        )
        directory.write_config(self._identity, self._tls_files, self._extra_config)

    # -- registry ---------------------------------------------------------------

    def _registry_path(self) -> str:
        return self._registry.entry_path(self.name)

    def _register(self) -> None:
        self._registry.register(
            self.name,
            {
                "name": self.name,
                "base_dir": self.base_dir,
                "remove_base_dir": self._owns_base_dir,
                "server_pid": self._server.pid if self._server else None,
                "epmd_pid": self._epmd.pid if self._epmd else None,
                "ports": asdict(self.ports),
            },
        )

    def _unregister(self) -> None:
        self._registry.unregister(self.name)

    def _check_base_dir_free(self, base_dir: str) -> None:
        """Refuse a base directory that a node of a live process is using."""
        for _path, entry in self._registry.entries():
            if entry.get("base_dir") == base_dir and owner_alive(entry):
                raise RabbitMQError(
                    f"{base_dir} is in use by node {entry.get('name')} "
                    f"of process {entry.get('owner_pid')}"
                )

    # -- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        """Start the node and return once it accepts connections (about 10 s).

        Raises :class:`RabbitMQNotInstalled` if RabbitMQ is missing and
        :class:`RabbitMQStartError` (with the tail of the logs) if it does not boot
        within the start timeout; in that case nothing of the node is left running.
        """
        with self._lock:
            if self.running:
                return
            programs = self._programs()
            _track_for_exit(self)
            reap_stale_nodes(self._registry.path)
            first = self._identity is None
            for attempt in range(1, PORT_ATTEMPTS + 1):
                try:
                    self._start_once(programs, first)
                    return
                except RabbitMQStartError as e:
                    # Free ports are chosen before the node binds them: another
                    # process may take one meanwhile.  A first start with ports
                    # of our choosing picks new ones.
                    if not (first and self._requested_ports is None and "eaddrinuse" in str(e)):
                        raise
                    if attempt == PORT_ATTEMPTS:
                        raise
                    _progress(f"A port of {self.name} was taken meanwhile; new ports")
                    assert self._directory is not None
                    os.unlink(self._directory.state_file)
                    self._identity = None

    def _start_once(self, programs: Programs, first: bool) -> None:
        """One attempt to start the node (see :meth:`start`)."""
        self._prepare()
        ports = self.ports
        _progress(
            f"Starting RabbitMQ node {self.name}{'' if first else ' again'} "
            f"in {self.base_dir} (about 10 s)"
        )
        started = time.monotonic()
        try:
            if self._shared_epmd:
                if not self._epmd_answers(programs):
                    raise RabbitMQStartError(f"no epmd answers on port {ports.epmd}")
            else:
                self._start_epmd(programs)
            self._register()
            self._start_watchdog()
            self._start_server(programs)
            self._register()
            self._await_startup(programs, started + self._start_timeout)
        except BaseException:
            self._kill_everything()
            raise
        _progress(
            f"RabbitMQ node {self.name} ready in {time.monotonic() - started:.1f} s "
            f"on ports amqp={ports.amqp} amqps={ports.amqps} "
            f"management={ports.management}"
        )

    def _spawn(self, programs: Programs, argv: list[str], out_path: str) -> subprocess.Popen[bytes]:
        with open(out_path, "ab") as out:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=self.directory.server_env(self.identity),
                # A session of its own (argv starts with setsid if there is one):
                # the terminal's Ctrl-C does not reach the node, only we stop it.
                start_new_session=programs.setsid is None,
            )

    def _epmd_answers(self, programs: Programs) -> bool:
        try:
            return (
                subprocess.run(
                    programs.epmd_names_argv(self.identity),
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    env=self.directory.ctl_env(self.identity),
                    timeout=5,
                ).returncode
                == 0
            )
        except subprocess.TimeoutExpired:
            return False

    def _start_epmd(self, programs: Programs) -> None:
        port = self.ports.epmd
        if _port_accepts(port, timeout=0.2):
            raise RabbitMQStartError(f"epmd port {port} is already taken")
        out = self.directory.epmd_output
        self._epmd = self._spawn(programs, programs.epmd_argv(self.identity), out)
        deadline = time.monotonic() + 10
        while not self._epmd_answers(programs):
            if self._epmd.poll() is not None:
                raise RabbitMQStartError(f"epmd exited with {self._epmd.returncode}:\n{tail(out)}")
            if time.monotonic() > deadline:
                raise RabbitMQStartError(f"epmd did not answer on port {port}")
            time.sleep(0.02)

    def _start_watchdog(self) -> None:
        remove = [self._registry_path()]
        if self._owns_base_dir:
            remove.append(self.base_dir)
        env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
        self._watchdog = Watchdog(
            _WATCHDOG_CLEANUP, [f"{MARKER_ENV}={self.name}", "10", *remove], env=env
        )

    def _release_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.release(timeout=5)

    def _start_server(self, programs: Programs) -> None:
        try:
            os.unlink(self.directory.pid_file)
        except FileNotFoundError:
            pass
        self._server = self._spawn(programs, programs.server_argv(), self.directory.server_output)

    def _failure(self, what: str) -> RabbitMQStartError:
        return RabbitMQStartError(self.directory.failure_report(self.identity, what))

    def _await_startup(self, programs: Programs, deadline: float) -> None:
        """Run the runtime's readiness probe (``rabbitmqctl wait``) until it
        succeeds, watching the server meanwhile (the probe does not notice a
        server that dies before writing its pid file)."""
        server, epmd = self._server, self._epmd
        assert server is not None and (epmd is not None or self._shared_epmd)
        last_error = ""
        while True:
            remaining = deadline - time.monotonic()
            probe = subprocess.Popen(
                programs.wait_argv(self.directory, self.identity, remaining),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                env=self.directory.ctl_env(self.identity),
            )
            try:
                while True:
                    try:
                        output, _ = probe.communicate(timeout=0.1)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    if server.poll() is not None:
                        raise self._failure(f"exited with code {server.returncode} while starting")
                    if epmd is not None and epmd.poll() is not None:
                        raise self._failure(f"lost its epmd (exit code {epmd.returncode})")
                    if time.monotonic() > deadline:
                        raise self._failure(
                            f"did not start within {self._start_timeout:.0f} s"
                            f" (last `rabbitmqctl wait`: {last_error or 'still waiting'})"
                        )
            finally:
                if probe.poll() is None:
                    probe.kill()
                    probe.wait()
            if probe.returncode == 0:
                return
            last_error = output.decode("utf-8", "replace").strip()[-500:]
            time.sleep(0.5)

    def stop(self, graceful: bool = True, timeout: float = 60.0) -> None:
        """Stop the node and its epmd; return when none of its processes is left.

        ``graceful`` sends SIGTERM, which makes RabbitMQ shut down cleanly like
        ``rabbitmqctl stop`` (about 7 s, 5 of them the management plugin's shutdown)
        without paying for booting another Erlang VM for the CLI; after ``timeout``
        seconds, or at once if not ``graceful``, every process of the node is
        killed. Data is kept: :meth:`start` brings the node back with it.
        """
        with self._lock:
            server, self._server = self._server, None
            if server is not None:
                _progress(f"Stopping RabbitMQ node {self.name}")
                started = time.monotonic()
                if graceful and server.poll() is None:
                    try:
                        # The server process is the Erlang VM itself.
                        server.send_signal(signal.SIGTERM)
                        server.wait(timeout=timeout)
                    except subprocess.TimeoutExpired:
                        _progress(
                            f"RabbitMQ node {self.name} did not stop within "
                            f"{timeout:.0f} s; killing it"
                        )
                # Whatever is left (all of it if not graceful): beam.smp and its
                # helpers, which run in sessions of their own.
                _kill_node_processes(self.name)
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
                _progress(
                    f"RabbitMQ node {self.name} stopped in {time.monotonic() - started:.1f} s"
                )
            self._stop_epmd()
            self._release_watchdog()
            if self._identity is not None:
                self._unregister()

    def _stop_epmd(self) -> None:
        epmd, self._epmd = self._epmd, None
        if epmd is None:
            return
        if epmd.poll() is None:
            epmd.terminate()
            try:
                epmd.wait(timeout=5)
            except subprocess.TimeoutExpired:
                epmd.kill()
                epmd.wait()

    def _kill_everything(self) -> None:
        """Kill the node at once after a failed start; keep data, drop the entry."""
        server, self._server = self._server, None
        if self._identity is not None:
            _kill_node_processes(self._identity.name)
        if server is not None:
            if server.poll() is None:
                server.kill()
            server.wait()
        self._stop_epmd()
        self._release_watchdog()
        if self._identity is not None:
            self._unregister()

    def restart(self, graceful: bool = True) -> None:
        """Stop and start again with the same data directory, name and ports.

        Durable queues and persistent messages survive (also with
        ``graceful=False``, which kills the node like a crash would).
        """
        with self._lock:
            self.stop(graceful=graceful)
            self.start()

    def destroy(self, graceful: bool | None = None) -> None:
        """Stop the node and remove its base directory if this object created it.

        By default a node whose data is thrown away is killed at once (0.1 s) and a
        node in a ``base_dir`` of the caller's (kept) is stopped gracefully.
        """
        if graceful is None:
            graceful = not self._owns_base_dir
        with self._lock:
            self.stop(graceful=graceful)
            if self._owns_base_dir and self._directory is not None:
                shutil.rmtree(self._directory.base_dir, ignore_errors=True)
                self._directory = None
                self._identity = None
                self._tls_files = None

    def emergency_kill(self) -> None:
        """Kill the node now, without locks or waiting: for signal handlers.

        Sends SIGKILL to every process of the node, tells the watchdog to stand
        down, drops the registry entry and removes a temporary base directory.
        """
        identity, directory = self._identity, self._directory
        if identity is None:
            return
        for proc in node_processes(identity.name):
            try:
                proc.kill()
            except psutil.Error:
                pass
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.stand_down()
        try:
            os.unlink(self._registry_path())
        except OSError:
            pass
        if self._owns_base_dir and directory is not None:
            shutil.rmtree(directory.base_dir, ignore_errors=True)

    def processes(self) -> list[psutil.Process]:
        """The node's live OS processes (beam.smp, its helpers, epmd)."""
        if self._identity is None:
            return []
        return node_processes(self._identity.name)

    def __enter__(self) -> RabbitMQNode:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.destroy()

    # -- rabbitmqctl ------------------------------------------------------------

    def rabbitmqctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n <node> <args>`` against this node; return stdout.

        Raises :class:`RabbitMQCtlError` on a non-zero exit and
        :class:`subprocess.TimeoutExpired` after ``timeout`` seconds.
        """
        argv = self._programs().ctl_argv(self.identity, *args)
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            cwd=self.base_dir,
            env=self.directory.ctl_env(self.identity),
            timeout=timeout,
        )
        stdout = result.stdout.decode("utf-8", "replace")
        if result.returncode != 0:
            raise RabbitMQCtlError(
                argv[1:], result.returncode, stdout, result.stderr.decode("utf-8", "replace")
            )
        return stdout

    def list_connections(
        self, columns: Iterable[str] = ("name", "user", "peer_host", "peer_port")
    ) -> list[dict[str, Any]]:
        """The node's AMQP connections, one dict per connection with ``columns``.

        (Erlang pids come out of the JSON formatter as ``#PID<...>``, which
        ``close_connection`` does not accept; :meth:`close_connection` handles that.)
        """
        out = self.rabbitmqctl(
            "list_connections", "--quiet", "--formatter", "json", *columns
        ).strip()
        return json.loads(out) if out else []

    def close_all_connections(self, reason: str = "closed by test") -> None:
        """Close every client connection (all virtual hosts)."""
        self.rabbitmqctl("close_all_connections", "--global", reason)

    def close_connection(self, name: str, reason: str = "closed by test") -> None:
        """Close the connection named ``name`` (as in :meth:`list_connections`)."""
        out = self.rabbitmqctl("list_connections", "--quiet", "--no-table-headers", "name", "pid")
        # Tab-separated; names ("127.0.0.1:1234 -> 127.0.0.1:5672") have no tabs.
        for line in out.splitlines():
            connection_name, _, pid = line.rpartition("\t")
            if connection_name == name:
                self.rabbitmqctl("close_connection", pid, reason)
                return
        raise RabbitMQError(f"no connection named {name!r}")

    # -- Deferred-returning variants for use inside a running reactor ------------

    def _in_thread(
        self, reactor: Any, f: Callable[..., _T], *args: Any, **kwargs: Any
    ) -> Deferred[_T]:
        assert IReactorThreads.providedBy(reactor) and IReactorFromThreads.providedBy(reactor)
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args, **kwargs)

    def start_async(self, reactor: Any) -> Deferred[None]:
        """:meth:`start` in a thread; the Deferred fires when the node is ready."""
        return self._in_thread(reactor, self.start)

    def stop_async(self, reactor: Any, graceful: bool = True) -> Deferred[None]:
        """:meth:`stop` in a thread."""
        return self._in_thread(reactor, self.stop, graceful)

    def restart_async(self, reactor: Any, graceful: bool = True) -> Deferred[None]:
        """:meth:`restart` in a thread."""
        return self._in_thread(reactor, self.restart, graceful)

    def destroy_async(self, reactor: Any, graceful: bool | None = None) -> Deferred[None]:
        """:meth:`destroy` in a thread."""
        return self._in_thread(reactor, self.destroy, graceful)

    def rabbitmqctl_async(self, reactor: Any, *args: str, timeout: float = 60.0) -> Deferred[str]:
        """:meth:`rabbitmqctl` in a thread."""
        return self._in_thread(reactor, self.rabbitmqctl, *args, timeout=timeout)

    def list_connections_async(self, reactor: Any) -> Deferred[list[dict[str, Any]]]:
        """:meth:`list_connections` in a thread."""
        return self._in_thread(reactor, self.list_connections)

    def close_all_connections_async(
        self, reactor: Any, reason: str = "closed by test"
    ) -> Deferred[None]:
        """:meth:`close_all_connections` in a thread."""
        return self._in_thread(reactor, self.close_all_connections, reason)

    def close_connection_async(
        self, reactor: Any, name: str, reason: str = "closed by test"
    ) -> Deferred[None]:
        """:meth:`close_connection` in a thread."""
        return self._in_thread(reactor, self.close_connection, name, reason)


# -- nothing outlives the process ----------------------------------------------

_started_nodes: weakref.WeakSet[RabbitMQNode] = weakref.WeakSet()
_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def _track_for_exit(node: RabbitMQNode) -> None:
    """Remember ``node`` so that :func:`_destroy_nodes_at_exit` cleans it up."""
    global _exit_hook_registered
    with _exit_hook_lock:
        _started_nodes.add(node)
        if not _exit_hook_registered:
            _exit_hook_registered = True
            atexit.register(_destroy_nodes_at_exit)


def _destroy_nodes_at_exit() -> None:
    # A node never outlives the process that started it (the watchdog enforces that
    # if this hook does not run): stop every node still running, and remove the
    # temporary directories of stopped ones nobody destroyed.
    for node in list(_started_nodes):
        try:
            node.destroy()
        except Exception as e:  # keep cleaning up the others
            _progress(f"Could not clean up {node!r}: {e}")


# -- the node shared by every test of a process --------------------------------

_hooks_lock = threading.Lock()
_atexit_registered = False
_signals_installed = False
_previous_handlers: dict[int, Any] = {}


def shared_node() -> RabbitMQNode:
    """The process-wide node, started on first use (blocking, about 10 s).

    Tests must not stop or restart it (use a node of their own for that). It is
    stopped when the process exits, also on failure, Ctrl-C, SIGTERM, SIGHUP or
    SIGKILL (see the module docstring).
    """
    return _SHARED.get()


def shared_node_async(reactor: Any) -> Deferred[RabbitMQNode]:
    """:func:`shared_node` from a running reactor: starts it in a thread if needed."""
    return _SHARED.get_async(reactor)


def stop_shared_node() -> None:
    """Stop and remove the shared node now (it is started again on next use)."""
    _SHARED.stop()


def _on_fatal_signal(signum: int, frame: FrameType | None) -> None:
    node = _SHARED.current
    if node is not None:
        node.emergency_kill()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        # Die of the signal as if we had never handled it.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_exit_hooks() -> None:
    """Register the ``atexit`` hook once, and (from the main thread) chain our
    handler in front of SIGTERM and SIGHUP.

    A signal that was ignored stays ignored. SIGINT is left alone on purpose: its
    default handler raises KeyboardInterrupt, which ends the process through
    ``atexit``; a handler of ours that raised it instead would raise it inside a
    running reactor's loop, which logs and swallows it (the process would not stop).
    """
    global _atexit_registered, _signals_installed
    with _hooks_lock:
        if not _atexit_registered:
            _atexit_registered = True
            atexit.register(stop_shared_node)
        if _signals_installed or threading.current_thread() is not threading.main_thread():
            return
        _signals_installed = True
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN or previous is None:
            continue
        _previous_handlers[signum] = previous
        signal.signal(signum, _on_fatal_signal)


def _destroy_now(node: RabbitMQNode) -> None:
    node.destroy(graceful=False)


# Its exit hooks (atexit and signals) are _install_exit_hooks's, run at every use.
_SHARED: SharedInstance[RabbitMQNode] = SharedInstance(
    RabbitMQNode,
    RabbitMQNode.start,
    _destroy_now,
    prepare=_install_exit_hooks,
    stop_at_exit=False,
)
