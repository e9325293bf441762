"""A private PostgreSQL server for tests and benchmarks.

:class:`PostgresServer` runs Debian's PostgreSQL (``/usr/lib/postgresql/<v>/bin``;
``scripts/bootstrap-system.sh postgresql`` installs it) as a child of this
process, in a temporary directory, on a free port of 127.0.0.1 (and a socket
in that directory), with password authentication for its superuser.
PostgreSQL refuses to run as root: when this process is root, the server
runs as the ``postgres`` OS user, in a directory that user owns.  Durability
is traded for speed (``fsync=off``): it is for tests.

:func:`shared_postgres` gives every test of a process the same server,
started on first use and stopped at exit: ``atexit`` on a normal exit, and a
watchdog process otherwise (it holds a pipe from this process; when the pipe
reaches end-of-file without a "release", it kills the server and removes its
directory).
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from twisted.internet.defer import Deferred

from funcx_endpoint.testing.shared import SharedInstance
from funcx_endpoint.testing.watchdog import Watchdog

__all__ = [
    "PostgresError",
    "PostgresNotInstalled",
    "PostgresServer",
    "shared_postgres",
    "shared_postgres_async",
    "stop_shared_postgres",
]

BIN_ENV = "FUNCX_TEST_PG_BIN"
_INSTALL_HINT = (
    "Run `scripts/bootstrap-system.sh postgresql` (or `apt-get install postgresql`), "
    f"or set {BIN_ENV} to the directory holding initdb and postgres."
)

# What the server's watchdog does once its owner is gone: kill the server's
# process group and remove its files.
_WATCHDOG_CLEANUP = r"""
pgid = int(sys.argv[1]); base = sys.argv[2]
for sig in (signal.SIGQUIT, signal.SIGKILL):
    try:
        os.killpg(pgid, sig)
    except OSError:
        break
    time.sleep(0.5)
