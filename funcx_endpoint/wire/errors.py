"""Exceptions of the wire-format layer and the error codes carried by results.

Every exception here is a ``ValueError`` (the input, not the program, is
wrong) and has an ``error_code``: the code a task result should carry when
this exception is why the task failed.
"""

from __future__ import annotations

from typing import ClassVar, FrozenSet, Optional


class ErrorCode:
    """The ``error_details.code`` strings this project puts in failed results.

    Real funcX 1.0.13 clients accept any string here; these are the ones this
    project makes.  ``CouldNotExecuteUserTaskError`` and ``"0"`` are made only
    by the real 1.0.13 endpoint and are listed so that readers can name them.
    """

    #: The user's function raised; ``data`` is the traceback text, starting
    #: at the user's own frames.
    REMOTE_EXECUTION_ERROR: ClassVar[str] = "RemoteExecutionError"
    #: The worker process running the task died.
    WORKER_LOST: ClassVar[str] = "WorkerLost"
    #: The manager holding the task stopped answering (missed heartbeats).
    MANAGER_LOST: ClassVar[str] = "ManagerLost"
    #: The task ran longer than it was allowed to.
    TASK_TIMEOUT: ClassVar[str] = "TaskTimeout"
    #: The serialized result is bigger than the endpoint's result size limit.
    MAX_RESULT_SIZE_EXCEEDED: ClassVar[str] = "MaxResultSizeExceeded"
    #: The endpoint's allow-list does not contain the task's function.
    FUNCTION_NOT_ALLOWED: ClassVar[str] = "FunctionNotAllowed"
    #: The function, args or kwargs of the task could not be deserialized.
    DESERIALIZATION_ERROR: ClassVar[str] = "DeserializationError"
    #: The task was cancelled before it finished.
    TASK_CANCELLED: ClassVar[str] = "TaskCancelled"
    #: The sender speaks a protocol or serialization version we cannot read.
    VERSION_MISMATCH: ClassVar[str] = "VersionMismatch"
    #: The task message itself is malformed (bad fields, bad task buffer).
    MALFORMED_TASK: ClassVar[str] = "MalformedTask"
    #: The task's container could not run: its image is missing or cannot start
    #: a worker, or it has no image of the type the endpoint's engine runs.
    CONTAINER_ERROR: ClassVar[str] = "ContainerError"
    #: Made only by the real 1.0.13 endpoint.
    COULD_NOT_EXECUTE_USER_TASK: ClassVar[str] = "CouldNotExecuteUserTaskError"

    #: Every code above (the upper-case names of this class body so far, so
    #: that a code added above is in it without being listed twice).
    ALL: ClassVar[FrozenSet[str]] = frozenset(
        value for name, value in list(locals().items()) if name.isupper()
    )

    #: No block of managers could start (the endpoint's provider failed
    #: again and again; the message has its last error, the batch scheduler's
    #: own words where there are some): the task waited for a worker in vain.
    #: Made by the endpoint's scaling, not by the task's path through managers
    #: and workers: not in :attr:`ALL`.
    BLOCK_START_FAILED: ClassVar[str] = "BlockStartFailed"
    #: The task's resource specification (MPI nodes and ranks) makes no sense,
    #: or asks for more nodes than the block it runs in has.  Added with MPI
    #: tasks, after the funcX 1.0 set that :attr:`ALL` lists.
    RESOURCE_SPECIFICATION_ERROR: ClassVar[str] = "InvalidResourceSpecification"
    #: The task's sandbox directory (``run_in_sandbox``) could not be made or
    #: entered.  Added with sandboxes, after the funcX 1.0 set of :attr:`ALL`.
    SANDBOX_UNAVAILABLE: ClassVar[str] = "SandboxUnavailable"


class ProtocolError(ValueError):
    """Something on the wire could not be written or read."""

    error_code: ClassVar[str] = ErrorCode.MALFORMED_TASK


class SerializationError(ProtocolError):
    """An object could not be serialized by any method that applies to it."""

    # On an endpoint this means the user's function returned something that
    # cannot be pickled: the user's problem, reported like an exception raised
    # by their code (as funcX 1.0.13 does).
    error_code: ClassVar[str] = ErrorCode.REMOTE_EXECUTION_ERROR


class DeserializationError(ProtocolError):
    """A serialized payload or packed buffer could not be loaded.

    ``part`` names the part of a task buffer that was wrong (``"function"``,
    ``"args"`` or ``"kwargs"``) when the payload was one, else None.
    """

    error_code: ClassVar[str] = ErrorCode.DESERIALIZATION_ERROR

    def __init__(self, message: str, part: Optional[str] = None) -> None:
        super().__init__(message)
        self.part = part


class MessageError(ProtocolError):
    """A queue message could not be packed or unpacked.

    ``message_type`` is the type the message claimed, and ``task_id`` the
    (normalized) task id it carried, when those could be read despite the
    problem, else None.  A reader that has a ``task_id`` should answer with an
    error result for that task instead of dropping the message.
    """

    error_code: ClassVar[str] = ErrorCode.MALFORMED_TASK

    def __init__(
        self,
        message: str,
        *,
        message_type: Optional[str] = None,
        task_id: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message_type = message_type
        self.task_id = task_id
