"""funcX 1.0 configs: import paths, every funcX 1.0.13 field, and seven real config.py files.

The files in ``tests/configs_funcx10/`` are written the way funcX 1.0.13's
documentation showed them (local, Slurm, Torque, Cobalt, PBS Pro with GPUs,
local GPUs, Kubernetes); each loads unchanged and builds the endpoint's
service, with exactly the warnings expected; the default one also runs a
function end to end through Parsl's LocalProvider.  They use Parsl's
providers, launchers and addresses: the ``[parsl]`` extra (``make test``
installs it).
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
from typing import Any, Dict, List, Set

from twisted.application.service import IService
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.config import Config, ConfigError, HighThroughputExecutor, load_config
from funcx_endpoint.config import model as config_model
from funcx_endpoint.config.fields import Notice
from funcx_endpoint.config.funcx10 import FUNCX10_FIELDS
from funcx_endpoint.config.kubernetes import KubernetesProvider, KubeSimpleStrategy
from funcx_endpoint.endpoint.layout import EndpointDir
from funcx_endpoint.endpoint.notices import ConfigNotices
from funcx_endpoint.endpoint.tap import build_endpoint
from funcx_endpoint.executor.interchange import Interchange
from funcx_endpoint.executor.providers.kubernetes import KubernetesPodProvider
from funcx_endpoint.executor.strategy import scaling_from_config

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs_funcx10")


def settings(notices: List[Notice]) -> Set[str]:
    return {notice.setting for notice in notices}


class ImportPathTests(SynchronousTestCase):
    """Every import path a funcX 1.0.13 config.py used gives our classes."""

    def test_funcx10_paths(self) -> None:
        from funcx_endpoint.config import SimpleStrategy

        paths = {
            "funcx_endpoint.endpoint.utils.config": {"Config": Config},
            "funcx_endpoint.executors": {"HighThroughputExecutor": HighThroughputExecutor},
            "funcx_endpoint.executors.high_throughput.executor": {
                "HighThroughputExecutor": HighThroughputExecutor
            },
            "funcx_endpoint.strategies": {
                "SimpleStrategy": SimpleStrategy,
                "KubeSimpleStrategy": KubeSimpleStrategy,
            },
            "funcx_endpoint.strategies.simple": {"SimpleStrategy": SimpleStrategy},
            "funcx_endpoint.strategies.kube_simple": {"KubeSimpleStrategy": KubeSimpleStrategy},
            "funcx_endpoint.providers": {"KubernetesProvider": KubernetesProvider},
            "funcx_endpoint.providers.kubernetes.kube": {
                "KubernetesProvider": KubernetesProvider,
                "KubeSimpleProvider": KubernetesProvider,
            },
        }
        for module_name, names in paths.items():
            module = importlib.import_module(module_name)
            for name, cls in names.items():
                self.assertIs(getattr(module, name), cls, f"{module_name}.{name}")
            self.assertEqual(sorted(module.__all__), sorted(names), module_name)

    def test_parsl_paths(self) -> None:
        """The Parsl names the funcX 1.0 docs' configs import (the [parsl] extra)."""
        try:
            import parsl  # noqa: F401
        except ImportError:
            raise self.skipTest("the [parsl] extra is not installed") from None
        from parsl.addresses import address_by_hostname, address_by_interface, address_by_route
        from parsl.channels import LocalChannel, SSHChannel
        from parsl.launchers import (
            AprunLauncher,
            MpiExecLauncher,
            SingleNodeLauncher,
            SrunLauncher,
        )
        from parsl.providers import (
            CobaltProvider,
            LocalProvider,
            PBSProProvider,
            SlurmProvider,
            TorqueProvider,
        )

        self.assertEqual(address_by_interface("lo"), "127.0.0.1")
        for found in (address_by_hostname, address_by_route, SSHChannel, AprunLauncher):
            self.assertTrue(callable(found))
        launchers = [MpiExecLauncher(), SingleNodeLauncher(), SrunLauncher()]
        provider = LocalProvider(channel=LocalChannel(), launcher=launchers[1])
        # The config model takes Parsl's providers as they are.
        for item in (
            provider,
            SlurmProvider(launcher=launchers[2]),
            TorqueProvider(),
            PBSProProvider(),
            CobaltProvider(),
        ):
            self.assertIs(HighThroughputExecutor(provider=item).provider, item)


