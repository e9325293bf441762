"""Helpers shared by this project's tests (not part of the package API)."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import psutil
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, TestCase

import funcx_endpoint
from funcx_endpoint.testing.service import sdk_client

if TYPE_CHECKING:
    from funcx_endpoint.endpoint.layout import EndpointDir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(funcx_endpoint.__file__)))


def child_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment for child processes: this checkout importable."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    parts = [REPO_ROOT] + [os.path.abspath(p) for p in path.split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.pop("FUNCX_ENDPOINT_CONFIG_DIR", None)
    if extra:
        env.update(extra)
    return env


def run_cli(
    config_dir: str,
    *args: str,
    timeout: float = 120,
    env: Optional[Dict[str, str]] = None,
    input: Optional[str] = None,
) -> subprocess.CompletedProcess:
    """Run ``funcx-endpoint -c config_dir ARGS`` in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "funcx_endpoint.cli", "-c", config_dir, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(env),
        input=input,
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def endpoint_processes(ep: EndpointDir, pid: Optional[int] = None) -> List[psutil.Process]:
    """The daemon ``pid``, its descendants, and every process that carries the
    endpoint's marker (managers and workers in their blocks' own sessions, and
    whatever they started), wherever they are now."""
    from funcx_endpoint.endpoint.layout import OWNER_ENV
    from funcx_endpoint.procs import marked_processes

    procs: Dict[int, psutil.Process] = {}
    if pid is not None and pid > 0:
        try:
            root = psutil.Process(pid)
            procs[pid] = root
            for child in root.children(recursive=True):
                procs[child.pid] = child
        except psutil.NoSuchProcess:
            pass
    for proc in marked_processes(OWNER_ENV, ep.path):
        procs.setdefault(proc.pid, proc)
    return list(procs.values())


def alive(procs: List[psutil.Process]) -> List[psutil.Process]:
    """Those of ``procs`` still running (zombies count as gone)."""
    result = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                result.append(proc)
        except psutil.NoSuchProcess:
            pass
    return result


def configure_endpoint(
    config_dir: str, name: str, service: Any, env: Dict[str, str], address: str = ""
) -> subprocess.CompletedProcess:
    """``funcx-endpoint configure NAME`` against ``service`` (a test web service
    process): its address (or ``address``), its CA and its broker's CA."""
    return run_cli(
        config_dir,
        "configure",
        name,
        "--service-address",
        address or service.base_url,
        "--service-ca-file",
        service.ca_file,
        "--amqp-ca-file",
        service.broker_ca_file,
        env=env,
    )


def replacing(edits: Dict[str, str]) -> Callable[[str], str]:
    """An edit of ``config.py`` that replaces each key of ``edits`` (which must be there)."""

    def edit(text: str) -> str:
        for old, new in edits.items():
            assert old in text, old
            text = text.replace(old, new)
        return text

    return edit


class CLIEndpoint:
    """An endpoint daemon run through the real CLI against the shared test web
    service (and its broker), with SDK clients of the endpoint's user.

    ``extra_env`` joins the user's environment (for the CLI, the daemon and the SDK).
    """

    def __init__(
        self, config_dir: str, name: str, extra_env: Optional[Dict[str, str]] = None
    ) -> None:
        from funcx_endpoint.endpoint.layout import EndpointDir
        from funcx_endpoint.testing.service import shared_service

        self.service = shared_service()
        self.credentials = self.service.create_client()
        self.env = self.service.client_env(self.credentials)
        self.env.update(extra_env or {})
        self.config_dir = config_dir
        self.name = name
        self.ep = EndpointDir(config_dir, name)

    @property
    def endpoint_id(self) -> Optional[str]:
        return self.ep.endpoint_id()

    def configure(self, edit: Callable[[str], str] = lambda text: text) -> None:
        """``configure`` the endpoint, then rewrite its ``config.py`` with ``edit``."""
        result = configure_endpoint(self.config_dir, self.name, self.service, self.env)
        assert result.returncode == 0, result.stderr
        with open(self.ep.config_file) as f:
            text = f.read()
        with open(self.ep.config_file, "w") as f:
            f.write(edit(text))

    def start(self, *extra: str) -> subprocess.CompletedProcess:
        """``funcx-endpoint start [EXTRA] NAME``, as the CLI answered."""
        return run_cli(self.config_dir, "start", *extra, self.name, env=self.env)

    def wait_online(self, says: str = "workers: 2", timeout: float = 60) -> None:
        """Wait until ``status`` says ``says`` (an AssertionError after ``timeout``)."""
        assert wait_for(lambda: says in self.status(), timeout), self.status()

    def status(self) -> str:
        return str(run_cli(self.config_dir, "status", self.name, env=self.env).stdout)

    def stop(self) -> subprocess.CompletedProcess:
        return run_cli(self.config_dir, "stop", self.name, env=self.env)

    def client(self) -> Any:
        return sdk_client(self.env)

    def log(self) -> str:
        with open(self.ep.log_file()) as f:
            return f.read()


