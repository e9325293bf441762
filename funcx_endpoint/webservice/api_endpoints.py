"""Endpoints: registration, listing, status, remote stop (lock), deletion, whitelists.

An endpoint is seen only by its owner (see :mod:`funcx_endpoint.webservice.api`).
"""

from __future__ import annotations

import json
import secrets
import uuid
from typing import Any, Dict, Tuple

from funcx_endpoint.amqp import topology
from funcx_endpoint.webservice.api_checks import (
    MAX_NAME,
    agreed_features,
    allowed_functions_of,
    canonical_uuid,
    heartbeat_settings,
    show,
    string_field,
    takes_batches,
    takes_commands,
)
from funcx_endpoint.webservice.api_context import HandlerGroup
from funcx_endpoint.webservice.auth import API
from funcx_endpoint.webservice.commands import send_command
from funcx_endpoint.webservice.http import APIError, Call, Router, bad_request, not_found
from funcx_endpoint.webservice.storage import Endpoint, TokenInfo
from funcx_endpoint.wire import EndpointCommand

__all__ = ["EndpointsAPI"]

MAX_METADATA = 256 * 1024


def _locked(endpoint_id: str, outcome: str) -> APIError:
    """423 for the registration of an endpoint stopped remotely; ``outcome``: what now."""
    return APIError(
        423, "ENDPOINT_LOCKED", f"Endpoint {endpoint_id} was stopped remotely (locked); {outcome}"
    )