class FieldTableTests(SynchronousTestCase):
    """Every keyword argument of funcX 1.0.13's classes is a field here."""

    def test_every_funcx10_field_is_accepted(self) -> None:
        classes = {
            "Config": Config,
            "HighThroughputExecutor": HighThroughputExecutor,
            "SimpleStrategy": config_model.SimpleStrategy,
        }
        for owner, names in FUNCX10_FIELDS.items():
            for name in names:
                self.assertIn(name, classes[owner].fields, f"{owner}.{name}")
        self.assertEqual(len(FUNCX10_FIELDS["Config"]), 14)
        self.assertEqual(len(FUNCX10_FIELDS["HighThroughputExecutor"]), 30)
        self.assertEqual(set(KubeSimpleStrategy.fields), set(config_model.SimpleStrategy.fields))

    def test_funcx10_defaults_accepted(self) -> None:
        """Each funcX 1.0 default, given explicitly, is accepted."""
        for owner, cls in (
            ("Config", Config),
            ("HighThroughputExecutor", HighThroughputExecutor),
            ("SimpleStrategy", config_model.SimpleStrategy),
        ):
            for name, default in FUNCX10_FIELDS[owner].items():
                if isinstance(default, str) and default.endswith(")") or "()]" in str(default):
                    continue  # an object, written as text in the table
                cls(**{name: default})


