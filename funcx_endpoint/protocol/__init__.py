"""funcX 1.0 wire formats: serialized functions and data, and queue messages.

No Twisted here; everything is plain, synchronous and fast.  See
:mod:`funcx_endpoint.protocol.serialize` (PROTOCOL.md section 1) and
:mod:`funcx_endpoint.protocol.messages` (section 4).
"""

from __future__ import annotations

from funcx_endpoint.protocol.errors import (
    DeserializationError,
    ErrorCode,
    MessageError,
    ProtocolError,
    SerializationError,
)
from funcx_endpoint.protocol.messages import (
    PROTOCOL_VERSION,
    ActorName,
    Container,
    ContainerImage,
    EPStatusReport,
    Message,
    Result,
    ResultErrorDetails,
    Task,
    TaskState,
    TaskTransition,
    pack,
    unpack,
)
from funcx_endpoint.protocol.serialize import (
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
    "PROTOCOL_VERSION",
    "ActorName",
    "Container",
    "ContainerImage",
    "DeserializationError",
    "EPStatusReport",
    "ErrorCode",
    "Message",
    "MessageError",
    "ProtocolError",
    "Result",
    "ResultErrorDetails",
    "SerializationError",
    "Serializer",
    "Task",
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
