"""The Kubernetes providers against a stub of the Kubernetes API (no cluster runs here).

The pure parts (names, manifests, pod states, error messages, the backoff)
are tested alone; the providers with the real ``kubernetes`` client, in the
adapter's threads, against :class:`~funcx_endpoint.testing.kubeapi.KubeApiStub`
served over TLS on loopback and reached through a kubeconfig the test writes.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from typing import Any, List, Optional

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from funcx_endpoint.config import kubernetes as config_kubernetes
from funcx_endpoint.config.kubernetes import KubernetesProvider
from funcx_endpoint.config.model import HighThroughputExecutor
from funcx_endpoint.executor.providers import JobState, ProviderAdapter, SubmitError
from funcx_endpoint.executor.providers.kube_api import (
    ApiBackoff,
    KubernetesApiError,
    describe_api_error,
)
from funcx_endpoint.executor.providers.kube_spec import (
    INFO_KEY,
    PodSettings,
    block_of,
    dns_label,
    info_file_of,
    pod_command,
    pod_manifest,
    pod_status,
)
from funcx_endpoint.executor.providers.kubernetes import (
    KubernetesPodProvider,
    kubernetes_provider,
)
from funcx_endpoint.executor.providers.local import provider_from_config
from funcx_endpoint.executor.providers.unavailable import UnavailableProvider
from funcx_endpoint.testing.kubeapi import KubeApiStub, serve

try:
    import kubernetes  # noqa: F401
except ImportError:  # pragma: no cover
    NO_CLIENT: Optional[str] = "the [kubernetes] extra is not installed"
else:
    NO_CLIENT = None

SECRET = "s3cr3t-value-that-must-stay-out-of-pod-specs"
COMMAND = "/opt/venv/bin/python -m funcx_endpoint.manager --info-file {info} --block-id {block}"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ApiException(Exception):
    """The shape of kubernetes.client.ApiException (matched by name)."""

    def __init__(self, status: int, reason: str, body: str = "") -> None:
        super().__init__(f"({status}) {reason}")
        self.status = status
        self.reason = reason
        self.body = body


class SpecTests(SynchronousTestCase):
    """Names, the pod command and manifest, pod states: pure functions."""

    settings = PodSettings(
        image="registry.example/funcx:1",
        namespace="science",
        max_cpu=4,
        max_mem="4096Mi",
        init_cpu=0.5,
        init_mem="1024Mi",
        worker_init="pip install numpy",
        user_id="1000",
        group_id="2000",
        run_as_non_root=True,
        secret="regcred",
        persistent_volumes=(("shared-data", "/data"),),
    )

    def test_names(self) -> None:
        self.assertEqual(
            dns_label("funcx.Kubernetes_funcX.block-0"), "funcx-kubernetes-funcx-block-0"
        )
        self.assertEqual(dns_label("___"), "funcx")
        self.assertEqual(len(dns_label("a" * 100, 20)), 20)
        self.assertEqual(block_of("funcx.Kubernetes_funcX.block-12"), "12")
        self.assertIsNone(block_of("parsl.auto"))

    def test_pod_command(self) -> None:
        command = COMMAND.format(info="'/home/u/ep dir/manager-info.json'", block=3)
        self.assertEqual(info_file_of(command), "/home/u/ep dir/manager-info.json")
        self.assertEqual(
            pod_command(command, "/etc/funcx-manager"),
            "python3 -m funcx_endpoint.manager --info-file /etc/funcx-manager/"
            f"{INFO_KEY} --block-id 3 --log-dir /tmp/funcx-manager",
        )
        self.assertIn("--info-file=/m/manager-info.json", pod_command("x --info-file=/a/b", "/m"))
        self.assertRaises(ValueError, pod_command, "sleep 1", "/m")
        self.assertRaises(ValueError, info_file_of, "sleep 1")

    def test_manifest(self) -> None:
        command = pod_command(COMMAND.format(info="/ep/manager-info.json", block=0))
        pod = pod_manifest(self.settings, "funcx-b-0-ab", command, {"app": "x"}, "info-sec")
        [container] = pod["spec"]["containers"]
        self.assertEqual(container["image"], "registry.example/funcx:1")
        self.assertEqual(container["command"][:2], ["/bin/sh", "-c"])
        self.assertEqual(container["command"][2], f"pip install numpy\nexec {command}")
        self.assertEqual(
            container["resources"],
            {
                "limits": {"cpu": "4", "memory": "4096Mi"},
                "requests": {"cpu": "0.5", "memory": "1024Mi"},
            },
        )
        self.assertEqual(
            container["securityContext"],
            {"runAsUser": 1000, "runAsGroup": 2000, "runAsNonRoot": True},
        )
        spec = pod["spec"]
        self.assertEqual(spec["imagePullSecrets"], [{"name": "regcred"}])
        self.assertEqual(spec["restartPolicy"], "Never")
        self.assertIs(spec["automountServiceAccountToken"], False)
        self.assertEqual(spec["securityContext"], {"fsGroup": 2000})
        self.assertEqual(
            spec["volumes"][0],
            {
                "name": "funcx-manager-info",
                "secret": {"secretName": "info-sec", "defaultMode": 0o440},
            },
        )
        self.assertEqual(
            spec["volumes"][1],
            {"name": "pv-shared-data", "persistentVolumeClaim": {"claimName": "shared-data"}},
        )
        self.assertEqual(
            container["volumeMounts"],
            [
                {"name": "funcx-manager-info", "mountPath": "/etc/funcx-manager", "readOnly": True},
                {"name": "pv-shared-data", "mountPath": "/data"},
            ],
        )
        self.assertEqual(pod["metadata"]["namespace"], "science")
        # As root (no user and group): the info file is readable by its owner only.
        plain = pod_manifest(PodSettings(image="i"), "p", command, {}, "s")
        self.assertEqual(plain["spec"]["volumes"][0]["secret"]["defaultMode"], 0o400)
        self.assertNotIn("imagePullSecrets", plain["spec"])
        self.assertEqual(plain["spec"]["containers"][0]["command"][2], f"exec {command}")

    def test_settings_from_config(self) -> None:
        config = KubernetesProvider(
            image="i", namespace="n", max_cpu=3, persistent_volumes=[("c", "/m")], secret="s"
        )
        settings = PodSettings.from_config(config, stop_grace_period=7)
        self.assertEqual(
            (settings.image, settings.namespace, settings.max_cpu, settings.secret),
            ("i", "n", 3, "s"),
        )
        self.assertEqual(settings.persistent_volumes, (("c", "/m"),))
        self.assertEqual(settings.stop_grace_period, 7)

    def test_phases(self) -> None:
        def pod(phase: str, **status: Any) -> dict:
            return {"status": dict(status, phase=phase)}

        self.assertEqual(pod_status(pod("Pending")).state, JobState.PENDING)
        self.assertEqual(pod_status(pod("Running")).state, JobState.RUNNING)
        self.assertEqual(pod_status(pod("Succeeded")).state, JobState.COMPLETED)
        self.assertEqual(pod_status(pod("Unknown")).state, JobState.UNKNOWN)
        self.assertEqual(pod_status({}).state, JobState.UNKNOWN)
        failed = pod_status(
            pod(
                "Failed",
                containerStatuses=[
                    {"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}
                ],
            ),
            "/logs/p.log",
        )
        self.assertEqual(
            (failed.state, failed.exit_code, failed.message, failed.stderr_path),
            (JobState.FAILED, 137, "OOMKilled", "/logs/p.log"),
        )
        stuck = pod_status(
            pod(
                "Pending",
                containerStatuses=[
                    {
                        "state": {
                            "waiting": {"reason": "ImagePullBackOff", "message": "no such image"}
                        }
                    }
                ],
            )
        )
        self.assertEqual(
            (stuck.state, stuck.message), (JobState.FAILED, "ImagePullBackOff: no such image")
        )
        unschedulable = pod_status(
            pod(
                "Pending",
                conditions=[
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/3 nodes are available: 3 Insufficient cpu.",
                    }
                ],
            )
        )
        self.assertEqual(unschedulable.state, JobState.PENDING)
        self.assertIn("Insufficient cpu", unschedulable.message)


class ErrorTests(SynchronousTestCase):
    def test_messages(self) -> None:
        body = json.dumps(
            {"kind": "Status", "message": 'pods is forbidden: User "x" cannot create'}
        )
        error = describe_api_error(ApiException(403, "Forbidden", body), "create pod 'p'")
        self.assertIsInstance(error, SubmitError)
        self.assertEqual(error.status, 403)
        self.assertFalse(error.unavailable)
        self.assertIn("could not create pod 'p': 403 Forbidden: pods is forbidden", str(error))
        self.assertIn("RBAC", str(error))
        server = describe_api_error(ApiException(500, "Internal Server Error"), "list pods")
        self.assertTrue(server.unavailable)
        self.assertTrue(describe_api_error(ApiException(429, "Too Many"), "x").unavailable)
        gone = describe_api_error(
            ConnectionRefusedError(111, "refused"), "list pods", "https://k:6443"
        )
        self.assertTrue(gone.unavailable)
        self.assertIsNone(gone.status)
        self.assertIn("cannot reach the API server at https://k:6443", str(gone))

    def test_backoff(self) -> None:
        clock = FakeClock()
        backoff = ApiBackoff(5, 20, clock)
        backoff.check("x")  # nothing failed
        backoff.failed(KubernetesApiError("denied", 403))  # not an availability problem
        self.assertFalse(backoff.waiting)
        delays = []
        for _ in range(4):
            backoff.failed(KubernetesApiError("down", 503, unavailable=True))
            assert backoff.until is not None
            delays.append(backoff.until - clock.now)
        self.assertEqual(delays, [5, 10, 20, 20])
        with self.assertRaises(KubernetesApiError) as cm:
            backoff.check("create a pod")
        self.assertIn("not trying to create a pod for 20s more", str(cm.exception))
        self.assertIn("4 call(s) failed in a row, the last with: down", str(cm.exception))
        clock.now += 20
        backoff.check("x")
        backoff.succeeded()
        self.assertEqual(backoff.failures, 0)


class FromConfigTests(SynchronousTestCase):
    def test_funcx10_provider(self) -> None:
        if NO_CLIENT:
            raise self.skipTest(NO_CLIENT)
        config = KubernetesProvider(
            image="img", namespace="ns", max_blocks=3, min_blocks=1, incluster_config=False
        )
        adapter = provider_from_config(config, object(), "/ep", stop_grace_period=4)
        self.assertIsInstance(adapter, ProviderAdapter)
        self.assertTrue(adapter.blocking)  # the client blocks: called in a thread
        native = adapter.provider
        self.assertIsInstance(native, KubernetesPodProvider)
        self.assertEqual((adapter.max_blocks, adapter.min_blocks, adapter.init_blocks), (3, 1, 0))
        self.assertEqual(adapter.nodes_per_block, 1)
        self.assertEqual(adapter.label, "kubernetes")
        self.assertEqual(adapter.status_polling_interval, 5.0)
        self.assertEqual(adapter.cores_per_node, 2)  # max_cpu: the strategy's estimate
        self.assertEqual(native.settings.image, "img")
        self.assertEqual(native.settings.namespace, "ns")
        self.assertEqual(native.settings.stop_grace_period, 4)
        self.assertFalse(native.incluster)

    def test_without_the_client_the_start_is_refused(self) -> None:
        self.patch(sys, "modules", dict(sys.modules, kubernetes=None))
        adapter = kubernetes_provider(KubernetesProvider(image="i"), object(), "/ep")
        assert adapter is not None
        self.assertIsInstance(adapter.provider, UnavailableProvider)
        self.assertEqual(adapter.provider.why, config_kubernetes.NO_CLIENT)
        self.assertIn("pip install 'funcx-endpoint[kubernetes]'", config_kubernetes.NO_CLIENT)

    def test_others_are_not_kubernetes(self) -> None:
        self.assertIsNone(kubernetes_provider(object(), object(), "/ep"))

    def test_through_an_executor(self) -> None:
        executor = HighThroughputExecutor(provider=KubernetesProvider(image="i", nodes_per_block=3))
        notices = [n.setting for n in executor.notices()]
        self.assertIn("KubernetesProvider.nodes_per_block", notices)


def _write_info(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"address": "10.0.0.5", "port": 55000, "ca_cert_pem": "CA", "secret": SECRET}, f)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class PodProviderTests(TestCase):
    """KubernetesPodProvider, with the real client in the adapter's thread, on the stub."""

    timeout = 60

    def setUp(self) -> None:
        if NO_CLIENT:
            raise self.skipTest(NO_CLIENT)
        self.stub = KubeApiStub(namespaces=("default", "science"))
        self.server = serve(reactor, self.stub)
        self.addCleanup(self.server.stop)
        self.work = os.path.abspath(self.mktemp())
        self.kubeconfig = self.server.write_kubeconfig(os.path.join(self.work, "kubeconfig"))
        self.info = _write_info(os.path.join(self.work, "interchange", "manager-info.json"))
        self.command = COMMAND.format(info=self.info, block="{block}")

    def adapter(
        self, namespace: str = "default", kubeconfig: Optional[str] = None, **kwargs: Any
    ) -> ProviderAdapter:
        settings = PodSettings(
            image="python:3.11",
            namespace=namespace,
            max_cpu=2,
            init_cpu=1,
            max_mem="1Gi",
            init_mem="256Mi",
            worker_init="echo setting up",
            secret="regcred",
        )
        kwargs.setdefault("backoff", ApiBackoff(30.0))
        kwargs.setdefault("request_timeout", (2.0, 2.0))
        native = KubernetesPodProvider(
            settings,
            reactor,
            os.path.join(self.work, "blocks"),
            label="kube",
            incluster=False,
            kubeconfig=kubeconfig or self.kubeconfig,
            **kwargs,
        )
        adapter = ProviderAdapter(native, reactor, working_dir=self.work)
        adapter.startService()
        self.addCleanup(adapter.stopService)
        return adapter

    def submit(self, adapter: ProviderAdapter, block: int = 0) -> Deferred[Any]:
        return adapter.submit(self.command.format(block=block), 1, f"funcx.Kube_Test.block-{block}")

    def requests_to(self, part: str) -> List[str]:
        return [uri for _, uri in self.stub.requests if part in uri]

    def test_submit_makes_the_pod(self) -> Deferred[None]:
        return ensureDeferred(self._submit_makes_the_pod())

    async def _submit_makes_the_pod(self) -> None:
        adapter = self.adapter()
        job = await self.submit(adapter, 4)
        self.assertEqual(self.stub.pod_names(), [job])
        self.assertTrue(job.startswith("funcx-kube-test-block-4-"), job)
        [pod] = self.stub.created
        [container] = pod["spec"]["containers"]
        self.assertEqual(container["image"], "python:3.11")
        self.assertEqual(
            container["command"],
            [
                "/bin/sh",
                "-c",
                "echo setting up\nexec python3 -m funcx_endpoint.manager --info-file "
                "/etc/funcx-manager/manager-info.json --block-id 4 --log-dir /tmp/funcx-manager",
            ],
        )
        self.assertEqual(
            container["resources"],
            {"limits": {"cpu": "2", "memory": "1Gi"}, "requests": {"cpu": "1", "memory": "256Mi"}},
        )
        labels = pod["metadata"]["labels"]
        self.assertEqual(labels["app.kubernetes.io/managed-by"], "funcx-endpoint")
        self.assertEqual(labels["app.kubernetes.io/name"], "funcx-manager")
        self.assertEqual(labels["funcx-block"], "4")
        self.assertEqual(labels["app"], "funcx.Kube_Test.block-4")
        self.assertEqual(pod["spec"]["imagePullSecrets"], [{"name": "regcred"}])
        # The endpoint's secret is in no pod spec, only in the Secret mounted.
        self.assertNotIn(SECRET, json.dumps(pod))
        self.assertNotIn(self.info, json.dumps(pod))
        secret_name = pod["spec"]["volumes"][0]["secret"]["secretName"]
        with open(self.info, "rb") as f:
            self.assertEqual(self.stub.secret_data(secret_name), {INFO_KEY: f.read()})
        # A second block: the Secret is not written again; another pod.
        job2 = await self.submit(adapter, 5)
        self.assertEqual(len(self.stub.pod_names()), 2)
        self.assertNotEqual(job, job2)
        self.assertEqual(
            len([r for r in self.stub.requests if r[0] == "POST" and "secrets" in r[1]]), 1
        )
        # Stopping deletes the Secret.
        await adapter.stopService()
        self.assertEqual(self.stub.secrets, {})

    def test_status_follows_the_phases(self) -> Deferred[None]:
        return ensureDeferred(self._status_follows_the_phases())

    async def _status_follows_the_phases(self) -> None:
        adapter = self.adapter()
        jobs = [await self.submit(adapter, i) for i in range(4)]
        [pending] = {s.state for s in await adapter.status(jobs)}
        self.assertEqual(pending, JobState.PENDING)
        self.assertEqual(len(self.requests_to("/pods?labelSelector")), 1 + 1)  # leftovers, status
        self.stub.set_phase(jobs[0], "Running")
        self.stub.set_phase(jobs[1], "Succeeded")
        self.stub.set_phase(jobs[2], "Failed", exit_code=3)
        self.stub.set_log(jobs[2], "Traceback...\nfuncx-manager: cannot connect\n")
        self.stub.set_waiting(jobs[3], "ImagePullBackOff", 'Back-off pulling image "python:3.11"')
        statuses = await adapter.status(jobs)
        self.assertEqual(
            [s.state for s in statuses],
            [JobState.RUNNING, JobState.COMPLETED, JobState.FAILED, JobState.FAILED],
        )
        self.assertEqual(statuses[2].exit_code, 3)
        tail = await adapter.read_tail(statuses[2].stderr_path)
        self.assertIn("funcx-manager: cannot connect", tail)
        self.assertIn("ImagePullBackOff", statuses[3].message)
        # Ended pods are deleted once reported; their end is remembered.
        self.assertEqual(self.stub.pod_names(), [jobs[0]])
        again = await adapter.status(jobs[1:])
        self.assertEqual(
            [s.state for s in again], [JobState.COMPLETED, JobState.FAILED, JobState.FAILED]
        )
        # A pod deleted behind the endpoint's back is MISSING.
        self.stub.remove_pod(jobs[0])
        [missing] = await adapter.status(jobs[:1])
        self.assertEqual(missing.state, JobState.MISSING)
        self.assertIn("deleted outside the endpoint", missing.message)

    def test_cancel_deletes_the_pod(self) -> Deferred[None]:
        return ensureDeferred(self._cancel_deletes_the_pod())

    async def _cancel_deletes_the_pod(self) -> None:
        adapter = self.adapter()
        job = await self.submit(adapter)
        self.stub.set_phase(job, "Running")
        self.assertEqual(await adapter.cancel([job, "unknown"]), [True, False])
        self.assertEqual(self.stub.deleted, [job])
        self.assertEqual(self.stub.pod_names(), [])
        [status] = await adapter.status([job])
        self.assertEqual(status.state, JobState.CANCELLED)
        self.assertEqual(await adapter.cancel([job]), [False])  # once

    def test_leftovers_of_an_earlier_run_are_deleted(self) -> Deferred[None]:
        return ensureDeferred(self._leftovers())

    async def _leftovers(self) -> None:
        first = self.adapter()
        old = await self.submit(first)
        second = self.adapter()  # the same endpoint, restarted
        new = await self.submit(second)
        self.assertEqual(self.stub.pod_names(), [new])
        self.assertIn(old, self.stub.deleted)

    def test_forbidden(self) -> Deferred[None]:
        return ensureDeferred(self._forbidden())

    async def _forbidden(self) -> None:
        adapter = self.adapter()
        self.stub.fail(
            "POST",
            "/pods",
            403,
            message='pods is forbidden: User "system:serviceaccount:x:y" cannot create resource',
        )
        failure = await self.assertFailure(self.submit(adapter), KubernetesApiError)
        self.assertEqual(failure.status, 403)
        self.assertIn("could not create pod", str(failure))
        self.assertIn("403 Forbidden: pods is forbidden", str(failure))
        self.assertIn("RBAC", str(failure))
        # Not an outage: the next submit goes to the API at once, and works.
        await self.submit(adapter)
        self.assertEqual(len(self.stub.pod_names()), 1)

    def test_unknown_namespace(self) -> Deferred[None]:
        return ensureDeferred(self._unknown_namespace())

    async def _unknown_namespace(self) -> None:
        adapter = self.adapter(namespace="nowhere")
        failure = await self.assertFailure(self.submit(adapter), KubernetesApiError)
        self.assertEqual(failure.status, 404)
        self.assertIn('namespaces "nowhere" not found', str(failure))

    def test_conflicts(self) -> Deferred[None]:
        return ensureDeferred(self._conflicts())

    async def _conflicts(self) -> None:
        names = iter(["aaaa", "aaaa", "bbbb"])
        adapter = self.adapter(unique=lambda: next(names))
        first = await self.submit(adapter)
        second = await self.submit(adapter)  # "aaaa" is taken (409): another name
        self.assertTrue(first.endswith("-aaaa") and second.endswith("-bbbb"), (first, second))
        # A Secret left by an earlier run is replaced (409 on create, then PUT).
        other = self.adapter()
        await other.submit(self.command.format(block=9), 1, "funcx.x.block-9")
        self.assertIn("PUT", [m for m, uri in self.stub.requests if "/secrets/" in uri])

    def test_server_error_backs_off(self) -> Deferred[None]:
        return ensureDeferred(self._server_error_backs_off())

    async def _server_error_backs_off(self) -> None:
        clock = FakeClock()
        adapter = self.adapter(backoff=ApiBackoff(10, 60, clock))
        job = await self.submit(adapter)
        self.stub.set_phase(job, "Running")
        [status] = await adapter.status([job])
        self.assertEqual(status.state, JobState.RUNNING)
        self.stub.set_phase(job, "Succeeded")  # unseen: the API is held back below
        self.stub.fail("POST", "/pods", 500, message="etcdserver: request timed out")
        failure = await self.assertFailure(self.submit(adapter, 1), KubernetesApiError)
        self.assertTrue(failure.unavailable)
        self.assertIn("500 Internal Server Error: etcdserver: request timed out", str(failure))
        before = len(self.stub.requests)
        # Held back: no request reaches the API; submit fails at once, status
        # answers the last states known.
        held = await self.assertFailure(self.submit(adapter, 2), KubernetesApiError)
        self.assertIn("not trying to create a pod", str(held))
        [status] = await adapter.status([job])
        self.assertEqual(status.state, JobState.RUNNING)
        self.assertEqual(len(self.stub.requests), before)
        clock.now += 10
        await self.submit(adapter, 3)
        self.assertEqual(len(self.stub.pod_names()), 2)

    def test_unreachable(self) -> Deferred[None]:
        return ensureDeferred(self._unreachable())

    async def _unreachable(self) -> None:
        from funcx_endpoint.testing.kubeapi import write_kubeconfig

        url = f"https://127.0.0.1:{_free_port()}"
        kubeconfig = write_kubeconfig(
            os.path.join(self.work, "nowhere"), url, "t", self.server.ca_pem
        )
        adapter = self.adapter(kubeconfig=kubeconfig)
        failure = await self.assertFailure(self.submit(adapter), KubernetesApiError)
        self.assertTrue(failure.unavailable)
        self.assertIn(f"cannot reach the API server at {url}", str(failure))
        held = await self.assertFailure(self.submit(adapter), KubernetesApiError)
        self.assertIn("not trying to", str(held))

    def test_hung_server_times_out_without_blocking_the_reactor(self) -> Deferred[None]:
        return ensureDeferred(self._hung())

    async def _hung(self) -> None:
        adapter = self.adapter(request_timeout=(2.0, 1.0))
        self.stub.stall("GET", "/pods", times=10)  # the client retries
        submitted = self.submit(adapter)
        ticks = 0
        while not submitted.called:
            await _sleep(0.05)  # the reactor goes on while the thread waits
            ticks += 1
        failure = await self.assertFailure(submitted, KubernetesApiError)
        self.assertGreater(ticks, 5)
        self.assertTrue(failure.unavailable)
        self.assertIn("could not list pods", str(failure))
        self.stub.release()

    def test_bad_kubeconfig(self) -> Deferred[None]:
        return ensureDeferred(self._bad_kubeconfig())

    async def _bad_kubeconfig(self) -> None:
        adapter = self.adapter(kubeconfig=os.path.join(self.work, "missing"))
        failure = await self.assertFailure(self.submit(adapter), KubernetesApiError)
        self.assertIn("cannot load the Kubernetes configuration from the kubeconfig", str(failure))

    def test_wrong_token(self) -> Deferred[None]:
        return ensureDeferred(self._wrong_token())

    async def _wrong_token(self) -> None:
        self.stub.token = "another"
        adapter = self.adapter()
        failure = await self.assertFailure(self.submit(adapter), KubernetesApiError)
        self.assertEqual(failure.status, 401)
        self.assertIn("check the credentials", str(failure))

    def test_secret_left_when_its_deletion_fails(self) -> Deferred[None]:
        return ensureDeferred(self._secret_left())

    async def _secret_left(self) -> None:
        adapter = self.adapter()
        await self.submit(adapter)
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.stub.fail("DELETE", "/secrets/", 500, message="etcd is down")
        await adapter.stopService()  # does not fail: the stop goes on
        self.assertEqual(len(self.stub.secrets), 1)
        [warning] = [e for e in events if "could not delete secret" in e.get("log_format", "")]
        self.assertIn("etcd is down", warning["error"])

    def test_cancel_error_is_raised_for_a_retry(self) -> Deferred[None]:
        return ensureDeferred(self._cancel_error())

    async def _cancel_error(self) -> None:
        adapter = self.adapter()
        job = await self.submit(adapter)
        self.stub.fail("DELETE", "/pods/", 503)
        failure = await self.assertFailure(adapter.cancel([job]), KubernetesApiError)
        self.assertIn("503", str(failure))
        self.assertEqual(self.stub.pod_names(), [job])
