"""Tests of the worker: frames, running a task, the read-run-write loop, and a
real worker process driven over its pipes (with its round-trip cost measured).
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import time
import uuid
from typing import Any, List, Tuple

from twisted.trial.unittest import SynchronousTestCase

from funcx_endpoint.testing.managers import package_environment
from funcx_endpoint.wire import (
    ActorName,
    ErrorCode,
    Result,
    TaskState,
    deserialize,
    frames,
    pack_buffers,
    pack_function,
    pack_payload,
    serialize,
)
from funcx_endpoint.wire.results import read_result
from funcx_endpoint.worker.execute import (
    MAX_SUMMARY_BYTES,
    MAX_TRACEBACK_BYTES,
    FunctionCache,
    TaskRunner,
    clip,
    versions,
)
from funcx_endpoint.worker.main import Worker, parse_args


def add(a: int, b: int = 0) -> int:
    return a + b


def shout(value: int) -> int:
    print("printed by the user")
    return value * 2


def user_failure(value: int) -> float:
    # Functions travel as source: what they call must be inside them.
    def inner_failure(value: int) -> float:
        return value / 0

    return inner_failure(value)


def big(size: int) -> str:
    return "x" * size


def huge_failure(size: int) -> None:
    raise ValueError("x" * size + "END")


def unpicklable() -> Any:
    return (i for i in range(3))


def leave() -> None:
    raise SystemExit(3)


def task_buffer(fn: Any, *args: Any, **kwargs: Any) -> str:
    return pack_function(fn) + pack_payload(args, kwargs)


def run(runner: TaskRunner, buffer: str, task_id: str = "") -> Result:
    task_id = task_id or str(uuid.uuid4())
    result = read_result(runner.run(task_id, 1234, buffer))
    assert isinstance(result, Result)
    assert result.task_id == task_id
    return result


class _Exit:
    """Unpickling this kills the process (stands in for bytecode from another Python)."""

    def __reduce__(self) -> Any:
        return (os._exit, (7,))


def deadly_buffer() -> str:
    import base64

    function_part = "01\n" + base64.encodebytes(pickle.dumps(_Exit())).decode()
    return pack_buffers([function_part]) + pack_payload(())


class FrameTests(SynchronousTestCase):
    def test_task_roundtrip(self) -> None:
        task_id = str(uuid.uuid4())
        frame = frames.encode_task(task_id, 123456789, "ünïcode".encode())
        [(kind, body)] = frames.FrameDecoder().feed(frame)
        self.assertEqual(kind, frames.KIND_TASK)
        self.assertEqual(frames.decode_task(body), (task_id, 123456789, "ünïcode".encode()))

    def test_incremental(self) -> None:
        stream = b"".join(
            [
                frames.encode_frame(frames.KIND_PHASE, frames.PHASE_LOADING),
                frames.encode_hello({"pid": 1}),
                frames.encode_frame(frames.KIND_RESULT, b"r" * 1000),
            ]
        )
        decoder = frames.FrameDecoder()
        received: List[Tuple[bytes, bytes]] = []
        for i in range(len(stream)):
            received.extend(decoder.feed(stream[i : i + 1]))
        self.assertEqual([k for k, _ in received], [b"P", b"H", b"R"])
        self.assertEqual(received[1], (b"H", b'{"pid":1}'))
        self.assertEqual(frames.decode_hello(received[1][1]), {"pid": 1})
        self.assertEqual(decoder.pending, 0)
        self.assertEqual(frames.FrameDecoder().feed(stream), received)

    def test_large_frame_in_pieces(self) -> None:
        payload = os.urandom(8 * 1024 * 1024)
        stream = frames.encode_frame(frames.KIND_RESULT, payload)
        decoder = frames.FrameDecoder()
        started = time.perf_counter()
        out = []
        for start in range(0, len(stream), 65536):
            out.extend(decoder.feed(stream[start : start + 65536]))
        self.assertLess(time.perf_counter() - started, 2.0)  # linear, not quadratic
        self.assertEqual(out, [(frames.KIND_RESULT, payload)])

    def test_garbage(self) -> None:
        self.assertRaises(frames.FrameError, frames.FrameDecoder().feed, b"\x00\x00\x00\x00")
        self.assertRaises(
            frames.FrameError, frames.FrameDecoder(max_frame=10).feed, b"\x00\x00\x01\x00"
        )
        self.assertRaises(frames.FrameError, frames.decode_task, b"\x05")
        self.assertRaises(frames.FrameError, frames.decode_task, b"\x09" + b"\x00" * 8 + b"ab")
        self.assertRaises(frames.FrameError, frames.decode_hello, b"not json")
        self.assertRaises(frames.FrameError, frames.decode_hello, b"[]")


class RunnerTests(SynchronousTestCase):
    def test_success(self) -> None:
        runner = TaskRunner()
        before = time.time_ns()
        result = run(runner, task_buffer(add, 2, b=3))
        self.assertIsNone(result.error_details)
        self.assertEqual(deserialize(result.data), 5)
        statuses = result.task_statuses or []
        self.assertEqual(
            [(t.state, t.actor) for t in statuses],
            [
                (TaskState.RUNNING, ActorName.MANAGER),
                (TaskState.EXECUTION_START, ActorName.WORKER),
                (TaskState.EXECUTION_END, ActorName.WORKER),
            ],
        )
        self.assertEqual(statuses[0].timestamp, 1234)
        self.assertGreaterEqual(statuses[1].timestamp, before)  # ns
        self.assertGreaterEqual(statuses[2].timestamp, statuses[1].timestamp)

    def test_exception_traceback_starts_at_user_code(self) -> None:
        result = run(TaskRunner(), task_buffer(user_failure, 1))
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.REMOTE_EXECUTION_ERROR)
        self.assertEqual(result.error_details.user_message, "ZeroDivisionError: division by zero")
        lines = result.data.splitlines()
        self.assertEqual(lines[0], "Traceback (most recent call last):")
        self.assertIn("in user_failure", lines[1])
        self.assertIn("in inner_failure", result.data)
        self.assertNotIn("execute.py", result.data)
        self.assertEqual(lines[-1], "ZeroDivisionError: division by zero")

    def test_system_exit_is_the_users(self) -> None:
        result = run(TaskRunner(), task_buffer(leave))
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.REMOTE_EXECUTION_ERROR)
        self.assertIn("SystemExit: 3", result.data)

    def test_wrong_arguments(self) -> None:
        result = run(TaskRunner(), task_buffer(add))
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.REMOTE_EXECUTION_ERROR)
        self.assertIn("TypeError", result.error_details.user_message)

    def test_result_size_limit(self) -> None:
        runner = TaskRunner(result_size_limit=1000)
        self.assertIsNone(run(runner, task_buffer(big, 100)).error_details)
        result = run(runner, task_buffer(big, 5000))
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.MAX_RESULT_SIZE_EXCEEDED)
        size = len(serialize("x" * 5000))
        self.assertIn(f"{size} bytes", result.error_details.user_message)
        self.assertIn("limit of 1000 bytes", result.error_details.user_message)

    def test_huge_exception_is_truncated(self) -> None:
        """A 20 MB exception message gives a small error result, not a 40 MB one."""
        packed = TaskRunner().run(str(uuid.uuid4()), 1, task_buffer(huge_failure, 20_000_000))
        self.assertLess(len(packed), MAX_TRACEBACK_BYTES + MAX_SUMMARY_BYTES + 2000)
        result = read_result(packed)
        assert isinstance(result, Result) and result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.REMOTE_EXECUTION_ERROR)
        summary = result.error_details.user_message
        self.assertTrue(summary.startswith("ValueError: xxx"))
        self.assertLess(len(summary.encode()), MAX_SUMMARY_BYTES + 200)
        self.assertIn("truncated: 20000015 bytes in all", summary)  # "ValueError: " + x + END
        text = result.data
        self.assertLess(len(text.encode()), MAX_TRACEBACK_BYTES + 200)
        self.assertTrue(text.startswith("Traceback (most recent call last):"))
        self.assertIn("in huge_failure", text)  # the head
        self.assertTrue(text.endswith("xxxEND\n"))  # and the tail are kept
        self.assertIn("bytes in all", text)

    def test_traceback_obeys_a_small_result_size_limit(self) -> None:
        result = run(TaskRunner(result_size_limit=1000), task_buffer(huge_failure, 5000))
        assert result.error_details is not None
        self.assertLess(len(result.data.encode()), 1200)
        self.assertIn("truncated", result.data)
        self.assertTrue(result.data.endswith("END\n"))

    def test_small_exception_is_untouched(self) -> None:
        result = run(TaskRunner(), task_buffer(huge_failure, 10))
        assert result.error_details is not None
        self.assertEqual(result.error_details.user_message, "ValueError: xxxxxxxxxxEND")
        self.assertNotIn("truncated", result.data)

    def test_clip(self) -> None:
        self.assertEqual(clip("abc", 3), "abc")
        self.assertEqual(clip("é" * 10, 20), "é" * 10)
        clipped = clip("é" * 10 + "abcdef", 10)
        self.assertTrue(clipped.startswith("éé"))  # no half character
        self.assertTrue(clipped.endswith("def"))
        self.assertIn("truncated: 26 bytes in all, 16 left out", clipped)

    def test_unserializable_result(self) -> None:
        result = run(TaskRunner(), task_buffer(unpicklable))
        assert result.error_details is not None
        self.assertEqual(result.error_details.code, ErrorCode.REMOTE_EXECUTION_ERROR)
        self.assertIn("could not be serialized", result.error_details.user_message)

    def test_bad_buffers(self) -> None:
        runner = TaskRunner()
        cases = [
            "garbage",
            pack_buffers(["99\nxx", "00\n", "00\n"]),
            pack_buffers([serialize(add)]),
            pack_function(add) + pack_buffers([serialize({"not": "a tuple"}), serialize({})]),
        ]
        for buffer in cases:
            result = run(runner, buffer)
            assert result.error_details is not None, buffer
            self.assertEqual(result.error_details.code, ErrorCode.DESERIALIZATION_ERROR)
            self.assertIn("could not be deserialized", result.error_details.user_message)
        message = run(runner, cases[1]).error_details.user_message  # type: ignore[union-attr]
        self.assertIn("unknown serialization method header", message)

    def test_phases_and_cache(self) -> None:
        phases: List[bytes] = []
        runner = TaskRunner(report_phase=phases.append)
        buffer = task_buffer(add, 1, 2)
        run(runner, buffer)
        self.assertEqual(phases, [frames.PHASE_LOADING, frames.PHASE_RUNNING])
        run(runner, task_buffer(add, 5, 6))  # same function: cached
        self.assertEqual(len(phases), 2)
        run(runner, pack_buffers(["00\nnot base64!", "00\n", "00\n"]))
        self.assertEqual(phases[2:], [frames.PHASE_LOADING, frames.PHASE_RUNNING])

    def test_cache_is_bounded(self) -> None:
        cache = FunctionCache(size=2)
        for key in "abc":
            cache[key] = len
        self.assertEqual(list(cache), ["b", "c"])
        cache.get("b")
        cache["d"] = len
        self.assertEqual(list(cache), ["b", "d"])

    def test_versions(self) -> None:
        info = versions()
        self.assertEqual(info["python"].split(".")[:2], [str(v) for v in sys.version_info[:2]])
        self.assertIn("dill", info)


class LoopTests(SynchronousTestCase):
    def serve(self, stream: bytes) -> Tuple[int, List[Tuple[bytes, bytes]]]:
        out = io.BytesIO()
        worker = Worker(io.BytesIO(stream), out)
        status = worker.serve()
        return status, frames.FrameDecoder().feed(out.getvalue())

    def test_tasks_in_order_until_eof(self) -> None:
        ids = [str(uuid.uuid4()) for _ in range(3)]
        stream = b"".join(
            frames.encode_task(task_id, 1, task_buffer(add, i, 1).encode())
            for i, task_id in enumerate(ids)
        )
        status, out = self.serve(stream)
        self.assertEqual(status, 0)
        results = [read_result(body) for kind, body in out if kind == frames.KIND_RESULT]
        self.assertEqual([r.task_id for r in results], ids)  # type: ignore[union-attr]
        self.assertEqual([deserialize(r.data) for r in results], [1, 2, 3])  # type: ignore[union-attr]
        # the function was loaded once, announced by two phase frames
        self.assertEqual([k for k, _ in out].count(frames.KIND_PHASE), 2)

    def test_quit_and_unknown(self) -> None:
        stream = frames.encode_frame(frames.KIND_QUIT) + frames.encode_task("x", 1, b"")
        self.assertEqual(self.serve(stream), (0, []))
        self.assertEqual(self.serve(frames.encode_frame(b"Z"))[0], 2)
        self.assertEqual(self.serve(b"\x00\x00\x00\x09T")[0], 0)  # truncated: the end

    def test_hello(self) -> None:
        out = io.BytesIO()
        Worker(io.BytesIO(), out).hello()
        [(kind, body)] = frames.FrameDecoder().feed(out.getvalue())
        info = frames.decode_hello(body)
        self.assertEqual(info["pid"], os.getpid())
        self.assertEqual(info["python"], versions()["python"])

    def test_args(self) -> None:
        options = parse_args(["--worker-id", "3", "--result-size-limit", "10"])
        self.assertEqual((options.worker_id, options.result_size_limit), ("3", 10))
        self.assertEqual((options.task_fd, options.result_fd), (3, 4))


class WorkerProcess:
    """A real ``python -m funcx_endpoint.worker`` on two pipes."""

    def __init__(self, *args: str) -> None:
        task_read, self.task_write = os.pipe()
        self.result_read, result_write = os.pipe()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "funcx_endpoint.worker",
                "--task-fd",
                str(task_read),
                "--result-fd",
                str(result_write),
                *args,
            ],
            pass_fds=(task_read, result_write),
            env=package_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        os.close(task_read)
        os.close(result_write)
        self.reader = open(self.result_read, "rb", buffering=0)
        self.decoder = frames.FrameDecoder()
        self.pending: List[Tuple[bytes, bytes]] = []

    def send(self, frame: bytes) -> None:
        os.write(self.task_write, frame)

    def receive(self) -> Tuple[bytes, bytes]:
        while not self.pending:
            data = self.reader.read(1 << 20)
            if not data:
                raise EOFError("the worker closed its result pipe")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> int:
        os.close(self.task_write)
        status = self.process.wait(timeout=30)
        self.reader.close()
        self.process.stdout.close()  # type: ignore[union-attr]
        self.process.stderr.close()  # type: ignore[union-attr]
        return status


class ProcessTests(SynchronousTestCase):
    def test_real_worker(self) -> None:
        worker = WorkerProcess("--result-size-limit", "100000", "--debug")
        self.addCleanup(worker.kill)
        kind, body = worker.receive()
        self.assertEqual(kind, frames.KIND_HELLO)
        self.assertEqual(frames.decode_hello(body)["pid"], worker.process.pid)
        task_id = str(uuid.uuid4())
        worker.send(frames.encode_task(task_id, 5, task_buffer(add, 20, b=22).encode()))
        kinds = []
        while True:
            kind, body = worker.receive()
            kinds.append(kind)
            if kind == frames.KIND_RESULT:
                break
        self.assertEqual(kinds, [frames.KIND_PHASE, frames.KIND_PHASE, frames.KIND_RESULT])
        result = read_result(body)
        self.assertEqual(deserialize(result.data), 42)  # type: ignore[union-attr]
        self.assertEqual(worker.close(), 0)  # exits when its task pipe closes

    def test_round_trip_cost(self) -> None:
        """A no-op task through a real worker costs well under a millisecond."""
        worker = WorkerProcess()
        self.addCleanup(worker.kill)
        worker.receive()
        buffer = task_buffer(add, 1).encode()
        frame = frames.encode_task(str(uuid.uuid4()), 1, buffer)
        for _ in range(50):  # warm up (and load the function once)
            worker.send(frame)
            while worker.receive()[0] != frames.KIND_RESULT:
                pass
        count = 1000
        started = time.perf_counter()
        for _ in range(count):
            worker.send(frame)
            worker.receive()
        elapsed = (time.perf_counter() - started) / count
        self.assertEqual(worker.close(), 0)
        # Typically 50-100 us here; the bound only catches gross regressions.
        self.assertLess(elapsed, 0.001, f"{elapsed * 1e6:.0f} us per round trip")

    def test_pipes_on_stdin_and_stdout(self) -> None:
        """``--task-fd 0 --result-fd 1`` (a worker in a Docker container): what the
        user's code prints goes to stderr, never among the result frames."""
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "funcx_endpoint.worker",
                "--task-fd",
                "0",
                "--result-fd",
                "1",
            ],
            env=package_environment(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.addCleanup(process.kill)
        buffer = task_buffer(shout, 21).encode()
        out, err = process.communicate(frames.encode_task(str(uuid.uuid4()), 1, buffer), timeout=60)
        self.assertEqual(process.returncode, 0)
        received = frames.FrameDecoder().feed(out)
        self.assertEqual(received[0][0], frames.KIND_HELLO)
        self.assertEqual(received[-1][0], frames.KIND_RESULT)
        self.assertEqual(deserialize(read_result(received[-1][1]).data), 42)  # type: ignore[union-attr]
        self.assertIn(b"printed by the user", err)

    def test_dies_while_loading(self) -> None:
        worker = WorkerProcess()
        self.addCleanup(worker.kill)
        worker.receive()
        worker.send(frames.encode_task(str(uuid.uuid4()), 1, deadly_buffer().encode()))
        self.assertEqual(worker.receive(), (frames.KIND_PHASE, frames.PHASE_LOADING))
        self.assertRaises(EOFError, worker.receive)
        self.assertEqual(worker.close(), 7)


class TaskVariableTests(SynchronousTestCase):
    """FUNCX_TASK_ID per task through one putenv'd buffer: no memory kept per task."""

    def test_seen_by_python_and_children_and_gone_after(self) -> None:
        from funcx_endpoint.worker.task_variable import TaskVariable

        variable = TaskVariable("FUNCX_TEST_TASK_VARIABLE")
        self.addCleanup(os.environ.pop, "FUNCX_TEST_TASK_VARIABLE", None)

        def child() -> str:
            return subprocess.run(
                ["sh", "-c", 'printf %s "$FUNCX_TEST_TASK_VARIABLE"'],
                capture_output=True,
                text=True,
                check=True,
            ).stdout

        variable.set("first")
        self.assertEqual(os.environ["FUNCX_TEST_TASK_VARIABLE"], "first")
        self.assertEqual(child(), "first")
        # The task's code may remove it; the next task has it again.
        del os.environ["FUNCX_TEST_TASK_VARIABLE"]
        variable.set("second-" + "x" * 30)
        self.assertEqual(child(), "second-" + "x" * 30)
        variable.clear()
        self.assertNotIn("FUNCX_TEST_TASK_VARIABLE", os.environ)
        self.assertEqual(child(), "")
        # Too long for the buffer: os.environ as usual.
        variable.set("y" * 1000)
        self.assertEqual(child(), "y" * 1000)
        variable.clear()
        self.assertNotIn("FUNCX_TEST_TASK_VARIABLE", os.environ)

    def test_no_memory_kept_per_task(self) -> None:
        # os.environ[...] = value (glibc's setenv) keeps every value: ~100
        # bytes per task id; the buffer keeps none.  Measured in a child
        # process, so that this one's heap does not blur it.
        script = (
            "import resource, uuid\n"
            "from funcx_endpoint.worker.task_variable import TaskVariable\n"
            "v = TaskVariable('FUNCX_TASK_ID')\n"
            "v.set('warm'); v.clear()\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "for _ in range(200000):\n"
            "    v.set(str(uuid.uuid4())); v.clear()\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
        )
        grown_kib = int(
            subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, check=True
            ).stdout
        )
        self.assertLess(grown_kib, 2048)  # setenv: ~19,000 KiB for 200,000 ids
