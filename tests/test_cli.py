"""CLI commands that need no daemon, run in-process with click's runner."""

from __future__ import annotations

import json
import os
import stat

from click.testing import CliRunner
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.cli.context import EX_ALREADY
from funcx_endpoint.cli.main import cli
from funcx_endpoint.cli.status import format_status
from funcx_endpoint.config import load_config
from funcx_endpoint.endpoint.layout import EndpointDir
from funcx_endpoint.version import __version__


class CLITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config_dir = os.path.abspath(self.mktemp())
        self.runner = CliRunner()

    def fx(self, *args: str, **kwargs):
        return self.runner.invoke(cli, ["-c", self.config_dir, *args], **kwargs)

    def mode(self, path: str) -> int:
        return stat.S_IMODE(os.stat(path).st_mode)

    def test_help_of_every_command(self) -> None:
        result = self.runner.invoke(cli, ["--help"])
        self.assertEqual(result.exit_code, 0)
        for command in (
            "init",
            "configure",
            "start",
            "stop",
            "restart",
            "delete",
            "list",
            "status",
        ):
            self.assertIn(command, result.output)
            sub = self.runner.invoke(cli, [command, "--help"])
            self.assertEqual(sub.exit_code, 0, sub.output)
            self.assertIn("Usage:", sub.output)

    def test_version(self) -> None:
        result = self.runner.invoke(cli, ["--version"])
        self.assertEqual(result.exit_code, 0)
        self.assertIn(__version__, result.output)

    def test_init_is_idempotent_and_private(self) -> None:
        result = self.fx("init")
        self.assertEqual(result.exit_code, 0, result.output)
        self.assertIn("Initialized", result.output)
        ep = EndpointDir(self.config_dir, "default")
        self.assertEqual(self.mode(self.config_dir), 0o700)
        self.assertEqual(self.mode(ep.path), 0o700)
        self.assertEqual(self.mode(ep.config_file), 0o600)
        with open(ep.config_file) as f:
            before = f.read()
        load_config(ep.config_file)

        again = self.fx("init")
        self.assertEqual(again.exit_code, 0)
        self.assertIn("is initialized", again.output)
        with open(ep.config_file) as f:
            self.assertEqual(f.read(), before)

    def test_configure_writes_template(self) -> None:
        ca = os.path.abspath(self.mktemp())
        open(ca, "w").close()
        result = self.fx(
            "configure",
            "ep2",
            "--service-address",
            "https://localhost:9443/v2/",
            "--service-ca-file",
            ca,
        )
        self.assertEqual(result.exit_code, 0, result.output)
        config = load_config(EndpointDir(self.config_dir, "ep2").config_file)
        self.assertEqual(config.funcx_service_address, "https://localhost:9443/v2")
        self.assertEqual(config.service_ca_file, ca)

    def test_configure_refuses_existing(self) -> None:
        self.assertEqual(self.fx("configure", "ep").exit_code, 0)
        ep = EndpointDir(self.config_dir, "ep")
        with open(ep.config_file, "a") as f:
            f.write("# mine\n")
        result = self.fx("configure", "ep")
        self.assertEqual(result.exit_code, 73)
        self.assertIn("already exists", result.output)
        with open(ep.config_file) as f:
            self.assertTrue(f.read().endswith("# mine\n"))

    def test_configure_copies_endpoint_config(self) -> None:
        source = os.path.abspath(self.mktemp())
        with open(source, "w") as f:
            f.write(
                "from funcx_endpoint.config import Config\nconfig = Config(heartbeat_period=7)\n"
            )
        result = self.fx("configure", "copy", "--endpoint-config", source)
        self.assertEqual(result.exit_code, 0, result.output)
        config = load_config(EndpointDir(self.config_dir, "copy").config_file)
        self.assertEqual(config.heartbeat_period, 7)

    def test_configure_refuses_broken_endpoint_config(self) -> None:
        source = os.path.abspath(self.mktemp())
        with open(source, "w") as f:
            f.write("config = Config(\n")
        result = self.fx("configure", "bad", "--endpoint-config", source)
        self.assertEqual(result.exit_code, 78)
        self.assertIn(f"{source}, line", result.output)
        self.assertFalse(os.path.exists(EndpointDir(self.config_dir, "bad").path))

    def test_start_without_the_container_engine(self) -> None:
        """A worker_mode whose engine is not installed: exit 78 (EX_CONFIG) with the fix."""
        source = os.path.abspath(self.mktemp())
        with open(source, "w") as f:
            f.write(
                "from funcx_endpoint.config import Config, HighThroughputExecutor\n"
                "config = Config(executors=[HighThroughputExecutor(worker_mode='podman')])\n"
            )
        result = self.fx("configure", "boxed", "--endpoint-config", source)
        self.assertEqual(result.exit_code, 0, result.output)
        empty = os.path.abspath(self.mktemp())
        os.makedirs(empty)
        result = self.fx("start", "boxed", env={"PATH": empty})
        self.assertEqual(result.exit_code, 78, result.output)
        self.assertIn("worker_mode='podman'", result.output)
        self.assertIn("install podman", result.output)
        self.assertFalse(os.path.exists(EndpointDir(self.config_dir, "boxed").pidfile))

    def test_bad_name(self) -> None:
        result = self.fx("configure", "../evil")
        self.assertEqual(result.exit_code, 65)
        self.assertIn("bad endpoint name", result.output)

    def test_list(self) -> None:
        empty = self.fx("list")
        self.assertEqual(empty.exit_code, 0)
        self.assertIn("No endpoints", empty.output)
        self.fx("configure", "b")
        self.fx("configure", "a")
        EndpointDir(self.config_dir, "b").write_endpoint_json(
            {"endpoint_id": "7b3c7e7e-1111-4b6f-8c3e-2f0f3b6b1a11"}
        )
        lines = self.fx("list").output.splitlines()
        self.assertEqual(lines[0].split(), ["NAME", "STATUS", "ENDPOINT", "ID"])
        self.assertEqual(lines[1].split(), ["a", "Initialized", "-"])
        self.assertEqual(lines[2].split(), ["b", "Stopped", "7b3c7e7e-1111-4b6f-8c3e-2f0f3b6b1a11"])

    def test_status_not_running(self) -> None:
        self.fx("configure", "x")
        result = self.fx("status", "x")
        self.assertEqual(result.exit_code, 0)
        self.assertIn("Endpoint 'x': Initialized", result.output)

    def test_status_json_not_running(self) -> None:
        self.fx("configure", "x")
        result = self.fx("status", "x", "--json")
        self.assertEqual(result.exit_code, 0, result.output)
        self.assertEqual(
            json.loads(result.output), {"name": "x", "state": "Initialized", "endpoint_id": None}
        )

    def test_status_shows_routing(self) -> None:
        from funcx_endpoint.cli.status import format_status

        text = format_status(
            {
                "managers": 2,
                "routing": {
                    "scheduler_mode": "soft",
                    "cold_starts": 7,
                    "warm_workers": {"c1": 3},
                    "cold_starts_by_manager": {"m1": 5, "m2": 2},
                },
            }
        )
        self.assertIn(
            "routing: scheduler mode soft, cold starts 7, warm workers (c1 3), cold starts "
            "by manager (m1 5, m2 2)",
            text,
        )

    def test_delete_not_running(self) -> None:
        self.fx("configure", "x")
        result = self.fx("delete", "x", "--yes")
        self.assertEqual(result.exit_code, 0, result.output)
        self.assertFalse(os.path.exists(EndpointDir(self.config_dir, "x").path))
        missing = self.fx("delete", "x", "--yes")
        self.assertEqual(missing.exit_code, 66)

    def test_install_completion(self) -> None:
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        env = {"HOME": home, "XDG_DATA_HOME": "", "XDG_CONFIG_HOME": ""}
        expected = {
            "bash": os.path.join(home, ".local/share/bash-completion/completions/funcx-endpoint"),
            "zsh": os.path.join(home, ".zfunc/_funcx-endpoint"),
            "fish": os.path.join(home, ".config/fish/completions/funcx-endpoint.fish"),
        }
        for shell, path in expected.items():
            result = self.runner.invoke(cli, ["--install-completion", shell], env=env)
            self.assertEqual(result.exit_code, 0, result.output)
            self.assertIn(path, result.output)
            with open(path) as f:
                self.assertIn("_FUNCX_ENDPOINT_COMPLETE", f.read())


