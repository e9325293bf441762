"""Containers in the service: registering them, reading them back, functions that name
them, and their tasks carrying the container to the endpoint.

The service's real API, storage (SQLite) and dispatch run in this process on a
Clock, with the fake broker (as tests/test_webservice_clock.py); the messages
checked are the bytes the service published on the endpoint's task queue.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Dict, List, Optional

from funcx_endpoint.amqp import topology
from funcx_endpoint.wire import (
    MESSAGE_BATCHES,
    Container,
    ContainerImage,
    Task,
    TaskBatchMessage,
    pack_function,
    pack_payload,
    unpack,
)
from tests.test_webservice_clock import START, ClockedServiceTestCase, add

OTHER = "someone-else"
TYPES = ["docker", "singularity", "shifter", "podman", "apptainer"]


class ContainerTestCase(ClockedServiceTestCase):
    """Shortcuts for the container calls, as a user (the default one unless named)."""

    def call(
        self, method: str, path: str, body: Any = None, user: str = "test-user"
    ) -> tuple[int, Any]:
        return self.request(method, path, token=self.service.issue_token(user), json=body)

    def register(
        self,
        location: str = "python:3.11",
        container_type: str = "docker",
        user: str = "test-user",
        **extra: Any,
    ) -> str:
        body = {"name": "py", "location": location, "description": "", "type": container_type}
        code, answer = self.call("POST", "/v2/containers", {**body, **extra}, user)
        self.assertEqual(code, 200, answer)
        self.assertEqual(list(answer), ["container_id"])
        return str(answer["container_id"])

    def function(self, container_id: Optional[str], user: str = "test-user") -> tuple[int, Any]:
        return self.call(
            "POST",
            "/v2/functions",
            {
                "function_name": "add",
                "function_code": pack_function(add),
                "entry_point": "add",
                "container_uuid": container_id,
                "description": None,
                "public": False,
                "group": None,
            },
            user,
        )

    def container_rows(self) -> int:
        return int(
            self.service._run(
                lambda tx: tx.execute("SELECT COUNT(*) FROM containers").fetchone()[0]
            )
        )

    def task_messages(self, endpoint_id: str) -> List[Dict[str, Any]]:
        """The ``data`` of each message published on the endpoint's task queue."""
        queue = self.service.broker.queues[topology.task_queue(endpoint_id)]
        messages = []
        for message in queue:
            self.assertEqual(message.body[:1], b"\x01")
            messages.append(json.loads(message.body[1:]))
        return messages


