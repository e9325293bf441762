"""The funcX REST API v2 (PROTOCOL.md section 2, and the funcX 1.0.13 notes).

Every handler checks its input fully before it changes anything, so a bad
request (malformed JSON, wrong types, bad UUIDs, unknown ids, another user's
objects) gets a 4xx answer and leaves no trace.  ``POST /submit`` decides
task by task: a refused task gets its own 4xx entry in the answer and the
others are created.  Once tasks are created the answer is 200 whatever
happens with the broker: tasks wait in the database until it takes them
(globus-sdk retries 5xx answers to POSTs, which would create the tasks again).

Another user's endpoints, tasks, task groups and private containers are
answered 404 (their existence is not even confirmed); registering an endpoint id that another
user owns, or submitting to one, is refused with 403.

:class:`FuncXAPI` answers ``GET /v2/version`` and installs the groups of
handlers, each an object of its own sharing one
:class:`~funcx_endpoint.webservice.api_context.APIContext`: functions
(:mod:`~funcx_endpoint.webservice.api_functions`), containers
(:mod:`~funcx_endpoint.webservice.api_containers`), tasks
(:mod:`~funcx_endpoint.webservice.api_tasks`) and endpoints
(:mod:`~funcx_endpoint.webservice.api_endpoints`); the checks of their input
are in :mod:`~funcx_endpoint.webservice.api_checks`.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

from twisted.internet.interfaces import IReactorTime

from funcx_endpoint.version import __version__
from funcx_endpoint.webservice.api_containers import ContainersAPI
from funcx_endpoint.webservice.api_context import APIContext, BrokerAddress
from funcx_endpoint.webservice.api_endpoints import EndpointsAPI
from funcx_endpoint.webservice.api_functions import FunctionsAPI
from funcx_endpoint.webservice.api_tasks import TasksAPI
from funcx_endpoint.webservice.broker import IServiceBroker
from funcx_endpoint.webservice.dispatch import TaskSender
from funcx_endpoint.webservice.http import Call, Router
from funcx_endpoint.webservice.management import IBrokerAdministrator
from funcx_endpoint.webservice.quotas import Quotas
from funcx_endpoint.webservice.storage import Storage

__all__ = ["FuncXAPI", "FUNCX_API_VERSION", "MIN_SDK_VERSION"]

#: The funcX API version this service speaks (what funcX 1.0.13 clients expect).
FUNCX_API_VERSION = "1.0.13"
MIN_SDK_VERSION = "1.0.0"
MIN_EP_VERSION = "1.0.0"


class FuncXAPI:
    """The ``/v2`` handlers; :meth:`install` adds them to a router.

    ``clock`` (the reactor by default) stamps what is stored (functions,
    tasks, registrations, deletions) and decides liveness: an endpoint is
    online while its last status report is at most its heartbeat threshold
    old by this clock.  ``min_sdk_version`` is what ``GET /version`` asks of clients.
    ``quotas`` (default: :class:`~funcx_endpoint.webservice.quotas.Quotas`) limit
    what each user holds.
    """

    def __init__(
        self,
        reactor: Any,
        storage: Storage,
        broker: IServiceBroker,
        management: IBrokerAdministrator,
        sender: TaskSender,
        broker_address: BrokerAddress,
        *,
        heartbeat_threshold: float = 120.0,
        result_queue_ttl: int = 7 * 24 * 3600,
        min_sdk_version: str = MIN_SDK_VERSION,
        clock: Optional[IReactorTime] = None,
        quotas: Optional[Quotas] = None,
    ) -> None:
        self.min_sdk_version = min_sdk_version
        self.context = APIContext(
            reactor if clock is None else clock,
            storage,
            broker,
            management,
            sender,
            broker_address,
            heartbeat_threshold,
            result_queue_ttl,
            quotas or Quotas(),
        )
        self.functions = FunctionsAPI(self.context)
        self.containers = ContainersAPI(self.context)
        self.tasks = TasksAPI(self.context)
        self.endpoints = EndpointsAPI(self.context)

    def install(self, router: Router) -> None:
        router.add("GET", "/v2/version", self.version)
        self.functions.install(router)
        self.containers.install(router)
        self.tasks.install(router)
        self.endpoints.install(router)

    async def version(self, call: Call) -> Tuple[int, Any]:
        return 200, {
            "api": FUNCX_API_VERSION,
            "min_ep_version": MIN_EP_VERSION,
            "min_sdk_version": self.min_sdk_version,
            "service": "funcx-service",
            "service_version": __version__,
        }