def running_endpoint(
    name: str, edit: Callable[[str], str] = lambda text: text, workers: int = 2
) -> CLIEndpoint:
    """A configured endpoint (``config.py`` rewritten by ``edit``), started and
    registered, once its status counts ``workers`` workers."""
    endpoint = CLIEndpoint(tempfile.mkdtemp(prefix=f"funcx-{name}-e2e-"), name)
    endpoint.configure(edit)
    started = endpoint.start()
    assert started.returncode == 0, started.stdout + started.stderr
    endpoint.wait_online(f"workers: {workers}")
    return endpoint


_shared_endpoints: Dict[str, CLIEndpoint] = {}


def shared_running_endpoint(
    name: str, edit: Callable[[str], str] = lambda text: text
) -> CLIEndpoint:
    """``running_endpoint(name, edit)`` made once per test process (the first call's
    ``edit`` counts) and stopped when the process exits."""
    if name not in _shared_endpoints:
        endpoint = _shared_endpoints[name] = running_endpoint(name, edit)
        atexit.register(endpoint.stop)
    return _shared_endpoints[name]


class ChaosRunTestCase(TestCase):
    """A chaos run (:func:`funcx_endpoint.testing.chaos.run_chaos`) on the real
    stack, in a thread, in a temporary directory; its progress lines kept for the
    report an assertion prints."""

    prefix = "funcx-chaos-test-"

    def setUp(self) -> None:
        if not shutil.which("rabbitmq-server") and not os.path.exists(
            "/usr/lib/rabbitmq/bin/rabbitmq-server"
        ):
            raise SkipTest("RabbitMQ is not installed")
        self.base_dir = tempfile.mkdtemp(prefix=self.prefix)
        self.addCleanup(shutil.rmtree, self.base_dir, True)
        self.lines: List[str] = []

    def run_chaos(self, **options: Any) -> Deferred[Any]:
        """``run_chaos`` with ``options``; fires with its ChaosResult."""
        from twisted.internet import reactor
        from twisted.internet.threads import deferToThread

        from funcx_endpoint.testing.chaos import run_chaos

        return deferToThread(
            run_chaos, reactor, self.base_dir, progress=self.lines.append, **options
        )

    def report(self, result: Any) -> str:
        """The run's progress and figures (printed too: the figures on the console)."""
        from funcx_endpoint.testing.chaos import format_report

        print("\n" + format_report(result))
        return "\n".join(self.lines) + "\n" + format_report(result)

    def assert_promise_kept(self, result: Any, tasks: int, report: str) -> None:
        """Every fault struck and recovered; every task answered once, none lost or hung."""
        for r in result.faults:
            if r.name != "none":
                self.assertFalse(r.detail.startswith("FAILED"), report)
                self.assertIsNotNone(r.recovery_seconds, f"{r.name} did not recover\n{report}")
        self.assertEqual(result.total("submitted"), tasks, report)
        self.assertEqual(result.total("answered"), tasks, report)
        self.assertEqual(result.total("lost"), 0, report)
        self.assertEqual(result.total("duplicates"), 0, report)
        self.assertEqual(result.total("hung"), 0, report)
        self.assertEqual(result.answered_without_run, 0, report)


def function_row(
    function_id: str,
    owner: str,
    *,
    name: str = "f",
    entry_point: str = "f",
    code: str = "x",
    created: float = 1.0,
) -> Dict[str, Any]:
    """A private function's row as ``webservice.tasks.insert_function`` takes it."""
    return {
        "function_id": function_id,
        "owner": owner,
        "name": name,
        "entry_point": entry_point,
        "description": None,
        "container_uuid": None,
        "public": False,
        "group_id": None,
        "function_code": code,
        "created": created,
    }
