"""The Celery app and tasks, imported by the worker and by the client (celery_runner.py).

Broker: ``BENCH_CELERY_BROKER`` (RabbitMQ, a virtual host of its own);
result backend ``rpc://`` (results come back over AMQP to the client's reply
queue, the natural choice with only RabbitMQ); JSON serialization (the
default); ``worker_prefetch_multiplier`` from ``BENCH_CELERY_PREFETCH``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workloads
from celery import Celery

app = Celery("bench", broker=os.environ["BENCH_CELERY_BROKER"], backend="rpc://")
app.conf.update(
    worker_prefetch_multiplier=int(os.environ.get("BENCH_CELERY_PREFETCH", "64")),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
)


@app.task(name="bench.noop")
def noop():
    return workloads.noop()


@app.task(name="bench.echo")
def echo(x):
    return workloads.echo(x)


@app.task(name="bench.sleep")
def sleep10():
    return workloads.sleep10()


TASKS = {"noop": noop, "echo": echo, "sleep": sleep10}
