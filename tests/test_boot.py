"""``enable-on-boot`` / ``disable-on-boot``: the systemd unit of an endpoint."""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess

from click.testing import CliRunner
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from funcx_endpoint.cli.boot import quote_word, systemd_running, unit_name
from funcx_endpoint.cli.main import cli
from funcx_endpoint.endpoint.layout import EndpointDir
from tests.support import child_env, configure_endpoint

SECRET = "s3cret-never-in-the-unit"


def unit_settings(text: str) -> dict:
    settings: dict = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


class BootUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config_dir = os.path.abspath(self.mktemp())
        self.unit_dir = os.path.abspath(self.mktemp())
        self.runner = CliRunner()
        self.env = {
            "FUNCX_SDK_CLIENT_ID": "7c4a2b0e-0f5b-4f3e-9d55-6d4b9d9d1c11",
            "FUNCX_SDK_CLIENT_SECRET": SECRET,
            "GLOBUS_SDK_SERVICE_URL_AUTH": "https://auth.example.org/",
        }
        result = self.fx("configure", "boot")
        self.assertEqual(result.exit_code, 0, result.output)
        self.ep = EndpointDir(self.config_dir, "boot")

    def fx(self, *args: str):
        return self.runner.invoke(cli, ["-c", self.config_dir, *args], env=self.env)

    def enable(self, *extra: str) -> str:
        result = self.fx("enable-on-boot", "boot", "--unit-dir", self.unit_dir, *extra)
        self.assertEqual(result.exit_code, 0, result.output)
        path = os.path.join(self.unit_dir, unit_name(self.ep))
        self.assertIn(f"Wrote {path}", result.output)
        self.output = result.output
        return path

    def test_system_unit_content(self) -> None:
        path = self.enable("--system")
        with open(path) as f:
            text = f.read()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o644)
        settings = unit_settings(text)
        argv = shlex.split(settings["ExecStart"][0])
        self.assertTrue(os.path.isabs(argv[0]))
        self.assertEqual(
            argv[1:],
            ["-m", "funcx_endpoint.cli", "-c", self.config_dir, "start", "--foreground", "boot"],
        )
        self.assertEqual(settings["Restart"], ["on-failure"])
        self.assertEqual(settings["RestartPreventExitStatus"], ["65 69 77 78"])
        self.assertEqual(settings["KillMode"], ["mixed"])
        self.assertEqual(settings["WorkingDirectory"], [self.ep.path])
        self.assertEqual(settings["User"], [_owner_name(self.ep.path)])
        self.assertEqual(settings["WantedBy"], ["multi-user.target"])
        self.assertEqual(
            settings["EnvironmentFile"], [f"-{os.path.join(self.ep.path, 'endpoint.env')}"]
        )
        self.assertIn(
            "GLOBUS_SDK_SERVICE_URL_AUTH=https://auth.example.org/", settings["Environment"]
        )
        # The credentials stay out of the unit, and the user is told where they go.
        self.assertNotIn(SECRET, text)
        self.assertNotIn("FUNCX_SDK_CLIENT_ID", settings.get("Environment", []))
        self.assertIn("endpoint.env", self.output)
        self.assertIn("systemctl daemon-reload && systemctl enable --now", self.output)

    def test_user_unit(self) -> None:
        path = self.enable("--user")
        settings = unit_settings(open(path).read())
        self.assertNotIn("User", settings)
        self.assertEqual(settings["WantedBy"], ["default.target"])
        self.assertIn(
            "systemctl --user daemon-reload && systemctl --user enable --now", self.output
        )
        self.assertIn("loginctl enable-linger", self.output)

    def test_exec_start_runs_the_cli(self) -> None:
        """The unit's command line is one the CLI accepts (run here with --help)."""
        path = self.enable()
        argv = shlex.split(unit_settings(open(path).read())["ExecStart"][0])
        done = subprocess.run(argv + ["--help"], capture_output=True, text=True, env=child_env())
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("--foreground", done.stdout)

    def test_systemd_analyze_verify(self) -> None:
        if shutil.which("systemd-analyze") is None:
            raise SkipTest("systemd-analyze is not installed (scripts/bootstrap-system.sh systemd)")
        for kind in ("--system", "--user"):
            path = self.enable(kind)
            done = subprocess.run(
                ["systemd-analyze", "verify", path], capture_output=True, text=True, timeout=60
            )
            self.assertEqual(done.returncode, 0, done.stderr)
            # Unknown keys and bad values are only warned about: there must be none.
            self.assertNotIn(os.path.basename(path), done.stderr + done.stdout)

    def test_disable_removes_unit_and_link(self) -> None:
        path = self.enable()
        wants = os.path.join(self.unit_dir, "multi-user.target.wants")
        os.makedirs(wants)
        link = os.path.join(wants, os.path.basename(path))
        os.symlink(path, link)
        result = self.fx("disable-on-boot", "boot", "--system", "--unit-dir", self.unit_dir)
        self.assertEqual(result.exit_code, 0, result.output)
        self.assertFalse(os.path.exists(path))
        self.assertFalse(os.path.lexists(link))
        again = self.fx("disable-on-boot", "boot", "--system", "--unit-dir", self.unit_dir)
        self.assertEqual(again.exit_code, 1)
        self.assertIn("nothing to disable", again.output)

    def test_default_user_place_and_systemd_detection(self) -> None:
        """Without --unit-dir a user unit goes to $XDG_CONFIG_HOME/systemd/user;
        where systemd does not run, the commands are printed, not run."""
        if systemd_running():
            raise SkipTest("systemd runs here: the command would call systemctl")
        config_home = os.path.abspath(self.mktemp())
        self.env["XDG_CONFIG_HOME"] = config_home
        result = self.fx("enable-on-boot", "boot", "--user")
        self.assertEqual(result.exit_code, 0, result.output)
        path = os.path.join(config_home, "systemd", "user", unit_name(self.ep))
        self.assertTrue(os.path.isfile(path))
        self.assertIn("systemd is not running here", result.output)
        result = self.fx("disable-on-boot", "boot", "--user")
        self.assertEqual(result.exit_code, 0, result.output)
        self.assertFalse(os.path.exists(path))

    def test_delete_points_at_a_unit_left(self) -> None:
        if systemd_running():
            raise SkipTest("systemd runs here: the command would call systemctl")
        self.env["XDG_CONFIG_HOME"] = os.path.abspath(self.mktemp())
        self.assertEqual(self.fx("enable-on-boot", "boot", "--user").exit_code, 0)
        result = self.fx("delete", "boot", "--yes")
        self.assertEqual(result.exit_code, 0, result.output)
        self.assertIn("disable-on-boot boot", result.output)
        self.assertEqual(self.fx("disable-on-boot", "boot", "--user").exit_code, 0)

    def test_unknown_endpoint(self) -> None:
        result = self.fx("enable-on-boot", "nope", "--unit-dir", self.unit_dir)
        self.assertEqual(result.exit_code, 66)


