"""The endpoint's lifecycle through the real CLI and real daemon processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.endpoint.layout import OWNER_ENV, EndpointDir, EndpointState
from tests.support import (
    alive,
    child_env,
    configure_endpoint,
    endpoint_processes,
    run_cli,
    wait_for,
)


def start_a_sleeper():
    """Runs on the endpoint (sent as source): start a process in a session of
    its own that outlives the task, as a careless function might."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
    )
    return proc.pid


def service_endpoint(test: SynchronousTestCase, name: str = "ep1") -> tuple:
    """A profile configured for the test run's private service, and the env to run it.

    The env carries a client of its own (a user of its own) for this test.
    """
    from funcx_endpoint.testing.service import shared_service

    service = shared_service()
    env = service.client_env(service.create_client())
    config_dir = os.path.abspath(test.mktemp())
    result = configure_endpoint(config_dir, name, service, env)
    test.assertEqual(result.returncode, 0, result.stderr)
    return config_dir, env


class LifecycleTests(SynchronousTestCase):
    """start, list, status, stop, restart, delete on a real daemon."""

    def setUp(self) -> None:
        self.config_dir, self.env = service_endpoint(self)
        self.ep = EndpointDir(self.config_dir, "ep1")
        self.addCleanup(self.force_stop)

    def force_stop(self) -> None:
        for proc in alive(endpoint_processes(self.ep, self.ep.read_pid())):
            proc.kill()

    def cli(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("env", self.env)
        return run_cli(self.config_dir, *args, **kwargs)

    def start(self) -> int:
        result = self.cli("start", "ep1")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("Endpoint 'ep1' is running", result.stdout)
        pid = self.ep.read_pid()
        assert pid is not None
        return pid

    def test_start_list_status_stop(self) -> None:
        self.assertEqual(self.ep.state(), EndpointState.INITIALIZED)
        pid = self.start()
        self.assertTrue(psutil.pid_exists(pid))
        # It is a daemon: in a session of its own that it records, not a child of ours.
        self.assertNotEqual(os.getsid(pid), os.getsid(0))
        self.assertEqual(self.ep.daemon_session(pid), os.getsid(pid))
        self.assertNotEqual(psutil.Process(pid).ppid(), os.getpid())

        listing = self.cli("list")
        self.assertEqual(listing.returncode, 0)
        self.assertRegex(listing.stdout, r"ep1\s+Running")

        # The daemon registered and runs a block: a manager and its workers.
        self.assertTrue(
            wait_for(lambda: "managers: 1" in self.cli("status", "ep1").stdout, 60),
            self.cli("status", "ep1").stdout,
        )
        status = self.cli("status", "ep1")
        self.assertEqual(status.returncode, 0, status.stderr)
        self.assertIn("Endpoint 'ep1': Running", status.stdout)
        self.assertIn(f"pid: {pid}", status.stdout)
        self.assertIn("uptime:", status.stdout)
        self.assertIn(f"endpoint id: {self.ep.endpoint_id()}", status.stdout)
        self.assertRegex(status.stdout, r"workers: [1-9]")
        self.assertIn("broker tasks connection: connected", status.stdout)

        tree = endpoint_processes(self.ep, pid)
        # daemon, the block's shell and manager, and the manager's workers
        self.assertGreaterEqual(len(alive(tree)), 4, [p.cmdline() for p in alive(tree)])
        # Everything the daemon started carries its marker, whatever session it is in.
        workers = [p for p in alive(tree) if "funcx_endpoint.worker" in " ".join(p.cmdline())]
        self.assertTrue(workers, [p.cmdline() for p in alive(tree)])
        for worker in workers:
            self.assertEqual(worker.environ().get(OWNER_ENV), self.ep.path)

        stop = self.cli("stop", "ep1")
        self.assertEqual(stop.returncode, 0, stop.stderr)
        self.assertIn(f"Endpoint 'ep1' stopped (pid {pid}", stop.stdout)
        self.assertEqual(alive(tree), [])
        self.assertEqual(alive(endpoint_processes(self.ep, pid)), [])
        self.assertIsNone(self.ep.read_pid())
        self.assertNotEqual(self.ep.state(), EndpointState.RUNNING)
        self.assertFalse(os.path.exists(self.ep.control_socket))

        # The log was written, and is private.
        log = self.ep.log_file()
        self.assertEqual(os.stat(log).st_mode & 0o777, 0o600)
        with open(log) as f:
            text = f.read()
        self.assertIn("Endpoint ep1 is ready", text)
        self.assertIn("Endpoint ep1 stopped", text)

    def test_start_timeout_is_not_taken_for_a_race(self) -> None:
        result = self.cli("start", "ep1", "--timeout", "0.05")
        self.assertEqual(result.returncode, 75, result.stdout + result.stderr)
        self.assertIn("did not report ready within 0.05 s; it may still be starting", result.stderr)
        self.assertNotIn("already running", result.stderr)
        self.assertTrue(wait_for(lambda: self.ep.state() is EndpointState.RUNNING, 30))
        self.assertEqual(self.cli("stop", "ep1").returncode, 0)

    def test_second_start_refused(self) -> None:

        pid = self.start()
        again = self.cli("start", "ep1")
        self.assertEqual(again.returncode, 1)
        self.assertIn(f"already running (pid {pid})", again.stderr)
        self.assertEqual(self.ep.read_pid(), pid)
        self.assertTrue(psutil.pid_exists(pid))

    def test_concurrent_starts_make_one_daemon(self) -> None:
        # Two `start`s racing each other: the instance lock lets one daemon run;
        # the other start fails and leaves the first one's files alone.
        first = subprocess.Popen(
            [sys.executable, "-m", "funcx_endpoint.cli", "-c", self.config_dir, "start", "ep1"],
            env=child_env(self.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        second = self.cli("start", "ep1")
        out, err = first.communicate(timeout=120)
        codes = sorted([first.returncode, second.returncode])
        self.assertEqual(codes[0], 0, out + err + second.stdout + second.stderr)
        self.assertNotEqual(codes[1], 0, out + err + second.stdout + second.stderr)
        self.assertIn("already running", err + second.stderr)
        pid = self.ep.read_pid()
        assert pid is not None
        self.assertEqual(self.ep.state(), EndpointState.RUNNING)
        daemons = [
            p
            for p in psutil.process_iter()
            if "twistd" in " ".join(self._cmdline(p)) and self.config_dir in self._cmdline(p)
        ]
        self.assertEqual([p.pid for p in alive(daemons)], [pid])
        tree = endpoint_processes(self.ep, pid)
        stop = self.cli("stop", "ep1")
        self.assertEqual(stop.returncode, 0, stop.stderr)
        self.assertIn(f"stopped (pid {pid}", stop.stdout)
        self.assertEqual(alive(tree + endpoint_processes(self.ep)), [])

    @staticmethod
    def _cmdline(proc: psutil.Process) -> list:
        try:
            return proc.cmdline()
        except psutil.Error:
            return []

    def test_kill_9_leaves_nothing_after_stop(self) -> None:
        # A task starts a process of its own, in a new session, that outlives
        # its worker; the daemon is killed with kill -9; one `stop` kills the
        # daemon's managers, workers and that process too.
        from funcx_endpoint.sdk import FuncXClient

        pid = self.start()
        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            client = FuncXClient()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.addCleanup(client.close)
        function_id = client.register_function(start_a_sleeper)
        task = client.run(endpoint_id=self.ep.endpoint_id(), function_id=function_id)
        sleeper_pid = None
        deadline = time.monotonic() + 60
        while sleeper_pid is None:
            try:
                sleeper_pid = client.get_result(task)
            except Exception:
                self.assertLess(time.monotonic(), deadline, "the task did not finish")
                time.sleep(0.1)
        sleeper = psutil.Process(sleeper_pid)
        self.addCleanup(lambda: [p.kill() for p in alive([sleeper])])
        self.assertNotEqual(os.getsid(sleeper_pid), os.getsid(pid))
        tree = alive(endpoint_processes(self.ep, pid))
        self.assertIn(sleeper_pid, [p.pid for p in tree])
        managers = [p for p in tree if "funcx_endpoint.manager" in " ".join(p.cmdline())]
        self.assertTrue(managers)

        os.kill(pid, signal.SIGKILL)
        self.assertTrue(
            wait_for(
                lambda: (
                    not psutil.pid_exists(pid)
                    or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                )
            )
        )
        stop = self.cli("stop", "ep1")

        self.assertEqual(stop.returncode, 0, stop.stderr)
        self.assertIn("removed the stale pidfile", stop.stdout)
        self.assertTrue(wait_for(lambda: alive(tree) == [], 10), [p.cmdline() for p in alive(tree)])
        self.assertEqual(alive(endpoint_processes(self.ep)), [])

    def test_kill_9_then_list_and_start(self) -> None:
        pid = self.start()
        self.assertTrue(wait_for(lambda: "managers: 1" in self.cli("status", "ep1").stdout, 60))
        old = alive(endpoint_processes(self.ep, pid))
        self.assertGreaterEqual(len(old), 3, [p.cmdline() for p in old])
        os.kill(pid, signal.SIGKILL)
        self.assertTrue(
            wait_for(
                lambda: (
                    not psutil.pid_exists(pid)
                    or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                )
            )
        )
        listing = self.cli("list")
        self.assertRegex(listing.stdout, r"ep1\s+Disconnected")
        status = self.cli("status", "ep1")
        self.assertIn("Disconnected", status.stdout)

        restarted = self.cli("start", "ep1")
        self.assertEqual(restarted.returncode, 0, restarted.stderr)
        self.assertIn("was Disconnected", restarted.stdout)
        self.assertIn("removed the stale pidfile", restarted.stdout)
        new_pid = self.ep.read_pid()
        self.assertNotEqual(new_pid, pid)
        self.assertEqual(self.ep.state(), EndpointState.RUNNING)
        # None of the dead daemon's processes is left.
        self.assertEqual(alive(old), [])
        self.assertEqual(self.cli("stop", "ep1").returncode, 0)

    def test_stop_cleans_stale_pidfile(self) -> None:
        pid = self.start()
        os.kill(pid, signal.SIGKILL)
        self.assertTrue(
            wait_for(
                lambda: (
                    not psutil.pid_exists(pid)
                    or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                )
            )
        )

        stop = self.cli("stop", "ep1")
        self.assertEqual(stop.returncode, 0)
        self.assertIn("was not running: removed the stale pidfile", stop.stdout)
        self.assertIsNone(self.ep.read_pid())

    def test_stop_when_not_running(self) -> None:
        stop = self.cli("stop", "ep1")
        self.assertEqual(stop.returncode, 0)
        self.assertIn("is not running", stop.stdout)

    def test_restart(self) -> None:
        pid = self.start()
        result = self.cli("restart", "ep1")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("stopped", result.stdout)
        self.assertIn("is running", result.stdout)
        new_pid = self.ep.read_pid()
        self.assertNotEqual(new_pid, pid)
        self.assertFalse(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie")
        self.assertEqual(self.cli("stop", "ep1").returncode, 0)

    def test_delete_running_endpoint(self) -> None:
        pid = self.start()
        declined = self.cli("delete", "ep1", input="n\n")
        self.assertNotEqual(declined.returncode, 0)
        self.assertTrue(os.path.isdir(self.ep.path))
        self.assertTrue(psutil.pid_exists(pid))

        result = self.cli("delete", "ep1", "--yes")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Deleted endpoint 'ep1'", result.stdout)
        self.assertFalse(os.path.exists(self.ep.path))
        self.assertTrue(wait_for(lambda: alive(endpoint_processes(self.ep, pid)) == []))

    def test_broken_config(self) -> None:
        with open(self.ep.config_file, "a") as f:
            f.write("\nconfig = Config(heartbeat_period='soon')\n")
        result = self.cli("start", "ep1")
        self.assertEqual(result.returncode, 78)
        self.assertIn(f"{self.ep.config_file}, line ", result.stderr)
        self.assertIn("Config.heartbeat_period: expected a number > 0", result.stderr)
        self.assertIsNone(self.ep.read_pid())

    def test_start_unknown_endpoint(self) -> None:
        result = self.cli("start", "nope")
        self.assertEqual(result.returncode, 66)
        self.assertIn("there is no endpoint 'nope'", result.stderr)
        self.assertIn("configure nope", result.stderr)

    def test_foreground(self) -> None:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "funcx_endpoint.cli",
                "-c",
                self.config_dir,
                "start",
                "ep1",
                "--foreground",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env(dict(self.env, PYTHONFAULTHANDLER="1")),
            # A test run started in the background (`make test &`, nohup) ignores
            # SIGINT, and a child would inherit that: Twisted then leaves SIGINT
            # ignored, as it should for a background job.  Ctrl-C is the point here.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.addCleanup(proc.kill)
        self.addCleanup(proc.stdout.close)
        self.assertTrue(wait_for(lambda: self.ep.state() is EndpointState.RUNNING, 30))
        self.assertEqual(self.ep.read_pid(), proc.pid)
        self.assertTrue(wait_for(lambda: os.path.exists(self.ep.control_socket), 10))
        status = self.cli("status", "ep1")
        self.assertIn(f"pid: {proc.pid}", status.stdout)
        self.assertIsNone(self.ep.daemon_session(proc.pid))
        # twistd ends with the signal that stopped it, as shells expect.
        output = self.stop_foreground(proc, signal.SIGINT)
        self.assertIn("Endpoint ep1 is ready", output)

        self.assertIsNone(self.ep.read_pid())

    def test_twistd_runs_plugin_in_foreground(self) -> None:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile",
                "",
                "funcx-endpoint",
                "--name",
                "ep1",
                "--config-dir",
                self.config_dir,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=child_env(self.env),
            cwd=self.ep.path,
        )
        self.addCleanup(proc.kill)
        self.addCleanup(proc.stdout.close)
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            lines.append(line)
            if "is ready" in line or not line:
                break
        self.assertIn("Endpoint ep1 is ready", "".join(lines))
        self.stop_foreground(proc, signal.SIGTERM)

    def stop_foreground(self, proc: subprocess.Popen, sig: int) -> str:
        """Send ``sig``; the output, once the process died of it within 30 s.

        The output is read while waiting: a full stdout pipe would stall it."""
        proc.send_signal(sig)
        try:
            raw, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            # With PYTHONFAULTHANDLER set (child_env), SIGABRT makes it print
            # every thread's stack: where it hangs.
            proc.send_signal(signal.SIGABRT)
            try:
                raw, _ = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                raw, _ = proc.communicate()

            self.fail(
                f"the endpoint did not stop within 30 s of {sig} (SIGINT here: "
                f"{signal.getsignal(signal.SIGINT)}):\n{raw.decode()[-8000:]}"
            )
        output = raw.decode()
        self.assertEqual(proc.returncode, -sig, output[-5000:])
        return output


FAKE_DAEMON = textwrap.dedent(
    """\
    import fcntl, os, signal, subprocess, sys, time
    # argv[1]: pidfile, argv[2]: file to write the children's pids to,
    # argv[3]: daemon.json, where a daemon records its session,
    # argv[4]: the endpoint's lock file, argv[5]: the endpoint's directory.
    # The marker keeps this recognisable as an endpoint: funcx-endpoint
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lock = os.open(sys.argv[4], os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.environ["FUNCX_ENDPOINT_DIR"] = sys.argv[5]
    child = subprocess.Popen([sys.executable, "-c",
        "import signal, subprocess, sys, time;"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']);"
        "open(sys.argv[1], 'a').write(str(g.pid) + chr(10));"
        "time.sleep(600)", sys.argv[2]])
    with open(sys.argv[2], "a") as f:
        f.write(str(child.pid) + "\\n")
    with open(sys.argv[3], "w") as f:
        f.write('{"pid": %d, "session": %d}' % (os.getpid(), os.getsid(0)))
    with open(sys.argv[1], "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)
    """
)


class StopKillsEverythingTests(SynchronousTestCase):
    """``stop`` leaves no process behind, even from a daemon that ignores TERM."""

    def setUp(self) -> None:
        self.config_dir = os.path.abspath(self.mktemp())
        configured = run_cli(self.config_dir, "configure", "ep1")
        self.assertEqual(configured.returncode, 0, configured.stdout + configured.stderr)
        self.ep = EndpointDir(self.config_dir, "ep1")
        self.children_file = os.path.abspath(self.mktemp())

    def spawn_fake_daemon(self) -> psutil.Process:
        script = os.path.abspath(self.mktemp() + "-funcx-endpoint.py")
        with open(script, "w") as f:
            f.write(FAKE_DAEMON)
        launcher = subprocess.Popen(
            [
                sys.executable,
                script,
                self.ep.pidfile,
                self.children_file,
                self.ep.daemon_info_file,
                self.ep.lock_file,
                self.ep.path,
            ]
        )
        self.addCleanup(launcher.wait)
        self.assertTrue(wait_for(lambda: self.ep.read_pid() is not None, 20))
        self.assertTrue(wait_for(lambda: len(self.children()) == 2, 20))
        daemon = psutil.Process(self.ep.read_pid())
        self.addCleanup(lambda: [p.kill() for p in alive([daemon] + self.children())])
        return daemon

    def children(self) -> list:
        try:
            with open(self.children_file) as f:
                pids = [int(line) for line in f.read().split()]
        except FileNotFoundError:
            return []
        return [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]

    def test_grace_period_then_kill(self) -> None:
        daemon = self.spawn_fake_daemon()
        everything = [daemon] + self.children()
        self.assertEqual(len(alive(everything)), 3)
        result = run_cli(self.config_dir, "stop", "ep1", "--timeout", "1")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("did not stop within 1 s; killed its 3 process(es)", result.stdout)
        self.assertEqual(alive(everything), [])
        self.assertIsNone(self.ep.read_pid())

    def test_orphans_of_a_dead_daemon_are_killed(self) -> None:
        daemon = self.spawn_fake_daemon()
        orphans = self.children()
        daemon.kill()
        daemon.wait(10) if daemon.ppid() == os.getpid() else wait_for(
            lambda: not daemon.is_running() or daemon.status() == psutil.STATUS_ZOMBIE
        )
        self.assertEqual(len(alive(orphans)), 2)
        self.assertEqual(self.ep.state(), EndpointState.DISCONNECTED)
        result = run_cli(self.config_dir, "stop", "ep1")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("removed the stale pidfile", result.stdout)
        self.assertIn("killed 2 leftover process(es)", result.stdout)
        self.assertEqual(alive(orphans), [])

    def test_daemon_without_lock_recognised_by_its_command_line(self) -> None:
        # A daemon started by an earlier version (or on a file system without
        # flock) holds no lock: its command line naming this endpoint counts.
        daemon = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"]
            + ["funcx-endpoint", "--name", "ep1", "--config-dir", self.ep.config_dir]
        )
        self.addCleanup(daemon.wait)
        self.addCleanup(daemon.kill)
        self.assertTrue(wait_for(lambda: "funcx-endpoint" in " ".join(self._argv(daemon.pid))))
        with open(self.ep.pidfile, "w") as f:
            f.write(str(daemon.pid))
        self.assertFalse(self.ep.lock_held())
        self.assertEqual(self.ep.state(), EndpointState.RUNNING)
        # Another endpoint's daemon is not taken for this one's.
        self.assertFalse(EndpointDir(self.config_dir, "ep2").runs_this_endpoint(daemon.pid))
        result = run_cli(self.config_dir, "stop", "ep1", "--timeout", "1")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(f"Endpoint 'ep1' stopped (pid {daemon.pid}", result.stdout)

        self.assertIsNotNone(daemon.wait(10))

    @staticmethod
    def _argv(pid: int) -> list:
        try:
            return psutil.Process(pid).cmdline()
        except psutil.Error:
            return []

    def test_stop_refuses_when_a_daemon_holds_the_lock_without_pidfile(self) -> None:
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import fcntl, os, sys, time\n"
                "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
                "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                "print('locked', flush=True)\n"
                "time.sleep(600)\n",
                self.ep.lock_file,
            ],
            stdout=subprocess.PIPE,
            env=child_env({"FUNCX_ENDPOINT_DIR": self.ep.path}),
        )
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        assert holder.stdout is not None
        self.assertEqual(holder.stdout.readline().strip(), b"locked")
        result = run_cli(self.config_dir, "stop", "ep1")
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertIn("yet a daemon of it holds", result.stderr)
        self.assertIsNone(holder.poll())  # marked, but not a leftover: left alone

    def test_a_stale_pidfile_never_kills_strangers(self) -> None:

        # A dead daemon's files name a session that now belongs to someone
        # else (session ids are reused), and a pid that is alive but not the
        # endpoint's: neither is touched.
        stranger = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
        )
        self.addCleanup(stranger.wait)
        self.addCleanup(stranger.kill)
        with open(self.ep.pidfile, "w") as f:
            f.write(str(stranger.pid))
        self.ep.write_daemon_info(stranger.pid, os.getsid(stranger.pid))
        self.assertEqual(self.ep.state(), EndpointState.DISCONNECTED)
        result = run_cli(self.config_dir, "stop", "ep1")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("removed the stale pidfile", result.stdout)
        self.assertNotIn("killed", result.stdout)
        self.assertIsNone(stranger.poll())
        self.assertIsNone(self.ep.read_pid())


