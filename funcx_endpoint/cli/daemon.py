"""Starting daemons through twistd, and stopping them completely.

Used by ``funcx-endpoint`` (:func:`start_daemon`, :func:`stop_daemon`) and
``funcx-service`` (:func:`launch_daemon`, :func:`stop_process_tree`).
``start`` runs twistd (through :mod:`funcx_endpoint.twistd`, which knows our
ServiceMakers without a plugin scan) in a child process with one extra pipe; the daemon
writes JSON lines on it: progress reports if it has any, then one line once
it is ready or has failed (twistd itself only reports failures raised while
the service starts).  ``stop`` sends TERM, lets the daemon stop its children,
and after a grace period kills whatever is left of its process tree and
session.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import attr
import psutil

from funcx_endpoint.endpoint.layout import OWNER_ENV, EndpointDir
from funcx_endpoint.lifecycle import EX_SOFTWARE, EX_TEMPFAIL
from funcx_endpoint.procs import marked_processes, pid_alive
from funcx_endpoint.twistd import run_app, runner_command

LOGGER = "funcx_endpoint.endpoint.logs.make_observer"


@attr.s(auto_attribs=True)
class StartResult:
    """What ``start`` learned: ready (with the daemon's info) or failed."""

    ok: bool
    exit_code: int
    message: str
    info: Dict[str, Any] = attr.Factory(dict)
    timed_out: bool = False  # no report within the timeout (the daemon may still start)


def twistd_argv(
    ep: EndpointDir,
    *,
    daemon: bool,
    debug: bool,
    ready_fd: Optional[int],
    clear_lock: bool = False,
) -> List[str]:
    """Arguments for twistd (after the program name) to run endpoint ``ep``;
    ``clear_lock``: its owner starts it, which lifts a remote stop's lock."""
    argv = ["--pidfile", ep.pidfile, "--rundir", ep.path, "--logger", LOGGER]
    if not daemon:
        argv += ["--nodaemon"]
    argv += ["funcx-endpoint", "--name", ep.name, "--config-dir", ep.config_dir]
    if not daemon:
        argv.append("--log-stdout")
    if debug:
        argv.append("--debug")
    if ready_fd is not None:
        argv += ["--ready-fd", str(ready_fd)]
    if clear_lock:
        argv.append("--clear-lock")
    return argv


def start_daemon(
    ep: EndpointDir,
    *,
    debug: bool,
    timeout: float,
    log_file: Optional[str] = None,
    command: str = "funcx-endpoint",
    clear_lock: bool = False,
) -> StartResult:
    """Run twistd to daemonize endpoint ``ep``; wait for it to be ready or fail.

    ``log_file`` and ``command`` (the CLI with its options) only go into hints."""
    return launch_daemon(
        lambda fd: twistd_argv(ep, daemon=True, debug=debug, ready_fd=fd, clear_lock=clear_lock),
        cwd=ep.path,
        timeout=timeout,
        read_pid=ep.read_pid,
        status_hint=f"`{command} status {ep.name}`",
        log_hint=log_file or ep.log_file(),
    )


def launch_daemon(
    argv_for: Callable[[int], List[str]],
    *,
    cwd: str,
    timeout: float,
    read_pid: Callable[[], Optional[int]],
    status_hint: str,
    log_hint: str,
    on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> StartResult:
    """Run twistd (``argv_for(ready_fd)`` after the program name) as a daemon and wait.

    The daemon reports on the pipe ``ready_fd`` with JSON lines: any number of
    ``{"state": "progress", ...}`` (passed to ``on_progress``), then one
    ``{"state": "ready", ...}`` or ``{"state": "failed", "exit_code", "message"}``.
    ``read_pid`` reads the daemon's pidfile, to tell a slow start from a death.
    """
    read_fd, write_fd = os.pipe()
    try:
        launcher = subprocess.Popen(
            runner_command() + argv_for(write_fd),
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )
    finally:
        os.close(write_fd)
    try:
        line, timed_out = _read_report(read_fd, timeout, on_progress)
    finally:
        os.close(read_fd)
    # twistd's own launcher exits as soon as the service has started (or failed
    # synchronously); what it printed explains early failures.
    try:
        launcher_output, _ = launcher.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        launcher.kill()
        launcher_output, _ = launcher.communicate()
    output = launcher_output.decode(errors="replace").strip()
    if line is None:
        # On end of file, the daemon we started is gone (it holds the pipe's
        # write end until it reports): a pid in the pidfile is another one's.
        pid = read_pid() if timed_out else None
        if pid and pid_alive(pid):
            return StartResult(
                False,
                EX_TEMPFAIL,
                f"the daemon (pid {pid}) did not report ready within {timeout:g} s; it "
                f"may still be starting: see {status_hint} and {log_hint}",
                {"pid": pid},
                timed_out=True,
            )

        detail = output or f"see {log_hint}"
        return StartResult(
            False,
            launcher.returncode or EX_SOFTWARE,
            f"the daemon exited before it was ready: {detail}",
        )
    try:
        message = json.loads(line)
    except ValueError:
        return StartResult(False, EX_SOFTWARE, f"the daemon sent a garbled report: {line!r}")
    if message.get("state") == "ready":
        return StartResult(True, 0, "ready", message)
    return StartResult(
        False,
        int(message.get("exit_code") or EX_SOFTWARE),
        str(message.get("message") or "unknown failure"),
        message,
    )


def _read_report(
    fd: int, timeout: float, on_progress: Optional[Callable[[Dict[str, Any]], None]]
) -> Tuple[Optional[str], bool]:
    """The first line from ``fd`` that is not a progress report, or None on end
    of file or timeout; and whether the timeout passed."""

    deadline = time.monotonic() + timeout
    data = b""
    while True:
        while b"\n" in data:
            raw, data = data.split(b"\n", 1)
            line = raw.decode(errors="replace")
            try:
                message = json.loads(line)
            except ValueError:
                return line, False
            if isinstance(message, dict) and message.get("state") == "progress":
                if on_progress is not None:
                    on_progress(message)
                continue
            return line, False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None, True
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return None, True
        chunk = os.read(fd, 65536)
        if not chunk:
            return None, False
        data += chunk


def run_foreground(ep: EndpointDir, *, debug: bool, clear_lock: bool = False) -> int:
    """Run the daemon in this process, attached to the terminal; its exit code."""
    from funcx_endpoint.endpoint.service import exit_status

    run_app(twistd_argv(ep, daemon=False, debug=debug, ready_fd=None, clear_lock=clear_lock))
    return exit_status.code


def session_members(sid: int) -> List[psutil.Process]:
    """Every live process in session ``sid``, except this one."""
    me = os.getpid()
    members = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != me and os.getsid(proc.pid) == sid:
                members.append(proc)
        except (OSError, psutil.Error):
            continue
    return members


def process_tree(pid: int, session: Optional[int]) -> List[psutil.Process]:
    """``pid``, its descendants, and the members of its own ``session``.

    A daemon gets a session of its own; orphans re-parented to init keep its
    session id, so the session finds them even after the daemon is gone.
    ``session`` is None for an endpoint run in the foreground (its session is
    the user's terminal, not to be touched).
    """
    found: Dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(pid)
        found[pid] = root
        for child in root.children(recursive=True):
            found[child.pid] = child
    except psutil.Error:
        pass
    if session is not None:
        for proc in session_members(session):
            found.setdefault(proc.pid, proc)
    return list(found.values())


def kill_all(procs: List[psutil.Process], timeout: float = 5.0) -> List[int]:
    """SIGKILL every process in ``procs`` that is alive; the pids killed."""
    killed = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                proc.send_signal(signal.SIGKILL)
                killed.append(proc)
        except psutil.Error:
            continue
    if killed:
        psutil.wait_procs(killed, timeout=timeout)
    return [proc.pid for proc in killed]


@attr.s(auto_attribs=True)
class StopResult:
    """What ``stop`` did, for its report."""

    was_running: bool
    pid: Optional[int]
    seconds: float = 0.0
    clean: bool = True  # exited by itself after TERM
    killed: List[int] = attr.Factory(list)
    stale_pidfile: bool = False
    lock_held_without_pidfile: bool = False


def endpoint_leftovers(ep: EndpointDir) -> List[psutil.Process]:
    """Processes the daemon of ``ep`` started (managers, workers, what tasks
    started), wherever they are now: they carry its marker."""
    return marked_processes(OWNER_ENV, ep.path)


def stop_daemon(ep: EndpointDir, grace: float) -> StopResult:
    """Stop endpoint ``ep`` completely; one call is always enough."""
    pid = ep.read_pid()
    if pid is None:
        if ep.lock_held():
            # A daemon runs but its pidfile is gone: its processes are not
            # leftovers, and which pid to stop is unknown.
            return StopResult(False, None, lock_held_without_pidfile=True)
        leftovers = kill_all(endpoint_leftovers(ep))
        return StopResult(False, None, killed=leftovers)
    owned = ep.owns(pid)
    result = stop_process_tree(
        pid,
        ep.daemon_session(pid) if owned else None,
        grace,
        is_ours=lambda _: owned,
        leftovers=lambda: endpoint_leftovers(ep),
    )
    ep.remove_pidfile()
    ep.remove_daemon_info()
    return result


def stop_process_tree(
    pid: int,
    session: Optional[int],
    grace: float,
    *,
    is_ours: Callable[[int], bool],
    leftovers: Callable[[], List[psutil.Process]] = list,
) -> StopResult:
    """TERM daemon ``pid``; after ``grace`` seconds kill whatever is left of its
    tree, its ``session`` and ``leftovers()`` (processes marked as its own).

    ``is_ours(pid)`` guards against a reused pid: a pid that is not ours means
    the daemon died; then only ``leftovers()`` are killed (a session id alone
    proves nothing once its leader is gone: it may have been reused).  The
    caller removes the pidfile afterwards."""
    started = time.monotonic()
    if pid <= 0 or not is_ours(pid):
        # The daemon died without cleaning up: remove what it left.
        killed = kill_all(leftovers())
        return StopResult(
            False, pid, killed=killed, stale_pidfile=True, seconds=time.monotonic() - started
        )
    tree = process_tree(pid, session)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = started + grace
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    clean = not pid_alive(pid)
    # Whatever is left of the tree after the daemon is gone (or after the
    # grace period) is killed: no orphan survives a stop.
    remaining = {p.pid: p for p in tree + process_tree(pid, session) + leftovers()}
    killed = kill_all(list(remaining.values()))

    _reap_wait(pid)
    return StopResult(True, pid, seconds=time.monotonic() - started, clean=clean, killed=killed)


def _reap_wait(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
