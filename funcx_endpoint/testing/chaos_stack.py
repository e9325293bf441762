"""The whole funcX stack on this machine, with a hand on every part: for the chaos suite.

:class:`ChaosStack` starts, in ``base_dir``:

- a private RabbitMQ node (:class:`~funcx_endpoint.testing.rabbitmq.RabbitMQNode`,
  the runtime's node code; its data directory is kept, so it can be killed and
  started again with its queues and persistent messages);
- a :class:`~funcx_endpoint.testing.proxy.PartitionableProxy` in front of the
  node's AMQPS port, on the caller's reactor;
- a ``funcx-service`` (SQLite) on a fixed port, using the node as its broker,
  and telling endpoints to reach the broker through the proxy
  (``broker_public_url``), so a partition cuts the endpoint from the broker
  and nothing else;
- an endpoint daemon (``funcx-endpoint configure`` and ``start``), with
  ``managers`` managers of ``workers`` workers, short heartbeats, and its
  result spool ``unacked_results/`` on a small tmpfs of its own when mounting
  one is possible (root), so the spool's disk can be filled.

Its methods are the faults (blocking; call them from a thread, never from the
reactor's): each does what an operator or a crash would do to one part.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import quote

import psutil
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.threads import blockingCallFromThread

from funcx_endpoint.endpoint.layout import OWNER_ENV, EndpointDir
from funcx_endpoint.procs import marked_processes
from funcx_endpoint.testing.proxy import BLACKHOLE, RESET, PartitionableProxy
from funcx_endpoint.testing.rabbitmq import RabbitMQNode
from funcx_endpoint.testing.service import child_env
from funcx_endpoint.testing.service_on_node import NodeServiceProcess
from funcx_endpoint.testing.watchdog import Watchdog

__all__ = ["ENDPOINT_NAME", "ChaosStack"]

ENDPOINT_NAME = "chaos"
#: Size of the spool's tmpfs.
SPOOL_FS_SIZE = "4m"

CONFIG = """\
from funcx_endpoint.config import Config, HighThroughputExecutor, LocalProvider, SimpleStrategy

config = Config(
    funcx_service_address={service_address!r},
    service_ca_file={service_ca!r},
    amqp_ca_file={amqp_ca!r},
    amqp_prefetch=512,
    # Short: a black-holed broker connection is noticed within a few seconds.
    amqp_heartbeat={amqp_heartbeat},
    heartbeat_period={heartbeat},
    heartbeat_threshold={heartbeat_threshold},
    executors=[
        HighThroughputExecutor(
            label="htex",
            provider=LocalProvider(
                init_blocks={managers},
                min_blocks={managers},
                max_blocks={managers},
                nodes_per_block=1,
            ),
            strategy=SimpleStrategy(interval=1, max_idletime=3600),
            max_workers_per_node={workers},
            prefetch_capacity=8,
            max_retries_on_system_failure=3,
            address="127.0.0.1",
        )
    ],
)
"""


# Run by the watchdog once this process is gone: argv[1] is the endpoint's
# marker (NAME=VALUE in a process's environment), argv[2] the spool mount or "".
_WATCHDOG_CLEANUP = r"""
needle = sys.argv[1].encode()
for entry in os.listdir("/proc"):
    if not entry.isdigit():
        continue
    try:
        with open(f"/proc/{entry}/environ", "rb") as f:
            if needle in f.read().split(b"\0"):
                os.kill(int(entry), signal.SIGKILL)
    except OSError:
        pass
if sys.argv[2]:
    import subprocess
    subprocess.run(["umount", "-l", sys.argv[2]])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Service(NodeServiceProcess):
    """The service on a fixed port, handing out the proxy as the broker's address."""

    def __init__(self, node: Any, state_dir: str, port: int, proxy_port: int) -> None:
        super().__init__(node, state_dir, env=None)
        self.port = port
        self.proxy_port = proxy_port

    def _broker_settings(self) -> Dict[str, Any]:
        settings = super()._broker_settings()
        settings["port"] = self.port
        settings["broker_public_url"] = (
            f"amqps://{self.node.host}:{self.proxy_port}/{quote(self.vhost, safe='')}"
        )
        return settings


