"""Where an endpoint keeps its files, and what state they say it is in.

``~/.funcx/<name>/`` (``-c/--config-dir`` overrides ``~/.funcx``) holds
``config.py``, ``endpoint.json``, ``daemon.pid``, ``endpoint.log`` and the
``unacked_results/`` spool.  The state shown by ``funcx-endpoint list`` is
derived from those files alone (PROTOCOL.md section 5).
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
import time
from typing import Any, Dict, Optional

from funcx_endpoint.files import write_atomically
from funcx_endpoint.procs import (
    command_line_has,
    read_daemon_info,
    read_daemon_session,
    read_pidfile,
    this_host,
    write_daemon_info,
)

DEFAULT_CONFIG_DIR = os.path.join("~", ".funcx")
#: Set to the endpoint's directory in the environment of the daemon's
#: children (managers, workers, what tasks start): how ``stop`` finds what a
#: daemon killed with ``kill -9`` left behind.
OWNER_ENV = "FUNCX_ENDPOINT_DIR"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 100


class EndpointState(enum.Enum):
    """The states ``list`` shows, as PROTOCOL.md section 5 defines them."""

    INITIALIZED = "Initialized"
    RUNNING = "Running"
    STOPPED = "Stopped"
    DISCONNECTED = "Disconnected"
    #: The daemon runs (or ran) on another host sharing this directory (a
    #: second login node): nothing here can tell whether it is alive.
    ELSEWHERE = "Running elsewhere"


class BadEndpointName(ValueError):
    """An endpoint name that cannot be a directory name."""


class AlreadyRunning(Exception):
    """Another daemon of the same endpoint holds its instance lock."""


def check_name(name: str) -> str:
    """Return ``name`` if it can name an endpoint, else raise BadEndpointName."""
    if not NAME_PATTERN.fullmatch(name):
        raise BadEndpointName(
            f"bad endpoint name {name!r}: use letters, digits, '.', '_' and '-', "
            f"starting with a letter or digit (at most 100 characters)"
        )
    return name


def resolve_config_dir(config_dir: Optional[str]) -> str:
    """The absolute config directory: the given one, or ``~/.funcx``."""
    return os.path.abspath(os.path.expanduser(config_dir or DEFAULT_CONFIG_DIR))


def ensure_private_dir(path: str) -> None:
    """Create ``path`` (and parents) and make it 0700."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)


def is_endpoint_process(pid: int) -> bool:
    """True if ``pid`` is alive and runs funcx-endpoint (guards against pid reuse)."""
    return command_line_has(pid, b"funcx-endpoint", b"funcx_endpoint")