class TwoLoginNodesTests(SynchronousTestCase):
    """A ~/.funcx shared by two login nodes: the daemon of one is never taken
    for a dead one by the other (Globus Compute issue #581)."""

    def setUp(self) -> None:
        self.config_dir = os.path.abspath(self.mktemp())
        self.runner = CliRunner()
        self.assertEqual(self.fx("configure", "shared").exit_code, 0)
        self.ep = EndpointDir(self.config_dir, "shared")
        self.ep.write_endpoint_json({"endpoint_id": "0d5e4a9c-4dc6-4d1f-9f6f-b7e3c2a1e111"})
        # What the daemon on the other login node wrote: its pid, and its host.
        with open(self.ep.pidfile, "w") as f:
            f.write("424242\n")
        with open(self.ep.daemon_info_file, "w") as f:
            json.dump({"pid": 424242, "session": 424242, "host": "login-2"}, f)

    def fx(self, *args: str, **kwargs):
        return self.runner.invoke(cli, ["-c", self.config_dir, *args], **kwargs)

    def test_list_and_status_name_the_host(self) -> None:
        listed = self.fx("list")
        self.assertEqual(listed.exit_code, 0)
        self.assertIn("Running on login-2", listed.output)
        status = self.fx("status", "shared")
        self.assertIn("Running on login-2", status.output)
        self.assertIn("runs on host login-2", status.output)

    def test_start_and_stop_refused_files_kept(self) -> None:
        for command in (["start", "shared"], ["stop", "shared"], ["delete", "--yes", "shared"]):
            result = self.fx(*command)
            self.assertEqual(result.exit_code, EX_ALREADY, result.output)
            self.assertIn("is running on host login-2 (pid 424242)", result.output)
            self.assertIn("stop --forget shared", result.output)
            self.assertTrue(os.path.exists(self.ep.pidfile))
            self.assertTrue(os.path.exists(self.ep.daemon_info_file))

    def test_forget(self) -> None:
        result = self.fx("stop", "--forget", "shared")
        self.assertEqual(result.exit_code, 0, result.output)
        self.assertIn("Forgot the daemon of endpoint 'shared' on host login-2", result.output)
        self.assertFalse(os.path.exists(self.ep.pidfile))
        self.assertEqual(self.ep.state().value, "Stopped")

    def test_this_host_is_not_elsewhere(self) -> None:
        from funcx_endpoint.procs import this_host

        with open(self.ep.daemon_info_file, "w") as f:
            json.dump({"pid": 424242, "session": None, "host": this_host()}, f)
        self.assertEqual(self.ep.state().value, "Disconnected")  # a dead daemon of this host


