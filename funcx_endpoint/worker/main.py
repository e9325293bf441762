"""The worker process: read a task frame, run it, write the result frame, repeat.

Started by a manager (``funcx-worker`` or ``python -m funcx_endpoint.worker``)
with the task pipe on fd 3 and the result pipe on fd 4; fds 1 and 2 are log
files (``--task-fd 0 --result-fd 1``: the pipes are stdin and stdout, as in a
Docker container, and stdout is moved aside).  Plain Python: no Twisted, no
reactor, one task at a time.  The worker exits when the task pipe closes or says
quit, and dies with its manager (``PR_SET_PDEATHSIG`` on Linux) so that a
killed manager leaves no orphans.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import BinaryIO, List, Optional, Tuple

from funcx_endpoint.wire import frames
from funcx_endpoint.worker.execute import DEFAULT_RESULT_SIZE_LIMIT, TaskRunner, versions

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to KILL this process when its parent (the manager) dies."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _terminate(signum: int, frame: object) -> None:
    os._exit(128 + signum)


def _move_pipes(task_fd: int, result_fd: int) -> Tuple[int, int]:
    """Pipes on the standard fds (a worker in a Docker container reads tasks on
    stdin and writes results on stdout) move to fds of their own: stdin then
    reads nothing, and stdout goes to stderr, so that what the user's code
    prints never lands among the result frames."""
    if task_fd < 3:
        moved = os.dup(task_fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, task_fd)
        os.close(null)
        task_fd = moved
    if result_fd < 3:
        moved = os.dup(result_fd)
        os.dup2(2, result_fd)
        result_fd = moved
    return task_fd, result_fd


class Worker:
    """The read-run-write loop over two binary streams.

    ``reader`` yields task frames and ``writer`` takes result frames (both
    binary files; the writer is flushed after each frame).
    """

    def __init__(
        self,
        reader: BinaryIO,
        writer: BinaryIO,
        result_size_limit: int = DEFAULT_RESULT_SIZE_LIMIT,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.runner = TaskRunner(result_size_limit, self._send_phase)
        self.tasks_run = 0

    def _send(self, frame: bytes) -> None:
        self._writer.write(frame)
        self._writer.flush()

    def _send_phase(self, phase: bytes) -> None:
        self._send(frames.encode_frame(frames.KIND_PHASE, phase))

    def hello(self) -> None:
        """Tell the manager this worker is ready, and what it runs."""
        info = dict(versions(), pid=os.getpid())
        self._send(frames.encode_hello(info))

    def serve(self) -> int:
        """Run tasks until the task stream ends or says quit; the exit status."""
        read = self._reader.read
        unpack = frames.LENGTH.unpack
        run = self.runner.run
        send = self._send
        kind_task = frames.KIND_TASK[0]
        kind_quit = frames.KIND_QUIT[0]
        result_header = frames.KIND_RESULT
        length = frames.LENGTH.pack
        while True:
            header = read(4)
            if len(header) < 4:
                return 0  # the manager closed the pipe: it is going away
            (size,) = unpack(header)
            body = read(size)
            if len(body) < size or size == 0:
                return 0
            kind = body[0]
            if kind == kind_task:
                try:
                    task_id, running_ns, task_buffer = frames.decode_task(body[1:])
                except frames.FrameError as e:
                    print(f"funcx-worker: unreadable task frame ({e}), exiting", file=sys.stderr)
                    return 2
                del body
                packed = run(task_id, running_ns, task_buffer.decode("utf-8", "replace"))
                del task_buffer
                send(length(len(packed) + 1) + result_header + packed)
                self.tasks_run += 1
            elif kind == kind_quit:
                return 0
            else:
                print(f"funcx-worker: unknown frame kind {body[:1]!r}, exiting", file=sys.stderr)
                return 2


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The worker's command line."""
    parser = argparse.ArgumentParser(
        prog="funcx-worker",
        description="Run funcX tasks given by a manager on fd 3, answering on fd 4.",
    )
    parser.add_argument("--worker-id", default="0", help="This worker's number (for logs).")
    parser.add_argument(
        "--result-size-limit",
        type=int,
        default=DEFAULT_RESULT_SIZE_LIMIT,
        help="Largest serialized result in bytes.",
    )
    parser.add_argument("--task-fd", type=int, default=frames.TASK_FD)
    parser.add_argument("--result-fd", type=int, default=frames.RESULT_FD)
    parser.add_argument("--debug", action="store_true", help="Log each task to stderr.")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point of ``funcx-worker``."""
    options = parse_args(argv)
    _die_with_parent()
    # Ctrl-C in a terminal reaches the whole process group; the manager
    # decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getpid() == 1:
        # The first process of a container ignores the signals it has no
        # handler for: TERM (a manager stopping) must still end it.
        signal.signal(signal.SIGTERM, _terminate)
    task_fd, result_fd = _move_pipes(options.task_fd, options.result_fd)
    # The pipes stay away from processes the user's code starts, which would
    # otherwise keep them open after this worker dies.
    os.set_inheritable(task_fd, False)
    os.set_inheritable(result_fd, False)
    reader = open(task_fd, "rb", buffering=256 * 1024)
    writer = open(result_fd, "wb", buffering=256 * 1024)
    worker = Worker(reader, writer, options.result_size_limit)
    if options.debug:
        print(
            f"funcx-worker {options.worker_id} (pid {os.getpid()}) started: {versions()}",
            file=sys.stderr,
            flush=True,
        )
    try:
        worker.hello()
        status = worker.serve()
    except BrokenPipeError:
        status = 0  # the manager went away while we answered
    if options.debug:
        print(
            f"funcx-worker {options.worker_id}: ran {worker.tasks_run} tasks, exiting",
            file=sys.stderr,
            flush=True,
        )
    sys.exit(status)
