"""The package installed the ways people install it, each into a scratch virtualenv:
``pip install -e .`` (setuptools' default editable mode, no config settings) and
``pip install .``; and the runner the CLIs start their daemons with.

Quick and offline: the scratch virtualenv sees this environment's site-packages
through a ``.pth`` file (the dependencies, pip and setuptools are already there),
and pip installs only this project, from a copy of the checkout, with
``--no-deps --no-build-isolation --no-index``.  Child processes get no
``PYTHONPATH``: what they import is what the install provides.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from typing import Dict, List, Optional

import attr
from twisted.application.service import IServiceMaker
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from funcx_endpoint.service_makers import funcx_endpoint, funcx_service
from funcx_endpoint.twistd import ServerOptions
from tests.support import REPO_ROOT

# What a build needs from the checkout: the top-level files and the packages.
PACKAGE_DIRS = ("funcx_endpoint", "twisted")
TWISTD = "from twisted.scripts.twistd import run; run()"
# Where twisted.plugins looks for plugin modules, and whether ours is among them.
PLUGIN_PROBE = (
    "import json, twisted.plugins, funcx_endpoint; "
    "print(json.dumps([list(twisted.plugins.__path__), funcx_endpoint.__file__]))"
)


def missing_tools() -> Optional[str]:
    """Why the install tests cannot run here, or None."""
    for module in ("pip", "setuptools", "venv"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed in this environment"
    if not os.path.exists(os.path.join(REPO_ROOT, "setup.py")):
        return f"no checkout with setup.py at {REPO_ROOT}"
    return None


def copy_checkout(dest: str) -> None:
    """The files a build reads: top-level files and the package directories."""
    os.makedirs(dest)
    for name in os.listdir(REPO_ROOT):
        path = os.path.join(REPO_ROOT, name)
        if os.path.isfile(path):
            shutil.copy2(path, dest)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    for name in PACKAGE_DIRS:
        shutil.copytree(os.path.join(REPO_ROOT, name), os.path.join(dest, name), ignore=ignore)


def this_environment_site_dirs() -> List[str]:
    dirs = site.getsitepackages() + [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


@attr.s(auto_attribs=True)
class ScratchInstall:
    """This project installed into a scratch virtualenv of its own."""

    root: str
    source: str  # the copy of the checkout that was installed
    venv: str
    site_packages: str
    install_output: str

    @property
    def python(self) -> str:
        return os.path.join(self.venv, "bin", "python")

    def script(self, name: str) -> str:
        return os.path.join(self.venv, "bin", name)

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("PYTHON", "FUNCX_", "GLOBUS_SDK", "PIP_")) and k != "VIRTUAL_ENV"
        }
        env.update(
            PATH=os.path.join(self.venv, "bin") + os.pathsep + env.get("PATH", ""),
            PIP_DISABLE_PIP_VERSION_CHECK="1",
            PIP_NO_INPUT="1",
        )
        env.update(extra or {})
        return env

    def run(
        self, *argv: str, extra_env: Optional[Dict[str, str]] = None, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` in the scratch environment, in its root directory (not
        the checkout: a current directory on ``sys.path`` would hide the install)."""
        return subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            cwd=self.root,
            env=self.env(extra_env),
            timeout=timeout,
        )