class EndpointDir:
    """The files of one endpoint profile: ``<config_dir>/<name>/``."""

    def __init__(self, config_dir: str, name: str) -> None:
        self.config_dir = resolve_config_dir(config_dir)
        self.name = check_name(name)
        self.path = os.path.join(self.config_dir, name)

    def __repr__(self) -> str:
        return f"EndpointDir({self.config_dir!r}, {self.name!r})"

    @property
    def config_file(self) -> str:
        return os.path.join(self.path, "config.py")

    @property
    def endpoint_json(self) -> str:
        return os.path.join(self.path, "endpoint.json")

    @property
    def pidfile(self) -> str:
        return os.path.join(self.path, "daemon.pid")

    @property
    def spool_dir(self) -> str:
        return os.path.join(self.path, "unacked_results")

    @property
    def daemon_info_file(self) -> str:
        return os.path.join(self.path, "daemon.json")

    @property
    def lock_file(self) -> str:
        return os.path.join(self.path, "daemon.lock")

    def hold_lock(self, wait: float = 2.0) -> Optional[int]:
        """Take the endpoint's instance lock, for as long as this process lives.

        Returns the lock's file descriptor (keep it open; it survives twistd's
        fork into a daemon), or None where the file system has no ``flock``
        (some NFS and Lustre mounts): then only the pidfile guards.  Raises
        AlreadyRunning if another daemon holds it after ``wait`` seconds
        (``list`` probes it for a moment).
        """
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise AlreadyRunning(
                        f"endpoint {self.name!r} is already running: another daemon "
                        f"holds {self.lock_file}"
                    ) from None
                time.sleep(0.05)
            except OSError:  # ENOLCK, EOPNOTSUPP ...: no locks on this file system
                os.close(fd)
                return None

    def lock_held(self) -> bool:
        """True while a daemon of this endpoint is alive (it holds the lock)."""
        try:
            fd = os.open(self.lock_file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:  # no locks on this file system
            return False
        finally:
            os.close(fd)
        return False

    def runs_this_endpoint(self, pid: int) -> bool:
        """True if ``pid``'s command line is twistd running this very endpoint
        (``--name NAME --config-dir DIR``, as ``start`` runs it)."""
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            return False
        wanted = [
            [b"--name", self.name.encode()],
            [b"--config-dir", self.config_dir.encode()],
        ]
        return all(any(argv[i : i + 2] == pair for i in range(len(argv) - 1)) for pair in wanted)

    def owns(self, pid: int) -> bool:
        """True if ``pid`` is this endpoint's live daemon (not a reused pid).

        The daemon holds ``daemon.lock``; where it cannot (no ``flock`` on the
        file system, or a daemon of an earlier version), its command line
        naming this endpoint is taken as proof instead.
        """
        if not is_endpoint_process(pid):
            return False
        return self.lock_held() or self.runs_this_endpoint(pid)

    def log_file(self, log_dir: Optional[str] = None) -> str:
        """``endpoint.log`` in ``log_dir``; a relative ``log_dir`` is under the
        endpoint's directory (funcX 1.0's daemon ran in it), None is that directory."""
        return os.path.join(self.path, log_dir or "", "endpoint.log")

    @property
    def control_socket(self) -> str:
        """Path of the daemon's control socket (owner only).

        It lives in the endpoint directory unless that path is too long for a
        UNIX socket; then in a private per-user directory under the temp dir,
        named by a hash of the endpoint directory.
        """
        local = os.path.join(self.path, "control.sock")
        if len(local.encode()) <= _MAX_SOCKET_PATH:
            return local
        digest = hashlib.sha256(self.path.encode()).hexdigest()[:24]
        return os.path.join(private_runtime_dir(), f"{digest}.sock")

    def exists(self) -> bool:
        return os.path.isfile(self.config_file)

    def read_pid(self) -> Optional[int]:
        """The pid in ``daemon.pid``, or None if there is no pidfile (-1: garbled, stale)."""
        return read_pidfile(self.pidfile)

    def remove_pidfile(self) -> None:
        try:
            os.unlink(self.pidfile)
        except FileNotFoundError:
            pass

    def write_daemon_info(self, pid: int, session: Optional[int]) -> None:
        """Record the daemon's pid and the session it owns (None: not its own)."""
        write_daemon_info(self.daemon_info_file, pid, session)

    def remove_daemon_info(self) -> None:
        try:
            os.unlink(self.daemon_info_file)
        except FileNotFoundError:
            pass

    def daemon_session(self, pid: int) -> Optional[int]:
        """The session the daemon ``pid`` owns, if it recorded one.

        A daemonized endpoint leads (or inherited from twistd's intermediate
        process) a session of its own; ``stop`` kills what is left in it while
        the daemon is alive (once it is gone, the id may be reused: leftovers
        are then found by their marker).  A foreground endpoint shares the
        user's terminal session and records none.
        """
        return read_daemon_session(self.daemon_info_file, pid)

    def read_endpoint_json(self) -> Dict[str, Any]:
        try:
            with open(self.endpoint_json) as f:
                data = json.load(f)
        except (FileNotFoundError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def endpoint_id(self) -> Optional[str]:
        value = self.read_endpoint_json().get("endpoint_id")
        return str(value) if value else None

    def write_endpoint_json(self, data: Dict[str, Any]) -> None:
        write_atomically(
            self.endpoint_json, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"
        )

    def daemon_host(self) -> Optional[str]:
        """The host the daemon of ``daemon.pid`` recorded it runs on, if it did."""
        pid = self.read_pid()
        if pid is None or pid < 0:
            return None
        host = read_daemon_info(self.daemon_info_file, pid).get("host")
        return host if isinstance(host, str) and host else None

    def runs_elsewhere(self) -> Optional[str]:
        """The other host the daemon runs on (with this directory shared), if so."""
        host = self.daemon_host()
        return host if host is not None and host != this_host() else None

    def state(self) -> EndpointState:
        """Derive the state from the files, as PROTOCOL.md section 5 says; a
        daemon of another host is :attr:`EndpointState.ELSEWHERE`, never taken
        for a dead one here."""
        pid = self.read_pid()
        if pid is not None:
            if self.runs_elsewhere():
                return EndpointState.ELSEWHERE
            if self.owns(pid):
                return EndpointState.RUNNING

            return EndpointState.DISCONNECTED
        if not os.path.exists(self.endpoint_json):
            return EndpointState.INITIALIZED
        return EndpointState.STOPPED


def private_runtime_dir() -> str:
    """A 0700 directory owned by this user for sockets with long paths."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = os.path.join(base, f"funcx-endpoint-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or stat.S_IMODE(info.st_mode) & 0o077
    ):
        raise RuntimeError(
            f"{path} is not a private directory of this user; remove it and try again"
        )
    return path


def list_endpoints(config_dir: str) -> list[EndpointDir]:
    """Every endpoint profile in ``config_dir`` (directories with a config.py)."""
    config_dir = resolve_config_dir(config_dir)
    result = []
    try:
        names = sorted(os.listdir(config_dir))
    except FileNotFoundError:
        return []
    for name in names:
        if not NAME_PATTERN.fullmatch(name):
            continue
        ep = EndpointDir(config_dir, name)
        if ep.exists():
            result.append(ep)
    return result
