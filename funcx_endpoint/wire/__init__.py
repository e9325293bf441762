"""Every format the endpoint's processes speak, in one package.

========================================  ==========================================
module                                    what
========================================  ==========================================
:mod:`~funcx_endpoint.wire.serialize`     funcX 1.0 serialization of functions and
                                          data (PROTOCOL.md section 1), with
                                          :mod:`~funcx_endpoint.wire.source` and the
                                          packed buffers of :mod:`~.wire.buffers`
:mod:`~funcx_endpoint.wire.messages`      the queue messages (section 4), with their
                                          parts in :mod:`~.wire.states` and
                                          :mod:`~.wire.containers`
:mod:`~funcx_endpoint.wire.results`       a result between worker and broker: a
                                          header routers read, a payload they never
                                          decode
:mod:`~funcx_endpoint.wire.framing`       the one list framing of every link
:mod:`~funcx_endpoint.wire.frames`        a worker's pipes
:mod:`~funcx_endpoint.wire.amp`           interchange and managers (needs Twisted;
                                          not imported here)
:mod:`~funcx_endpoint.wire.info`          the manager info file and version checks
========================================  ==========================================

Only :mod:`~funcx_endpoint.wire.amp` imports Twisted: a worker imports this
package without it.  Managers import only this package and
:mod:`funcx_endpoint.worker` of the project.
"""

from __future__ import annotations

from funcx_endpoint.wire.errors import (
    DeserializationError,
    ErrorCode,
    MessageError,
    ProtocolError,
    SerializationError,
)
from funcx_endpoint.wire.messages import (
    MESSAGE_BATCHES,
    PROTOCOL_VERSION,
    ActorName,
    Container,
    ContainerImage,
    EPStatusReport,
    Message,
    Result,
    ResultBatchMessage,
    ResultErrorDetails,
    Task,
    TaskBatchMessage,
    TaskState,
    TaskTransition,
    pack,
    unpack,
)
from funcx_endpoint.wire.results import PackedResult
from funcx_endpoint.wire.serialize import (
    Serializer,
    default_serializer,
    deserialize,
    pack_buffers,
    pack_function,
    pack_payload,
    pack_task_buffer,
    serialize,
    split_task_buffer,
    unpack_buffers,
    unpack_task_buffer,
)

__all__ = [
    "MESSAGE_BATCHES",
    "PROTOCOL_VERSION",
    "ActorName",
    "Container",
    "ContainerImage",
    "DeserializationError",
    "EPStatusReport",
    "ErrorCode",
    "Message",
    "MessageError",
    "PackedResult",
    "ProtocolError",
    "Result",
    "ResultBatchMessage",
    "ResultErrorDetails",
    "SerializationError",
    "Serializer",
    "Task",
    "TaskBatchMessage",
    "TaskState",
    "TaskTransition",
    "default_serializer",
    "deserialize",
    "pack",
    "pack_buffers",
    "pack_function",
    "pack_payload",
    "pack_task_buffer",
    "serialize",
    "split_task_buffer",
    "unpack",
    "unpack_buffers",
    "unpack_task_buffer",
]
