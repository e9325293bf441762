"""The funcX SDK: a client of the funcX 1.0 web service API, and futures on top.

* :class:`FuncXClient` (:mod:`funcx_endpoint.sdk.client`): every REST call of
  the funcX 1.0 API, on globus-sdk's ``BaseClient``;
* :class:`FuncXExecutor` (:mod:`funcx_endpoint.sdk.executor`): a
  ``concurrent.futures.Executor`` whose tasks run on a funcX endpoint;
* :class:`ShellFunction`, :class:`MPIFunction` and :class:`ShellResult`
  (:mod:`funcx_endpoint.functions`): command lines and MPI programs to
  register as functions;
* :class:`Batch` and the task records (:mod:`funcx_endpoint.sdk.tasks`), the
  retry policy (:mod:`funcx_endpoint.sdk.retries`), the errors
  (:mod:`funcx_endpoint.sdk.errors`) and the client-credentials login
  (:mod:`funcx_endpoint.sdk.login`).

Both work with the public funcX service and with this project's private
service (``funcx-service``); their tests use that service's API in-process
(:mod:`funcx_endpoint.testing.inprocess`).
"""

from __future__ import annotations

from funcx_endpoint.functions import MPIFunction, ShellFunction, ShellResult
from funcx_endpoint.sdk.client import FuncXClient
from funcx_endpoint.sdk.environment import EnvironmentMismatchWarning
from funcx_endpoint.sdk.errors import *  # noqa: F403
from funcx_endpoint.sdk.errors import __all__ as _errors_all
from funcx_endpoint.sdk.executor import FuncXExecutor
from funcx_endpoint.sdk.tasks import Batch

__all__ = [
    "Batch",
    "EnvironmentMismatchWarning",
    "FuncXClient",
    "FuncXExecutor",
    "MPIFunction",
    "ShellFunction",
    "ShellResult",
    *_errors_all,
]
