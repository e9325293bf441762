"""Running one task: deserialize, call, serialize; every outcome is a result.

:class:`TaskRunner` turns a task buffer into the encoded
:class:`~funcx_endpoint.wire.results.PackedResult` a worker sends back, and
never raises for anything the task does: the user's exception becomes a
``RemoteExecutionError`` whose data is the traceback starting at the user's
own frames, a buffer that cannot be loaded a ``DeserializationError``, a
result that is too big ``MaxResultSizeExceeded``.

Error texts are bounded too: the one-line summary (``error_details``) to
:data:`MAX_SUMMARY_BYTES`, the traceback to :data:`MAX_TRACEBACK_BYTES` (and
never more than the result size limit), keeping their head and tail and
saying how big they were, so that ``raise ValueError("x" * 20_000_000)``
gives a small error result, not a 40 MB one.

Every result carries the worker's environment (``details``: Python, dill,
OS, host).  A task buffer may start with the submitter's versions (a
``#runtime:`` header, :mod:`funcx_endpoint.wire.runtime`): when its Python
minor version differs from the worker's, functions are loaded from their
source only (never another Python's bytecode, which may crash the worker),
and a task that cannot be loaded while the versions differ is a
``VersionMismatch`` naming both sides rather than a ``DeserializationError``.

With ``run_in_sandbox`` (the variable ``FUNCX_TASK_SANDBOX_DIR`` names the
directory of the sandboxes) each task runs in its own directory,
``<that directory>/<task id>``, made for it; the worker goes back to its own
directory afterwards.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections import OrderedDict
from time import time_ns
from types import TracebackType
from typing import Any, Callable, Dict, List, Optional, Tuple

import dill

from funcx_endpoint.version import __version__
from funcx_endpoint.wire import (
    ErrorCode,
    PackedResult,
    serialize,
    unpack_task_buffer,
)
from funcx_endpoint.wire.fields import _encode_json
from funcx_endpoint.wire.frames import PHASE_LOADING, PHASE_RUNNING
from funcx_endpoint.wire.resources import (
    RESOURCES_HEADER,
    ResourceSpecificationError,
    check_resource_specification,
    split_resources_header,
)
from funcx_endpoint.wire.runtime import (
    RUNTIME_HEADER,
    UserRuntimeError,
    describe_runtime,
    local_runtime,
    runtime_difference,
    split_runtime_header,
    worker_details,
)
from funcx_endpoint.wire.serialize import Serializer
from funcx_endpoint.worker.task_variable import TaskVariable

#: The default largest serialized result, in bytes (as funcX).
DEFAULT_RESULT_SIZE_LIMIT = 10 * 1024 * 1024
#: The largest error summary (``error_details.user_message``), in UTF-8 bytes.
MAX_SUMMARY_BYTES = 4096
#: The largest traceback text of a failed task, in UTF-8 bytes (the result
#: size limit applies too, if smaller).
MAX_TRACEBACK_BYTES = 64 * 1024
#: Loaded functions kept per worker, keyed by their serialized form.
FUNCTION_CACHE_SIZE = 128

_THIS_FILE = __file__


def python_version() -> str:
    """This interpreter's version, e.g. ``3.11.7``."""
    return "{}.{}.{}".format(*sys.version_info[:3])


def versions() -> Dict[str, str]:
    """The versions that decide whether serialized code loads here."""
    return {"python": python_version(), "dill": dill.__version__, "funcx": __version__}