class HonouredFieldTests(SynchronousTestCase):
    """funcX 1.0 fields that this design honours: no warning, and they take effect."""

    def test_service_address_from_environment(self) -> None:
        self.assertEqual(Config().funcx_service_address, "https://api2.funcx.org/v2")
        self.assertEqual(
            Config(funcx_service_address=None).funcx_service_address, "https://api2.funcx.org/v2"
        )
        dev = Config(environment="dev")
        self.assertEqual(dev.funcx_service_address, "https://api.dev.funcx.org/v2")
        self.assertEqual(dev.notices(), [])
        local = Config(environment="local", funcx_service_address=None)
        self.assertEqual(local.funcx_service_address, "http://localhost:5000/v2")
        # An address given wins over the environment, as in funcX 1.0.
        both = Config(environment="dev", funcx_service_address="https://x.example/v2")
        self.assertEqual(both.funcx_service_address, "https://x.example/v2")

    def test_unknown_environment_is_production_with_a_warning(self) -> None:
        config = Config(environment="staging")
        self.assertEqual(config.funcx_service_address, "https://api2.funcx.org/v2")
        [notice] = config.notices()
        self.assertEqual((notice.setting, notice.value), ("Config.environment", "staging"))
        self.assertIn("production service is used", notice.text())

    def test_idle_heartbeats_as_funcx10_took_them(self) -> None:
        config = Config(idle_heartbeats_soft=-3, idle_heartbeats_hard=10.7)
        self.assertEqual((config.idle_heartbeats_soft, config.idle_heartbeats_hard), (0, 10))
        self.assertEqual((Config().idle_heartbeats_soft, Config().idle_heartbeats_hard), (0, 5760))
        self.assertRaises(ConfigError, Config, idle_heartbeats_soft="often")

    def test_executor_heartbeats_reach_the_interchange(self) -> None:
        executor = HighThroughputExecutor(heartbeat_period=5, heartbeat_threshold=12)
        config = Config(executors=[executor], heartbeat_period=30, heartbeat_threshold=120)
        interchange = Interchange.from_config(
            MemoryReactorClock(), self.mktemp(), config, _NoSink()
        )
        self.assertEqual((interchange.heartbeat_period, interchange.heartbeat_threshold), (5, 12))
        plain = Interchange.from_config(MemoryReactorClock(), self.mktemp(), Config(), _NoSink())
        self.assertEqual((plain.heartbeat_period, plain.heartbeat_threshold), (30, 120))
        self.assertEqual(config.notices(), [])
        # The manager's threshold must exceed its period, wherever each is set.
        self.assertRaises(
            ConfigError, Config, executors=[HighThroughputExecutor(heartbeat_threshold=20)]
        )
        self.assertRaises(
            ConfigError, HighThroughputExecutor, heartbeat_period=20, heartbeat_threshold=10
        )

    def test_worker_ports_and_ranges(self) -> None:
        self.assertEqual(HighThroughputExecutor().listen_port_range(), (0, 0))
        ranged = HighThroughputExecutor(worker_port_range=(54000, 55000))
        self.assertEqual(ranged.listen_port_range(), (54000, 55000))
        self.assertEqual(ranged.notices(), [])
        # funcX 1.0's interchange_port_range alone: where managers connect here.
        alone = HighThroughputExecutor(interchange_port_range=(55000, 56000))
        self.assertEqual((alone.listen_port_range(), alone.notices()), ((55000, 56000), []))
        # Both: funcX 1.0's meaning (internal ports) has no use here: one warning.
        both = HighThroughputExecutor(
            worker_port_range=(54000, 55000), interchange_port_range=(55000, 56000)
        )
        self.assertEqual(both.listen_port_range(), (54000, 55000))
        [notice] = both.notices()
        self.assertEqual(notice.setting, "HighThroughputExecutor.interchange_port_range")
        self.assertIn("managers connect on worker_port_range", notice.text())
        # worker_ports: the first port; the second has no use here.
        ports = HighThroughputExecutor(worker_ports=(50001, 50002))
        self.assertEqual(ports.listen_port_range(), (50001, 50001))
        self.assertEqual(settings(ports.notices()), {"HighThroughputExecutor.worker_ports"})
        self.assertRaises(ConfigError, HighThroughputExecutor, worker_ports=(1, 2, 3))

    def test_working_dir_holds_blocks_and_scripts(self) -> None:
        reactor = MemoryReactorClock()
        base = os.path.abspath(self.mktemp())
        relative = HighThroughputExecutor(working_dir="runinfo")
        scaling = scaling_from_config(
            relative,
            reactor=reactor,
            load=_NoLoad(),
            command_template="x {block_id}",
            working_dir=base,
        )
        native = scaling.scaler.provider.provider
        self.assertEqual(native.working_dir, os.path.join(base, "runinfo", "blocks"))
        elsewhere = os.path.abspath(self.mktemp())
        absolute = HighThroughputExecutor(working_dir=elsewhere)
        scaling = scaling_from_config(
            absolute,
            reactor=reactor,
            load=_NoLoad(),
            command_template="x {block_id}",
            working_dir=base,
        )
        self.assertEqual(
            scaling.scaler.provider.provider.working_dir, os.path.join(elsewhere, "blocks")
        )

    def test_any_funcx10_label(self) -> None:
        executor = HighThroughputExecutor(label="My cluster (GPU)")
        scaling = scaling_from_config(
            executor,
            reactor=MemoryReactorClock(),
            load=_NoLoad(),
            command_template="x {block_id}",
            working_dir=self.mktemp(),
        )
        self.assertEqual(scaling.scaler.job_name_prefix, "funcx.My_cluster__GPU_")
        self.assertRaises(ConfigError, HighThroughputExecutor, label="")
        self.assertRaises(ConfigError, HighThroughputExecutor, label="a/b")

    def test_explicit_none_accelerators(self) -> None:
        self.assertEqual(
            HighThroughputExecutor(available_accelerators=None).available_accelerators, []
        )

    def test_relative_log_dir_is_under_the_endpoint(self) -> None:
        ep = EndpointDir(os.path.abspath(self.mktemp()), "e")
        self.assertEqual(ep.log_file("."), os.path.join(ep.path, ".", "endpoint.log"))
        self.assertEqual(ep.log_file("/var/log/fx"), "/var/log/fx/endpoint.log")
        self.assertEqual(ep.log_file(None), os.path.join(ep.path, "endpoint.log"))


