"""The test run's own container engines: a private Podman setup and Docker daemon.

Like the RabbitMQ node of the tests (:mod:`~funcx_endpoint.testing.rabbitmq`),
each engine is the real Debian package run by this process with all its state
in one temporary directory, so the tests neither need nor touch the machine's
own engine setup, and no registry is reached:

* :class:`PodmanSetup`: ``podman`` with a ``containers.conf`` (runtime
  ``runc``, ``cgroupfs``, file events, ``nofile``/``nproc`` ulimits of 4096)
  and a ``storage.conf`` (``overlay`` driver, or ``vfs`` where overlay cannot
  mount; private graph root and run root),
  both given through ``CONTAINERS_CONF`` / ``CONTAINERS_STORAGE_CONF`` in the
  environment of every ``podman`` command, the manager's included.  Podman
  has no daemon: "starting" it only writes the files.
* :class:`DockerDaemon`: ``dockerd --iptables=false --bridge=none`` with its
  own ``--data-root``, ``--exec-root``, pid file and socket (``-H unix://``),
  and ``DOCKER_HOST`` pointing the ``docker`` CLI at it.  A watchdog
  (:mod:`~funcx_endpoint.testing.watchdog`) stops it if this process dies.

Both import the worker image from a root filesystem made from this machine's
Python (:mod:`~funcx_endpoint.testing.rootfs`) as :data:`WORKER_IMAGE`, and
can tag it under more names (several container types of the same content).
:func:`shared_podman` and :func:`shared_docker` give every test of a process
the same engine, started on first use and stopped at exit.  They raise
:class:`unittest.SkipTest` with the reason when the engine cannot run here
(not root, a package missing).

Blocking calls (``subprocess``): for test setup and scripts, not a reactor's
thread.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest
from typing import Dict, List, Optional, Sequence

from funcx_endpoint.testing.rootfs import write_worker_rootfs
from funcx_endpoint.testing.shared import SharedInstance
from funcx_endpoint.testing.watchdog import Watchdog

__all__ = [
    "WORKER_IMAGE",
    "DockerDaemon",
    "EngineError",
    "PodmanSetup",
    "shared_docker",
    "shared_podman",
    "worker_rootfs",
]

#: The name the worker image is imported as, in each engine.
WORKER_IMAGE = "localhost/funcx-worker:test"

#: Debian packages each engine needs (bootstrap-system.sh installs them).
PACKAGES = {"podman": ("podman", "runc"), "docker": ("docker.io", "runc")}


class EngineError(Exception):
    """An engine command failed (its output is in the message)."""


def _skip_unless_usable(engine: str, binaries: Sequence[str]) -> None:
    if os.geteuid() != 0:
        raise unittest.SkipTest(f"{engine} tests need root (rootless engines need setup)")
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        raise unittest.SkipTest(
            f"{engine} tests need {', '.join(missing)} (apt-get install "
            f"{' '.join(PACKAGES[engine])}, or scripts/bootstrap-system.sh containers)"
        )


_rootfs_lock = threading.Lock()
_rootfs: Optional[str] = None


def worker_rootfs() -> str:
    """The tar of the worker image's root filesystem, written once per process."""
    global _rootfs
    with _rootfs_lock:
        if _rootfs is None or not os.path.exists(_rootfs):
            directory = tempfile.mkdtemp(prefix="funcx-rootfs-")
            path = os.path.join(directory, "rootfs.tar")
            write_worker_rootfs(path)
            import atexit

            atexit.register(shutil.rmtree, directory, True)
            _rootfs = path
        return _rootfs


def _unmount_under(directory: str) -> None:
    """Unmount (lazily) whatever an engine left mounted under ``directory``."""
    try:
        with open("/proc/self/mounts") as handle:
            points = [line.split()[1] for line in handle]
    except OSError:
        return
    prefix = directory.rstrip("/") + "/"
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False, timeout=30)


