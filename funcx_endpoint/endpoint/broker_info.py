"""What registration tells the endpoint about the broker (PROTOCOL.md section 3)."""

from __future__ import annotations

import struct
from typing import Any, Dict, FrozenSet, Optional

import attr

from funcx_endpoint.amqp.codec import encode_properties
from funcx_endpoint.amqp.connection import AMQPURL

__all__ = ["BrokerInfo", "QueueInfo", "amqp_properties"]


@attr.s(auto_attribs=True, frozen=True)
class QueueInfo:
    """One side of the registration answer (PROTOCOL.md section 3)."""

    url: AMQPURL
    exchange: str
    queue: str
    routing_key: str = ""
    mandatory: bool = True
    properties: Dict[str, Any] = attr.Factory(dict)


@attr.s(auto_attribs=True, frozen=True)
class BrokerInfo:
    """Where the endpoint takes tasks from and sends results to."""

    endpoint_id: str
    tasks: QueueInfo
    results: QueueInfo
    #: What the service agreed to besides funcX 1.0's formats
    #: (:data:`~funcx_endpoint.wire.MESSAGE_BATCHES`).
    features: FrozenSet[str] = frozenset()
    #: When the service registered it, by the service's clock (for endpoint commands)
    registered_at: Optional[float] = None

    @classmethod
    def from_registration(cls, answer: Dict[str, Any]) -> BrokerInfo:
        """Read a registration answer; ValueError says what is missing or wrong."""
        try:
            endpoint_id = str(answer["endpoint_id"])
            tasks = answer["task_queue_info"]
            results = answer["result_queue_info"]
            publish = results.get("queue_publish_kwargs") or {}
            return cls(
                endpoint_id=endpoint_id,
                tasks=QueueInfo(
                    url=AMQPURL.parse(tasks["connection_url"]),
                    exchange=str(tasks["exchange"]),
                    queue=str(tasks["queue"]),
                ),
                results=QueueInfo(
                    url=AMQPURL.parse(results["connection_url"]),
                    exchange=str(publish.get("exchange", results["exchange"])),
                    queue=str(results["queue"]),
                    routing_key=str(publish.get("routing_key", f"{endpoint_id}.results")),
                    mandatory=bool(publish.get("mandatory", True)),
                    properties=_checked_properties(publish.get("properties")),
                ),
                features=frozenset(
                    f for f in answer.get("wire_features") or () if isinstance(f, str)
                ),
                registered_at=_number(answer.get("registered_at")),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"the registration answer lacks broker details ({e!r})") from None


def _number(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _checked_properties(given: Any) -> Dict[str, Any]:
    """The results' publish properties of a registration answer, checked now
    (a bad one would otherwise fail every publish later)."""
    properties = dict(given or {"delivery_mode": 2})
    try:
        encode_properties(amqp_properties(properties))
    except (ValueError, TypeError, struct.error, OverflowError) as e:
        raise ValueError(f"the registration answer has bad publish properties: {e}") from None
    return properties


def amqp_properties(properties: Dict[str, Any]) -> Dict[str, Any]:
    """pika-style property names (delivery_mode) as AMQP names (delivery-mode)."""
    return {name.replace("_", "-"): value for name, value in properties.items()}
