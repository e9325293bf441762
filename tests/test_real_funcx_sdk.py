"""The real funcX 1.0.13 SDK (from PyPI, in a virtualenv of its own) against our service.

``scripts/make-funcx-venv.sh`` makes (or reuses) ``.state/venv-funcx-1.0.13``
with ``pip install funcx==1.0.13``.  A script run with that venv's Python
logs in with client credentials (``FUNCX_SDK_CLIENT_ID``/``SECRET`` and
``GLOBUS_SDK_SERVICE_URL_AUTH``), registers functions, runs tasks, reads
results with ``get_result``/``get_batch_result``, uses ``FuncXExecutor``
(results over AMQP from a per-task-group queue) and the endpoint calls; a
second script registers containers and functions in them, and the task
messages the endpoint received are read back with funcX 1.0.13's own
``funcx_common``.  Meanwhile the test plays the endpoint on the broker
(:class:`~funcx_endpoint.testing.service.EndpointPlayer`): it takes the tasks
from the endpoint's queue, runs them, and publishes the results.

If the venv cannot be made (no network to PyPI), the test is skipped and says why.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import textwrap
import uuid
from typing import Any, Dict, Tuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from funcx_endpoint.testing.service import APIClient, EndpointPlayer, shared_service_async
from tests.support import REPO_ROOT

SCRIPT = textwrap.dedent(
    '''
    """Exercise the real funcX 1.0.13 SDK against a funcX service; print JSON."""
    import json
    import sys
    import time

    import funcx
    from funcx import FuncXClient, FuncXExecutor
    from funcx.errors import FuncxTaskExecutionFailed, TaskPending


    def add(a, b=1):
        return a + b


    def boom(x):
        raise ValueError(f"bad {x}")


    def wait_result(fxc, task_id, timeout=60):
        deadline = time.time() + timeout
        while True:
            try:
                return fxc.get_result(task_id)
            except TaskPending:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)


    def main():
        cfg = json.loads(sys.argv[1])
        eid = cfg["endpoint_id"]
        out = {"funcx": funcx.__version__}
        fxc = FuncXClient(funcx_service_address=cfg["base_url"])
        fid = fxc.register_function(add, description="adds")
        boom_id = fxc.register_function(boom)
        out["endpoints"] = [e["endpoint_id"] for e in fxc.get_endpoints()]
        out["metadata_name"] = fxc.get_endpoint_metadata(eid)["endpoint_name"]
        out["status"] = fxc.get_endpoint_status(eid)["status"]

        task_id = fxc.run(1, b=2, endpoint_id=eid, function_id=fid)
        fail_id = fxc.run(7, endpoint_id=eid, function_id=boom_id)
        batch = fxc.create_batch()
        for i in range(5):
            batch.add(fid, eid, args=(i,), kwargs={"b": 10})
        batch_ids = fxc.batch_run(batch)
        out["result"] = wait_result(fxc, task_id)
        out["task"] = fxc.get_task(task_id)
        try:
            wait_result(fxc, fail_id)
            out["failure"] = None
        except FuncxTaskExecutionFailed as e:
            out["failure"] = str(e)
        deadline = time.time() + 60
        while True:
            batch_results = fxc.get_batch_result(batch_ids)
            if all(not r["pending"] for r in batch_results.values()) or time.time() > deadline:
                break
            time.sleep(0.2)
        out["batch"] = sorted(r.get("result") for r in batch_results.values())

        with FuncXExecutor(endpoint_id=eid, funcx_client=fxc) as fx:
            futures = [fx.submit(add, i, b=100) for i in range(3)]
            out["executor"] = [f.result(timeout=60) for f in futures]
            bad = fx.submit(boom, 3)
            try:
                bad.result(timeout=60)
                out["executor_failure"] = None
            except FuncxTaskExecutionFailed as e:
                out["executor_failure"] = str(e)

        fxc.add_to_whitelist(eid, [fid])
        out["whitelist"] = fxc.get_whitelist(eid)["functions"]
        fxc.delete_from_whitelist(eid, [fid])
        out["whitelist_after"] = fxc.get_whitelist(eid)["functions"]
        auth = fxc.login_manager.get_auth_client()
        out["whoami"] = auth.oauth2_userinfo()["preferred_username"]
        out["stop"] = fxc.stop_endpoint(eid)["locked"]
        fxc.logout()
        out["logged_out"] = True
        print(json.dumps(out, default=str))


    main()
    '''
)


CONTAINER_SCRIPT = textwrap.dedent(
    '''
    """Containers with the real funcX 1.0.13 SDK against a funcX service; print JSON."""
    import json
    import sys
    import time
    import uuid

    import globus_sdk
    from funcx import ContainerSpec, FuncXClient, FuncXExecutor
    from funcx.errors import TaskPending


    def add(a, b=1):
        return a + b


    def refusal(call, *args, **kwargs):
        try:
            call(*args, **kwargs)
        except globus_sdk.GlobusAPIError as e:
            return [e.http_status, e.code]
        return None


    def main():
        cfg = json.loads(sys.argv[1])
        eid = cfg["endpoint_id"]
        out = {}
        fxc = FuncXClient(funcx_service_address=cfg["base_url"])
        cid = fxc.register_container(
            "python:3.11-slim", "docker", name="py311", description="slim python"
        )
        out["container_id"] = cid
        out["container"] = fxc.get_container(cid, "docker")
        sid = fxc.register_container("/images/py.sif", "singularity")
        out["singularity_id"] = sid
        out["singularity"] = fxc.get_container(sid, "singularity")
        out["wrong_type"] = refusal(fxc.get_container, cid, "singularity")
        out["unknown"] = refusal(fxc.get_container, str(uuid.uuid4()), "docker")
        out["bad_type"] = refusal(fxc.register_container, "python:3", "lxc")
        out["build_status"] = fxc.get_container_build_status(cid)
        out["build"] = refusal(fxc.build_container, ContainerSpec(name="x", pip=["numpy"]))
        out["unknown_container"] = refusal(
            fxc.register_function, add, container_uuid=str(uuid.uuid4())
        )

        fid = fxc.register_function(add, container_uuid=cid)
        task_id = fxc.run(1, b=2, endpoint_id=eid, function_id=fid)
        out["task_id"] = task_id
        deadline = time.time() + 60
        while True:
            try:
                out["result"] = fxc.get_result(task_id)
                break
            except TaskPending:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        with FuncXExecutor(endpoint_id=eid, funcx_client=fxc, container_id=sid) as fx:
            out["executor"] = fx.submit(add, 5, b=10).result(timeout=60)
        print(json.dumps(out, default=str))


    main()
    '''
)

#: Reads task messages with funcx_common (funcX 1.0.13's own reader, in its venv) and
#: picks each task's image as a funcX 1.0.13 endpoint of each container type would.
READ_TASKS_SCRIPT = textwrap.dedent(
    """
    import base64
    import json
    import sys

    from funcx_common.messagepack import unpack

    out = []
    for body in json.loads(sys.argv[1]):
        task = unpack(base64.b64decode(body))
        images = task.container.images if task.container else []
        out.append(
            {
                "task_id": str(task.task_id),
                "container_id": str(task.container_id),
                "name": task.container.name if task.container else None,
                "images": [[i.image_type, i.location, i.created_at] for i in images],
                "runs_with": {
                    kind: next((i.location for i in images if i.image_type == kind), "RAW")
                    for kind in ("docker", "singularity", "shifter")
                },
            }
        )
    print(json.dumps(out))
    """
)


def _funcx_python() -> str:
    script = os.path.join(REPO_ROOT, "scripts", "make-funcx-venv.sh")
    try:
        # Not this project's Python path (trial -j sets PYTHONPATH for its
        # workers): the funcx venv must see only its own packages.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        made = subprocess.run([script], capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        raise SkipTest("making the funcx 1.0.13 venv took over 10 minutes") from None
    if made.returncode != 0:
        raise SkipTest(
            "could not make the funcx 1.0.13 venv (no access to PyPI?): "
            + (made.stderr or made.stdout)[-800:]
        )
    return made.stdout.strip().splitlines()[-1]


class RealFuncXSDKTests(TestCase):
    timeout = 600

    async def played_endpoint(
        self, client_name: str
    ) -> Tuple[str, Any, Any, Any, Tuple[str, str], Dict[str, Any]]:
        """(the funcx venv's python, the service, an API client logged in as a new
        client ``client_name``, the endpoint player, the client's credentials, the
        userinfo of its user)."""
        python = await deferToThread(_funcx_python)
        service = await shared_service_async(reactor)
        client = await service.create_client_async(reactor, client_name)
        api = APIClient(reactor, service)
        await api.login(*client)
        status, me = await api.get("/v2/oauth2/userinfo")
        # The endpoint is registered (as this user) and played by this test.
        endpoint_id = str(uuid.uuid4())
        status, registration = await api.post(
            "/v2/endpoints",
            {"endpoint_name": "played", "endpoint_uuid": endpoint_id, "metadata": {}},
        )
        self.assertEqual(status, 200, registration)
        player = EndpointPlayer(reactor, registration, service.broker_ca_file)
        await player.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(player.stop()))
        await player.report()
        return python, service, api, player, client, me

    async def run_script(
        self, python: str, service: Any, client: Tuple[str, str], script_text: str, *args: str
    ) -> Dict[str, Any]:
        """Run ``script_text`` with the funcx venv's python, logged in as ``client``;
        the JSON of its last line of output."""
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        script = os.path.join(home, "use_real_sdk.py")
        with open(script, "w") as f:
            f.write(script_text)
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("FUNCX_", "GLOBUS_")) and key != "PYTHONPATH"
        }
        env.update(service.client_env(client))
        env["HOME"] = home

        def run() -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [python, script, *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=300,
                cwd=home,
            )

        done = await deferToThread(run)
        if done.returncode != 0:
            self.fail(
                f"the real SDK script failed ({done.returncode}):\n{done.stderr[-4000:]}\n"
                f"service log:\n{service.log_tail(30)}"
            )
        out: Dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return out

    def test_real_sdk(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.run_real_sdk())

    async def run_real_sdk(self) -> None:
        python, service, api, player, client, me = await self.played_endpoint("real-sdk")
        endpoint_id = player.endpoint_id
        config = json.dumps({"base_url": service.base_url, "endpoint_id": endpoint_id})
        out = await self.run_script(python, service, client, SCRIPT, config)
        self.assertEqual(out["funcx"], "1.0.13")
        self.assertEqual(out["endpoints"], [endpoint_id])
        self.assertEqual(out["metadata_name"], "played")
        self.assertEqual(out["status"], "online")
        self.assertEqual(out["result"], 3)
        self.assertEqual(out["task"]["status"], "success")
        self.assertIn("ValueError: bad 7", out["failure"])
        self.assertEqual(out["batch"], [10, 11, 12, 13, 14])
        self.assertEqual(out["executor"], [100, 101, 102])
        self.assertIn("ValueError: bad 3", out["executor_failure"])
        self.assertEqual(len(out["whitelist"]), 1)
        self.assertEqual(out["whitelist_after"], [])
        self.assertEqual(out["whoami"], me["preferred_username"])
        self.assertTrue(out["stop"])
        self.assertTrue(out["logged_out"])
        # 2 + 5 tasks by the client, 4 by the executor: each ran once here.
        self.assertEqual(len(player.tasks), 11)
        self.assertEqual(len({t.task_id for t in player.tasks}), 11)
        # stop_endpoint locked it: the next registration is refused (423), once.
        body = {"endpoint_name": "played", "endpoint_uuid": endpoint_id}
        await player.stop()
        status, answer = await api.post("/v2/endpoints", body)
        self.assertEqual(status, 423, answer)
        status, answer = await api.post("/v2/endpoints", body)
        self.assertEqual(status, 200, answer)

    def test_real_sdk_containers(self) -> Deferred[None]:
        """register_container, get_container, register_function(container_uuid=...),
        FuncXExecutor(container_id=...): the tasks reach the endpoint with their
        container, readable by funcx_common, each image where a funcX 1.0.13
        endpoint of its type looks for it."""
        return Deferred.fromCoroutine(self.run_real_sdk_containers())

    async def run_real_sdk_containers(self) -> None:
        python, service, api, player, client, me = await self.played_endpoint("real-sdk-containers")
        config = json.dumps({"base_url": service.base_url, "endpoint_id": player.endpoint_id})
        out = await self.run_script(python, service, client, CONTAINER_SCRIPT, config)
        container_id, singularity_id = out["container_id"], out["singularity_id"]
        container = out["container"]
        self.assertEqual(
            {k: container[k] for k in ("container_uuid", "name", "type", "location")},
            {
                "container_uuid": container_id,
                "name": "py311",
                "type": "docker",
                "location": "python:3.11-slim",
            },
        )
        self.assertEqual(container["description"], "slim python")
        self.assertEqual(
            (out["singularity"]["type"], out["singularity"]["location"]),
            ("singularity", "/images/py.sif"),
        )
        self.assertEqual(out["wrong_type"], [404, "CONTAINER_NOT_FOUND"])
        self.assertEqual(out["unknown"], [404, "CONTAINER_NOT_FOUND"])
        self.assertEqual(out["bad_type"], [400, "INVALID_CONTAINER_TYPE"])
        self.assertEqual(out["build_status"], "provided")
        self.assertEqual(out["build"], [501, "CONTAINER_BUILD_UNAVAILABLE"])
        self.assertEqual(out["unknown_container"], [404, "CONTAINER_NOT_FOUND"])
        self.assertEqual(out["result"], 3)
        self.assertEqual(out["executor"], 15)

        # What the endpoint received, read with funcX 1.0.13's own reader.
        self.assertEqual(len(player.bodies), 2)
        bodies = json.dumps([base64.b64encode(body).decode() for body in player.bodies])
        [task, executor_task] = await self.run_script(
            python, service, client, READ_TASKS_SCRIPT, bodies
        )
        self.assertEqual(task["task_id"], out["task_id"])
        self.assertEqual((task["container_id"], task["name"]), (container_id, "py311"))
        self.assertEqual([i[:2] for i in task["images"]], [["docker", "python:3.11-slim"]])
        self.assertIsInstance(task["images"][0][2], int)
        self.assertEqual(
            task["runs_with"],
            {"docker": "python:3.11-slim", "singularity": "RAW", "shifter": "RAW"},
        )
        self.assertEqual(executor_task["container_id"], singularity_id)
        self.assertEqual(executor_task["runs_with"]["singularity"], "/images/py.sif")
        self.assertEqual(executor_task["runs_with"]["docker"], "RAW")