class EndpointsAPI(HandlerGroup):
    """The endpoint handlers; :meth:`install` adds them to a router."""

    def install(self, router: Router) -> None:
        eid = "(?P<endpoint_id>[^/]+)"
        for method, path, handler in (
            ("POST", "/v2/endpoints", self.register_endpoint),
            ("GET", "/v2/endpoints", self.list_endpoints),
            ("GET", f"/v2/endpoints/{eid}", self.get_endpoint),
            ("DELETE", f"/v2/endpoints/{eid}", self.delete_endpoint),
            ("GET", f"/v2/endpoints/{eid}/status", self.endpoint_status),
            ("POST", f"/v2/endpoints/{eid}/lock", self.lock_endpoint),
            ("GET", f"/v2/endpoints/{eid}/whitelist", self.get_whitelist),
            ("POST", f"/v2/endpoints/{eid}/whitelist", self.add_to_whitelist),
            (
                "DELETE",
                f"/v2/endpoints/{eid}/whitelist/(?P<function_id>[^/]+)",
                self.remove_from_whitelist,
            ),
        ):
            router.add(method, path, handler, API)

    async def _own_endpoint(self, call: Call, allow_deleted: bool = False) -> Endpoint:
        me: TokenInfo = call.identity
        endpoint_id = canonical_uuid(call.params["endpoint_id"], "the endpoint id")
        endpoint = await self.context.storage.get_endpoint(endpoint_id)
        if endpoint is None or endpoint.owner != me.identity_id:
            raise not_found(f"Endpoint {endpoint_id} not found", "ENDPOINT_NOT_FOUND")
        if endpoint.deleted_at is not None and not allow_deleted:
            raise APIError(410, "ENDPOINT_DELETED", f"Endpoint {endpoint_id} was deleted")
        return endpoint

    async def status_of(self, endpoint: Endpoint) -> str:
        status, check = endpoint.liveness(
            self.context.clock.seconds(), self.context.heartbeat_threshold
        )
        if check:
            consumers = await self.context.broker.task_queue_consumers(endpoint.endpoint_id)
            if consumers:
                # The final report came from an instance that could not start (or
                # one still letting go): an instance holds the task queue.
                status = "online"
        return status

    def endpoint_view(self, endpoint: Endpoint, status: str, full: bool = True) -> Dict[str, Any]:
        metadata = endpoint.metadata
        view: Dict[str, Any] = {
            "endpoint_id": endpoint.endpoint_id,
            "endpoint_name": endpoint.name,
            "status": status,
            "locked": endpoint.locked,
            "created": endpoint.created,
            "registered_at": endpoint.registered_at,
            "last_seen": endpoint.last_report_at,
            "hostname": metadata.get("hostname"),
            "endpoint_version": metadata.get("endpoint_version"),
        }
        if full:
            view.update(
                {
                    "registrations": endpoint.registrations,
                    "ip_address": endpoint.ip_address,
                    "allowed_functions": endpoint.allowed_functions,
                    "heartbeat_period": endpoint.heartbeat_period,
                    "heartbeat_threshold": endpoint.threshold(self.context.heartbeat_threshold),
                    "metadata": metadata,
                }
            )
        return view

    async def register_endpoint(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        body = await call.json_object()
        name = string_field(body, "endpoint_name", required=True, max_length=MAX_NAME)
        assert name is not None
        raw_id = body.get("endpoint_uuid")
        endpoint_id = (
            str(uuid.uuid4()) if raw_id in (None, "") else canonical_uuid(raw_id, "endpoint_uuid")
        )
        metadata = body.get("metadata")
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise bad_request(f"metadata must be an object, got {show(metadata)}", "INVALID_TYPE")
        # Our endpoint started by its owner (funcx-endpoint start) lifts a remote stop.
        clear_lock = metadata.pop("clear_lock", None) is True
        if len(json.dumps(metadata)) > MAX_METADATA:
            raise APIError(422, "INVALID_VALUE", f"metadata is larger than {MAX_METADATA} bytes")
        allowed = allowed_functions_of(metadata)
        period, threshold = heartbeat_settings(metadata)

        batches = takes_batches(metadata)
        existing = await self.context.storage.get_endpoint(endpoint_id)
        if existing is None:
            self.context.quotas.check_endpoint(await self.context.usage(me.identity_id))
        else:
            if existing.owner != me.identity_id:
                raise APIError(
                    403,
                    "ENDPOINT_FORBIDDEN",
                    f"Endpoint {endpoint_id} is registered by another user; use another "
                    f"endpoint id (remove endpoint.json to get a new one)",
                )
            if existing.deleted_at is not None:
                raise APIError(
                    410,
                    "ENDPOINT_DELETED",
                    f"Endpoint {endpoint_id} was deleted; register under a new id "
                    f"(remove its endpoint.json)",
                )
            if existing.locked:
                await self._check_lock(endpoint_id, metadata, clear_lock)
        consumers = await self.context.broker_call(
            self.context.broker.declare_task_queue(endpoint_id)
        )
        if consumers:
            raise APIError(
                409,
                "ENDPOINT_ALREADY_RUNNING",
                f"Endpoint {endpoint_id} is already running: its task queue has "
                f"{consumers} consumer(s). Stop the other instance first "
                f"(funcx-endpoint stop), or wait a few seconds if it just stopped",
            )
        # Claim (or update) the row first and provision the broker user only once the
        # row is ours: of two users registering the same new id at once, the loser
        # must not replace the winner's broker password.  A new row keeps these
        # credentials; an existing one keeps its own.
        saved = await self.context.storage.save_registration(
            endpoint_id,
            me.identity_id,
            name,
            metadata,
            allowed,
            period,
            threshold,
            f"funcx-ep-{endpoint_id}",
            secrets.token_urlsafe(24),
            call.client_ip(),
            self.context.clock.seconds(),
        )
        if saved is None:
            # Another user (or a delete) won a race with this registration.
            raise APIError(
                403, "ENDPOINT_FORBIDDEN", f"Endpoint {endpoint_id} is registered by another user"
            )
        user, password = saved.broker_user, saved.broker_password
        await self.context.broker_call(
            self.context.management.provision_endpoint(user, password, endpoint_id)
        )
        if existing is not None and takes_batches(existing.metadata) and not batches:
            # This start cannot read several tasks to a message (an older version):
            # what was sent so to its queue is sent again, one task per message.
            again = await self.context.storage.send_unfinished_again(endpoint_id)
            if again:
                self.log.info(
                    "Endpoint {eid} no longer takes task batches: {n} unfinished tasks "
                    "will be sent again one per message",
                    eid=endpoint_id,
                    n=again,
                )
        self.log.info(
            "Registered endpoint {eid} ({name}) for {who} from {ip}",
            eid=endpoint_id,
            name=name,
            who=me.identity_id,
            ip=call.client_ip(),
        )
        url = self.context.broker_address.url(user, password)
        answer = {
            "endpoint_id": endpoint_id,
            **topology.registration_queue_info(endpoint_id, url, url),
        }
        features = agreed_features(metadata)
        if features:
            answer["wire_features"] = features
            answer["registered_at"] = saved.registered_at
        return 200, answer

    async def _check_lock(
        self, endpoint_id: str, metadata: Dict[str, Any], clear_lock: bool
    ) -> None:
        """Refuse (423) the registration of a locked (remotely stopped) endpoint.

        Our endpoint stays refused, lock kept, however often it is restarted on
        its own (systemd, ``start --keep-lock``); its owner's ``funcx-endpoint
        start`` (``clear_lock``) is refused once more and clears the lock, so
        the next start runs: the owner learns that it was stopped remotely.  A
        funcX 1.0 endpoint, which cannot say who started it, is treated as its
        owner's start, as funcX 1.0's service did.
        """
        storage = self.context.storage
        if takes_commands(metadata) and not clear_lock:
            self.log.info("Refused locked endpoint {eid}", eid=endpoint_id)
            raise _locked(
                endpoint_id,
                "it stays refused until its owner starts it again "
                "(funcx-endpoint start on its host)",
            )
        if await storage.consume_lock(endpoint_id):
            self.log.info("Refused locked endpoint {eid}; lock consumed", eid=endpoint_id)
            raise _locked(
                endpoint_id,
                "this registration is refused and the lock is cleared: start it again to run it",
            )

    async def list_endpoints(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        endpoints = await self.context.storage.list_endpoints(me.identity_id)
        return 200, [self.endpoint_view(e, await self.status_of(e), full=False) for e in endpoints]

    async def get_endpoint(self, call: Call) -> Tuple[int, Any]:
        endpoint = await self._own_endpoint(call)
        view = self.endpoint_view(endpoint, await self.status_of(endpoint))
        view["whitelist"] = await self.context.storage.get_whitelist(endpoint.endpoint_id)
        return 200, view

    async def endpoint_status(self, call: Call) -> Tuple[int, Any]:
        endpoint = await self._own_endpoint(call)
        return 200, {
            "endpoint_id": endpoint.endpoint_id,
            "status": await self.status_of(endpoint),
            "last_seen": endpoint.last_report_at,
            "heartbeat_threshold": endpoint.threshold(self.context.heartbeat_threshold),
            "logs": endpoint.recent_reports,
        }

    async def lock_endpoint(self, call: Call) -> Tuple[int, Any]:
        await call.json_body(required=False)  # {} from the SDK; malformed JSON is refused
        endpoint = await self._own_endpoint(call)
        await self.context.storage.lock_endpoint(endpoint.endpoint_id)
        self.log.info("Endpoint {eid} locked (stopped remotely)", eid=endpoint.endpoint_id)
        # A running endpoint of ours drains and exits; a funcX 1.0 one is only
        # refused at its next registration.
        answer: Dict[str, Any] = {"endpoint_id": endpoint.endpoint_id, "locked": True}
        if takes_commands(endpoint.metadata):
            answer["stop_sent"] = await send_command(
                self.context,
                endpoint.endpoint_id,
                EndpointCommand.stop("stopped remotely", self.context.clock.seconds()),
            )
        return 200, answer

    async def delete_endpoint(self, call: Call) -> Tuple[int, Any]:
        endpoint = await self._own_endpoint(call)
        endpoint_id = endpoint.endpoint_id
        failed = await self.context.storage.delete_endpoint(
            endpoint_id,
            self.context.clock.seconds(),
            f"EndpointDeleted: endpoint {endpoint_id} was deleted before this task ran",
        )
        self.context.sender.kick()
        try:
            await self.context.broker.delete_queue(topology.task_queue(endpoint_id))
        except Exception as e:
            self.log.warn("Could not delete the task queue of {eid}: {e}", eid=endpoint_id, e=e)
        try:
            await self.context.management.delete_user(endpoint.broker_user)
        except Exception as e:
            self.log.warn("Could not delete broker user of {eid}: {e}", eid=endpoint_id, e=e)
        self.log.info(
            "Deleted endpoint {eid} ({n} unfinished task(s) failed)", eid=endpoint_id, n=failed
        )
        return 200, {"endpoint_id": endpoint_id, "deleted": True, "tasks_failed": failed}

    async def get_whitelist(self, call: Call) -> Tuple[int, Any]:
        endpoint = await self._own_endpoint(call)
        functions = await self.context.storage.get_whitelist(endpoint.endpoint_id)
        return 200, {"endpoint_id": endpoint.endpoint_id, "functions": functions}

    async def add_to_whitelist(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        body = await call.json_object()
        endpoint = await self._own_endpoint(call)
        raw = body.get("func")
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise bad_request("func must be a non-empty list of function ids", "INVALID_TYPE")
        function_ids = [canonical_uuid(f, "each of func") for f in raw]
        visible = await self.context.storage.visible_functions(function_ids, me.identity_id)
        missing = [f for f in function_ids if f not in visible]
        if missing:
            raise not_found(f"Function {missing[0]} not found", "FUNCTION_NOT_FOUND")
        await self.context.storage.add_to_whitelist(endpoint.endpoint_id, sorted(set(function_ids)))
        functions = await self.context.storage.get_whitelist(endpoint.endpoint_id)
        return 200, {"endpoint_id": endpoint.endpoint_id, "functions": functions}

    async def remove_from_whitelist(self, call: Call) -> Tuple[int, Any]:
        endpoint = await self._own_endpoint(call)
        function_id = canonical_uuid(call.params["function_id"], "the function id")
        if not await self.context.storage.remove_from_whitelist(endpoint.endpoint_id, function_id):
            raise not_found(
                f"Function {function_id} is not in the whitelist of endpoint "
                f"{endpoint.endpoint_id}",
                "FUNCTION_NOT_FOUND",
            )
        functions = await self.context.storage.get_whitelist(endpoint.endpoint_id)
        return 200, {"endpoint_id": endpoint.endpoint_id, "functions": functions}
