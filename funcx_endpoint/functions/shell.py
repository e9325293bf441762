"""ShellFunction and MPIFunction: a command line as a funcX function.

Register an instance like a function (``client.register_function(ShellFunction(
"echo {message}"))`` or ``executor.submit(ShellFunction(...), message="hi")``);
it is serialized with dill (by reference to this module, which every worker
has) and, called with keyword arguments on the endpoint, it:

* formats its command with them (``str.format``);
* runs it with ``/bin/bash -c`` in the task's sandbox directory (below);
* sends its stdout and stderr to files there (``stdout=``/``stderr=`` name
  other files, relative to the sandbox);
* kills the command's whole process group when it runs past ``walltime``
  seconds and says so with return code 124, as ``timeout(1)`` and Globus
  Compute do;
* returns a :class:`ShellResult`: ``returncode``, ``cmd`` (as run), and the
  last ``snippet_lines`` lines of ``stdout`` and ``stderr``.

A non-zero return code is not an exception: the result says it, and the
caller decides.  The sandbox is ``$GC_TASK_SANDBOX_DIR`` when set (Globus
Compute's name), else ``$FUNCX_TASK_SANDBOX_DIR``, else
``tasks_working_dir/<task id>`` in the worker's directory (the worker sets
``FUNCX_TASK_ID`` for each task).

:class:`MPIFunction` puts ``$PARSL_MPI_PREFIX`` in front of the command: the
worker sets it, for a task with a resource specification, to the endpoint's
MPI launcher with the task's nodes and ranks (see
:mod:`funcx_endpoint.worker.mpi`).

Only the standard library is used: this runs in the worker.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import tempfile
from collections import deque
from typing import IO, Any, Optional

__all__ = ["MPIFunction", "ShellFunction", "ShellResult"]

#: The return code of a command stopped at its walltime (as ``timeout(1)``).
WALLTIME_RETURNCODE = 124
#: Seconds a command gets between TERM and KILL once its walltime is over.
KILL_GRACE = 2.0


@dataclasses.dataclass(repr=False, eq=False)
class ShellResult:
    """What a :class:`ShellFunction` call did: its command line, return code,
    and the ends of its stdout and stderr."""

    cmd: str
    stdout: str
    stderr: str
    returncode: int
    #: ``"subprocess.TimeoutExpired"`` when the walltime ended it, else None.
    exception_name: Optional[str] = None

    def __repr__(self) -> str:
        return (
            f"ShellResult(returncode={self.returncode}, cmd={self.cmd!r}, "
            f"stdout={self.stdout[-200:]!r}, stderr={self.stderr[-200:]!r})"
        )

    def __str__(self) -> str:
        return self.stdout

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShellResult):
            return NotImplemented
        return vars(self) == vars(other)


class ShellFunction:
    """A command line to run on the endpoint (see the module docstring).

    ``cmd`` is a format string filled with the call's keyword arguments;
    ``stdout``/``stderr`` are files for the command's output (default:
    ``<name>.stdout``/``.stderr`` in the sandbox); ``walltime`` is seconds
    (None: no limit); ``snippet_lines`` how many last lines of each the
    result carries; ``name`` the function's name when registered.
    """

    def __init__(
        self,
        cmd: str,
        stdout: Optional[str] = None,
        stderr: Optional[str] = None,
        walltime: Optional[float] = None,
        snippet_lines: int = 1000,
        name: Optional[str] = None,
    ) -> None:
        if not isinstance(cmd, str) or not cmd.strip():
            raise ValueError(f"cmd must be a non-empty command line, got {cmd!r}")
        if walltime is not None and walltime <= 0:
            raise ValueError(f"walltime must be positive seconds or None, got {walltime!r}")
        if snippet_lines < 0:
            raise ValueError(f"snippet_lines must be 0 or more, got {snippet_lines!r}")
        self.cmd = cmd
        self.stdout = stdout
        self.stderr = stderr
        self.walltime = walltime
        self.snippet_lines = snippet_lines
        self.__name__ = name or type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cmd!r})"

    def __call__(self, **kwargs: Any) -> ShellResult:
        """Run the command with ``kwargs`` filled in; its :class:`ShellResult`."""
        return self.execute_cmd_line(self.cmd.format(**kwargs))

    def execute_cmd_line(self, cmd: str) -> ShellResult:
        """Run the command line ``cmd`` as it is (see the module docstring)."""
        sandbox = sandbox_dir()
        os.makedirs(sandbox, exist_ok=True)
        out_path = os.path.join(sandbox, self.stdout or f"{self.__name__}.stdout")
        err_path = os.path.join(sandbox, self.stderr or f"{self.__name__}.stderr")
        exception_name = None
        with open(out_path, "w") as out, open(err_path, "w") as err:
            returncode = _run(cmd, sandbox, out, err, self.walltime)
        if returncode is None:
            returncode = WALLTIME_RETURNCODE
            exception_name = "subprocess.TimeoutExpired"
        return ShellResult(
            cmd,
            _tail(out_path, self.snippet_lines),
            _tail(err_path, self.snippet_lines),
            returncode,
            exception_name,
        )


class MPIFunction(ShellFunction):
    """A :class:`ShellFunction` whose command runs under the endpoint's MPI
    launcher (``$PARSL_MPI_PREFIX``) with the task's resource specification.

    The tasks must carry a resource specification (``num_nodes``,
    ``ranks_per_node``, ``num_ranks``): ``FuncXExecutor.resource_specification``
    or ``Batch.add(..., resource_specification=...)``.
    """

    def __call__(self, **kwargs: Any) -> ShellResult:
        if not os.environ.get("PARSL_MPI_PREFIX"):
            raise RuntimeError(
                "MPIFunction needs a resource specification (num_nodes, ranks_per_node): "
                "submit it with FuncXExecutor.resource_specification set, or "
                "Batch.add(..., resource_specification=...); this task has none, so "
                "the endpoint set no $PARSL_MPI_PREFIX"
            )
        return self.execute_cmd_line("$PARSL_MPI_PREFIX " + self.cmd.format(**kwargs))


def sandbox_dir() -> str:
    """The directory a command of this task runs in (see the module docstring)."""
    for name in ("GC_TASK_SANDBOX_DIR", "FUNCX_TASK_SANDBOX_DIR"):
        if os.environ.get(name):
            return os.environ[name]
    task_id = os.environ.get("FUNCX_TASK_ID")
    if task_id:
        return os.path.join(os.getcwd(), "tasks_working_dir", task_id)
    return tempfile.mkdtemp(prefix="funcx-shell-")


def _run(
    cmd: str, cwd: str, out: IO[str], err: IO[str], walltime: Optional[float]
) -> Optional[int]:
    """The return code of ``cmd``, or None if it ran past ``walltime`` (then its
    process group got TERM, and KILL after :data:`KILL_GRACE`)."""
    process = subprocess.Popen(
        cmd,
        shell=True,
        executable="/bin/bash",
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        start_new_session=True,  # its own process group: the walltime kills it all
    )
    try:
        return process.wait(timeout=walltime)
    except subprocess.TimeoutExpired:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()
        return None
    except BaseException:
        _signal_group(process.pid, signal.SIGKILL)
        process.wait()
        raise


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, lines: int) -> str:
    """The last ``lines`` lines of the file at ``path``."""
    if lines == 0:
        return ""
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return ""