class _Engine:
    """What both engines share: a directory, an environment, the CLI."""

    name = ""

    def __init__(self) -> None:
        # Short: a unix socket's path must fit in 108 bytes.
        self.base_dir = tempfile.mkdtemp(prefix=f"fx-{self.name}-", dir="/tmp")
        self.started = False
        self.image_seconds: Optional[float] = None

    def environment(self) -> Dict[str, str]:
        """The variables every command of this engine needs (the manager's too)."""
        raise NotImplementedError

    def env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """``base`` (default: this process's environment) with :meth:`environment`."""
        merged = dict(os.environ if base is None else base)
        merged.update(self.environment())
        return merged

    def command(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        """Run the engine's CLI; its output (EngineError if it fails and ``check``)."""
        result = subprocess.run(
            [self.name, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise EngineError(
                f"{self.name} {' '.join(args)} exited with {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result.stdout

    def import_worker_image(self, names: Sequence[str] = ()) -> None:
        """Import :data:`WORKER_IMAGE` (once), and tag it as each of ``names``."""
        if self.image_seconds is None:
            started = time.monotonic()
            self.command("import", worker_rootfs(), WORKER_IMAGE, timeout=300)
            self.image_seconds = time.monotonic() - started
        for name in names:
            self.command("tag", WORKER_IMAGE, name)

    def remove_image(self, name: str) -> None:
        self.command("rmi", "-f", name, check=False)

    def kill_container(self, name: str) -> None:
        """``kill`` the container ``name`` (SIGKILL)."""
        self.command("kill", name)

    def containers(self) -> List[str]:
        """The names of the running containers."""
        return self.command("ps", "--format", "{{.Names}}").split()


class PodmanSetup(_Engine):
    """Podman with private configuration and storage (see the module docstring)."""

    name = "podman"
    driver = "overlay"

    def environment(self) -> Dict[str, str]:
        return {
            "CONTAINERS_CONF": os.path.join(self.base_dir, "containers.conf"),
            "CONTAINERS_STORAGE_CONF": os.path.join(self.base_dir, "storage.conf"),
        }

    def start(self) -> None:
        if self.started:
            return
        _skip_unless_usable("podman", ["podman", "runc"])
        base = self.base_dir
        for sub in ("storage", "run", "tmp", "volumes", "networks"):
            os.makedirs(os.path.join(base, sub), exist_ok=True)
        with open(os.path.join(base, "containers.conf"), "w") as handle:
            handle.write(
                "[containers]\n"
                'default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]\n'
                "[network]\n"
                f'network_config_dir = "{base}/networks"\n'
                "[engine]\n"
                'runtime = "runc"\n'
                'cgroup_manager = "cgroupfs"\n'
                'events_logger = "file"\n'
                f'events_logfile_path = "{base}/events.log"\n'
                f'tmp_dir = "{base}/tmp"\n'
                f'volume_path = "{base}/volumes"\n'
            )
        with open(os.path.join(base, "storage.conf"), "w") as handle:
            handle.write(
                f'[storage]\ndriver = "vfs"\ngraphroot = "{base}/storage"\nrunroot = "{base}/run"\n'
            )
        self.command("info", "--format", "{{.Host.OCIRuntime.Name}}")
        self.started = True

    def stop(self) -> None:
        if os.path.exists(os.path.join(self.base_dir, "storage.conf")):
            self.command("rm", "--all", "--force", "--time", "0", check=False)
            self.command("rmi", "--all", "--force", check=False)
        _unmount_under(self.base_dir)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.started = False


_DOCKERD_CLEANUP = r"""
pid, base = int(sys.argv[1]), sys.argv[2]
try:
    os.kill(pid, signal.SIGTERM)
    for _ in range(150):
        os.kill(pid, 0)
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
except OSError:
    pass
shutil.rmtree(base, ignore_errors=True)
"""


class DockerDaemon(_Engine):
    """A private ``dockerd`` (see the module docstring)."""

    name = "docker"
    start_timeout = 60.0

    def __init__(self) -> None:
        super().__init__()
        self.socket = os.path.join(self.base_dir, "docker.sock")
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._watchdog: Optional[Watchdog] = None

    def environment(self) -> Dict[str, str]:
        return {"DOCKER_HOST": f"unix://{self.socket}"}

    @property
    def log_path(self) -> str:
        return os.path.join(self.base_dir, "dockerd.log")

    def start(self) -> None:
        if self.started:
            return
        _skip_unless_usable("docker", ["dockerd", "docker", "runc"])
        base = self.base_dir
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [
                    "dockerd",
                    "--iptables=false",
                    "--bridge=none",
                    f"--data-root={base}/data",
                    f"--exec-root={base}/exec",
                    f"--pidfile={base}/dockerd.pid",
                    f"--host=unix://{self.socket}",
                    "--config-file=" + self._config_file(),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self._watchdog = Watchdog(_DOCKERD_CLEANUP, [str(self._process.pid), base])
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._process.poll() is not None:
                self.stop()
                raise EngineError(f"dockerd exited at start: {self._log_tail()}")
            if os.path.exists(self.socket) and (
                self.command("version", "--format", "{{.Server.Version}}", check=False).strip()
            ):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise EngineError(f"dockerd did not answer within {self.start_timeout:g} s")
            time.sleep(0.2)
        self.started = True

    def _config_file(self) -> str:
        path = os.path.join(self.base_dir, "daemon.json")
        with open(path, "w") as handle:
            handle.write(
                '{"default-ulimits": {"nofile": {"Name": "nofile", "Soft": 4096, "Hard": 4096}}}\n'
            )
        return path

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as handle:
                return handle.read()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            self.command(
                "rm", "--force", *self.command("ps", "-aq", check=False).split(), check=False
            )
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._process = None
        if self._watchdog is not None:
            self._watchdog.release(timeout=5)
            self._watchdog = None
        _unmount_under(self.base_dir)
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.started = False


def _start(engine: _Engine) -> None:
    engine.start()  # type: ignore[attr-defined]


def _stop(engine: _Engine) -> None:
    engine.stop()  # type: ignore[attr-defined]


#: The process's Podman setup (worker image imported), made on first use.
shared_podman: SharedInstance[PodmanSetup] = SharedInstance(PodmanSetup, _start, _stop)
#: The process's Docker daemon (worker image imported), made on first use.
shared_docker: SharedInstance[DockerDaemon] = SharedInstance(DockerDaemon, _start, _stop)
