"""``POST /v2/functions``: registering a function.

The function's code is stored as the client sent it (a packed buffer holding
the serialized function); it is checked to be one, not run.  A
``container_uuid`` must name a container the caller may use (its own, or a
public one): the function's tasks carry that container to the endpoint.
"""

from __future__ import annotations

import uuid
from typing import Any, Tuple

from funcx_endpoint.webservice.api_checks import (
    MAX_NAME,
    MAX_TEXT,
    boolean_field,
    canonical_uuid,
    string_field,
)
from funcx_endpoint.webservice.api_context import HandlerGroup
from funcx_endpoint.webservice.auth import API
from funcx_endpoint.webservice.http import Call, Router, bad_request, not_found
from funcx_endpoint.webservice.storage import TokenInfo
from funcx_endpoint.webservice.tasks import text_size
from funcx_endpoint.wire import DeserializationError, unpack_buffers

__all__ = ["FunctionsAPI"]


class FunctionsAPI(HandlerGroup):
    """The function handlers; :meth:`install` adds them to a router."""

    def install(self, router: Router) -> None:
        router.add("POST", "/v2/functions", self.register_function, API)

    async def register_function(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        body = await call.json_object()
        name = string_field(body, "function_name", required=True, max_length=MAX_NAME)
        code = string_field(body, "function_code", required=True, max_length=1 << 31)
        assert name is not None and code is not None
        entry_point = string_field(body, "entry_point", required=False, max_length=MAX_NAME) or name
        description = string_field(body, "description", required=False, max_length=MAX_TEXT)
        container = body.get("container_uuid")
        container = None if container in (None, "") else canonical_uuid(container, "container_uuid")
        group = body.get("group")
        group = None if group in (None, "") else canonical_uuid(group, "group")
        public = boolean_field(body, "public")
        try:
            parts = unpack_buffers(code)
        except DeserializationError as e:
            raise bad_request(
                f"function_code is not a packed buffer: {e}", "INVALID_FUNCTION"
            ) from None
        if len(parts) != 1 or not parts[0]:
            raise bad_request(
                f"function_code must be one packed part (the serialized function), "
                f"it holds {len(parts)}",
                "INVALID_FUNCTION",
            )
        if container is not None:
            found = await self.context.storage.get_container(container)
            if found is None or not found.visible_to(me.identity_id):
                raise not_found(
                    f"Container {container} not found: register it first "
                    f"(POST /v2/containers); another user's container must be public",
                    "CONTAINER_NOT_FOUND",
                )
        usage = await self.context.usage(me.identity_id)
        self.context.quotas.check_function(usage, text_size(code))
        function_id = str(uuid.uuid4())
        await self.context.storage.insert_function(
            {
                "function_id": function_id,
                "owner": me.identity_id,
                "name": name,
                "entry_point": entry_point,
                "description": description,
                "container_uuid": container,
                "public": public,
                "group_id": group,
                "function_code": code,
                "created": self.context.clock.seconds(),
            }
        )
        return 200, {"function_uuid": function_id}
