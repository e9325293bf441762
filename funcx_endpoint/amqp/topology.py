"""The RabbitMQ objects of PROTOCOL.md section 3, owned by the service.

The web service declares these (the endpoint only declares passively).
Names are functions so that every component spells them the same way.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

TASKS_EXCHANGE = "tasks"
RESULTS_EXCHANGE = "results"
RESULTS_QUEUE = "results"
RESULTS_BINDING = "*.results"


def task_queue(endpoint_id: str) -> str:
    """The queue an endpoint consumes: ``<endpoint_id>.tasks``."""
    return f"{endpoint_id}.tasks"


def results_routing_key(endpoint_id: str) -> str:
    """The routing key of an endpoint's results and status reports."""
    return f"{endpoint_id}.results"


async def declare_service_topology(
    channel: Any, queue_arguments: Optional[Dict[str, Any]] = None
) -> None:
    """Declare the exchanges and the results queue (idempotent); ``queue_arguments``
    (e.g. ``{"x-queue-type": "quorum"}``) for the queue."""
    await channel.exchange_declare(exchange=TASKS_EXCHANGE, type="direct", durable=True)
    await channel.exchange_declare(exchange=RESULTS_EXCHANGE, type="topic", durable=True)
    if queue_arguments:
        await channel.queue_declare(queue=RESULTS_QUEUE, durable=True, arguments=queue_arguments)
    else:
        await channel.queue_declare(queue=RESULTS_QUEUE, durable=True)
    await channel.queue_bind(
        queue=RESULTS_QUEUE, exchange=RESULTS_EXCHANGE, routing_key=RESULTS_BINDING
    )


async def declare_endpoint_queue(channel: Any, endpoint_id: str) -> None:
    """Declare an endpoint's durable task queue and bind it (idempotent)."""
    queue = task_queue(endpoint_id)
    await channel.queue_declare(queue=queue, durable=True)
    await channel.queue_bind(queue=queue, exchange=TASKS_EXCHANGE, routing_key=queue)


def registration_queue_info(endpoint_id: str, tasks_url: str, results_url: str) -> dict[str, Any]:
    """The ``task_queue_info`` and ``result_queue_info`` of a registration answer."""
    return {
        "task_queue_info": {
            "connection_url": tasks_url,
            "exchange": TASKS_EXCHANGE,
            "queue": task_queue(endpoint_id),
        },
        "result_queue_info": {
            "connection_url": results_url,
            "exchange": RESULTS_EXCHANGE,
            "queue": RESULTS_QUEUE,
            "queue_publish_kwargs": {
                "exchange": RESULTS_EXCHANGE,
                "routing_key": results_routing_key(endpoint_id),
                "mandatory": True,
                "properties": {"delivery_mode": 2},
            },
        },
    }