shutil.rmtree(base, ignore_errors=True)
"""


class PostgresError(Exception):
    """The server could not be run."""


class PostgresNotInstalled(PostgresError):
    """initdb/postgres were not found."""


def find_bin_dir() -> str:
    """The directory of ``initdb`` and ``postgres`` (the newest installed version)."""
    configured = os.environ.get(BIN_ENV)
    if configured:
        if os.access(os.path.join(configured, "initdb"), os.X_OK):
            return configured
        raise PostgresNotInstalled(f"{BIN_ENV}={configured} holds no initdb. " + _INSTALL_HINT)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: [int(x) if x.isdigit() else 0 for x in p.split("/")[4].split(".")],
    )
    if not found:
        raise PostgresNotInstalled("PostgreSQL is not installed. " + _INSTALL_HINT)
    return os.path.dirname(found[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A PostgreSQL server of our own; nothing happens until :meth:`start`."""

    def __init__(self, *, start_timeout: float = 60.0) -> None:
        self.start_timeout = start_timeout
        self.base_dir: Optional[str] = None
        self.port: Optional[int] = None
        self.password = secrets.token_urlsafe(18)
        self.user = "postgres"
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._watchdog: Optional[Watchdog] = None
        self._lock = threading.RLock()

    # -- running as whom ----------------------------------------------------------------

    @staticmethod
    def _run_as() -> Dict[str, Any]:
        """subprocess arguments that drop root to the postgres user (else nothing)."""
        if os.getuid() != 0:
            return {}
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresError(
                "running as root and there is no `postgres` OS user to run PostgreSQL as "
                "(it refuses to run as root); " + _INSTALL_HINT
            ) from None
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _chown(self, path: str) -> None:
        if os.getuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(path, pw.pw_uid, pw.pw_gid)

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def url(self, database: str = "postgres") -> str:
        """``postgresql://postgres:<password>@127.0.0.1:<port>/<database>``."""
        if self.port is None:
            raise PostgresError("the server has not been started")
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """initdb (about 1 s), start, and return once it accepts connections."""
        with self._lock:
            if self.running:
                return
            bin_dir = find_bin_dir()
            run_as = self._run_as()
            base = tempfile.mkdtemp(prefix="funcx-pg-")
            self.base_dir = base
            self._chown(base)
            pwfile = os.path.join(base, "pwfile")
            with open(pwfile, "w") as f:
                f.write(self.password + "\n")
            self._chown(pwfile)
            data = os.path.join(base, "data")
            log_path = os.path.join(base, "initdb.log")
            result = self._program(
                subprocess.run,
                [
                    os.path.join(bin_dir, "initdb"),
                    "-D",
                    data,
                    "-U",
                    self.user,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                log_path,
                run_as,
                timeout=120,
            )
            os.unlink(pwfile)
            if result.returncode != 0:
                raise PostgresError(f"initdb failed: {_tail(log_path)}")
            self.port = _free_port()
            server_log = os.path.join(base, "postgres.log")
            self._process = self._program(
                subprocess.Popen,
                [
                    os.path.join(bin_dir, "postgres"),
                    "-D",
                    data,
                    "-p",
                    str(self.port),
                    "-k",
                    base,
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=60",
                ],
                server_log,
                run_as,
                start_new_session=True,
            )
            self._start_watchdog()
            self._await_ready(server_log)

    def _program(
        self,
        run: Callable[..., Any],
        args: List[str],
        log_path: str,
        run_as: Dict[str, Any],
        **options: Any,
    ) -> Any:
        """``run(args, ...)``: a program of the server, in its base directory, as
        ``run_as`` says, with its output in the new file ``log_path``."""
        with open(log_path, "wb") as log:
            self._chown(log_path)
            return run(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                **run_as,
                **options,
            )

    def _start_watchdog(self) -> None:
        assert self._process is not None and self.base_dir is not None
        self._watchdog = Watchdog(_WATCHDOG_CLEANUP, [str(self._process.pid), self.base_dir])

    def _await_ready(self, log_path: str) -> None:
        import psycopg2

        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                self.stop()
                raise PostgresError(f"postgres exited at start: {_tail(log_path)}")
            try:
                psycopg2.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg2.OperationalError as e:
                last = str(e)
                time.sleep(0.1)
        self.stop()
        raise PostgresError(f"postgres did not accept connections ({last}): {_tail(log_path)}")

    def create_database(self, name: Optional[str] = None) -> str:
        """A new empty database; its URL."""
        import psycopg2

        name = name or f"funcx_{secrets.token_hex(6)}"
        connection = psycopg2.connect(self.url())
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f'CREATE DATABASE "{name}"')
        finally:
            connection.close()
        return self.url(name)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (fast shutdown, then kill) and remove its directory."""
        with self._lock:
            process, self._process = self._process, None
            if process is not None:
                if process.poll() is None:
                    try:
                        os.killpg(process.pid, signal.SIGINT)  # fast shutdown
                    except OSError:
                        pass
                    try:
                        process.wait(timeout)
                    except subprocess.TimeoutExpired:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
                # Backends exit with the postmaster; make sure.
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except OSError:
                    pass
            watchdog, self._watchdog = self._watchdog, None
            if watchdog is not None:
                watchdog.release(timeout=10)
            if self.base_dir is not None:
                shutil.rmtree(self.base_dir, ignore_errors=True)
                self.base_dir = None

    def processes(self) -> List[int]:
        """pids of the server's processes still alive (for tests)."""
        import psutil

        if self._process is None:
            return []
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == self._process.pid:
                    found.append(proc.pid)
            except (OSError, psutil.Error):
                continue
        return found


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


_SHARED: SharedInstance[PostgresServer] = SharedInstance(
    PostgresServer, PostgresServer.start, PostgresServer.stop
)


def shared_postgres() -> PostgresServer:
    """The process-wide server, started on first use (about 2 s); stopped at exit."""
    return _SHARED.get()


def shared_postgres_async(reactor: Any) -> Deferred[PostgresServer]:
    return _SHARED.get_async(reactor)


def stop_shared_postgres() -> None:
    _SHARED.stop()