class ChaosStack:
    """Broker, proxy, service and endpoint; see the module docstring."""

    def __init__(
        self,
        reactor: Any,
        base_dir: str,
        *,
        managers: int = 2,
        workers: int = 2,
        amqp_heartbeat: int = 4,
        heartbeat: float = 2.0,
        heartbeat_threshold: float = 8.0,
        progress: Callable[[str], None] = print,
    ) -> None:
        self.reactor = reactor
        self.base_dir = os.path.abspath(base_dir)
        self.managers = managers
        self.workers = workers
        self.amqp_heartbeat = amqp_heartbeat
        self.heartbeat = heartbeat
        self.heartbeat_threshold = heartbeat_threshold
        self.progress = progress
        self.node = RabbitMQNode(os.path.join(self.base_dir, "rabbitmq"))
        self.proxy: Optional[PartitionableProxy] = None
        self.service: Optional[_Service] = None
        self.config_dir = os.path.join(self.base_dir, "endpoints")
        self.ep = EndpointDir(self.config_dir, ENDPOINT_NAME)
        self.env: Dict[str, str] = {}
        self.service_address = ""
        self.service_ca = ""
        self.amqp_ca = ""
        self.endpoint_id = ""
        #: "tmpfs" if the spool is on a tmpfs of its own, else why not.
        self.spool_fs = "not mounted"
        self._started_endpoint = False
        self._watchdog: Optional[Watchdog] = None

    # -- start and stop ------------------------------------------------------------------

    def start(self) -> None:
        os.makedirs(self.base_dir, mode=0o700, exist_ok=True)
        self._start_backend()
        self._start_endpoint()

    def _start_backend(self) -> None:
        """The broker, the proxy and the service; sets :attr:`service_address`,
        :attr:`service_ca`, :attr:`amqp_ca` and :attr:`env` (a client's)."""
        self.progress("starting RabbitMQ")
        self.node.start()
        self.proxy = PartitionableProxy(
            TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1"),
            TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.node.amqps_port),
        )
        port = blockingCallFromThread(self.reactor, self._start_proxy)
        self.progress("starting funcx-service")
        state_dir = os.path.join(self.base_dir, "service")
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.service = _Service(self.node, state_dir, _free_port(), port.getHost().port)
        self.service.start()
        self.env = self.service.client_env(self.service.create_client("chaos"))
        self.service_address = self.service.base_url
        self.service_ca = self.service.ca_file
        self.amqp_ca = self.node.ca_cert_path

    def _start_endpoint(self) -> None:
        self.progress("configuring and starting the endpoint")
        self._check(
            self.cli(
                "configure",
                ENDPOINT_NAME,
                "--service-address",
                self.service_address,
                "--service-ca-file",
                self.service_ca,
                "--amqp-ca-file",
                self.amqp_ca,
            ),
            "configure",
        )
        with open(self.ep.config_file, "w") as f:
            f.write(
                CONFIG.format(
                    service_address=self.service_address,
                    service_ca=self.service_ca,
                    amqp_ca=self.amqp_ca,
                    amqp_heartbeat=self.amqp_heartbeat,
                    heartbeat=self.heartbeat,
                    heartbeat_threshold=self.heartbeat_threshold,
                    managers=self.managers,
                    workers=self.workers,
                )
            )
        self._mount_spool()
        # If this process dies without stopping the stack, the watchdog kills
        # the endpoint's processes and unmounts the spool (the node and the
        # service have lifelines of their own).
        self._watchdog = Watchdog(
            _WATCHDOG_CLEANUP,
            [f"{OWNER_ENV}={self.ep.path}", self.ep.spool_dir if self.spool_fs == "tmpfs" else ""],
        )
        self._started_endpoint = True
        self._check(self.cli("start", ENDPOINT_NAME), "start")
        self.endpoint_id = str(self.ep.endpoint_id())
        self.wait_for_workers()

    def _start_proxy(self) -> Any:
        assert self.proxy is not None
        self.proxy.startService()
        return self.proxy.when_listening()

    def _mount_spool(self) -> None:
        spool = self.ep.spool_dir
        os.makedirs(spool, mode=0o700, exist_ok=True)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={SPOOL_FS_SIZE},mode=0700", "tmpfs", spool],
            capture_output=True,
            text=True,
        )
        if result.returncode == 0:
            self.spool_fs = "tmpfs"
        else:
            self.spool_fs = f"not mounted ({(result.stderr or result.stdout).strip()[:200]})"

    def stop(self) -> None:
        self._stop_endpoint()
        self._stop_backend()

    def _stop_endpoint(self) -> None:
        if self._started_endpoint:
            self.progress("stopping the endpoint")
            result = self.cli("stop", ENDPOINT_NAME, timeout=120)
            if result.returncode != 0:
                self.progress(f"funcx-endpoint stop exited {result.returncode}: {result.stderr}")
            self._started_endpoint = False
        if self.spool_fs == "tmpfs":
            subprocess.run(["umount", "-l", self.ep.spool_dir], capture_output=True)
            self.spool_fs = "unmounted"
        if self._watchdog is not None:
            watchdog, self._watchdog = self._watchdog, None
            watchdog.release(timeout=5)

    def _stop_backend(self) -> None:
        if self.service is not None:
            self.service.stop()
        if self.proxy is not None:
            proxy, self.proxy = self.proxy, None
            blockingCallFromThread(self.reactor, lambda: proxy.stopService())
        self.node.stop(graceful=False)

    # -- the endpoint -----------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "funcx_endpoint.cli", "-c", self.config_dir, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=child_env(self.env),
            cwd=self.base_dir,
        )

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode != 0:
            raise RuntimeError(
                f"funcx-endpoint {what} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}"
            )

    def processes(self, kind: str) -> List[psutil.Process]:
        """The endpoint's live ``"manager"`` or ``"worker"`` processes."""
        module = f"funcx_endpoint.{kind}"
        found = []
        for proc in marked_processes(OWNER_ENV, self.ep.path):
            try:
                cmdline = proc.cmdline()
            except psutil.Error:
                continue
            if module in cmdline:
                found.append(proc)
        return found

    def wait_for_workers(self, timeout: float = 120.0) -> None:
        """Until every manager runs all its workers."""
        deadline = time.monotonic() + timeout
        while len(self.processes("worker")) < self.managers * self.workers:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the endpoint's workers did not come up: {self.status()}\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def status(self) -> str:
        result = self.cli("status", ENDPOINT_NAME, timeout=60)
        return result.stdout + result.stderr

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.ep.log_file(), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no endpoint log)"

    # -- faults (blocking) ------------------------------------------------------------------

    def restart_broker(self) -> str:
        self.node.restart(graceful=True)
        return "RabbitMQ stopped (SIGTERM) and started again"

    def kill_broker(self) -> str:
        pid = self.node.beam_pid
        self.node.stop(graceful=False)
        self.node.start()
        return f"RabbitMQ (beam pid {pid}) killed with SIGKILL, started again"

    def close_broker_connections(self) -> str:
        count = len(self.node.list_connections())
        self.node.close_all_connections("chaos: connections closed")
        return f"rabbitmqctl close_all_connections ({count} connections)"

    def kill_daemon(self) -> str:
        pid = self.ep.read_pid()
        if pid is None:
            raise RuntimeError("the endpoint has no pidfile")
        _kill(pid)
        result = self.cli("start", ENDPOINT_NAME)
        self._check(result, "start (after kill -9)")
        return f"daemon (pid {pid}) killed with SIGKILL; funcx-endpoint start"

    def kill_manager(self, rng: random.Random) -> str:
        return self._kill_one("manager", rng)

    def kill_worker(self, rng: random.Random) -> str:
        return self._kill_one("worker", rng)

    def _kill_one(self, kind: str, rng: random.Random) -> str:
        procs = sorted(self.processes(kind), key=lambda p: p.pid)
        if not procs:
            raise RuntimeError(f"no {kind} process to kill")
        victim = rng.choice(procs)
        _kill(victim.pid)
        return f"{kind} (pid {victim.pid}, one of {len(procs)}) killed with SIGKILL"

    def kill_service(self) -> str:
        assert self.service is not None
        pid = self.service.pid
        self.service.kill()
        self.service.start()
        return f"funcx-service (pid {pid}) killed with SIGKILL, started again"

    def partition(self, seconds: float, mode: str = BLACKHOLE) -> str:
        proxy = self.proxy
        assert proxy is not None
        blockingCallFromThread(self.reactor, proxy.partition, mode)
        time.sleep(seconds)
        blockingCallFromThread(self.reactor, proxy.heal)
        return f"endpoint-broker link cut ({mode}) for {seconds:g} s, then healed"

    def full_disk(self, seconds: float) -> str:
        """Fill the spool's disk, cut the link (so results must be spooled),
        heal, then free the disk; says how often endpoint.log shows results
        sent to the spool and spool writes failing meanwhile."""
        if self.spool_fs != "tmpfs":
            return f"skipped: the spool is {self.spool_fs}"
        fill = os.path.join(self.ep.spool_dir, "chaos-fill")
        written = 0
        with open(fill, "wb") as f:
            block = b"\0" * 65536
            try:
                while True:
                    written += f.write(block)
                    f.flush()
            except OSError:
                pass
        before = self.log_counts()
        proxy = self.proxy
        assert proxy is not None
        try:
            # First silent, so that results pile up unconfirmed, then reset:
            # the closed channels fail them, and the endpoint must spool them.
            blockingCallFromThread(self.reactor, proxy.partition, BLACKHOLE)
            silent_until = time.monotonic() + seconds / 2
            # Until results wait unconfirmed (on a slow machine the workers may
            # take a while to answer the tasks the endpoint holds), at most 10 s.
            deadline = time.monotonic() + max(seconds / 2, 10.0)
            while time.monotonic() < deadline:
                if re.search(r"results unconfirmed: [1-9]", self.status()):
                    break
                time.sleep(0.2)
            time.sleep(max(0.0, silent_until - time.monotonic()))
            blockingCallFromThread(self.reactor, proxy.partition, RESET)
            time.sleep(seconds / 2)
            blockingCallFromThread(self.reactor, proxy.heal)
            what = f"endpoint-broker link black-holed then reset for {seconds:g} s, healed"
        finally:
            # Results may still be waiting to be spooled; give them a moment
            # to hit the full disk before it is freed.
            time.sleep(1.0)
            os.unlink(fill)
        after = self.log_counts()
        seen = ", ".join(f"{after[k] - before.get(k, 0)} {k}" for k in after)
        return f"spool tmpfs filled ({written // 1024} KiB), {what}, disk freed ({seen})"

    #: Lines of endpoint.log that show what a fault did to the spool.
    LOG_MARKERS = {
        "results not confirmed, to the spool": "result(s) not confirmed (",
        "spool writes failed": "Could not write results to the spool",
    }

    def log_counts(self) -> Dict[str, int]:
        """How often each of :data:`LOG_MARKERS` is in endpoint.log now."""
        counts = dict.fromkeys(self.LOG_MARKERS, 0)
        try:
            with open(self.ep.log_file(), errors="replace") as f:
                for line in f:
                    for name, marker in self.LOG_MARKERS.items():
                        if marker in line:
                            counts[name] += 1
        except OSError:
            pass
        return counts


def _kill(pid: int, timeout: float = 10.0) -> None:
    try:
        proc = psutil.Process(pid)
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout)
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass
