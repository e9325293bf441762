"""FuncXExecutor: run functions on a funcX endpoint behind ``concurrent.futures``.

::

    with FuncXExecutor(endpoint_id, funcx_client=FuncXClient(url)) as fx:
        futures = [fx.submit(double, i) for i in range(1000)]
        print([f.result() for f in futures])

Two background threads do the work, so that ``submit`` never waits for the
network:

* the *submitter* registers each function once (cached by function object)
  and sends the queued tasks in batches of up to ``batch_size`` per
  ``POST /submit``.  It sends whatever is queued as soon as the previous
  request is answered, so a lone task goes out at once and a burst of
  submissions goes out in few requests;
* the *poller* asks ``POST /batch_status`` about every task still pending
  (at most 1000 ids per request) every ``poll_interval`` seconds and
  resolves the futures: the deserialized result, or the task's error
  (:class:`TaskExecutionFailed` with the remote traceback and error code).

Nothing waits forever on the service: a task that could not be submitted
gets the reason on its future (:class:`TaskRefused`, the service's error, or
:class:`ServiceUnreachable` after globus-sdk's retries), and when
``max_poll_failures`` polls in a row fail (each after globus-sdk's retries)
every pending future fails with :class:`ServiceUnreachable`.  A task that
the service accepted but an endpoint never runs stays pending, as in funcX:
use ``future.result(timeout=...)``.

Results come by polling rather than over AMQP as in funcX 1.0's executor;
``create_websocket_queue`` is therefore false in the submits.
"""

from __future__ import annotations

import functools
import json
import queue
import sys
import threading
import time
import uuid
from concurrent.futures import Executor, Future
from concurrent.futures._base import PENDING, RUNNING
from typing import IO, Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import globus_sdk

from funcx_endpoint.sdk.client import MAX_BATCH_STATUS_IDS, FuncXClient
from funcx_endpoint.sdk.errors import (
    BatchSubmissionError,
    FuncxAPIError,
    FuncxError,
    ServiceUnreachable,
)
from funcx_endpoint.sdk.tasks import TaskRecord
from funcx_endpoint.wire.resources import check_resource_specification

try:  # tqdm draws the progress bar when it is installed
    from tqdm import tqdm as _tqdm
except ImportError:  # pragma: no cover - depends on the environment
    _tqdm = None

__all__ = ["FuncXExecutor", "TaskFuture"]


class TaskFuture(Future):
    """The future of a task run by a :class:`FuncXExecutor`.

    ``task_id`` is set once the service accepted the task.  :meth:`running`
    is true once the service reports the task ``running`` on the endpoint
    (not merely submitted).  :meth:`cancel` works until the task is done:
    a task not yet sent is not sent; a submitted one is cancelled at the
    service (:meth:`FuncXClient.cancel`), which has the endpoint drop or kill
    it; then the future is cancelled (``result()`` raises ``CancelledError``).
    It returns False if the task finished first.
    """

    def __init__(self) -> None:
        super().__init__()
        self.task_id: Optional[str] = None
        self._cancel_remote: Optional[Callable[[str], bool]] = None

    def cancel(self) -> bool:
        if self.done():
            return self.cancelled()
        task_id, cancel_remote = self.task_id, self._cancel_remote
        if task_id is not None and cancel_remote is not None:
            try:
                if not cancel_remote(task_id):
                    return False  # it finished first; its result is on its way
            except Exception:
                return False
        with self._condition:
            # Running at the endpoint, cancelled there: the future may be too.
            if self._state == RUNNING:
                self._state = PENDING
        return super().cancel()


class _Submission:
    """A task waiting for the submitter thread."""

    __slots__ = ("args", "fn", "future", "kwargs", "resources")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: Tuple[Any, ...],
        kwargs: Dict[str, Any],
        resources: Optional[Dict[str, int]] = None,
    ) -> None:
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.resources = resources
        self.future: TaskFuture = TaskFuture()


_STOP = object()