class StatusFormatTests(SynchronousTestCase):
    """How `funcx-endpoint status` shows the daemon's answer."""

    def test_blocks(self) -> None:
        text = format_status(
            {
                "uptime": 75.0,
                "blocks": {
                    "provider": "slurm",
                    "active": 2,
                    "states": {"RUNNING": 1, "PENDING": 1},
                    "ended": {"CANCELLED": 1},
                    "failed_starts_in_a_row": 1,
                    "last_error": "block 2 could not be submitted to the slurm provider: the "
                    "slurm scheduler refused funcx.htex.block-2 (exit code 1): sbatch: error:\n"
                    "Invalid partition name specified",
                    "last_error_age": 130.0,
                    "list": [
                        {
                            "block": "0",
                            "job_id": "41",
                            "state": "RUNNING",
                            "nodes": ["node0", "node1"],
                            "managers": "2/2",
                            "walltime_left": 570.4,
                        },
                        {
                            "block": "1",
                            "job_id": "42",
                            "state": "PENDING",
                            "nodes": [],
                            "managers": "0/2",
                        },
                    ],
                },
                "strategy": {"name": "simple", "backoff_remaining": 8.5},
            }
        )
        self.assertEqual(
            text.splitlines(),
            [
                "  uptime: 1m15s",
                "  blocks: provider slurm, active 2, states (RUNNING 1, PENDING 1), ended "
                "(CANCELLED 1), failed starts in a row 1",
                "    last error (2m10s ago): block 2 could not be submitted to the slurm "
                "provider: the slurm scheduler refused funcx.htex.block-2 (exit code 1): "
                "sbatch: error: Invalid partition name specified",
                "    block 0, job 41, RUNNING, nodes node0 node1, managers 2/2, walltime left "
                "9m30s",
                "    block 1, job 42, PENDING, nodes -, managers 0/2",
                "  strategy: name simple, backoff remaining 8.5",
            ],
        )

    def test_no_blocks(self) -> None:
        text = format_status({"blocks": {"provider": "local", "active": 0, "list": []}})
        self.assertEqual(text, "  blocks: provider local, active 0")
