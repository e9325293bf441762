"""Every format the endpoint's processes speak, in one package.

========================================  ==========================================
module                                    what
========================================  ==========================================
:mod:`~funcx_endpoint.wire.serialize`     funcX 1.0 serialization of functions and
                                          data (PROTOCOL.md section 1), with
                                          :mod:`~funcx_endpoint.wire.source` and the
                                          packed buffers of :mod:`~.wire.buffers`
:mod:`~funcx_endpoint.wire.messages`      the queue messages (section 4), with their
                                          parts in :mod:`~.wire.states`,
                                          :mod:`~.wire.containers` and the status
                                          report in :mod:`~.wire.report`
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
from funcx_endpoint.wire.messages import *  # noqa: F403
from funcx_endpoint.wire.messages import __all__ as _messages_all
from funcx_endpoint.wire.results import PackedResult
from funcx_endpoint.wire.serialize import *  # noqa: F403
from funcx_endpoint.wire.serialize import __all__ as _serialize_all

# The errors, the packed result, and all of messages' and serialize's names.
__all__ = [
    "DeserializationError",
    "ErrorCode",
    "MessageError",
    "PackedResult",
    "ProtocolError",
    "SerializationError",
    *_messages_all,
    *_serialize_all,
]