class _Progress:
    """Shows ``done/submitted`` on a stream: a tqdm bar, or a plain line."""

    _PLAIN_INTERVAL = 0.1

    def __init__(self, stream: IO[str], use_tqdm: bool) -> None:
        self._lock = threading.Lock()
        self._stream = stream
        self.submitted = 0
        self.done = 0
        self._bar: Any = None
        if use_tqdm and _tqdm is not None:
            self._bar = _tqdm(total=0, file=stream, unit="task", desc="funcX tasks", leave=True)
        self._last_draw = 0.0
        self._closed = False

    def add_submitted(self, count: int) -> None:
        with self._lock:
            self.submitted += count
            if self._bar is not None:
                self._bar.total = self.submitted
                self._bar.refresh()
            else:
                self._draw(force=False)

    def add_done(self, count: int) -> None:
        with self._lock:
            self.done += count
            if self._bar is not None:
                self._bar.update(count)
            else:
                self._draw(force=False)

    def _draw(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < self._PLAIN_INTERVAL:
            return
        self._last_draw = now
        self._stream.write(f"\rfuncX tasks: {self.done}/{self.submitted} done")
        self._stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            else:
                self._draw(force=True)
                self._stream.write("\n")
                self._stream.flush()


def _function_key(fn: Callable[..., Any]) -> Hashable:
    # Bound methods are made anew at each attribute access but compare equal,
    # so hashable callables are keyed by equality; the rest by identity (the
    # cache keeps them alive, so an id is not reused while cached).
    try:
        hash(fn)
    except TypeError:
        return ("id", id(fn))
    return fn


class FuncXExecutor(Executor):
    """A :class:`concurrent.futures.Executor` whose tasks run on a funcX endpoint.

    ``funcx_client`` defaults to a new :class:`FuncXClient` (configured from
    the environment), which :meth:`shutdown` closes.  ``batch_size`` is the
    most tasks per ``POST /submit``; ``poll_interval`` the seconds between
    status polls.  ``show_progress`` draws ``done/submitted`` on
    ``progress_stream`` (stderr by default) with tqdm if it is installed,
    else as one plain line.  Tasks go in task group ``task_group_id`` (a new
    one by default) and functions are registered with ``container_id``.
    ``resource_specification`` (settable later, as Globus Compute's) is what
    the tasks submitted ask of the endpoint's nodes: an ``MPIFunction``'s
    ``num_nodes``, ``ranks_per_node`` and ``num_ranks``.
    """

    def __init__(
        self,
        endpoint_id: str,
        funcx_client: Optional[FuncXClient] = None,
        batch_size: int = 128,
        poll_interval: float = 0.5,
        show_progress: bool = False,
        *,
        task_group_id: Optional[str] = None,
        container_id: Optional[str] = None,
        resource_specification: Optional[Dict[str, int]] = None,
        max_poll_failures: int = 3,
        progress_stream: Optional[IO[str]] = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        if max_poll_failures < 1:
            raise ValueError(f"max_poll_failures must be at least 1, got {max_poll_failures}")
        self.endpoint_id = str(uuid.UUID(str(endpoint_id)))
        self._owns_client = funcx_client is None
        self.funcx_client = funcx_client if funcx_client is not None else FuncXClient()
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.task_group_id = str(uuid.UUID(task_group_id)) if task_group_id else str(uuid.uuid4())
        self.container_id = container_id
        #: What the tasks submitted from now on ask of the endpoint's nodes
        #: (an MPIFunction's ``num_nodes``, ``ranks_per_node``, ``num_ranks``),
        #: as Globus Compute's ``executor.resource_specification``.
        self.resource_specification: Optional[Dict[str, int]] = resource_specification
        self.max_poll_failures = max_poll_failures
        self._show_progress = show_progress
        self._progress_stream = progress_stream
        self._progress: Optional[_Progress] = None

        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._functions: Dict[Hashable, Tuple[Callable[..., Any], str]] = {}
        # _lock guards _shutdown, _started, _pending and _submitter_finished;
        # _changed is signalled when _pending grows or the submitter finishes.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._shutdown = False
        self._started = False
        self._submitter_finished = False
        self._pending: Dict[str, Future[Any]] = {}
        self._submitter = threading.Thread(
            target=self._submit_loop, name="funcx-submitter", daemon=True
        )
        self._poller = threading.Thread(target=self._poll_loop, name="funcx-poller", daemon=True)

    # -- the Executor API -------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run ``fn(*args, **kwargs)`` on the endpoint; a Future of its result."""
        if not callable(fn):
            raise TypeError(f"submit needs a callable, got {type(fn).__name__}")
        resources = self.resource_specification
        if resources:
            resources = dict(resources)
            check_resource_specification(resources)
        item = _Submission(fn, args, kwargs, resources or None)
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a FuncXExecutor after shutdown")
            if not self._started:
                self._start()
            self._queue.put(item)
        return item.future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks; with ``wait``, return once every future is resolved.

        ``cancel_futures`` cancels the tasks not yet sent to the service;
        tasks already submitted cannot be cancelled and are still waited for.
        """
        with self._lock:
            first = not self._shutdown
            self._shutdown = True
            started = self._started
        if first and started:
            if cancel_futures:
                self._cancel_queued()
            self._queue.put(_STOP)
        if not started:
            if first and self._owns_client:
                self.funcx_client.close()
            return
        if wait:
            self._submitter.join()
            self._poller.join()

    # -- threads ------------------------------------------------------------------

    def _start(self) -> None:
        self._started = True
        if self._show_progress:
            stream = self._progress_stream if self._progress_stream is not None else sys.stderr
            self._progress = _Progress(stream, use_tqdm=True)
        self._submitter.start()
        self._poller.start()

    def _cancel_queued(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP:
                item.future.cancel()

    def _next_batch(self) -> Tuple[List[_Submission], bool]:
        """Wait for a task, then take what else is queued; also whether to stop."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _submit_loop(self) -> None:
        stop = False
        try:
            while not stop:
                batch, stop = self._next_batch()
                # A future stays pending until the task runs (``running()``).
                live = [item for item in batch if not item.future.cancelled()]
                for group in _by_resources(live):
                    try:
                        self._submit_batch(group)
                    except Exception as error:  # a bug: fail the batch, keep going
                        self._fail(group, error)
        finally:
            with self._changed:
                self._submitter_finished = True
                self._changed.notify_all()

    def _function_id(self, fn: Callable[..., Any]) -> str:
        key = _function_key(fn)
        cached = self._functions.get(key)
        if cached is not None:
            return cached[1]
        function_id = self.funcx_client.register_function(fn, container_uuid=self.container_id)
        self._functions[key] = (fn, function_id)
        return function_id

    def _submit_batch(self, items: List[_Submission]) -> None:
        if self._progress is not None:
            self._progress.add_submitted(len(items))
        batch = self.funcx_client.create_batch(
            self.task_group_id, resource_specification=items[0].resources
        )
        sent: List[_Submission] = []
        for item in items:
            try:
                function_id = self._function_id(item.fn)
                batch.add_task(function_id, self.endpoint_id, item.args, item.kwargs)
            except Exception as error:
                self._fail([item], self._describe_error(error, "register the function of the task"))
                continue
            sent.append(item)
        if not sent:
            return
        try:
            task_ids: Sequence[Optional[str]] = self.funcx_client.batch_run(batch)
        except BatchSubmissionError as error:
            task_ids = error.task_ids
            refused = {failure.index: failure for failure in error.failures}
            for index, item in enumerate(sent):
                if index in refused:
                    self._fail([item], refused[index])
        except Exception as error:
            self._fail(sent, self._describe_error(error, "submit the task"))
            return
        cancelled_meanwhile = []
        with self._changed:
            for item, task_id in zip(sent, task_ids):
                if task_id is not None:
                    item.future.task_id = task_id
                    item.future._cancel_remote = self.funcx_client.cancel
                    if item.future.cancelled():
                        cancelled_meanwhile.append(task_id)
                    else:
                        self._pending[task_id] = item.future
            self._changed.notify_all()
        if cancelled_meanwhile:
            self.funcx_client.cancel_batch(cancelled_meanwhile)

    def _describe_error(self, error: Exception, doing: str) -> Exception:
        """``error``, or a ServiceUnreachable saying what it means for the tasks."""
        if not isinstance(error, globus_sdk.NetworkError):
            return error
        wrapped = ServiceUnreachable(
            f"could not {doing}: the funcX service at "
            f"{self.funcx_client.funcx_service_address} did not answer ({error}); "
            f"if the request was sent, the task may exist (task group {self.task_group_id})"
        )
        wrapped.__cause__ = error
        return wrapped

    def _fail(self, items: List[_Submission], error: Exception) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)
        if self._progress is not None:
            self._progress.add_done(len(items))

    def _poll_loop(self) -> None:
        failures = 0
        try:
            while True:
                with self._changed:
                    while not self._pending and not self._submitter_finished:
                        self._changed.wait()
                    if not self._pending:
                        return
                    task_ids = list(self._pending)
                try:
                    failures = self._poll(task_ids, failures)
                except Exception as error:  # a bug: fail these futures, keep going
                    self._abandon(task_ids, functools.partial(_same_error, error))
                time.sleep(self.poll_interval)
        finally:
            if self._progress is not None:
                self._progress.close()
            if self._owns_client:
                self.funcx_client.close()

    def _poll(self, task_ids: List[str], failures: int) -> int:
        """One round of status polls; how many rounds in a row have failed after it.

        A transient failure (network, 5xx, after globus-sdk's retries) ends
        the round; after ``max_poll_failures`` of them in a row the futures
        are failed.  Any other error fails the futures it was about at once.
        """
        for start in range(0, len(task_ids), MAX_BATCH_STATUS_IDS):
            chunk = task_ids[start : start + MAX_BATCH_STATUS_IDS]
            try:
                records = self.funcx_client.fetch_task_records(chunk)
            except Exception as caught:
                error: Exception = caught
            else:
                self._resolve(chunk, records)
                continue
            if not _is_transient(error):
                self._abandon(chunk, functools.partial(_same_error, error))
                continue
            failures += 1
            if failures < self.max_poll_failures:
                return failures
            self._abandon(task_ids, functools.partial(self._lost_contact, error, failures))
            return 0
        return 0

    def _lost_contact(self, error: Exception, failures: int, task_id: str) -> Exception:
        lost = ServiceUnreachable(
            f"lost contact with the funcX service at {self.funcx_client.funcx_service_address}: "
            f"{failures} status polls in a row failed (last: {error}); task {task_id} may "
            f"still run, ask for its result later with FuncXClient.get_result",
            task_id,
        )
        lost.__cause__ = error
        return lost

    def _resolve(self, task_ids: List[str], records: Dict[str, TaskRecord]) -> None:
        finished: List[Tuple[Future[Any], TaskRecord]] = []
        running: List[Future[Any]] = []
        with self._lock:
            for task_id in task_ids:
                record = records.get(task_id)
                if record is None:
                    # The service created it, so not knowing it now is its bug.
                    error = FuncxError(f"the funcX service did not report task {task_id}")
                    record = {"task_id": task_id, "pending": False, "exception": error}
                if not record["pending"]:
                    future = self._pending.pop(task_id, None)
                    if future is not None:
                        finished.append((future, record))
                elif record.get("status") == "running":
                    future = self._pending.get(task_id)
                    if future is not None and not future.running():
                        running.append(future)
        for future in running:
            if not future.set_running_or_notify_cancel():
                self._forget(future)
        for future, record in finished:
            if future.done():
                continue  # cancelled here meanwhile
            if future.running() is False and not future.cancelled():
                # Finished without being seen running: futures go pending → running → done.
                future.set_running_or_notify_cancel()
            if "exception" in record:
                future.set_exception(record["exception"])
            else:
                future.set_result(record["result"])
        if finished and self._progress is not None:
            self._progress.add_done(len(finished))

    def _forget(self, future: Future[Any]) -> None:
        """Stop polling for a future cancelled here."""
        with self._lock:
            for task_id, pending in list(self._pending.items()):
                if pending is future:
                    del self._pending[task_id]
                    break

    def _abandon(self, task_ids: List[str], reason: Callable[[str], Exception]) -> None:
        """Fail the pending futures of ``task_ids`` with ``reason(task_id)``."""
        with self._lock:
            futures = [(t, self._pending.pop(t)) for t in task_ids if t in self._pending]
        for task_id, future in futures:
            future.set_exception(reason(task_id))
        if futures and self._progress is not None:
            self._progress.add_done(len(futures))


def _by_resources(items: List[_Submission]) -> List[List[_Submission]]:
    """``items`` in groups of one resource specification (one batch each), in order."""
    groups: Dict[str, List[_Submission]] = {}
    for item in items:
        key = json.dumps(item.resources, sort_keys=True)
        groups.setdefault(key, []).append(item)
    return list(groups.values())


def _same_error(error: Exception, task_id: str) -> Exception:
    return error


def _is_transient(error: Exception) -> bool:
    """Whether a failed poll is worth trying again (network trouble, 5xx)."""
    if isinstance(error, globus_sdk.NetworkError):
        return True
    return isinstance(error, FuncxAPIError) and error.http_status >= 500