class UnitNameTests(SynchronousTestCase):
    def test_default_dir_has_plain_name(self) -> None:
        ep = EndpointDir(os.path.expanduser("~/.funcx"), "default")
        self.assertEqual(unit_name(ep), "funcx-endpoint-default.service")

    def test_other_dir_is_told_apart(self) -> None:
        a = unit_name(EndpointDir("/srv/a", "default"))
        b = unit_name(EndpointDir("/srv/b", "default"))
        self.assertNotEqual(a, b)
        self.assertTrue(a.startswith("funcx-endpoint-default-"))

    def test_quote_word(self) -> None:
        self.assertEqual(quote_word("/usr/bin/python3"), "/usr/bin/python3")
        self.assertEqual(quote_word("/a b/c"), '"/a b/c"')
        self.assertEqual(quote_word("100%"), '"100%%"')
        self.assertEqual(quote_word("$HOME"), '"$$HOME"')


def _owner_name(path: str) -> str:
    import pwd

    return pwd.getpwuid(os.stat(path).st_uid).pw_name


class UnitRunsTheEndpointTests(SynchronousTestCase):
    """What the unit runs, run as systemd would (its ExecStart, WorkingDirectory,
    EnvironmentFile and Environment; TERM to the main process on stop), against
    the real service: the endpoint gets ready, and TERM makes it exit 0, which
    Restart=on-failure does not restart."""

    def test_exec_start_runs_the_endpoint(self) -> None:
        import signal
        import sys

        from funcx_endpoint.endpoint.layout import EndpointState
        from funcx_endpoint.testing.service import shared_service
        from tests.support import alive, endpoint_processes, run_cli, wait_for

        service = shared_service()
        client_id, secret = service.create_client()
        env = service.client_env((client_id, secret))
        config_dir = os.path.abspath(self.mktemp())
        configured = configure_endpoint(config_dir, "booted", service, env)
        self.assertEqual(configured.returncode, 0, configured.stderr)
        ep = EndpointDir(config_dir, "booted")
        # The credentials go to the EnvironmentFile, not into the unit.
        env_file = os.path.join(ep.path, "endpoint.env")
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"FUNCX_SDK_CLIENT_ID={client_id}\nFUNCX_SDK_CLIENT_SECRET={secret}\n")
        unit_dir = os.path.abspath(self.mktemp())
        bare = {k: v for k, v in env.items() if not k.startswith("FUNCX_SDK_")}
        enabled = run_cli(config_dir, "enable-on-boot", "booted", "--unit-dir", unit_dir, env=bare)
        self.assertEqual(enabled.returncode, 0, enabled.stderr)
        self.assertNotIn("Credentials:", enabled.stdout)  # the file exists
        with open(os.path.join(unit_dir, unit_name(ep))) as f:
            text = f.read()
        self.assertNotIn(secret, text)
        settings = unit_settings(text)

        unit_env = {k: v for k, v in child_env().items() if not k.startswith(("FUNCX_", "GLOBUS_"))}
        unit_env.update({k: v for k, v in bare.items() if k.startswith("GLOBUS_")})
        for assignment in settings.get("Environment", []):
            key, value = shlex.split(assignment)[0].split("=", 1)
            unit_env[key] = value
        with open(settings["EnvironmentFile"][0].lstrip("-")) as f:
            for line in f:
                key, value = line.strip().split("=", 1)
                unit_env[key] = value
        argv = shlex.split(settings["ExecStart"][0])
        self.assertEqual(argv[0], sys.executable)
        process = subprocess.Popen(
            argv,
            cwd=settings["WorkingDirectory"][0],
            env=unit_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.addCleanup(lambda: process.poll() is None and process.kill())
        ready = wait_for(
            lambda: (
                process.poll() is None
                and ep.state() is EndpointState.RUNNING
                and ep.endpoint_id() is not None
                and "broker tasks connection: connected"
                in run_cli(config_dir, "status", "booted").stdout
            ),
            60,
        )
        if not ready:
            process.kill()
            self.fail(process.communicate()[0].decode(errors="replace")[-3000:])
        pid = ep.read_pid()
        process.send_signal(signal.SIGTERM)  # KillMode=mixed: the main process only
        output, _ = process.communicate(timeout=60)
        # twistd ends by re-raising the TERM it stopped for; systemd counts an exit
        # by SIGTERM as clean (SuccessExitStatus's default), so no restart follows.
        self.assertIn(
            process.returncode, (0, -signal.SIGTERM), output.decode(errors="replace")[-3000:]
        )
        self.assertIn(b"Starting endpoint 'booted' in the foreground", output)
        self.assertEqual(alive(endpoint_processes(ep, pid)), [])
        self.assertEqual(ep.state(), EndpointState.STOPPED)
