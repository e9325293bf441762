"""`make demo`: a private funcX service, an endpoint, and real functions run through it.

Steps (each prints what it does):

1. start the private web service (``funcx-service start``): SQLite and an
   embedded RabbitMQ node under the state directory, HTTPS with its own CA;
2. create a client for the demo (``funcx-service create-client demo``), once;
3. configure the endpoint ``demo`` for that service and start it
   (``funcx-endpoint start``): it registers, starts a manager with workers;
4. with the SDK: register functions and run them: one returning data, one
   raising, one printing, and a batch of 1,000 with a progress bar; timings;
5. ``funcx-endpoint list`` and ``status`` (managers, workers, tasks);
6. print the web portal's address and a one-time sign-in link
   (``funcx-service portal-link demo``);
7. say how to stop it all (``make demo-stop``, which runs this with ``--stop``).

Everything lives in ``--state-dir`` (default ``.state/demo``), so running it
again reuses the service, the client and the endpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from typing import Dict, List

BIN = os.path.dirname(sys.executable)


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def run(argv: List[str], env: Dict[str, str], check: bool = True, capture: bool = False) -> str:
    print("$ " + " ".join(shlex.quote(a) for a in argv), flush=True)
    result = subprocess.run(argv, env=env, text=True, capture_output=capture)
    if capture:
        if result.stderr:
            sys.stderr.write(result.stderr)
    if check and result.returncode != 0:
        if capture:
            sys.stdout.write(result.stdout)
        sys.exit(f"demo: the command failed (exit {result.returncode})")
    return result.stdout if capture else ""


def tool(name: str) -> str:
    path = os.path.join(BIN, name)
    return path if os.path.exists(path) else name


def parse_env_lines(text: str) -> Dict[str, str]:
    found = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export ") :]
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            found[key] = shlex.split(value)[0] if value else ""
    return found


def stop(state_dir: str) -> None:
    env = dict(os.environ)
    endpoints = os.path.join(state_dir, "endpoints")
    service = os.path.join(state_dir, "service")
    if os.path.isdir(os.path.join(endpoints, "demo")):
        step("Stopping the endpoint")
        run([tool("funcx-endpoint"), "-c", endpoints, "stop", "demo"], env, check=False)
    if os.path.isdir(service):
        step("Stopping the private service and its broker")
        run([tool("funcx-service"), "-d", service, "stop"], env, check=False)
    print("\nStopped. Remove everything with `make clean` (or rm -rf " + state_dir + ").")


def demo(state_dir: str, batch: int) -> None:
    os.makedirs(state_dir, exist_ok=True)
    service_dir = os.path.join(state_dir, "service")
    endpoints = os.path.join(state_dir, "endpoints")
    client_file = os.path.join(state_dir, "client.env")
    env = dict(os.environ)

    step("Starting the private funcX web service (embedded RabbitMQ: about 10 s)")
    status = subprocess.run(
        [tool("funcx-service"), "-d", service_dir, "status"], env=env, capture_output=True
    )
    if status.returncode != 0:
        run([tool("funcx-service"), "-d", service_dir, "start"], env)
    else:
        print("(already running)")
    env.update(
        parse_env_lines(run([tool("funcx-service"), "-d", service_dir, "env"], env, capture=True))
    )

    step("A client (a user) for the demo")
    if not os.path.exists(client_file):
        text = run(
            [tool("funcx-service"), "-d", service_dir, "create-client", "demo"], env, capture=True
        )
        fd = os.open(client_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        print(f"credentials saved in {client_file}")
    else:
        print(f"reusing {client_file}")
    with open(client_file) as f:
        env.update(parse_env_lines(f.read()))
    os.environ.update(env)  # for the SDK in this process

    step("Configuring and starting the endpoint 'demo'")
    if not os.path.exists(os.path.join(endpoints, "demo", "config.py")):
        run(
            [
                tool("funcx-endpoint"),
                "-c",
                endpoints,
                "configure",
                "demo",
                "--service-address",
                env["FUNCX_SERVICE_ADDRESS"],
                "--service-ca-file",
                env["FUNCX_SERVICE_CA_FILE"],
            ],
            env,
        )
    state = run([tool("funcx-endpoint"), "-c", endpoints, "list"], env, capture=True)
    if "Running" not in state:
        run([tool("funcx-endpoint"), "-c", endpoints, "start", "demo"], env)
    run([tool("funcx-endpoint"), "-c", endpoints, "list"], env)
    endpoint_id = None
    import json

    with open(os.path.join(endpoints, "demo", "endpoint.json")) as f:
        endpoint_id = json.load(f)["endpoint_id"]

    step("Running functions through the service with the SDK")
    from funcx_endpoint.sdk import FuncXClient, FuncXExecutor, TaskExecutionFailed

    client = FuncXClient()

    def where_am_i(greeting):
        import os
        import platform
        import socket

        return {
            "greeting": greeting,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "python": platform.python_version(),
        }

    def fails(n):
        if n > 2:
            raise ValueError(f"{n} is too many")
        return n

    def prints(message):
        print(message)  # goes to the worker's log, not to the caller
        return len(message)

    def square(x):
        return x * x

    timings = []
    t0 = time.monotonic()
    fid = client.register_function(where_am_i)
    task = client.run("hello", endpoint_id=endpoint_id, function_id=fid)
    result = wait_result(client, task)
    timings.append(("returns data", time.monotonic() - t0))
    print(f"where_am_i('hello') -> {result}")

    t0 = time.monotonic()
    fid = client.register_function(fails)
    task = client.run(5, endpoint_id=endpoint_id, function_id=fid)
    try:
        wait_result(client, task)
    except TaskExecutionFailed as e:
        print(f"fails(5) raised remotely, as it should:\n{e}")
    timings.append(("raises", time.monotonic() - t0))

    t0 = time.monotonic()
    fid = client.register_function(prints)
    task = client.run("printed on the endpoint", endpoint_id=endpoint_id, function_id=fid)
    print(
        f"prints(...) -> {wait_result(client, task)} (the text is in the worker's "
        f"log under {os.path.join(endpoints, 'demo', 'interchange', 'managers')})"
    )
    timings.append(("prints", time.monotonic() - t0))

    print(f"\nA batch of {batch} tasks with FuncXExecutor:")
    t0 = time.monotonic()
    with FuncXExecutor(endpoint_id, funcx_client=client, show_progress=True) as executor:
        futures = [executor.submit(square, i) for i in range(batch)]
        values = [f.result(timeout=300) for f in futures]
    elapsed = time.monotonic() - t0
    assert values == [i * i for i in range(batch)], "wrong results"
    timings.append((f"batch of {batch}", elapsed))
    print(f"all {batch} results correct; sum = {sum(values)}")

    step("Timings (submit to result, through the service, broker, endpoint, workers)")
    for what, seconds in timings:
        print(f"  {what:<16} {seconds * 1000:8.0f} ms")
    print(f"  throughput        {batch / elapsed:8.0f} tasks/s (batch, polling the service)")

    step("The endpoint, live")
    run([tool("funcx-endpoint"), "-c", endpoints, "status", "demo"], env)

    step("The web portal: the endpoint, its functions and tasks in a browser")
    link = run(
        [tool("funcx-service"), "-d", service_dir, "portal-link", "demo"], env, capture=True
    ).strip()
    print(
        f"Portal: {link.split('/portal/')[0]}/portal/ (HTTPS with the service's own CA: "
        f"trust {env['FUNCX_SERVICE_CA_FILE']} or accept the warning)\n"
        f"Sign in with FUNCX_SDK_CLIENT_ID and FUNCX_SDK_CLIENT_SECRET from {client_file},\n"
        f"or open this one-time link (valid 15 minutes; "
        f"`funcx-service -d {service_dir} portal-link demo` makes another):\n    {link}"
    )

    step("Done")
    print(
        "The service, its broker and the endpoint keep running. To stop them all:\n"
        "    make demo-stop\n"
        f"To use them from a shell:  set -a; . {client_file}; set +a; "
        f'eval "$({tool("funcx-service")} -d {service_dir} env)"\n'
        f"Endpoint files: {os.path.join(endpoints, 'demo')}"
    )


def wait_result(client, task_id: str, timeout: float = 120.0):
    from funcx_endpoint.sdk import TaskPending

    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.get_result(task_id)
        except TaskPending:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", default=os.path.join(".state", "demo"))
    parser.add_argument("--stop", action="store_true", help="stop what the demo started")
    parser.add_argument("--batch", type=int, default=1000, help="size of the batch")
    args = parser.parse_args()
    state_dir = os.path.abspath(args.state_dir)
    if args.stop:
        stop(state_dir)
    else:
        demo(state_dir, args.batch)


if __name__ == "__main__":
    main()