def scratch_install(test: SynchronousTestCase, *, editable: bool) -> ScratchInstall:
    """Install a copy of this checkout into a new virtualenv, ``-e`` if ``editable``."""
    reason = missing_tools()
    if reason:
        raise SkipTest(reason)
    root = os.path.abspath(test.mktemp())
    os.makedirs(root)
    source = os.path.join(root, "src")
    copy_checkout(source)
    venv = os.path.join(root, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=60)
    site_packages = subprocess.run(
        [
            os.path.join(venv, "bin", "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_path('purelib'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Named to sort after the .pth files pip installs: their paths come first.
    with open(os.path.join(site_packages, "zz-base-environment.pth"), "w") as f:
        f.write("".join(d + "\n" for d in this_environment_site_dirs()))
    scratch = ScratchInstall(root, source, venv, site_packages, "")
    flags = ["--no-deps", "--no-build-isolation", "--no-index"]
    target = ["-e", source] if editable else [source]
    result = scratch.run(scratch.python, "-m", "pip", "install", *flags, *target, timeout=300)
    test.assertEqual(result.returncode, 0, result.stdout + result.stderr)
    scratch.install_output = result.stdout + result.stderr
    return scratch


class InstalledPackageTests:
    """What every kind of install must give; mixed into a test case per kind."""

    editable: bool
    scratch: ScratchInstall

    def setUp(self) -> None:
        self.scratch = scratch_install(self, editable=self.editable)  # type: ignore[arg-type]

    def plugin_dir(self) -> str:
        """Where twistd's plugin scan must find ``funcx_plugins.py``."""
        raise NotImplementedError

    def package_dir(self) -> str:
        raise NotImplementedError

    def test_twistd_finds_the_plugins(self) -> None:
        result = self.scratch.run(self.scratch.python, "-c", TWISTD, "--help")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"funcx-endpoint\s+Run a funcX endpoint")
        self.assertRegex(result.stdout, r"funcx-service\s+Run a private funcX web service")
        # Found where this install put them (not in another environment's copy).
        probe = self.scratch.run(self.scratch.python, "-c", PLUGIN_PROBE)
        self.assertEqual(probe.returncode, 0, probe.stderr)
        plugin_path, package_file = json.loads(probe.stdout)
        self.assertIn(self.plugin_dir(), plugin_path)
        self.assertEqual(os.path.dirname(package_file), self.package_dir())
        self.assertTrue(os.path.exists(os.path.join(self.plugin_dir(), "funcx_plugins.py")))
        self.assertFalse(os.path.exists(os.path.join(self.plugin_dir(), "__init__.py")))

    def test_twistd_plugin_options(self) -> None:
        for name, text in [
            ("funcx-endpoint", "--config-dir"),
            ("funcx-service", "--state-dir"),
        ]:
            for argv in [["-c", TWISTD], ["-m", "funcx_endpoint.twistd"]]:
                result = self.scratch.run(self.scratch.python, *argv, name, "--help")
                self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
                self.assertIn(f"[options] {name} [options]", result.stdout)
                self.assertIn(text, result.stdout)

    def test_cli_starts_the_endpoint(self) -> None:
        """``funcx-endpoint start`` of this install: the daemon starts, reports
        ready (registered with the test run's service), and stops."""
        from funcx_endpoint.testing.service import shared_service

        service = shared_service()
        env = service.client_env(service.create_client())
        config_dir = os.path.join(self.scratch.root, "endpoints")
        cli = self.scratch.script("funcx-endpoint")

        def endpoint(*args: str) -> subprocess.CompletedProcess:
            result = self.scratch.run(cli, "-c", config_dir, *args, extra_env=env)
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
            return result

        endpoint(
            "configure",
            "ep1",
            "--service-address",
            service.base_url,
            "--service-ca-file",
            service.ca_file,
            "--amqp-ca-file",
            service.broker_ca_file,
        )
        self.addCleanup(self.scratch.run, cli, "-c", config_dir, "stop", "ep1", extra_env=env)
        started = endpoint("start", "ep1")
        self.assertIn("Endpoint 'ep1' is running", started.stdout)
        status = endpoint("status", "ep1")
        self.assertIn("Endpoint 'ep1': Running", status.stdout)
        self.assertIn("broker tasks connection: connected", status.stdout)
        with open(os.path.join(config_dir, "ep1", "daemon.pid")) as f:
            pid = int(f.read())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
        # This install's interpreter runs our runner.
        self.assertEqual(
            cmdline[:3], [self.scratch.python.encode(), b"-m", b"funcx_endpoint.twistd"]
        )
        stopped = endpoint("stop", "ep1")
        self.assertIn(f"Endpoint 'ep1' stopped (pid {pid}", stopped.stdout)


class EditableInstallTests(InstalledPackageTests, SynchronousTestCase):
    """``pip install -e .``, setuptools' default editable mode."""

    editable = True

    def plugin_dir(self) -> str:
        return os.path.join(self.scratch.source, "twisted", "plugins")

    def package_dir(self) -> str:
        return os.path.join(self.scratch.source, "funcx_endpoint")

    def test_no_import_hook(self) -> None:
        """A static .pth puts the checkout on sys.path (an import hook mapping
        only our packages would hide twisted/plugins from the plugin scan)."""
        pth = [n for n in os.listdir(self.scratch.site_packages) if n.startswith("__editable__")]
        self.assertEqual(len(pth), 1, pth)
        with open(os.path.join(self.scratch.site_packages, pth[0])) as f:
            self.assertEqual(f.read().strip(), self.scratch.source)
        self.assertNotIn("BuildBackendWarning", self.scratch.install_output)


class WheelInstallTests(InstalledPackageTests, SynchronousTestCase):
    """``pip install .``: a regular (wheel) install."""

    editable = False

    def plugin_dir(self) -> str:
        return os.path.join(self.scratch.site_packages, "twisted", "plugins")

    def package_dir(self) -> str:
        return os.path.join(self.scratch.site_packages, "funcx_endpoint")


class RunnerTests(SynchronousTestCase):
    """``python -m funcx_endpoint.twistd``: twistd that knows our ServiceMakers itself."""

    def test_daemons_tune_the_garbage_collector(self) -> None:
        import gc

        from funcx_endpoint.twistd import GC_THRESHOLDS, run_app, tune_garbage_collector

        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        gc.set_threshold(700, 10, 10)
        self.assertEqual(tune_garbage_collector(), (700, 10, 10))
        self.assertEqual(gc.get_threshold(), GC_THRESHOLDS)
        self.assertGreaterEqual(GC_THRESHOLDS[0], 50_000)
        gc.set_threshold(700, 10, 10)
        self.patch(sys, "stdout", io.StringIO())
        with self.assertRaises(SystemExit):
            run_app(["--version"])
        self.assertEqual(gc.get_threshold(), GC_THRESHOLDS)

    def test_subcommands_without_plugin_scan(self) -> None:
        self.assertEqual(ServerOptions._getPlugins(IServiceMaker), [funcx_endpoint, funcx_service])
        self.assertEqual(ServerOptions._getPlugins(object), [])
        options = ServerOptions()
        self.assertEqual(
            [name for name, *_ in options.subCommands], ["funcx-endpoint", "funcx-service"]
        )
        self.assertEqual(
            options.loadedPlugins,
            {"funcx-endpoint": funcx_endpoint, "funcx-service": funcx_service},
        )

    def test_parses_twistd_arguments(self) -> None:
        config_dir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(config_dir, "ep1"))
        with open(os.path.join(config_dir, "ep1", "config.py"), "w"):
            pass
        options = ServerOptions()
        options.parseOptions(
            [
                "--nodaemon",
                "--pidfile",
                "x.pid",
                "funcx-endpoint",
                "--name",
                "ep1",
                "-c",
                config_dir,
            ]
        )
        self.assertTrue(options["nodaemon"])
        self.assertEqual(options["pidfile"], os.path.abspath("x.pid"))
        self.assertEqual(options.subCommand, "funcx-endpoint")
        self.assertEqual(options.subOptions["name"], "ep1")

    def test_plugin_file_reexports_the_makers(self) -> None:
        """twisted/plugins/funcx_plugins.py is one import of these same objects."""
        path = os.path.join(REPO_ROOT, "twisted", "plugins", "funcx_plugins.py")
        namespace: Dict[str, object] = {}
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), namespace)
        self.assertIs(namespace["funcx_endpoint"], funcx_endpoint)
        self.assertIs(namespace["funcx_service"], funcx_service)
