"""What the funcX API's handler groups share: the service's parts and settings.

:class:`~funcx_endpoint.webservice.api.FuncXAPI` makes one
:class:`APIContext` and hands it to each group of handlers (functions,
containers, tasks, endpoints: each a :class:`HandlerGroup`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import attr
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from funcx_endpoint.webservice.broker import IServiceBroker
from funcx_endpoint.webservice.dispatch import TaskSender
from funcx_endpoint.webservice.http import APIError, Router
from funcx_endpoint.webservice.management import (
    BrokerUnavailable,
    IBrokerAdministrator,
    ManagementError,
)
from funcx_endpoint.webservice.quotas import Quotas, Usage, user_usage
from funcx_endpoint.webservice.storage import Storage

__all__ = ["APIContext", "BrokerAddress", "HandlerGroup"]


def storage_unavailable(could_not: str) -> APIError:
    """503 for a database that failed a request which therefore created nothing:
    ``could_not`` says what the service could not do ("read its database now")."""
    return APIError(
        503,
        "STORAGE_UNAVAILABLE",
        f"the service {could_not} (nothing was created); try again",
        headers={"Retry-After": "5"},
    )


@attr.s(auto_attribs=True, frozen=True)
class BrokerAddress:
    """Where endpoints and clients reach the broker: ``amqps://host:port/vhost``."""

    scheme: str
    host: str
    port: int
    vhost: str

    def url(self, user: str, password: str) -> str:
        return (
            f"{self.scheme}://{quote(user, safe='')}:{quote(password, safe='')}@"
            f"{self.host}:{self.port}/{quote(self.vhost, safe='')}"
        )


@attr.s(auto_attribs=True, frozen=True)
class APIContext:
    """The service's parts the handlers use, and their settings.

    ``clock`` stamps what is stored and decides liveness: an endpoint is
    online while its last status report is at most its heartbeat threshold
    (``heartbeat_threshold`` unless it registered its own) old by this clock.
    ``quotas`` limit what each user holds.
    """

    log = Logger()

    clock: IReactorTime
    storage: Storage
    broker: IServiceBroker
    management: IBrokerAdministrator
    sender: TaskSender
    broker_address: BrokerAddress
    heartbeat_threshold: float
    result_queue_ttl: int
    quotas: Quotas = attr.ib(factory=Quotas)

    async def usage(self, owner: str) -> Usage:
        """What ``owner`` holds now (for the quotas)."""
        try:
            return await self.storage.run(user_usage, owner)
        except Exception:
            self.log.failure("Reading the usage of {owner} failed", owner=owner)
            raise storage_unavailable("cannot read its database now") from None

    async def broker_call(self, operation: Any) -> Any:
        """Await ``operation`` (a call to the broker or its management API);
        its failures as the API errors the client gets."""
        try:
            return await operation
        except BrokerUnavailable as e:
            raise APIError(
                503,
                "BROKER_UNAVAILABLE",
                f"the message broker cannot be reached now ({e}); try again in a moment",
                headers={"Retry-After": "5"},
            ) from None
        except ManagementError as e:
            self.log.error("The broker's management API refused a request: {error}", error=e)
            raise APIError(
                500,
                "BROKER_PROVISIONING_FAILED",
                "the service could not set up broker access; the operator should check "
                "that the service's broker user is an administrator (see the service log)",
            ) from None


@attr.s(auto_attribs=True)
class HandlerGroup:
    """A group of the API's handlers (functions, containers, tasks, endpoints)
    over the service's shared :class:`APIContext`; :meth:`install` adds them
    to a router.  ``log`` is named after the subclass."""

    log = Logger()

    context: APIContext

    def install(self, router: Router) -> None:
        raise NotImplementedError(f"{type(self).__name__} installs no handlers")