class PluginDiscoveryTests(SynchronousTestCase):
    def test_twistd_lists_plugin(self) -> None:
        result = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"funcx-endpoint\s+Run a funcX endpoint")


class RegistrationFailureTests(SynchronousTestCase):
    """``start`` reports why registration failed, with its exit code, and no
    daemon is left behind."""

    def setUp(self) -> None:
        self.config_dir, self.env = service_endpoint(self)
        self.ep = EndpointDir(self.config_dir, "ep1")

    def assert_failed_cleanly(
        self, result: subprocess.CompletedProcess, code: int, text: str
    ) -> None:
        self.assertEqual(result.returncode, code, result.stdout + result.stderr)
        self.assertIn(text, result.stderr)
        # The daemon that failed is gone, with everything it started.
        self.assertTrue(wait_for(lambda: self.ep.state() is not EndpointState.RUNNING, 15))
        pid = self.ep.read_pid()
        if pid:
            self.assertEqual(alive(endpoint_processes(self.ep, pid)), [])

    def test_no_credentials(self) -> None:
        env = {k: v for k, v in self.env.items() if not k.startswith("FUNCX_SDK")}
        env.update({"FUNCX_SDK_CLIENT_ID": "", "FUNCX_SDK_CLIENT_SECRET": ""})
        result = run_cli(self.config_dir, "start", "ep1", env=env)
        self.assert_failed_cleanly(result, 77, "no credentials: set FUNCX_SDK_CLIENT_ID")

    def test_wrong_secret(self) -> None:
        env = dict(self.env, FUNCX_SDK_CLIENT_SECRET="not-the-secret")
        result = run_cli(self.config_dir, "start", "ep1", env=env)
        self.assert_failed_cleanly(result, 77, "refused the client credentials")
        self.assertNotIn("not-the-secret", result.stderr)

    def test_locked_endpoint(self) -> None:
        from funcx_endpoint.sdk import FuncXClient

        self.assertEqual(run_cli(self.config_dir, "start", "ep1", env=self.env).returncode, 0)
        self.assertEqual(run_cli(self.config_dir, "stop", "ep1", env=self.env).returncode, 0)
        saved = dict(os.environ)
        os.environ.update(self.env)
        try:
            client = FuncXClient()
            client.stop_endpoint(self.ep.endpoint_id())
            client.close()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        result = run_cli(self.config_dir, "start", "ep1", env=self.env)
        self.assert_failed_cleanly(result, 69, "locked (stopped remotely)")
        # The lock is consumed: the next start works.
        again = run_cli(self.config_dir, "start", "ep1", env=self.env)
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertEqual(run_cli(self.config_dir, "stop", "ep1", env=self.env).returncode, 0)

    def test_untrusted_service_certificate(self) -> None:
        with open(self.ep.config_file) as f:
            text = f.read()
        import re

        # Forget the private CA: the service's certificate is then not trusted.
        with open(self.ep.config_file, "w") as f:
            f.write(re.sub(r"(?m)^    service_ca_file=.*,$", "    service_ca_file=None,", text))

        result = run_cli(self.config_dir, "start", "ep1", env=self.env)
        self.assert_failed_cleanly(result, 78, "failed TLS verification")

    def test_service_unreachable(self) -> None:
        with open(self.ep.config_file) as f:
            text = f.read()
        from funcx_endpoint.testing.service import shared_service

        with open(self.ep.config_file, "w") as f:
            f.write(text.replace(shared_service().base_url, "https://127.0.0.1:9/v2"))
        result = run_cli(self.config_dir, "start", "ep1", env=self.env)
        self.assert_failed_cleanly(result, 75, "cannot reach the funcX service")
