"""The endpoint's AMQP pipe: tasks in from RabbitMQ, results out, nothing else.

A private RabbitMQ node (AMQPS) is started.  A driver in this process plays
the service: it publishes no-op tasks to an endpoint's task queue (keeping
``--window`` unanswered) and consumes the ``results`` queue.  The endpoint
is a separate process running only the endpoint's transport with the echo
interchange (``funcx_endpoint.testing.echo_endpoint``): exclusive consumer,
publisher confirms, results confirmed before the task is acked, acks
batched.

The same driver then runs against a bare echo written with pika (consume,
publish the reply, ack; no publisher confirms, no spool), the floor any
AMQP endpoint in Python can hope to reach, and our rate is printed as a
ratio of it.

Figures: sustained tasks/s over ``--tasks`` tasks (default 50,000), and the
round trip of single tasks (p50/p90/p99 of ``--latency-samples``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Dict, List, Optional

import psutil
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import react

from funcx_endpoint.amqp import topology
from funcx_endpoint.amqp.channel import Delivery
from funcx_endpoint.amqp.client import AMQPClient
from funcx_endpoint.amqp.connection import AMQPURL, AMQPConnectionService
from funcx_endpoint.testing.broker import _unredacted
from funcx_endpoint.testing.rabbitmq import RabbitMQNode
from funcx_endpoint.wire import Task, pack, pack_function, pack_payload

HERE = os.path.dirname(os.path.abspath(__file__))
PIKA_ECHO = os.path.join(HERE, "pika_echo.py")


def noop() -> None:
    return None


class Driver:
    """Publishes tasks (no confirms, pipelined) and times their results."""

    def __init__(self, url: str, ca_file: str, endpoint_id: str) -> None:
        self.url = AMQPURL.parse(url)
        self.endpoint_id = endpoint_id
        self.queue = topology.task_queue(endpoint_id)
        self.conn = AMQPConnectionService(
            reactor, self.url, self._prepare, ca_file=ca_file, heartbeat=0, name="driver"
        )
        self.buffer = pack_function(noop) + pack_payload((), {})
        self.sent_at: Dict[str, float] = {}
        self.answered = 0
        self.to_send = 0
        self.window = 0
        self.in_flight = 0
        self.done: Optional[Deferred[None]] = None
        self.latencies: List[float] = []

    async def _prepare(self, client: AMQPClient) -> None:
        channel = await client.open_channel(1)
        await topology.declare_service_topology(channel)
        await topology.declare_endpoint_queue(channel, self.endpoint_id)
        await channel.queue_purge(queue=self.queue)
        await channel.queue_purge(queue=topology.RESULTS_QUEUE)
        await channel.basic_qos(prefetch_count=2000)
        channel.handlers.consumers["driver"] = self._on_result
        await channel.basic_consume(queue=topology.RESULTS_QUEUE, consumer_tag="driver")
        channel.handlers.on_close = self._closed
        self.channel = channel

    def _closed(self, reason: Any) -> None:
        if self.done is not None:
            done, self.done = self.done, None
            done.errback(RuntimeError(f"the driver's channel closed: {reason}"))

    async def start(self) -> None:
        self.conn.startService()
        await self.conn.when_connected()

    def _publish(self, n: int) -> None:
        for _ in range(n):
            task = Task(str(uuid.uuid4()), self.buffer)
            self.sent_at[task.task_id] = time.perf_counter()
            self.channel.publish(
                topology.TASKS_EXCHANGE, self.queue, pack(task), {"delivery-mode": 2}
            )
        self.in_flight += n
        self.to_send -= n

    def _on_result(self, delivery: Delivery) -> None:
        now = time.perf_counter()
        # Parse just enough to find the task id (the service would unpack all).
        data = json.loads(bytes(delivery.body[1:]))
        if data.get("message_type") == "result":
            task_id = data["data"]["task_id"]
            sent = self.sent_at.pop(task_id, None)
            if sent is not None:
                self.latencies.append(now - sent)
                self.answered += 1
                self.in_flight -= 1
        finished = self.to_send == 0 and self.in_flight == 0
        if delivery.delivery_tag % 100 == 0 or finished:
            self.channel.ack(delivery.delivery_tag, multiple=True)
        if self.to_send > 0 and self.in_flight < self.window:
            self._publish(min(self.to_send, self.window - self.in_flight))
        if finished and self.done is not None:
            done, self.done = self.done, None
            done.callback(None)

    async def run(self, count: int, window: int) -> float:
        """Seconds to get ``count`` results, keeping ``window`` in flight."""
        self.latencies = []
        self.to_send = count
        self.window = window
        self.done = Deferred()
        started = time.perf_counter()
        self._publish(min(count, window))
        await self.done
        return time.perf_counter() - started

    async def latency(self, samples: int) -> List[float]:
        found = []
        for _ in range(samples):
            self.latencies = []
            await self.run(1, 1)
            found.extend(self.latencies)
        return found

    async def stop(self) -> None:
        await self.conn.stopService()


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


async def measure(
    label: str,
    driver: Driver,
    args: argparse.Namespace,
    endpoint: psutil.Process,
    broker: Optional[psutil.Process],
) -> Dict[str, Any]:
    await driver.run(min(2000, args.tasks), args.window)  # warm up
    me = psutil.Process()
    before = (cpu_seconds(me), cpu_seconds(endpoint), cpu_seconds(broker) if broker else 0.0)
    elapsed = await driver.run(args.tasks, args.window)
    after = (cpu_seconds(me), cpu_seconds(endpoint), cpu_seconds(broker) if broker else 0.0)
    lat = await driver.latency(args.latency_samples)
    rate = args.tasks / elapsed
    result = {
        "label": label,
        "tasks": args.tasks,
        "seconds": elapsed,
        "rate": rate,
        "p50_ms": percentile(lat, 0.5) * 1000,
        "p90_ms": percentile(lat, 0.9) * 1000,
        "p99_ms": percentile(lat, 0.99) * 1000,
        "cpu_us_per_task": {
            "driver": (after[0] - before[0]) / args.tasks * 1e6,
            "endpoint": (after[1] - before[1]) / args.tasks * 1e6,
            "broker": (after[2] - before[2]) / args.tasks * 1e6,
        },
    }
    print(
        f"{label:<32} {rate:>9,.0f} tasks/s  ({args.tasks} in {elapsed:.2f} s)   "
        f"round trip p50 {result['p50_ms']:.2f} ms  p90 {result['p90_ms']:.2f} ms  "
        f"p99 {result['p99_ms']:.2f} ms",
        flush=True,
    )
    cpu = result["cpu_us_per_task"]
    print(
        f"{'':<32} CPU per task: driver {cpu['driver']:.0f} us, endpoint "
        f"{cpu['endpoint']:.0f} us, broker {cpu['broker']:.0f} us",
        flush=True,
    )
    return result


def spawn(argv: List[str]) -> subprocess.Popen:
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(HERE))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)


async def main(reactor: Any, args: argparse.Namespace) -> None:
    base = tempfile.mkdtemp(prefix="funcx-bench-amqp-")
    node = RabbitMQNode(os.path.join(base, "rabbitmq"))
    print(f"Starting a private RabbitMQ node (about 10 s) in {base}", flush=True)
    await node.start_async(reactor)
    broker = psutil.Process(node.beam_pid) if node.beam_pid else None
    results = []
    try:
        url = node.amqps_url
        for label, kind in (
            ("funcx-endpoint transport (ours)", "ours"),
            ("bare pika echo (no confirms)", "pika"),
        ):
            endpoint_id = str(uuid.uuid4())
            driver = Driver(url, node.ca_cert_path, endpoint_id)
            await driver.start()
            registration = os.path.join(base, f"{endpoint_id}.json")
            with open(registration, "w") as f:
                plain = _unredacted(AMQPURL.parse(url))
                json.dump(
                    {
                        "endpoint_id": endpoint_id,
                        **topology.registration_queue_info(endpoint_id, plain, plain),
                    },
                    f,
                )
            if kind == "ours":
                argv = [
                    sys.executable,
                    "-m",
                    "funcx_endpoint.testing.echo_endpoint",
                    registration,
                    os.path.join(base, f"spool-{endpoint_id}"),
                    node.ca_cert_path,
                ]
            else:
                argv = [sys.executable, PIKA_ECHO, registration, node.ca_cert_path]
            proc = spawn(argv)
            try:
                line = await _readline(proc)
                if line.strip() != b"ready":
                    raise RuntimeError(f"{label} did not start: {line!r}")
                results.append(await measure(label, driver, args, psutil.Process(proc.pid), broker))
            finally:
                proc.terminate()
                proc.wait(30)
                await driver.stop()
    finally:
        node.destroy()
        shutil.rmtree(base, ignore_errors=True)
    ours, pika_result = results

    ratio = ours["rate"] / pika_result["rate"]
    print(
        f"\nours / bare pika echo: {ratio:.2f}  "
        f"(targets: >= 4,000 tasks/s sustained, p50 round trip < 2 ms)",
        flush=True,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "ratio": ratio}, f, indent=2)


async def _readline(proc: subprocess.Popen) -> bytes:
    from twisted.internet.threads import deferToThread

    assert proc.stdout is not None
    line: bytes = await deferToThread(proc.stdout.readline)
    return line


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=50_000, help="tasks per throughput run")
    parser.add_argument("--window", type=int, default=2000, help="tasks kept in flight")
    parser.add_argument("--latency-samples", type=int, default=1000)
    parser.add_argument("--json", help="also write the figures to this file")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse()
    react(lambda r: ensureDeferred(main(r, arguments)))
