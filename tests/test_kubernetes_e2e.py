"""Tasks run end to end through the Kubernetes path, and Parsl's KubernetesProvider on the stub.

No cluster runs here: the Kubernetes API is
:class:`~funcx_endpoint.testing.kubeapi.KubeApiStub` (TLS on loopback, reached
through a kubeconfig), and :class:`~funcx_endpoint.testing.kubelet.LocalKubelet`
starts each pod's container command as a local process, with the pod's
Secret volume written where the pod mounts it, as a node would.  Everything
else is real: the interchange, the block scaler and strategy, the provider in
the adapter's thread with the ``kubernetes`` client, the manager and its
workers started by the pod's command.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Any, Callable, List

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from funcx_endpoint.config import model as config_model
from funcx_endpoint.endpoint.tap import manager_command
from funcx_endpoint.executor.blocks import BlockScaler
from funcx_endpoint.executor.providers import JobState, ProviderAdapter
from funcx_endpoint.executor.providers.kube_api import KubernetesApiError
from funcx_endpoint.executor.providers.kube_spec import PodSettings
from funcx_endpoint.executor.providers.kubernetes import KubernetesPodProvider
from funcx_endpoint.executor.strategy import ScalingService, SimpleStrategy
from funcx_endpoint.testing.kubeapi import KubeApiStub, StubServer, serve
from funcx_endpoint.testing.kubelet import LocalKubelet
from funcx_endpoint.wire import Result, Task, deserialize, pack_function, pack_payload
from tests.test_scaling_integration import started_interchange


def where_am_i() -> Any:
    import os

    # The native provider names the pod in FUNCX_POD_NAME; Parsl's sets TEST.
    return os.environ.get("FUNCX_POD_NAME"), os.environ.get("TEST")


async def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)


def _skip_without_client(case: TestCase) -> None:
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        raise case.skipTest("the [kubernetes] extra is not installed") from None


def _parsl_provider(case: TestCase, server: StubServer, **kwargs: Any) -> Any:
    """Parsl's KubernetesProvider, built as config.py builds it: it loads the
    default kubeconfig (~/.kube/config) when constructed."""
    try:
        from kubernetes.config import kube_config
        from parsl.providers import KubernetesProvider
    except ImportError:
        raise case.skipTest("the [parsl] and [kubernetes] extras are needed") from None
    if kube_config.KUBE_CONFIG_DEFAULT_LOCATION != "~/.kube/config":
        raise case.skipTest("KUBECONFIG is set: Parsl's provider would not read ours")
    home = os.path.abspath(case.mktemp())
    server.write_kubeconfig(os.path.join(home, ".kube", "config"))
    old = os.environ.get("HOME")
    os.environ["HOME"] = home
    try:
        return KubernetesProvider(**kwargs)
    finally:
        if old is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = old


class EndToEndTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        _skip_without_client(self)
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.stub = KubeApiStub()
        self.server = serve(reactor, self.stub)
        self.addCleanup(self.server.stop)
        # The image's python3 is this environment's.
        path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
        self.kubelet = LocalKubelet(reactor, self.stub, dict(os.environ, PATH=path), self.work)
        self.addCleanup(self.kubelet.stop)
        self.info_dir = os.path.join(self.work, "pod", "etc", "funcx-manager")
        self.log_dir = os.path.join(self.work, "pod", "logs")

    def test_funcx10_provider_runs_a_task_in_a_pod(self) -> Deferred[None]:
        def provider(work: str) -> Any:
            settings = PodSettings(
                image="funcx-endpoint:test",
                worker_init="echo preparing the pod",
                info_dir=self.info_dir,
                log_dir=self.log_dir,
                stop_grace_period=3,
            )
            native = KubernetesPodProvider(
                settings,
                reactor,
                work,
                max_blocks=1,
                status_polling_interval=0.5,
                incluster=False,
                kubeconfig=self.server.write_kubeconfig(os.path.join(work, "kubeconfig")),
            )
            return ProviderAdapter(native, reactor, working_dir=work)

        return ensureDeferred(self._run_task(provider, "/bin/sh", lambda pod: (pod, None)))

    def test_parsl_provider_runs_a_task_in_a_pod(self) -> Deferred[None]:
        from funcx_endpoint.executor.providers.parsl_kube import ParslKubernetesProvider

        parsl = _parsl_provider(
            self, self.server, image="funcx-endpoint:test", init_blocks=0, max_blocks=1
        )

        def provider(work: str) -> Any:
            wrapped = ParslKubernetesProvider(
                parsl, reactor, work, info_dir=self.info_dir, log_dir=self.log_dir
            )
            return ProviderAdapter(wrapped, reactor, working_dir=work)

        # Parsl's pods set TEST=SOME DATA in the container's environment.
        return ensureDeferred(self._run_task(provider, "/bin/bash", lambda _: (None, "SOME DATA")))

    async def _run_task(
        self, make_provider: Callable[[str], Any], shell: str, seen: Callable[[str], Any]
    ) -> None:
        results: List[Result] = []
        executor = config_model.HighThroughputExecutor(
            max_workers_per_node=1, prefetch_capacity=0, address="127.0.0.1"
        )
        interchange = started_interchange(self.work, executor, results)
        scaler = BlockScaler(
            make_provider(self.work),
            interchange,
            reactor,
            manager_command(interchange),
            job_name_prefix="funcx.Kube_E2E",
        )
        strategy = SimpleStrategy(
            scaler, interchange, reactor, interval=0.2, max_idletime=60, workers_per_node=1
        )
        scaling = ScalingService(scaler, strategy)
        scaling.startService()
        stopped = False
        try:
            # No block at start (init_blocks 0): a task makes the strategy start one.
            self.assertEqual(self.stub.created, [])
            interchange.submit(
                [Task(str(uuid.uuid4()), pack_function(where_am_i) + pack_payload((), {}))]
            )
            await wait_until(lambda: results, 90, "the task's result")
            [pod] = self.stub.created
            name = pod["metadata"]["name"]
            [result] = results
            self.assertFalse(result.is_error, result)
            self.assertEqual(deserialize(result.data), seen(name))  # it ran in the pod
            self.assertEqual(self.kubelet.started, [name])
            self.assertEqual(len(interchange.managers()), 1)
            [container] = pod["spec"]["containers"]
            self.assertEqual(container["image"], "funcx-endpoint:test")
            self.assertEqual(container["command"][0], shell)
            with open(interchange.info_file) as f:
                secret = json.load(f)["secret"]
            self.assertNotIn(secret, json.dumps(pod))
            self.assertIn(f"--info-file {self.info_dir}/manager-info.json", json.dumps(pod))
            # Stopping cancels the block: the pod is deleted, its manager stops.
            await scaling.stopService()
            await interchange.stopService()
            stopped = True
            await wait_until(lambda: not self.stub.pods, 30, "the pod to go")
            self.assertEqual(self.stub.deleted, [name])
            self.assertEqual(self.kubelet.running, {})
        finally:
            if not stopped:
                await scaling.stopService()
                await interchange.stopService()


class ParslProviderTests(TestCase):
    """Parsl's KubernetesProvider, unchanged, behind the endpoint's wrapper, on the stub."""

    timeout = 60

    def setUp(self) -> None:
        _skip_without_client(self)
        self.stub = KubeApiStub()
        self.server = serve(reactor, self.stub)
        self.addCleanup(self.server.stop)
        self.work = os.path.abspath(self.mktemp())
        self.info = os.path.join(self.work, "interchange", "manager-info.json")
        os.makedirs(os.path.dirname(self.info))
        with open(self.info, "w") as f:
            json.dump({"address": "a", "port": 1, "ca_cert_pem": "c", "secret": "SeCrEt"}, f)
        self.parsl = _parsl_provider(
            self,
            self.server,
            image="python:3.11",
            init_blocks=0,
            max_blocks=3,
            max_cpu=2,
            max_mem="2Gi",
            worker_init="pip install funcx-endpoint",
            secret="regcred",
        )

    def adapter(self) -> ProviderAdapter:
        from funcx_endpoint.executor.providers.kubernetes import kubernetes_provider

        adapter = kubernetes_provider(self.parsl, reactor, self.work)
        assert adapter is not None
        adapter.startService()
        self.addCleanup(adapter.stopService)
        return adapter

    def submit(self, adapter: ProviderAdapter) -> Deferred[Any]:
        command = f"{sys.executable} -m funcx_endpoint.manager --info-file {self.info} --block-id 0"
        return adapter.submit(command, 1, "funcx.Kubernetes_funcX.block-0")

    def test_submit_status_cancel(self) -> Deferred[None]:
        return ensureDeferred(self._submit_status_cancel())

    async def _submit_status_cancel(self) -> None:
        adapter = self.adapter()
        self.assertTrue(adapter.blocking)
        self.assertEqual((adapter.max_blocks, adapter.nodes_per_block), (3, 1))
        job = await self.submit(adapter)
        [pod] = self.stub.created
        self.assertEqual(pod["metadata"]["name"], job)
        self.assertTrue(job.startswith("funcx-kubernetes-funcx-block-0-"), job)
        [container] = pod["spec"]["containers"]
        self.assertEqual(container["image"], "python:3.11")
        self.assertEqual(container["resources"]["limits"], {"cpu": "2", "memory": "2Gi"})
        self.assertEqual(container["command"], ["/bin/bash"])
        script = container["args"][1]
        self.assertIn("pip install funcx-endpoint", script)
        self.assertIn(
            "exec python3 -m funcx_endpoint.manager --info-file "
            "/etc/funcx-manager/manager-info.json --block-id 0",
            script,
        )
        self.assertEqual(pod["spec"]["imagePullSecrets"], [{"name": "regcred"}])
        [mount] = [m for m in container["volumeMounts"] if m["name"] == "funcx-manager-info"]
        self.assertEqual((mount["mountPath"], mount["readOnly"]), ("/etc/funcx-manager", True))
        [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == "funcx-manager-info"]
        self.assertIn(
            b"SeCrEt", self.stub.secret_data(volume["secret"]["secretName"])["manager-info.json"]
        )
        self.assertNotIn("SeCrEt", json.dumps(pod))
        # States follow the pod's phase (Parsl reads each pod).
        self.stub.set_phase(job, "Pending")
        [status] = await adapter.status([job])
        self.assertEqual(status.state, JobState.PENDING)
        self.stub.set_phase(job, "Running")
        [status] = await adapter.status([job])
        self.assertEqual(status.state, JobState.RUNNING)
        self.assertEqual(await adapter.cancel([job]), [True])
        self.assertEqual(self.stub.pod_names(), [])
        [status] = await adapter.status([job])
        self.assertEqual(status.state, JobState.CANCELLED)

    def test_errors(self) -> Deferred[None]:
        return ensureDeferred(self._errors())

    async def _errors(self) -> None:
        adapter = self.adapter()
        self.stub.fail("POST", "/pods", 403, message="pods is forbidden")
        failure = await self.assertFailure(self.submit(adapter), KubernetesApiError)
        self.assertIn("403 Forbidden: pods is forbidden", str(failure))
        self.assertIn("RBAC", str(failure))
        job = await self.submit(adapter)
        # A pod deleted behind the endpoint's back: cancelling it is no error,
        # and it counts as cancelled (Parsl alone would keep it running).
        self.stub.remove_pod(job)
        self.assertEqual(await adapter.cancel([job]), [False])
        [status] = await adapter.status([job])
        self.assertEqual(status.state, JobState.CANCELLED)
        self.stub.fail("POST", "/pods", 500)
        failure = await self.assertFailure(self.submit(adapter), KubernetesApiError)
        self.assertTrue(failure.unavailable)
        before = len(self.stub.requests)
        await self.assertFailure(self.submit(adapter), KubernetesApiError)  # held back
        self.assertEqual(len(self.stub.requests), before)
