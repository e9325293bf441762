"""The version check on fakes and in one process: the runtime header, results
with the worker's environment, the worker's VersionMismatch, the SDK's warning.

The end-to-end tests (SDK, service, broker, endpoint daemon, worker) are in
:mod:`tests.test_versions_e2e`.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from typing import Any, Dict

import dill
from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.sdk.environment import EnvironmentCheck, EnvironmentMismatchWarning
from funcx_endpoint.sdk.tasks import task_record
from funcx_endpoint.wire import (
    ErrorCode,
    PackedResult,
    Result,
    Task,
    pack,
    pack_payload,
    pack_task_buffer,
    unpack,
)
from funcx_endpoint.wire.buffers import pack_buffers
from funcx_endpoint.wire.resources import add_resources_header
from funcx_endpoint.wire.runtime import (
    UserRuntimeError,
    add_runtime_header,
    check_user_runtime,
    local_runtime,
    runtime_difference,
    split_runtime_header,
    worker_details,
)
from funcx_endpoint.wire.serialize import DeserializationError, Serializer
from funcx_endpoint.worker.execute import TaskRunner

TASK_ID = "0b6f6a8e-3f35-4c1e-9a55-2f7f3c1e0a11"
_BYTECODE_ONLY = Serializer(code_methods=("01",))
_SOURCE_FIRST = Serializer()


def double(x: int) -> int:
    return 2 * x


def buffer_of(function_code: str, *args: Any) -> str:
    return pack_task_buffer(function_code, pack_payload(args))


def bytecode_only(fn: Any) -> str:
    return _BYTECODE_ONLY.pack_function(fn)


def other_python() -> str:
    """A Python of another minor version on this machine (pyenv's), or skip."""
    mine = "{}.{}".format(*sys.version_info[:2])
    root = os.path.expanduser("~/.pyenv/versions")
    for version in ("3.10", "3.12", "3.9"):
        if version == mine:
            continue
        for name in sorted(os.listdir(root)) if os.path.isdir(root) else ():
            if name.startswith(version + "."):
                return os.path.join(root, name, "bin", "python")
    from twisted.trial.unittest import SkipTest

    raise SkipTest("no Python of another minor version here (pyenv)")


def pickled_by(python: str, source: str, name: str) -> Dict[str, str]:
    """``{"function_code", "python_version", "dill_version"}``: the function
    ``name`` defined by ``source``, pickled with its bytecode (method 01) by
    the interpreter ``python`` with this environment's dill (pure Python)."""
    path = tempfile.mkdtemp(prefix="funcx-dill-")
    try:
        os.symlink(
            os.path.dirname(os.path.dirname(os.path.abspath(dill.__file__))) + "/dill",
            os.path.join(path, "dill"),
        )
        script = (
            "import base64, json, sys, dill\n"
            f"{source}\n"
            f"body = base64.b64encode(dill.dumps({name}, recurse=True)).decode()\n"
            "print(json.dumps({'code': '01\\n' + body, 'python_version': "
            "'{}.{}.{}'.format(*sys.version_info[:3]), 'dill_version': dill.__version__}))\n"
        )
        out = subprocess.run(
            [python, "-c", script],
            env=dict(os.environ, PYTHONPATH=path),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    finally:
        shutil.rmtree(path)
    found = json.loads(out)
    return {
        "function_code": pack_buffers([found["code"]]),
        "python_version": found["python_version"],
        "dill_version": found["dill_version"],
    }


class RuntimeHeaderTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        buffer = buffer_of(_SOURCE_FIRST.pack_function(double), 3)
        runtime = {"python_version": "3.7.16", "dill_version": "0.3.5"}
        self.assertEqual(
            split_runtime_header(add_runtime_header(buffer, runtime)), (runtime, buffer)
        )
        self.assertEqual(split_runtime_header(buffer), (None, buffer))

    def test_bad_headers(self) -> None:
        for bad in ("#runtime:{", "#runtime:[1]\nx", '#runtime:{"python_version": 3}\nx'):
            with self.assertRaises(UserRuntimeError):
                split_runtime_header(bad)

    def test_check(self) -> None:
        self.assertEqual(
            check_user_runtime({"python_version": "3.11.7", "other": 1}),
            {"python_version": "3.11.7"},
        )
        for bad in ([], {"dill_version": ""}, {"python_version": "3" * 100}):
            with self.assertRaises(UserRuntimeError):
                check_user_runtime(bad)

    def test_difference(self) -> None:
        mine = {"python_version": "3.11.7", "dill_version": "0.4.1"}
        self.assertEqual(runtime_difference({"python_version": "3.11.2"}, mine), (False, False))
        self.assertEqual(runtime_difference({"python_version": "3.10.13"}, mine), (True, False))
        self.assertEqual(runtime_difference({"dill_version": "0.3.6"}, mine), (False, True))
        self.assertEqual(runtime_difference({}, mine), (False, False))

    def test_task_message_field(self) -> None:
        """``user_runtime`` rides in the task message, written only when given."""
        runtime = {"python_version": "3.10.13", "dill_version": "0.3.6"}
        message = Task(TASK_ID, "buffer", user_runtime=runtime)
        self.assertEqual(unpack(pack(message)).user_runtime, runtime)
        self.assertNotIn(b"user_runtime", pack(Task(TASK_ID, "buffer")))
        self.assertIn("user_runtime", repr(message))


class ResultDetailsTests(SynchronousTestCase):
    def test_packed_result_with_details(self) -> None:
        details = {"python_version": "3.11.7", "os": "Linux", "host": "h"}
        packed = PackedResult(
            TASK_ID, b'"00\\nx"', details=json.dumps(details, separators=(",", ":")).encode()
        )
        decoded = PackedResult.decode(packed.encode())
        self.assertEqual(json.loads(decoded.details), details)
        self.assertEqual(decoded.message_size(), len(decoded.message()))
        result = decoded.to_result()
        self.assertEqual(result.details, details)
        self.assertEqual(PackedResult.from_result(result).message(), decoded.message())

    def test_without_details_as_before(self) -> None:
        """No details: the message is funcX 1.0's, byte for byte."""
        packed = PackedResult.success(TASK_ID, "00\nx")
        self.assertNotIn(b'"details"', packed.message())
        self.assertEqual(PackedResult.decode(packed.encode()).message(), packed.message())
        self.assertEqual(pack(Result.success(TASK_ID, "00\nx")), packed.message())

    def test_unknown_details_shape_ignored(self) -> None:
        raw = pack(Result.success(TASK_ID, "00\nx")).replace(
            b'"task_statuses":null', b'"task_statuses":null,"details":"nonsense"'
        )
        result = unpack(raw)
        self.assertIsNone(result.details)


class SourceOnlyTests(SynchronousTestCase):
    def test_bytecode_refused(self) -> None:
        code = _BYTECODE_ONLY.serialize(double)
        with self.assertRaises(DeserializationError) as caught:
            Serializer(load_bytecode=False).deserialize(code)
        self.assertIn("bytecode", str(caught.exception))

    def test_combined_loads_from_source(self) -> None:
        code = Serializer(code_methods=("10",)).serialize(double)
        self.assertEqual(Serializer(load_bytecode=False).deserialize(code)(4), 8)


class WorkerVersionTests(SynchronousTestCase):
    def run_task(self, buffer: str) -> Result:
        result = PackedResult.decode(TaskRunner().run(TASK_ID, 1, buffer)).to_result()
        return result

    def test_every_result_carries_the_environment(self) -> None:
        ok = self.run_task(buffer_of(_SOURCE_FIRST.pack_function(double), 3))
        self.assertFalse(ok.is_error)
        self.assertEqual(ok.details, worker_details())
        for key in ("python_version", "dill_version", "os", "host"):
            self.assertTrue(ok.details[key], key)
        failed = self.run_task(buffer_of(_SOURCE_FIRST.pack_function(double), "x", "y"))
        self.assertTrue(failed.is_error)
        self.assertEqual(failed.details, worker_details())

    def test_same_versions_run(self) -> None:
        buffer = add_runtime_header(buffer_of(bytecode_only(double), 5), local_runtime())
        result = self.run_task(buffer)
        self.assertFalse(result.is_error, result.data)

    def test_other_python_bytecode_is_a_version_mismatch(self) -> None:
        """Announced from another Python, a function with only its bytecode is not
        loaded (it might crash the worker): VersionMismatch naming both sides."""
        theirs = {"python_version": "3.7.16", "dill_version": dill.__version__}
        result = self.run_task(add_runtime_header(buffer_of(bytecode_only(double), 5), theirs))
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.VERSION_MISMATCH)
        message = result.error_details.user_message
        self.assertIn("Python 3.7.16 with dill", message)
        self.assertIn(f"this worker runs Python {local_runtime()['python_version']}", message)

    def test_other_python_source_runs(self) -> None:
        theirs = {"python_version": "3.7.16"}
        code = Serializer(code_methods=("10",)).pack_function(double)
        result = self.run_task(add_runtime_header(buffer_of(code, 5), theirs))
        self.assertFalse(result.is_error, result.data)

    def test_other_dill_and_unloadable_is_a_version_mismatch(self) -> None:
        theirs = {"dill_version": "0.0.1"}
        result = self.run_task(add_runtime_header("1\nx1\ny1\nz", theirs))
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.VERSION_MISMATCH)
        self.assertIn("dill 0.0.1", result.error_details.user_message)

    def test_same_versions_unloadable_is_a_deserialization_error(self) -> None:
        result = self.run_task(add_runtime_header("1\nx1\ny1\nz", local_runtime()))
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.DESERIALIZATION_ERROR)

    def test_with_a_resources_header_too(self) -> None:
        buffer = add_resources_header(buffer_of(bytecode_only(double), 5), {"num_ranks": 1})
        result = self.run_task(add_runtime_header(buffer, local_runtime()))
        self.assertFalse(result.is_error, result.data)

    def test_bad_runtime_header(self) -> None:
        result = self.run_task("#runtime:{\n" + buffer_of(bytecode_only(double), 5))
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.MALFORMED_TASK)

    def test_function_pickled_by_another_python(self) -> None:
        """A function really pickled (bytecode) by another Python minor version:
        without its versions it loads and fails as the user's code would (or
        worse); with them it is a VersionMismatch before anything runs."""
        pickled = pickled_by(other_python(), "def double(x):\n    return 2 * x", "double")
        buffer = buffer_of(pickled["function_code"], 21)
        theirs = {k: pickled[k] for k in ("python_version", "dill_version")}
        result = self.run_task(add_runtime_header(buffer, theirs))
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.VERSION_MISMATCH)
        self.assertIn(f"Python {pickled['python_version']}", result.error_details.user_message)


