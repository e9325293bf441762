"""Config classes and config.py loading."""

from __future__ import annotations

import math
import os
import textwrap

from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.cli.profiles import render_template
from funcx_endpoint.config import (
    Config,
    ConfigError,
    ConfigFileError,
    HighThroughputExecutor,
    LocalProvider,
    SimpleStrategy,
    load_config,
)


class ConfigObjectTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        config = Config()
        self.assertEqual(config.heartbeat_period, 30.0)
        self.assertEqual(config.heartbeat_threshold, 120.0)
        self.assertEqual(config.result_size_limit, 10 * 1024 * 1024)
        self.assertIsNone(config.allowed_functions)
        [executor] = config.executors
        self.assertIsInstance(executor, HighThroughputExecutor)
        self.assertIsInstance(executor.provider, LocalProvider)
        self.assertEqual(executor.max_workers_per_node, math.inf)
        self.assertEqual(executor.available_accelerators, [])

    def test_unknown_field_suggests(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            Config(heartbeat_perod=10)
        message = str(cm.exception)
        self.assertIn("unknown field 'heartbeat_perod'", message)
        self.assertIn("did you mean 'heartbeat_period'?", message)

    def test_wrong_type(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            Config(heartbeat_period="often")
        self.assertIn("Config.heartbeat_period", str(cm.exception))
        self.assertIn("expected a number > 0", str(cm.exception))
        self.assertIn("'often' (str)", str(cm.exception))

    def test_log_backup_count_keeps_at_least_one(self) -> None:
        # 0 would make Twisted's LogFile keep every rotated file: refused.
        with self.assertRaises(ConfigError) as cm:
            Config(log_backup_count=0)
        self.assertIn("Config.log_backup_count: expected an integer >= 1", str(cm.exception))
        self.assertEqual(Config(log_backup_count=1).log_backup_count, 1)

    def test_bool_is_not_a_number(self) -> None:
        self.assertRaises(ConfigError, Config, amqp_prefetch=True)

    def test_integer_field_rejects_fraction(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            LocalProvider(max_blocks=1.5)
        self.assertIn("LocalProvider.max_blocks: expected an integer", str(cm.exception))

    def test_integral_float_accepted_as_integer(self) -> None:
        self.assertEqual(LocalProvider(max_blocks=2.0).max_blocks, 2)

    def test_positional_arguments_refused(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            Config([HighThroughputExecutor()])
        self.assertIn("keyword arguments only", str(cm.exception))

    def test_relations(self) -> None:
        self.assertRaises(ConfigError, Config, heartbeat_period=60, heartbeat_threshold=30)
        self.assertRaises(ConfigError, LocalProvider, min_blocks=2, max_blocks=1)
        self.assertRaises(ConfigError, LocalProvider, init_blocks=3, max_blocks=2)

    def test_executors_must_be_a_list_of_executors(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            Config(executors=HighThroughputExecutor())
        self.assertIn("executors=[HighThroughputExecutor(...)]", str(cm.exception))
        self.assertRaises(ConfigError, Config, executors=[])
        self.assertRaises(ConfigError, Config, executors=["htex"])

    def test_allowed_functions_normalised(self) -> None:
        fid = "0B7E2B9A-57A6-4D4A-9BB8-9D32C3B09A51"
        config = Config(allowed_functions=[fid])
        self.assertEqual(config.allowed_functions, [fid.lower()])
        with self.assertRaises(ConfigError) as cm:
            Config(allowed_functions=["not-a-uuid"])
        self.assertIn("'not-a-uuid' is not a UUID", str(cm.exception))

    def test_service_address(self) -> None:
        config = Config(funcx_service_address="https://localhost:8443/v2/")
        self.assertEqual(config.funcx_service_address, "https://localhost:8443/v2")
        self.assertRaises(ConfigError, Config, funcx_service_address="ftp://x/v2")

    def test_accelerators_count(self) -> None:
        self.assertEqual(
            HighThroughputExecutor(available_accelerators=2).available_accelerators, ["0", "1"]
        )
        self.assertRaises(ConfigError, HighThroughputExecutor, available_accelerators="0,1")

    def test_provider_must_look_like_one(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            HighThroughputExecutor(provider="local")
        self.assertIn("no submit() method", str(cm.exception))

        class ParslLike:
            def submit(self, command, tasks_per_node, job_name="x"):  # pragma: no cover
                pass

            def status(self, job_ids):  # pragma: no cover
                pass

            def cancel(self, job_ids):  # pragma: no cover
                pass

        provider = ParslLike()
        self.assertIs(HighThroughputExecutor(provider=provider).provider, provider)

    def test_strategy(self) -> None:
        executor = HighThroughputExecutor(strategy=SimpleStrategy(max_idletime=5))
        self.assertEqual(executor.strategy.max_idletime, 5)
        self.assertRaises(ConfigError, HighThroughputExecutor, strategy={"max_idletime": 5})

    def test_repr_shows_changes(self) -> None:
        self.assertEqual(repr(Config(debug=True)), "Config(debug=True)")


class LoadConfigTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def test_template_loads(self) -> None:
        path = self.write(render_template("x", "https://localhost:1/v2", "/tmp/ca.pem"))
        config = load_config(path)
        self.assertEqual(config.funcx_service_address, "https://localhost:1/v2")
        self.assertEqual(config.service_ca_file, "/tmp/ca.pem")
        # The template's values are the defaults.
        defaults = Config(
            funcx_service_address="https://localhost:1/v2", service_ca_file="/tmp/ca.pem"
        )
        self.assertEqual(config.as_dict(), defaults.as_dict())

    def test_syntax_error_has_line(self) -> None:
        path = self.write("from funcx_endpoint.config import Config\n\nconfig = Config(\n")
        with self.assertRaises(ConfigFileError) as cm:
            load_config(path)
        self.assertEqual(cm.exception.path, path)
        self.assertIsNotNone(cm.exception.line)
        self.assertIn("syntax error", str(cm.exception))
        self.assertTrue(str(cm.exception).startswith(f"{path}, line "))

    def test_config_error_has_line(self) -> None:
        path = self.write(
            """\
            from funcx_endpoint.config import Config

            x = 1
            config = Config(
                heartbeat_perod=5,
            )
            """
        )
        with self.assertRaises(ConfigFileError) as cm:
            load_config(path)
        self.assertEqual(cm.exception.line, 4)
        self.assertIn("unknown field 'heartbeat_perod'", str(cm.exception))

    def test_runtime_error_has_line(self) -> None:
        path = self.write("import os\nconfig = 1 / 0\n")
        with self.assertRaises(ConfigFileError) as cm:
            load_config(path)
        self.assertEqual(cm.exception.line, 2)
        self.assertIn("ZeroDivisionError", str(cm.exception))

    def test_exit_in_config_is_reported(self) -> None:
        path = self.write("import sys\nsys.exit(3)\n")
        with self.assertRaises(ConfigFileError) as cm:
            load_config(path)
        self.assertEqual(cm.exception.line, 2)
        self.assertIn("it called exit(3)", str(cm.exception))

    def test_missing_config_name(self) -> None:

        path = self.write("cfg = None\n")
        with self.assertRaises(ConfigFileError) as cm:
            load_config(path)
        self.assertIn("defines no 'config'", str(cm.exception))

    def test_config_of_wrong_type(self) -> None:
        path = self.write("config = {'heartbeat_period': 3}\n")
        with self.assertRaises(ConfigFileError) as cm:
            load_config(path)
        self.assertIn("must be a Config(...), got a dict", str(cm.exception))

    def test_missing_file(self) -> None:
        path = os.path.abspath(self.mktemp())
        with self.assertRaises(ConfigFileError) as cm:
            load_config(path)
        self.assertIn("cannot read the file", str(cm.exception))