class RegisterAndGetTests(ContainerTestCase):
    def test_register_and_get_back(self) -> None:
        """POST /v2/containers as funcX 1.0.13 sends it; GET .../<id>/<type> as it reads it."""
        self.clock.advance(5)
        container_id = self.register("python:3.11-slim", "Docker", name="py311", description="d")
        code, answer = self.call("GET", f"/v2/containers/{container_id}/docker")
        self.assertEqual(code, 200, answer)
        self.assertEqual(
            answer,
            {
                "container": {
                    "container_uuid": container_id,
                    "name": "py311",
                    "description": "d",
                    "public": False,
                    "type": "docker",
                    "location": "python:3.11-slim",
                    "build_status": "provided",
                    "build_stderr": None,
                    "created_at": START + 5,
                    "modified_at": START + 5,
                }
            },
        )
        # The type in any case; the id in any spelling of the UUID.
        code, again = self.call("GET", f"/v2/containers/{container_id.upper()}/DOCKER")
        self.assertEqual((code, again), (200, answer))
        # No image of another type.
        code, answer = self.call("GET", f"/v2/containers/{container_id}/singularity")
        self.assertEqual((code, answer["code"]), (404, "CONTAINER_NOT_FOUND"))
        self.assertIn("no singularity image (it has: docker)", answer["message"])

    def test_every_type(self) -> None:
        for container_type in TYPES:
            container_id = self.register(f"/images/{container_type}.img", container_type.upper())
            code, answer = self.call("GET", f"/v2/containers/{container_id}/{container_type}")
            self.assertEqual(code, 200, answer)
            self.assertEqual(answer["container"]["type"], container_type)
            self.assertEqual(answer["container"]["location"], f"/images/{container_type}.img")

    def test_name_and_description_are_optional(self) -> None:
        """funcX 1.0.13 sends name "" and description "" by default; absent is fine too."""
        code, answer = self.call(
            "POST", "/v2/containers", {"location": "python:3", "type": "docker"}
        )
        self.assertEqual(code, 200, answer)
        code, answer = self.call("GET", f"/v2/containers/{answer['container_id']}/docker")
        self.assertEqual(
            (answer["container"]["name"], answer["container"]["description"]), ("", None)
        )

    def test_bad_registrations_are_refused_and_store_nothing(self) -> None:
        good = {"name": "n", "location": "python:3", "description": "", "type": "docker"}
        cases = [
            ({**good, "type": "lxc"}, 400, "INVALID_CONTAINER_TYPE"),
            ({**good, "type": 5}, 400, "INVALID_CONTAINER_TYPE"),
            ({**good, "type": ""}, 400, "INVALID_CONTAINER_TYPE"),
            ({k: v for k, v in good.items() if k != "type"}, 400, "MISSING_FIELD"),
            ({k: v for k, v in good.items() if k != "location"}, 400, "MISSING_FIELD"),
            ({**good, "location": None}, 400, "MISSING_FIELD"),
            ({**good, "location": ["python:3"]}, 400, "INVALID_TYPE"),
            ({**good, "location": ""}, 422, "INVALID_VALUE"),
            ({**good, "location": "   "}, 422, "INVALID_VALUE"),
            ({**good, "location": "python:3\nrm -rf /"}, 400, "INVALID_VALUE"),
            ({**good, "location": "x" * 4097}, 422, "INVALID_VALUE"),
            ({**good, "name": "n" * 257}, 422, "INVALID_VALUE"),
            ({**good, "name": 7}, 400, "INVALID_TYPE"),
            ({**good, "description": "d" * (64 * 1024 + 1)}, 422, "INVALID_VALUE"),
            ({**good, "public": "yes"}, 400, "INVALID_TYPE"),
            ([good], 400, "INVALID_BODY"),
        ]
        for body, status, error in cases:
            code, answer = self.call("POST", "/v2/containers", body)
            self.assertEqual((code, answer["code"]), (status, error), body)
            self.assertTrue(answer["message"], body)
        code, answer = self.call("POST", "/v2/containers")
        self.assertEqual((code, answer["code"]), (400, "MISSING_BODY"))
        self.assertEqual(self.container_rows(), 0)
        # The longest accepted values are accepted.
        self.register("x" * 4096, name="n" * 256)
        self.assertEqual(self.container_rows(), 1)

    def test_bad_paths(self) -> None:
        container_id = self.register()
        code, answer = self.call("GET", "/v2/containers/not-a-uuid/docker")
        self.assertEqual((code, answer["code"]), (400, "INVALID_UUID"))
        code, answer = self.call("GET", f"/v2/containers/{container_id}/lxc")
        self.assertEqual((code, answer["code"]), (400, "INVALID_CONTAINER_TYPE"))
        self.assertIn("docker, singularity, shifter, podman, apptainer", answer["message"])
        code, answer = self.call("GET", f"/v2/containers/{uuid.uuid4()}/docker")
        self.assertEqual((code, answer["code"]), (404, "CONTAINER_NOT_FOUND"))
        code, answer = self.call("DELETE", f"/v2/containers/{container_id}/docker")
        self.assertEqual((code, answer["code"]), (405, "METHOD_NOT_ALLOWED"))

    def test_token_required(self) -> None:
        container_id = self.register()
        for method, path in (
            ("POST", "/v2/containers"),
            ("GET", f"/v2/containers/{container_id}/docker"),
            ("GET", f"/v2/containers/{container_id}"),
            ("PUT", f"/v2/containers/{container_id}/docker"),
        ):
            code, answer = self.request(method, path, json={"location": "x", "type": "docker"})
            self.assertEqual((code, answer["code"]), (401, "UNAUTHORIZED"), path)

    def test_whole_container_and_more_images(self) -> None:
        """GET /v2/containers/<id> shows every image; PUT .../<type> adds or moves one."""
        container_id = self.register("python:3.11", "docker")
        self.clock.advance(10)
        code, answer = self.call(
            "PUT", f"/v2/containers/{container_id}/Singularity", {"location": "/img/py.sif"}
        )
        self.assertEqual(code, 200, answer)
        self.assertEqual(
            (answer["container"]["type"], answer["container"]["location"]),
            ("singularity", "/img/py.sif"),
        )
        self.assertEqual(answer["container"]["modified_at"], START + 10)
        self.clock.advance(10)
        code, answer = self.call(
            "PUT", f"/v2/containers/{container_id}/docker", {"location": "python:3.12"}
        )
        self.assertEqual(code, 200, answer)
        code, answer = self.call("GET", f"/v2/containers/{container_id}")
        self.assertEqual(code, 200, answer)
        container = answer["container"]
        self.assertEqual((container["created_at"], container["modified_at"]), (START, START + 20))
        images = [
            (i["type"], i["location"], i["created_at"], i["modified_at"])
            for i in container["images"]
        ]
        self.assertEqual(
            images,
            [
                ("docker", "python:3.12", START, START + 20),
                ("singularity", "/img/py.sif", START + 10, START + 10),
            ],
        )
        for body, status, error in (
            ({}, 400, "MISSING_FIELD"),
            ({"location": "a\tb"}, 400, "INVALID_VALUE"),
            ({"location": "x" * 4097}, 422, "INVALID_VALUE"),
        ):
            code, answer = self.call("PUT", f"/v2/containers/{container_id}/docker", body)
            self.assertEqual((code, answer["code"]), (status, error), body)
        code, answer = self.call(
            "PUT", f"/v2/containers/{container_id}/lxc", {"location": "python:3"}
        )
        self.assertEqual((code, answer["code"]), (400, "INVALID_CONTAINER_TYPE"))
        code, answer = self.call("GET", f"/v2/containers/{container_id}/docker")
        self.assertEqual(answer["container"]["location"], "python:3.12")

    def test_builds(self) -> None:
        """funcX 1.0's build calls: nothing is built here; registered images are 'provided'."""
        code, answer = self.call("POST", "/v2/containers/build", {"name": "x", "pip": ["numpy"]})
        self.assertEqual((code, answer["code"]), (501, "CONTAINER_BUILD_UNAVAILABLE"))
        self.assertIn("register_container", answer["message"])
        container_id = self.register()
        code, answer = self.call("GET", f"/v2/containers/build/{container_id}")
        self.assertEqual((code, answer), (200, {"status": "provided"}))
        code, answer = self.call("GET", f"/v2/containers/build/{uuid.uuid4()}")
        self.assertEqual((code, answer["code"]), (404, "CONTAINER_NOT_FOUND"))
        code, answer = self.call("GET", f"/v2/containers/build/{container_id}", user=OTHER)
        self.assertEqual((code, answer["code"]), (404, "CONTAINER_NOT_FOUND"))