class UnusedFieldTests(SynchronousTestCase):
    """funcX 1.0 fields without a use here: accepted; one notice each when given,
    none for a value that asks for what happens anyway, none when not given."""

    def test_each_unused_field_given_gives_one_notice(self) -> None:
        examples: Dict[Any, Dict[str, Any]] = {
            Config: {
                "multi_tenant": True,
                "stdout": "/tmp/out.log",
                "stderr": "./err.log",
                "results_ws_uri": "wss://api2.funcx.org/ws/v2/",
                "warn_about_url_mismatch": True,
            },
            HighThroughputExecutor: {
                "launch_cmd": "process_worker_pool.py {debug} --task_url={task_url}",
                "worker_mode": "singularity_reuse",
                "scheduler_mode": "soft",
                "cold_routing_interval": 5.0,
                "poll_period": 100,
                "suppress_failure": False,
                "storage_access": ["globus"],
                "run_dir": "/tmp/run",
                "endpoint_id": "2f1f1d7c-8f6e-4a44-9d3c-6a6f0a7b1e55",
                "passthrough": False,
                "task_status_queue": object(),
                "worker_ports": (50001, 50002),
            },
            config_model.SimpleStrategy: {"threshold": 5},
        }
        for cls, fields in examples.items():
            for name, value in fields.items():
                [notice] = cls(**{name: value}).notices()
                self.assertEqual(notice.setting, f"{cls.__name__}.{name}")
                self.assertIs(notice.value, value)
                text = notice.text()
                self.assertTrue(text.startswith(f"{cls.__name__}.{name}="), text)
                self.assertGreater(len(notice.meaning), 20, text)
                self.assertIsNotNone(cls.fields[name].unused, name)

    def test_values_that_ask_for_what_happens_give_none(self) -> None:
        quiet = [
            Config(multi_tenant=False),
            Config(multi_tenant=None),
            Config(stdout="./endpoint.log", stderr="./endpoint.log"),
            Config(results_ws_uri=None),
            HighThroughputExecutor(worker_mode="no_container", suppress_failure=True),
            HighThroughputExecutor(passthrough=True, container_cmd_options=""),
            HighThroughputExecutor(launch_cmd=None, container_image=None, run_dir=None),
            Config(),
            HighThroughputExecutor(),
        ]
        for config in quiet:
            self.assertEqual(config.notices(), [], repr(config))

    def test_container_modes(self) -> None:
        """(Issue 11: containers run; before it, these modes ran as no_container.)"""
        executor = HighThroughputExecutor(worker_mode="singularity_reuse")
        self.assertEqual(executor.worker_mode, "singularity")
        self.assertEqual(executor.given["worker_mode"], "singularity_reuse")
        for mode in ("docker", "podman", "singularity", "apptainer", "shifter"):
            self.assertEqual(HighThroughputExecutor(worker_mode=mode).worker_mode, mode)
        self.assertRaises(ConfigError, HighThroughputExecutor, worker_mode="rkt")

    def test_funcx10_container_fields(self) -> None:
        """container_type and container_image are honoured (funcX 1.0's endpoint-wide
        container); container_type alone gives a notice (nothing runs it)."""
        executor = HighThroughputExecutor(
            container_type="singularity",
            container_cmd_options="-H /home/$USER",
            container_image="/images/python.sif",
        )
        self.assertEqual(executor.worker_mode, "singularity")
        self.assertEqual(executor.container_uri, "/images/python.sif")
        self.assertEqual(executor.notices(), [])
        [notice] = HighThroughputExecutor(container_type="docker").notices()
        self.assertEqual(notice.setting, "HighThroughputExecutor.container_type")
        self.assertIn("without container_uri", notice.text())

    def test_nested_notices_are_collected(self) -> None:
        config = Config(
            executors=[
                HighThroughputExecutor(
                    poll_period=1, strategy=config_model.SimpleStrategy(threshold=3)
                )
            ],
            multi_tenant=True,
        )
        self.assertEqual(
            settings(config.notices()),
            {
                "Config.multi_tenant",
                "HighThroughputExecutor.poll_period",
                "SimpleStrategy.threshold",
            },
        )

    def test_kube_simple_strategy_scales_as_simple(self) -> None:
        strategy = KubeSimpleStrategy(max_idletime=3600, interval=2)
        self.assertEqual((strategy.max_idletime, strategy.interval), (3600, 2))
        [notice] = strategy.notices()
        self.assertTrue(notice.whole)
        self.assertIn("scales as SimpleStrategy here", notice.text())
        self.assertTrue(
            notice.text().startswith("KubeSimpleStrategy(interval=2, max_idletime=3600)")
        )


class KubernetesProviderTests(SynchronousTestCase):
    """funcX 1.0's KubernetesProvider: its fields checked as funcX 1.0 checked them;
    an endpoint using it runs its blocks as pods (tests/test_kubernetes.py)."""

    def test_fields(self) -> None:
        provider = KubernetesProvider(image="python:3.11", max_blocks=2, incluster_config=False)
        self.assertEqual((provider.namespace, provider.max_blocks), ("default", 2))
        self.assertEqual(provider.persistent_volumes, [])
        with self.assertRaises(ConfigError) as cm:
            KubernetesProvider()
        self.assertIn("image is required", str(cm.exception))
        self.assertRaises(ConfigError, KubernetesProvider, image="x", init_blocks=1)
        self.assertRaises(ConfigError, KubernetesProvider, image="x", persistent_volumes=["a"])

    def test_starts_as_the_pod_provider(self) -> None:
        try:
            import kubernetes  # noqa: F401
        except ImportError:
            raise self.skipTest("the [kubernetes] extra is not installed") from None
        executor = HighThroughputExecutor(provider=KubernetesProvider(image="x"))
        scaling = scaling_from_config(
            executor,
            reactor=MemoryReactorClock(),
            load=_NoLoad(),
            command_template="x {block_id}",
            working_dir=self.mktemp(),
        )
        self.assertIsInstance(scaling.scaler.provider.provider, KubernetesPodProvider)
        # No API call at start: the first comes with the first block.
        scaling.startService()
        self.assertTrue(scaling.strategy.running)
        self.successResultOf(scaling.stopService())


