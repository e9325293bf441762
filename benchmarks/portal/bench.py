"""The web portal in headless Chromium: first paint of big pages, and how soon a
result shows in an open task page.

Starts a RabbitMQ node and a funcx-service of its own, and a user who owns:

* 100 endpoints (registered and reporting, written to the service's storage
  with its own functions: 100 broker users would take minutes to provision);
* 10,000 finished tasks (stored the same way);
* and another user, a real endpoint daemon with 2 workers, started last (the
  first user's 100 endpoints are beyond the service's default quota of 20).

Figures, each over ``--runs`` loads in Debian's Chromium (headless, Selenium,
signed in through the portal's form):

* first-contentful-paint (Performance API) of the endpoints page (100 rows),
  of the first tasks page (50 of 10,000) and of a deep page (page 150);
* the result delay: a task sleeps ``--sleep`` seconds and returns
  ``time.time()`` as it ends (same machine, same clock); its page is open, and
  a MutationObserver notes when the result's text appears.  The delay covers
  worker, manager, endpoint, broker, the service storing it, and the live
  stream (server-sent events) updating the page.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from funcx_endpoint.endpoint.layout import EndpointDir  # noqa: E402

ENDPOINTS = 100
TASKS = 10_000


def ends_at(seconds):
    import time

    time.sleep(seconds)
    return time.time()


def cli(config_dir: str, env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    full = dict(os.environ, **env)
    full["PYTHONPATH"] = ROOT
    return subprocess.run(
        [sys.executable, "-m", "funcx_endpoint.cli", "-c", config_dir, *args],
        capture_output=True,
        text=True,
        env=full,
        timeout=180,
    )


def populate(service: Any, client_id: str) -> None:
    """100 reporting endpoints and 10,000 finished tasks of the client's user."""
    from funcx_endpoint.portal import store
    from funcx_endpoint.webservice import endpoints, tasks
    from funcx_endpoint.webservice.records import IncomingResult, NewTask, Report
    from funcx_endpoint.webservice.settings import ServiceSettings
    from funcx_endpoint.webservice.storage import open_sync
    from funcx_endpoint.wire import pack_function, serialize

    settings = ServiceSettings.load(service.state_dir)
    connection, call = open_sync(settings.effective_database_url)
    try:
        owner = call(store.active_client_named)(client_id).identity_id
        now = time.time()
        ids = [str(uuid.uuid4()) for _ in range(ENDPOINTS)]
        state = {"managers": 2, "total_workers": 16, "idle_workers": 5, "pending_tasks": 3}
        for index, endpoint_id in enumerate(ids):
            call(endpoints.save_registration)(
                endpoint_id,
                owner,
                f"bench-{index:03d}",
                {"hostname": f"node-{index:03d}.example", "endpoint_version": "bench"},
                None,
                None,
                3600.0,  # online for the whole run without more reports
                f"bench-{index}",
                "unused",
                "127.0.0.1",
                now,
            )
        call(endpoints.record_reports)(
            [Report(e, {**state, "heartbeat_period": 3600}, {}, False, now) for e in ids], 20
        )
        function_id = str(uuid.uuid4())
        call(tasks.insert_function)(
            {
                "function_id": function_id,
                "owner": owner,
                "name": "bench_function",
                "entry_point": "bench_function",
                "description": None,
                "container_uuid": None,
                "public": False,
                "group_id": None,
                "function_code": pack_function(ends_at),
                "created": now,
            }
        )
        group = str(uuid.uuid4())
        result = serialize(42)
        for start in range(0, TASKS, 1000):
            batch = [str(uuid.uuid4()) for _ in range(1000)]
            call(tasks.insert_tasks)(
                [
                    NewTask(
                        t, owner, function_id, ids[0], group, "x", None, now - TASKS + start + i
                    )
                    for i, t in enumerate(batch)
                ]
            )
            call(tasks.store_results)(
                [IncomingResult(t, ids[0], result, None, None, f"{now:.3f}") for t in batch],
                now,
            )
    finally:
        connection.close()


def start_endpoint(service: Any, env: Dict[str, str], base: str) -> EndpointDir:
    done = cli(
        base,
        env,
        "configure",
        "bench",
        "--service-address",
        service.base_url,
        "--service-ca-file",
        service.ca_file,
        "--amqp-ca-file",
        service.broker_ca_file,
    )
    assert done.returncode == 0, done.stderr
    ep = EndpointDir(base, "bench")
    with open(ep.config_file) as f:
        text = f.read()
    text = text.replace('max_workers_per_node=float("inf"),', "max_workers_per_node=2,")
    with open(ep.config_file, "w") as f:
        f.write(text)
    done = cli(base, env, "start", "bench")
    assert done.returncode == 0, done.stdout + done.stderr
    deadline = time.time() + 60
    while "workers: 2" not in cli(base, env, "status", "bench").stdout:
        if time.time() > deadline:
            raise RuntimeError("the endpoint's workers did not come up")
        time.sleep(0.5)
    return ep