class AccessTests(ContainerTestCase):
    def test_another_users_private_container(self) -> None:
        """Not seen, not used, not changed: 404 as if it did not exist."""
        theirs = self.register(user=OTHER)
        for method, path, body in (
            ("GET", f"/v2/containers/{theirs}/docker", None),
            ("GET", f"/v2/containers/{theirs}", None),
            ("PUT", f"/v2/containers/{theirs}/singularity", {"location": "/x.sif"}),
        ):
            code, answer = self.call(method, path, body)
            self.assertEqual((code, answer["code"]), (404, "CONTAINER_NOT_FOUND"), path)
            self.assertNotIn("python", json.dumps(answer))
        code, answer = self.function(theirs)
        self.assertEqual((code, answer["code"]), (404, "CONTAINER_NOT_FOUND"))
        self.assertEqual(len(self.service.functions), 0)
        # Its owner still has it as it was.
        code, answer = self.call("GET", f"/v2/containers/{theirs}", user=OTHER)
        self.assertEqual([i["type"] for i in answer["container"]["images"]], ["docker"])

    def test_another_users_public_container(self) -> None:
        """Seen and used by anyone; changed only by its owner (403)."""
        theirs = self.register(user=OTHER, public=True)
        code, answer = self.call("GET", f"/v2/containers/{theirs}/docker")
        self.assertEqual((code, answer["container"]["public"]), (200, True))
        code, answer = self.function(theirs)
        self.assertEqual(code, 200, answer)
        code, answer = self.call(
            "PUT", f"/v2/containers/{theirs}/docker", {"location": "evil:latest"}
        )
        self.assertEqual((code, answer["code"]), (403, "CONTAINER_FORBIDDEN"))
        code, answer = self.call("GET", f"/v2/containers/{theirs}/docker")
        self.assertEqual(answer["container"]["location"], "python:3.11")

    def test_function_with_unknown_or_malformed_container(self) -> None:
        code, answer = self.function(str(uuid.uuid4()))
        self.assertEqual((code, answer["code"]), (404, "CONTAINER_NOT_FOUND"))
        self.assertIn("register it first", answer["message"])
        code, answer = self.function("not-a-uuid")
        self.assertEqual((code, answer["code"]), (400, "INVALID_UUID"))
        self.assertEqual(len(self.service.functions), 0)
        mine = self.register()
        code, answer = self.function(mine.upper())
        self.assertEqual(code, 200, answer)
        stored = self.service._run(
            lambda tx: tx.execute(
                "SELECT container_uuid FROM functions WHERE function_id = ?",
                (answer["function_uuid"],),
            ).fetchone()[0]
        )
        self.assertEqual(stored, mine)