class NoticeLoggingTests(SynchronousTestCase):
    def test_one_warning_per_notice_at_start(self) -> None:
        config = Config(
            executors=[HighThroughputExecutor(poll_period=1, worker_mode="singularity_reuse")]
        )
        part = ConfigNotices(config.notices())
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual(events, [])
        part.startService()
        warnings = [e for e in events if e.get("log_namespace", "").endswith("ConfigNotices")]
        self.assertEqual(len(warnings), 2)
        self.assertEqual({e["log_level"] for e in warnings}, {LogLevel.warn})
        self.assertEqual(
            {e["setting"] for e in warnings},
            {"HighThroughputExecutor.poll_period", "HighThroughputExecutor.worker_mode"},
        )
        text = " ".join(e["notice"] for e in warnings)
        self.assertIn("poll_period=1: this endpoint is event-driven", text)
        self.assertIn("worker_mode='singularity_reuse': funcX 1.0's reuse/single-use", text)


# The seven funcX 1.0 config files and the warnings each is expected to give.
EXPECTED: Dict[str, Set[str]] = {
    "local.py": set(),
    "slurm_srun.py": set(),
    "torque_aprun.py": set(),
    "cobalt.py": set(),
    "pbspro_gpus.py": set(),
    "local_gpu.py": set(),
    "kubernetes.py": {
        "HighThroughputExecutor.scheduler_mode",
        "HighThroughputExecutor.container_type",
        "KubeSimpleStrategy",
    },
}


class Funcx10ConfigFileTests(SynchronousTestCase):
    """The funcX 1.0 config.py files load unchanged and build the endpoint's service."""

    def setUp(self) -> None:
        try:
            import parsl  # noqa: F401
        except ImportError:
            raise self.skipTest("the [parsl] extra is not installed") from None

    def build(self, name: str) -> Any:
        config_dir = os.path.abspath(self.mktemp())
        ep = EndpointDir(config_dir, name.replace(".py", "").replace("_", "-"))
        os.makedirs(ep.path)
        shutil.copy(os.path.join(CONFIGS, name), ep.config_file)
        config = load_config(ep.config_file)
        service = build_endpoint(ep, config, MemoryReactorClock())
        return config, service

    def test_all_seven_are_here(self) -> None:
        self.assertEqual(sorted(os.listdir(CONFIGS)), sorted(EXPECTED))

    def test_each_loads_and_builds_with_the_warnings_expected(self) -> None:
        for name, expected in EXPECTED.items():
            config, service = self.build(name)
            self.assertIsInstance(config, Config, name)
            notices = service.getServiceNamed("config")
            self.assertEqual(settings(notices.notices), expected, name)
            parts = [part.name for part in service]
            self.assertEqual(
                parts,
                [
                    "config",
                    "control",
                    "registration",
                    "interchange",
                    "providers",
                    "amqp",
                    "idle",
                    "status",
                ],
            )
            for part in service:
                self.assertTrue(IService.providedBy(part))

    def test_what_the_files_ask_for(self) -> None:
        from parsl.providers import CobaltProvider, PBSProProvider, SlurmProvider, TorqueProvider

        local, _ = self.build("local.py")
        [executor] = local.executors
        self.assertEqual(type(executor.provider).__module__, "parsl.providers.local.local")
        self.assertEqual(local.funcx_service_address, "https://api2.funcx.org/v2")

        for name, kind in (
            ("slurm_srun.py", SlurmProvider),
            ("torque_aprun.py", TorqueProvider),
            ("cobalt.py", CobaltProvider),
            ("pbspro_gpus.py", PBSProProvider),
        ):
            config, service = self.build(name)
            [executor] = config.executors
            self.assertIsInstance(executor.provider, kind, name)
            adapter = service.getServiceNamed("providers").scaler.provider
            self.assertTrue(adapter.blocking, name)  # Parsl's providers run in a thread
        config, _ = self.build("cobalt.py")
        self.assertEqual(config.executors[0].address, "127.0.0.1")
        self.assertEqual(config.executors[0].max_workers_per_node, 2)
        config, _ = self.build("pbspro_gpus.py")
        self.assertEqual(config.executors[0].strategy.max_idletime, 300)

        gpu, _ = self.build("local_gpu.py")
        self.assertEqual(gpu.executors[0].available_accelerators, ["0", "1", "2", "3"])
        self.assertEqual(gpu.executors[0].max_workers_per_node, 4)

        kube, service = self.build("kubernetes.py")
        self.assertEqual((kube.heartbeat_period, kube.heartbeat_threshold), (15, 200))
        self.assertEqual(kube.executors[0].strategy.max_idletime, 3600)
        self.assertEqual(kube.executors[0].label, "Kubernetes_funcX")
        pods = service.getServiceNamed("providers").scaler.provider
        self.assertTrue(pods.blocking)  # the kubernetes client blocks: called in a thread
        self.assertEqual(pods.max_blocks, 2)
        settings = pods.provider.settings
        self.assertEqual((settings.image, settings.init_mem), ("python:3.8-buster", "1024Mi"))

    def test_a_funcx10_default_config_is_quiet(self) -> None:
        config, _ = self.build("local.py")
        self.assertEqual(config.notices(), [])
        self.assertEqual(config.executors[0].max_workers_per_node, math.inf)