def sign_in(driver: Any, portal: str, client_id: str, secret: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(portal + "/signin")
    driver.find_element(By.ID, "client_id").send_keys(client_id)
    driver.find_element(By.ID, "client_secret").send_keys(secret)
    driver.find_element(By.ID, "signin").click()
    deadline = time.time() + 20
    while not driver.find_elements(By.ID, "signout"):
        if time.time() > deadline:
            raise RuntimeError("could not sign in")
        time.sleep(0.05)


def paint(driver: Any, url: str, runs: int, expect: str) -> Dict[str, Any]:
    """First-contentful-paint and server time (ms) of ``url`` over ``runs`` loads."""
    from funcx_endpoint.testing.browser import first_contentful_paint

    paints: List[float] = []
    servers: List[float] = []
    for _ in range(runs):
        driver.get(url)
        if expect not in driver.page_source:
            raise RuntimeError(f"{url} does not show {expect!r}")
        fcp: Optional[float] = None
        deadline = time.time() + 10
        while fcp is None and time.time() < deadline:
            fcp = first_contentful_paint(driver)
            time.sleep(0.01 if fcp is None else 0)
        if fcp is None:
            raise RuntimeError(f"{url} was not painted")
        paints.append(fcp)
        servers.append(
            driver.execute_script(
                "const n = performance.getEntriesByType('navigation')[0];"
                "return n.responseEnd - n.requestStart;"
            )
        )
    return _summary(paints) | {"server_ms_p50": round(statistics.median(servers), 1)}


def _summary(values: List[float]) -> Dict[str, Any]:
    values = sorted(values)
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values), 1),
        "p90_ms": round(values[min(len(values) - 1, int(0.9 * len(values)))], 1),
        "max_ms": round(values[-1], 1),
    }


_OBSERVE = """
const target = document.getElementById('result');
window.__shown = null;
const seen = () => { if (target.textContent.trim() && window.__shown === null) {
  window.__shown = performance.timeOrigin + performance.now(); } };
new MutationObserver(seen).observe(target, {childList: true, characterData: true, subtree: true});
seen();
"""


def result_delay(driver: Any, portal: str, client: Any, endpoint_id: str, runs: int, sleep: float):
    function_id = client.register_function(ends_at)
    delays: List[float] = []
    for _ in range(runs):
        task_id = client.run(sleep, endpoint_id=endpoint_id, function_id=function_id)
        driver.get(f"{portal}/tasks/{task_id}")
        driver.execute_script(_OBSERVE)
        if driver.execute_script("return window.__shown") is not None:
            raise RuntimeError(
                "the result was there before the page was watched: use a longer --sleep"
            )
        deadline = time.time() + 60
        shown = None
        while shown is None:
            if time.time() > deadline:
                raise RuntimeError(f"the result of {task_id} did not show")
            time.sleep(0.01)
            shown = driver.execute_script("return window.__shown")
        finished = float(driver.find_element("id", "result").text)
        delays.append(shown - finished * 1000)
    return _summary(delays)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="loads (and tasks) per figure [20]")
    parser.add_argument("--sleep", type=float, default=1.0, help="each task's run, s [1.0]")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)

    from funcx_endpoint.testing import browser
    from funcx_endpoint.testing.service import sdk_client, shared_service, stop_shared_service

    why = browser.missing()
    if why is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 1
    service = shared_service()
    client_id, secret = service.create_client()
    env = service.client_env((client_id, secret))
    portal = service.root_url + "/portal"
    base = tempfile.mkdtemp(prefix="funcx-bench-portal-")
    figures: Dict[str, Any] = {}
    driver = None
    ep = None
    try:
        t0 = time.monotonic()
        populate(service, client_id)
        print(f"stored {ENDPOINTS} endpoints and {TASKS} tasks in {time.monotonic() - t0:.1f} s")
        driver = browser.headless_chromium()
        sign_in(driver, portal, client_id, secret)
        figures["endpoints page, 100 endpoints"] = paint(
            driver, portal + "/endpoints", args.runs, "bench-099"
        )
        figures["tasks page 1, 10,000 tasks"] = paint(
            driver, portal + "/tasks", args.runs, "10000 tasks; page 1 of 200"
        )
        figures["tasks page 150, 10,000 tasks"] = paint(
            driver, portal + "/tasks?page=150", args.runs, "page 150 of 200"
        )
        # Another user for the real endpoint (the first holds 100: beyond the quota).
        env = service.client_env(service.create_client())
        ep = start_endpoint(service, env, base)
        driver.delete_all_cookies()
        sign_in(driver, portal, env["FUNCX_SDK_CLIENT_ID"], env["FUNCX_SDK_CLIENT_SECRET"])
        client = sdk_client(env)
        endpoint_id = ep.endpoint_id()
        assert endpoint_id is not None
        figures["result delay, task end -> shown"] = result_delay(
            driver, portal, client, endpoint_id, args.runs, args.sleep
        )
        client.close()
    finally:
        if driver is not None:
            driver.quit()
        if ep is not None:
            cli(ep.config_dir, env, "stop", ep.name)
        stop_shared_service()
    print()
    print(
        f"{'figure':<36}{'n':>4}{'p50 (ms)':>10}{'p90 (ms)':>10}{'max (ms)':>10}{'server p50':>12}"
    )
    for name, values in figures.items():
        print(
            f"{name:<36}{values['n']:>4}{values['p50_ms']:>10}{values['p90_ms']:>10}"
            f"{values['max_ms']:>10}{values.get('server_ms_p50', '-'):>12}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