class SDKWarningTests(SynchronousTestCase):
    def record(self, details: Dict[str, Any]) -> Dict[str, Any]:
        return task_record(
            TASK_ID,
            {
                "status": "success",
                "result": "00\n" + base64.b64encode(dill.dumps(1)).decode(),
                "details": details,
            },
        )

    def test_record_has_details(self) -> None:
        self.assertEqual(self.record({"os": "x"})["details"], {"os": "x"})

    def test_warns_once(self) -> None:
        check = EnvironmentCheck()
        mine = {"python_version": "3.11.7", "dill_version": "0.4.1"}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check.check(self.record({"python_version": "3.11.2", "dill_version": "0.4.1"}), mine)
            self.assertEqual(caught, [])
            other = {"python_version": "3.10.13", "dill_version": "0.4.1", "host": "node7"}
            check.check(self.record(other), mine)
            check.check(self.record(other), mine)
        self.assertEqual(len(caught), 1)
        self.assertIs(caught[0].category, EnvironmentMismatchWarning)
        text = str(caught[0].message)
        self.assertIn("Python 3.10.13 with dill 0.4.1", text)
        self.assertIn("host node7", text)
        self.assertIn("this client Python 3.11.7", text)


class Funcx10ReadersTests(SynchronousTestCase):
    def test_funcx_common_ignores_the_fields(self) -> None:
        """funcX 1.0.13's own reader (funcx_common, in the funcx venv) reads a task
        message with a user_runtime and a result with details: both ignored."""
        import subprocess

        from funcx_endpoint.wire import Task as TaskMessage
        from tests.test_real_funcx_sdk import _funcx_python

        task = TaskMessage(TASK_ID, "1\nx", user_runtime=local_runtime())
        result = Result(TASK_ID, "00\nx", details=worker_details())
        script = (
            "import base64, sys\n"
            "from funcx_common.messagepack import unpack\n"
            "for arg in sys.argv[1:]:\n"
            "    message = unpack(base64.b64decode(arg))\n"
            "    print(type(message).__name__, message.task_id)\n"
        )
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        done = subprocess.run(
            [_funcx_python(), "-c", script]
            + [base64.b64encode(pack(m)).decode("ascii") for m in (task, result)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.split(), ["Task", TASK_ID, "Result", TASK_ID])