class _NoSink:
    def results_ready(self, results: Any) -> None:  # pragma: no cover
        pass


class _NoLoad:
    def outstanding_tasks(self) -> int:  # pragma: no cover
        return 0

    def managers(self) -> List[Any]:  # pragma: no cover
        return []


class Funcx10DefaultConfigRunsTests(SynchronousTestCase):
    """funcX 1.0's default config.py (Parsl's LocalProvider) runs a function end to end:
    its only additions are the private service's address and CA files."""

    def setUp(self) -> None:
        try:
            import parsl  # noqa: F401
        except ImportError:
            raise self.skipTest("the [parsl] extra is not installed") from None

    def test_runs_a_function(self) -> None:
        from funcx_endpoint.testing.service import shared_service
        from tests.support import alive, endpoint_processes, run_cli, sdk_client, wait_for
        from tests.test_end_to_end import add, wait_result

        service = shared_service()
        env = service.client_env(service.create_client())
        config_dir = os.path.abspath(self.mktemp())
        with open(os.path.join(CONFIGS, "local.py")) as f:
            text = f.read()
        text = text.replace(
            "config = Config(\n",
            "config = Config(\n"
            f"    funcx_service_address={service.base_url!r},\n"
            f"    service_ca_file={service.ca_file!r},\n"
            f"    amqp_ca_file={service.broker_ca_file!r},\n",
        )
        source = os.path.abspath(self.mktemp())
        with open(source, "w") as f:
            f.write(text)
        configured = run_cli(config_dir, "configure", "old", "--endpoint-config", source, env=env)
        self.assertEqual(configured.returncode, 0, configured.stdout + configured.stderr)
        started = run_cli(config_dir, "start", "old", env=env)
        self.assertEqual(started.returncode, 0, started.stdout + started.stderr)
        self.addCleanup(run_cli, config_dir, "stop", "old", env=env)
        ep = EndpointDir(config_dir, "old")
        pid = ep.read_pid()
        self.assertTrue(
            wait_for(
                lambda: "managers: 1" in run_cli(config_dir, "status", "old", env=env).stdout, 60
            ),
            run_cli(config_dir, "status", "old", env=env).stdout,
        )

        client = sdk_client(env)
        function_id = client.register_function(add)
        task_id = client.run(5, 6, endpoint_id=ep.endpoint_id(), function_id=function_id)
        self.assertEqual(wait_result(client, task_id), 11)
        # Parsl wrote its submit script under the endpoint's directory.
        self.assertTrue(os.listdir(os.path.join(ep.path, "submit_scripts")))
        processes = endpoint_processes(ep, pid)
        stopped = run_cli(config_dir, "stop", "old", env=env)
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        self.assertTrue(wait_for(lambda: not alive(processes), 30))
        with open(ep.log_file()) as f:
            self.assertNotIn("funcX 1.0 compatibility", f.read())
