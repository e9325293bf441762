"""Exceptions of the funcX SDK.

Two families:

* :class:`FuncxAPIError` is what the service said: an HTTP answer of 400 or
  more.  It is a :class:`globus_sdk.GlobusAPIError`, so code written for the
  real funcX SDK (which raises ``GlobusAPIError``) keeps working.
* :class:`FuncxError` and its subclasses are the SDK's own errors: a task that
  is still pending, a task that failed on the endpoint, a task the service
  refused, a service that cannot be reached, a version mismatch.

Network failures are globus-sdk's :class:`globus_sdk.NetworkError` (raised
after globus-sdk's retries); :class:`FuncXExecutor
<funcx_endpoint.sdk.executor.FuncXExecutor>` wraps them in
:class:`ServiceUnreachable` for its futures.
"""

from __future__ import annotations

import textwrap
from typing import Any, List, Optional, Sequence

import attr
import globus_sdk

__all__ = [
    "BatchSubmissionError",
    "FuncxAPIError",
    "FuncxError",
    "FuncxTaskExecutionFailed",
    "LoginError",
    "MalformedResponse",
    "ServiceUnreachable",
    "TaskCancelled",
    "TaskExecutionFailed",
    "TaskPending",
    "TaskRefused",
    "VersionMismatch",
]


class FuncxAPIError(globus_sdk.GlobusAPIError):
    """An error answer (HTTP 400 or more) from the funcX web service.

    ``http_status`` is the HTTP status, ``code`` the service's error code
    (e.g. ``"TASK_NOT_FOUND"``) and ``message`` its explanation.  The service
    sends ``{"code", "message", "reason", "http_status_code", "error_args"}``;
    older funcX services sent only ``reason``, which is used as ``message``
    when there is no ``message``.
    """

    def _post_parse_hook(self) -> bool:
        data = self.raw_json
        if not self.messages and isinstance(data, dict):
            reason = data.get("reason")
            if isinstance(reason, str) and reason:
                self.messages = [reason]
        return True

    @property
    def reason(self) -> Optional[str]:
        """The ``reason`` field of the error body, if any (funcX's old format)."""
        data = self.raw_json
        if isinstance(data, dict) and isinstance(data.get("reason"), str):
            return str(data["reason"])
        return None


class FuncxError(Exception):
    """Base class of the SDK's own errors (not HTTP error answers)."""


class LoginError(FuncxError):
    """No credentials to log in with (or unusable ones)."""


class MalformedResponse(FuncxError):
    """The service answered 2xx, but not with the shape the funcX API promises."""


class VersionMismatch(FuncxError):
    """The service needs a newer SDK than this one.

    ``sdk_version`` is the funcX API version this SDK speaks, ``min_version``
    the oldest the service accepts.
    """

    def __init__(self, sdk_version: str, min_version: str) -> None:
        super().__init__(
            f"the funcX service requires SDK version {min_version} or newer; "
            f"this SDK speaks version {sdk_version}"
        )
        self.sdk_version = sdk_version
        self.min_version = min_version


class TaskPending(FuncxError):
    """The task has no result yet; ``status`` is what the service last said."""

    def __init__(self, task_id: str, status: str) -> None:
        super().__init__(f"task {task_id} is not done yet (status: {status})")
        self.task_id = task_id
        self.status = status
        # funcX 1.0 called this field "reason".
        self.reason = status


@attr.s(auto_attribs=True, eq=False, repr=False)
class TaskExecutionFailed(FuncxError):
    """The task ran (or was meant to run) and failed; this is the remote error.

    ``remote_data`` is the traceback text the endpoint sent (starting at the
    user's own frames) or the system's explanation.  ``error_code`` says what
    kind of failure it was: ``RemoteExecutionError`` when the function raised,
    or a system failure such as ``WorkerLost``, ``ManagerLost``,
    ``TaskTimeout``, ``MaxResultSizeExceeded``, ``FunctionNotAllowed``...;
    None when the service did not say.  ``completion_t`` is when the task
    ended, as the service gave it.
    """

    remote_data: str
    completion_t: Any = None
    task_id: Optional[str] = attr.ib(default=None, kw_only=True)
    error_code: Optional[str] = attr.ib(default=None, kw_only=True)
    user_message: Optional[str] = attr.ib(default=None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        super().__init__(self.remote_data)  # its args: the traceback text alone

    def __str__(self) -> str:
        what = f"task {self.task_id}" if self.task_id else "the task"
        kind = f" with {self.error_code}" if self.error_code else ""
        headline = f"{what} failed{kind}"
        if self.user_message:
            headline += f": {self.user_message}"
        return f"{headline}\n{textwrap.indent(self.remote_data.rstrip(), '    ')}"

    def __reduce__(self) -> Any:
        return (
            _rebuild_task_execution_failed,
            (
                type(self),
                self.remote_data,
                self.completion_t,
                self.task_id,
                self.error_code,
                self.user_message,
            ),
        )


def _rebuild_task_execution_failed(
    cls: type,
    remote_data: str,
    completion_t: Any,
    task_id: Optional[str],
    error_code: Optional[str],
    user_message: Optional[str],
) -> TaskExecutionFailed:
    error: TaskExecutionFailed = cls(
        remote_data,
        completion_t,
        task_id=task_id,
        error_code=error_code,
        user_message=user_message,
    )
    return error


#: The name funcX 1.0 gave this exception.
FuncxTaskExecutionFailed = TaskExecutionFailed


class TaskCancelled(TaskExecutionFailed):
    """The task was cancelled (:meth:`FuncXClient.cancel`) before it finished:
    its error code is ``TaskCancelled``; it has no result."""


class TaskRefused(FuncxError):
    """The service refused to create one task of a submitted batch.

    ``index`` is the task's position in the batch, ``http_status`` and
    ``reason`` the service's per-task answer.
    """

    def __init__(self, index: int, http_status: int, reason: str) -> None:
        super().__init__(f"task {index} of the batch was refused ({http_status}): {reason}")
        self.index = index
        self.http_status = http_status
        self.reason = reason


class BatchSubmissionError(FuncxError):
    """Some tasks of a batch were refused by the service; the others exist.

    ``task_ids`` has one entry per submitted task, in order: the id of each
    task that was created (it runs, fetch its result as usual), None for each
    refused one.  ``failures`` holds a :class:`TaskRefused` per refused task.
    """

    def __init__(self, task_ids: Sequence[Optional[str]], failures: Sequence[TaskRefused]) -> None:
        self.task_ids: List[Optional[str]] = list(task_ids)
        self.failures: List[TaskRefused] = list(failures)
        created = sum(1 for task_id in self.task_ids if task_id is not None)
        first = self.failures[0] if self.failures else None
        detail = (
            f"; first: task {first.index} ({first.http_status}): {first.reason}"
            if first is not None
            else ""
        )
        super().__init__(
            f"{len(self.failures)} of {len(self.task_ids)} tasks were refused by the service "
            f"({created} created, their ids are in .task_ids){detail}"
        )

    @property
    def created_task_ids(self) -> List[str]:
        """The ids of the tasks that were created, in submission order."""
        return [task_id for task_id in self.task_ids if task_id is not None]


class ServiceUnreachable(FuncxError):
    """The funcX service could not be reached (after globus-sdk's retries).

    ``task_id`` names the task concerned when there is one; the underlying
    error is the ``__cause__``.
    """

    def __init__(self, message: str, task_id: Optional[str] = None) -> None:
        super().__init__(message)
        self.task_id = task_id