class FunctionCache(OrderedDict):
    """Loaded functions by serialized function part; least recently used go first.

    ``on_miss`` is called when a lookup finds nothing, that is just before
    the function is loaded.
    """

    def __init__(
        self, size: int = FUNCTION_CACHE_SIZE, on_miss: Callable[[], None] = lambda: None
    ) -> None:
        super().__init__()
        self.size = size
        self.on_miss = on_miss

    def get(self, key: Any, default: Any = None) -> Any:
        value = super().get(key, default)
        if value is default:
            self.on_miss()
        else:
            self.move_to_end(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if len(self) > self.size:
            self.popitem(last=False)


def _user_traceback(exc: BaseException) -> str:
    """The traceback of ``exc`` without the frames of this module above the user's."""
    tb: Optional[TracebackType] = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == _THIS_FILE:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _summary(exc: BaseException) -> str:
    """``Type: message``, the last line of a traceback (at most MAX_SUMMARY_BYTES)."""
    return clip("".join(traceback.format_exception_only(type(exc), exc)).strip(), MAX_SUMMARY_BYTES)


def clip(text: str, limit: int) -> str:
    """``text`` if it is at most ``limit`` UTF-8 bytes, else its head and tail
    around a note saying it was truncated and from what size.

    The result is at most ``limit`` bytes plus the note (about 100 bytes).
    """
    if len(text) * 4 <= limit:  # short enough whatever its characters
        return text
    data = text.encode("utf-8", "replace")
    size = len(data)
    if size <= limit:
        return text
    half = max(limit // 2, 0)
    head = data[:half].decode("utf-8", "ignore")  # "ignore": drop a cut character
    tail = data[size - half :].decode("utf-8", "ignore") if half else ""
    note = f"\n[... truncated: {size} bytes in all, {size - 2 * half} left out here ...]\n"
    return head + note + tail


class TaskRunner:
    """Runs tasks one at a time, with a cache of loaded functions.

    ``report_phase`` is called with a phase byte (see
    :mod:`funcx_endpoint.wire.frames`) before a function that is not in
    the cache is loaded, and again once it is loaded.
    """

    def __init__(
        self,
        result_size_limit: int = DEFAULT_RESULT_SIZE_LIMIT,
        report_phase: Callable[[bytes], None] = lambda phase: None,
        cache_size: int = FUNCTION_CACHE_SIZE,
    ) -> None:
        self.result_size_limit = result_size_limit
        self._report_phase = report_phase
        self._functions = FunctionCache(cache_size, self._loading_function)
        self._loading = False
        self._runtime = local_runtime()
        #: The directory of the task sandboxes (None: tasks run where the worker does).
        self.sandbox_root: Optional[str] = os.environ.get(SANDBOX_VARIABLE) or None
        #: This worker's environment, as every result carries it (JSON).
        self.details = _encode_json(worker_details()).encode("ascii")

    def _loading_function(self) -> None:
        self._loading = True
        self._report_phase(PHASE_LOADING)

    def run(self, task_id: str, running_ns: int, task_buffer: str) -> bytes:
        """The encoded PackedResult of running ``task_buffer``."""
        # Transitions are written as the JSON they become (no objects on the
        # way): running (the manager's stamp), execution start and end.
        statuses = [_RUNNING % running_ns]
        # Only while the task runs: its id (always) and MPI's variables (if asked).
        environment: Optional[Dict[str, Optional[str]]] = None
        details = self.details
        theirs: Optional[Dict[str, str]] = None
        if task_buffer.startswith(RUNTIME_HEADER):
            try:
                theirs, task_buffer = split_runtime_header(task_buffer)
            except UserRuntimeError as exc:
                message = clip(f"Task {task_id} could not be read: {exc}", MAX_SUMMARY_BYTES)
                return _failure(task_id, ErrorCode.MALFORMED_TASK, message, None, statuses, details)
        if task_buffer.startswith(RESOURCES_HEADER):
            try:
                spec, task_buffer = split_resources_header(task_buffer)
                environment = _mpi_environment(spec)
            except (ResourceSpecificationError, ValueError) as exc:
                message = clip(f"Task {task_id} cannot run here: {exc}", MAX_SUMMARY_BYTES)
                code = ErrorCode.RESOURCE_SPECIFICATION_ERROR
                return _failure(task_id, code, message, None, statuses, details)
        python_differs, dill_differs = (
            runtime_difference(theirs, self._runtime) if theirs else (False, False)
        )
        try:
            fn, args, kwargs = self._load(task_buffer, python_differs)
        except Exception as exc:
            if python_differs or dill_differs:
                message = clip(
                    f"Task {task_id} could not be loaded: it was serialized with "
                    f"{describe_runtime(theirs or {})} and this worker runs "
                    f"{describe_runtime(self._runtime)} ({exc})",
                    MAX_SUMMARY_BYTES,
                )
                code = ErrorCode.VERSION_MISMATCH
                return _failure(task_id, code, message, None, statuses, details)
            message = clip(f"Task {task_id} could not be deserialized: {exc}", MAX_SUMMARY_BYTES)
            code = ErrorCode.DESERIALIZATION_ERROR
            return _failure(task_id, code, message, None, statuses, details)
        home = None
        if self.sandbox_root is not None:
            try:
                home = _enter_sandbox(self.sandbox_root, task_id)
            except OSError as exc:
                message = clip(
                    f"Task {task_id} could not enter its sandbox in {self.sandbox_root}: {exc}",
                    MAX_SUMMARY_BYTES,
                )
                code = ErrorCode.SANDBOX_UNAVAILABLE
                return _failure(task_id, code, message, None, statuses, details)
        statuses.append(_STARTED % time_ns())
        _TASK_ID.set(task_id)
        previous = None if environment is None else _set_environment(environment)
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # the user's code may raise anything, SystemExit too
            _restore_environment(previous)
            _leave_sandbox(home)
            statuses.append(_ENDED % time_ns())
            text = clip(_user_traceback(exc), min(MAX_TRACEBACK_BYTES, self.result_size_limit))
            return _failure(
                task_id, ErrorCode.REMOTE_EXECUTION_ERROR, _summary(exc), text, statuses, details
            )
        _restore_environment(previous)
        _leave_sandbox(home)
        statuses.append(_ENDED % time_ns())
        try:
            data = serialize(value)
        except Exception as exc:
            message = clip(
                f"The result of task {task_id} could not be serialized: {exc}", MAX_SUMMARY_BYTES
            )
            code = ErrorCode.REMOTE_EXECUTION_ERROR
            return _failure(task_id, code, message, None, statuses, details)
        del value
        size = len(data)
        if size > self.result_size_limit:
            message = (
                f"The result of task {task_id} is {size} bytes serialized, more than the "
                f"result size limit of {self.result_size_limit} bytes"
            )
            code = ErrorCode.MAX_RESULT_SIZE_EXCEEDED
            return _failure(task_id, code, message, None, statuses, details)
        return PackedResult(
            task_id, _encode_json(data).encode("ascii"), _NULL, _statuses(statuses), details
        ).encode()

    def _load(
        self, task_buffer: str, source_only: bool = False
    ) -> Tuple[Callable[..., Any], Tuple[Any, ...], Dict[str, Any]]:
        try:
            if source_only:
                # Another Python's bytecode is never loaded (nor cached).
                return _SOURCE_ONLY.unpack_task_buffer(task_buffer)
            return unpack_task_buffer(task_buffer, function_cache=self._functions)
        finally:
            if self._loading:
                self._loading = False
                self._report_phase(PHASE_RUNNING)


#: The variable that names the task being run, for the task's own code
#: (a ShellFunction makes its sandbox directory from it).
TASK_ID_VARIABLE = "FUNCX_TASK_ID"
_TASK_ID = TaskVariable(TASK_ID_VARIABLE)


def _mpi_environment(spec: Any) -> Dict[str, Optional[str]]:
    """The MPI variables for a task's resource specification, in this worker's
    block (see :mod:`funcx_endpoint.worker.mpi`)."""
    from funcx_endpoint.worker.mpi import mpi_environment

    return mpi_environment(check_resource_specification(spec), os.environ)


#: The variable that names the directory of task sandboxes (run_in_sandbox).
SANDBOX_VARIABLE = "FUNCX_TASK_SANDBOX_DIR"


def _enter_sandbox(root: str, task_id: str) -> str:
    """Make and enter ``root/task_id``; the directory to go back to."""
    home = os.getcwd()
    path = os.path.join(root, task_id)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chdir(path)
    return home


def _leave_sandbox(home: Optional[str]) -> None:
    if home is not None:
        try:
            os.chdir(home)
        except OSError:
            pass


def _restore_environment(previous: Optional[Dict[str, Optional[str]]]) -> None:
    """Remove the task's id and put back what ``_set_environment`` changed."""
    _TASK_ID.clear()
    if previous is not None:
        _set_environment(previous)


def _set_environment(values: Dict[str, Optional[str]]) -> Dict[str, Optional[str]]:
    """Set (or, for None, remove) variables; their previous values."""
    environ = os.environ
    previous = {name: environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return previous


_RUNNING = '{"timestamp":%d,"state":"running","actor":"manager"}'
_STARTED = '{"timestamp":%d,"state":"execution-start","actor":"worker"}'
_ENDED = '{"timestamp":%d,"state":"execution-end","actor":"worker"}'
_NULL = b"null"
_SOURCE_ONLY = Serializer(load_bytecode=False)


def _statuses(transitions: List[str]) -> bytes:
    return ("[" + ",".join(transitions) + "]").encode("ascii")


def _failure(
    task_id: str,
    code: str,
    message: str,
    data: Optional[str],
    transitions: List[str],
    environment: bytes = _NULL,
) -> bytes:
    """The encoded failure result (``data`` defaults to ``message``, as Result.failure)."""
    details = _encode_json({"code": code, "user_message": message}).encode("ascii")
    text = _encode_json(message if data is None else data).encode("ascii")
    return PackedResult(task_id, text, details, _statuses(transitions), environment).encode()
