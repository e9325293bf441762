"""A bare echo endpoint written with pika: the floor for the AMQP pipe benchmark.

Consumes the task queue (prefetch 512), publishes a fixed result for each
task to the results exchange, acks the task.  No publisher confirms, no
spool, no parsing beyond the task id: the least work an AMQP endpoint can do.

    python pika_echo.py REGISTRATION_JSON CA_FILE
"""

import json
import ssl
import sys

import pika


def main() -> None:
    with open(sys.argv[1]) as f:
        registration = json.load(f)
    context = ssl.create_default_context(cafile=sys.argv[2])
    tasks = registration["task_queue_info"]
    results = registration["result_queue_info"]["queue_publish_kwargs"]
    params = pika.URLParameters(tasks["connection_url"])
    params.ssl_options = pika.SSLOptions(context, server_hostname=params.host)
    params.heartbeat = 0
    connection = pika.BlockingConnection(params)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=512)
    properties = pika.BasicProperties(delivery_mode=2)
    result_data = "00\ngAROLg==\n"

    def on_message(ch, method, _props, body):
        task_id = json.loads(body[1:])["data"]["task_id"]
        reply = (
            b"\x01"
            + json.dumps(
                {
                    "message_type": "result",
                    "data": {
                        "task_id": task_id,
                        "data": result_data,
                        "error_details": None,
                        "task_statuses": None,
                    },
                },
                separators=(",", ":"),
            ).encode()
        )
        ch.basic_publish(results["exchange"], results["routing_key"], reply, properties)
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(tasks["queue"], on_message, exclusive=True)
    print("ready", flush=True)
    try:
        channel.start_consuming()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