class TaskMessageTests(ContainerTestCase):
    def endpoint(self, **metadata: Any) -> str:
        """A registered endpoint, online (its first report stored)."""
        endpoint_id = self.service.add_endpoint(**metadata)
        self.clock.advance(0)
        return endpoint_id

    def submit(self, tasks: List[List[str]]) -> List[str]:
        code, answer = self.call("POST", "/v2/submit", {"tasks": tasks})
        self.assertEqual(code, 200, answer)
        self.assertEqual([r["http_status_code"] for r in answer["results"]], [200] * len(tasks))
        return [r["task_uuid"] for r in answer["results"]]

    def containerized_function(self, *images: tuple[str, str]) -> tuple[str, str]:
        """A container with ``images`` ((type, location) pairs) and a function in it."""
        container_id = self.register(images[0][1], images[0][0], name="py")
        for image_type, location in images[1:]:
            code, answer = self.call(
                "PUT", f"/v2/containers/{container_id}/{image_type}", {"location": location}
            )
            self.assertEqual(code, 200, answer)
        code, answer = self.function(container_id)
        self.assertEqual(code, 200, answer)
        return container_id, str(answer["function_uuid"])

    def test_task_carries_its_container(self) -> None:
        """The task message has container_id and the container with its images, every
        field as funcx_common 0.0.25 writes it (whole-second times)."""
        endpoint_id = self.endpoint()
        self.clock.advance(0.75)
        container_id, function_id = self.containerized_function(("docker", "python:3.11"))
        [task_id] = self.submit([[function_id, endpoint_id, pack_payload((1,), {"b": 2})]])
        [message] = self.task_messages(endpoint_id)
        self.assertEqual(message["message_type"], "task")
        data = message["data"]
        self.assertEqual(
            list(data), ["task_id", "container_id", "container", "task_buffer", "function_id"]
        )
        self.assertEqual((data["task_id"], data["container_id"]), (task_id, container_id))
        self.assertEqual(
            data["container"],
            {
                "container_id": container_id,
                "name": "py",
                "images": [
                    {
                        "image_type": "docker",
                        "location": "python:3.11",
                        "created_at": int(START),
                        "modified_at": int(START),
                        "build_status": "provided",
                        "build_stderr": None,
                    }
                ],
            },
        )
        # The endpoint reads it, and the task still runs (the in-process worker
        # ignores the container, as this project's endpoint does for now).
        _, task = self.service.published_tasks[task_id]
        assert task.container is not None
        self.assertEqual(
            task.container.image_for("docker"),
            ContainerImage("docker", "python:3.11", int(START), int(START), "provided", None),
        )
        self.service.run_task(task_id)
        self.clock.advance(0)
        code, answer = self.call("GET", f"/v2/tasks/{task_id}")
        self.assertEqual(answer["status"], "success")

    def test_tasks_without_container_are_unchanged(self) -> None:
        endpoint_id = self.endpoint()
        code, answer = self.function(None)
        self.assertEqual(code, 200, answer)
        self.submit([[answer["function_uuid"], endpoint_id, pack_payload((1,), {})]])
        [message] = self.task_messages(endpoint_id)
        self.assertEqual(
            (message["data"]["container_id"], message["data"]["container"]), (None, None)
        )

    def test_every_image_goes_with_the_task(self) -> None:
        """The endpoint picks the image of its type: all of them are sent, current ones."""
        endpoint_id = self.endpoint()
        container_id, function_id = self.containerized_function(
            ("singularity", "/img/a.sif"), ("docker", "python:3.11")
        )
        [first] = self.submit([[function_id, endpoint_id, pack_payload((1,), {})]])
        self.clock.advance(30)
        code, _ = self.call(
            "PUT", f"/v2/containers/{container_id}/docker", {"location": "python:3.12"}
        )
        self.assertEqual(code, 200)
        [second] = self.submit([[function_id, endpoint_id, pack_payload((2,), {})]])
        before = self.service.published_tasks[first][1].container
        after = self.service.published_tasks[second][1].container
        assert before is not None and after is not None
        self.assertEqual(
            sorted((i.image_type, i.location) for i in before.images),
            [("docker", "python:3.11"), ("singularity", "/img/a.sif")],
        )
        self.assertEqual(
            sorted((i.image_type, i.location, i.modified_at) for i in after.images),
            [("docker", "python:3.12", int(START + 30)), ("singularity", "/img/a.sif", int(START))],
        )

    def test_task_batches_carry_containers(self) -> None:
        """An endpoint that takes batches gets each task with its own container (or none)."""
        endpoint_id = self.endpoint(wire_features=[MESSAGE_BATCHES])
        docker_id, in_docker = self.containerized_function(("docker", "python:3.11"))
        podman_id, in_podman = self.containerized_function(("podman", "quay.io/x/y:1"))
        code, answer = self.function(None)
        plain = answer["function_uuid"]
        task_ids = self.submit(
            [
                [in_docker, endpoint_id, pack_payload((1,), {})],
                [plain, endpoint_id, pack_payload((2,), {})],
                [in_podman, endpoint_id, pack_payload((3,), {})],
                [in_docker, endpoint_id, pack_payload((4,), {})],
            ]
        )
        [message] = self.service.broker.queues[topology.task_queue(endpoint_id)]
        batch = unpack(message.body)
        assert isinstance(batch, TaskBatchMessage)
        self.assertEqual([t.task_id for t in batch.tasks], task_ids)
        self.assertEqual(
            [t.container_id for t in batch.tasks], [docker_id, None, podman_id, docker_id]
        )
        self.assertEqual(
            [None if t.container is None else t.container.images[0].location for t in batch.tasks],
            ["python:3.11", None, "quay.io/x/y:1", "python:3.11"],
        )
        assert batch.tasks[2].container is not None
        self.assertEqual(batch.tasks[2].container.images[0].image_type, "podman")

    def test_tasks_sent_again_carry_their_container(self) -> None:
        """A task the broker did not take is read back from storage with its container."""
        endpoint_id = self.endpoint()
        container_id, function_id = self.containerized_function(("shifter", "docker:py/3"))
        self.service.broker.disconnect()
        [task_id] = self.submit([[function_id, endpoint_id, pack_payload((1,), {})]])
        self.assertEqual(self.service.published_tasks, {})
        self.service.broker.reconnect()
        self.clock.advance(2)  # the resend loop, once the task is a second old
        self.clock.advance(0.125)
        _, task = self.service.published_tasks[task_id]
        self.assertEqual(task.container_id, container_id)
        self.assertEqual(
            task.container,
            Container(
                container_id,
                "py",
                [ContainerImage("shifter", "docker:py/3", int(START), int(START), "provided")],
            ),
        )

    def test_function_registered_before_containers(self) -> None:
        """A function whose container_uuid names no stored container (registered before
        this service had containers) still runs: its tasks carry the id alone."""
        endpoint_id = self.endpoint()
        code, answer = self.function(None)
        function_id = answer["function_uuid"]
        dangling = str(uuid.uuid4())
        self.service._run(
            lambda tx: tx.execute(
                "UPDATE functions SET container_uuid = ? WHERE function_id = ?",
                (dangling, function_id),
            )
        )
        [task_id] = self.submit([[function_id, endpoint_id, pack_payload((1,), {})]])
        _, task = self.service.published_tasks[task_id]
        self.assertEqual((task.container_id, task.container), (dangling, None))
        self.assertIsInstance(task, Task)
