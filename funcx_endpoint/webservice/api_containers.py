"""Containers: ``POST /v2/containers`` and reading them back, as funcX 1.0.13's SDK calls.

A container is a name and images, at most one of each type (``docker``,
``singularity``, ``shifter``, ``podman``, ``apptainer``; given in any case,
kept in lower case, which is how endpoints name their container type).
``register_container`` makes one with one image; ``PUT
/v2/containers/<id>/<type>`` (this service's addition) gives it more.
Functions registered with its id run in it: their tasks carry the
container and its images to the endpoint, which picks the image of its type.

Who sees what: a container is its owner's, or public (``"public": true``
when registering); another user's private container is answered 404, as if
it did not exist.  Only the owner changes it.  Containers are not built
here: ``POST /v2/containers/build`` is answered 501.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, Dict, Tuple

import attr

from funcx_endpoint.webservice.api_checks import (
    MAX_NAME,
    MAX_TEXT,
    boolean_field,
    canonical_uuid,
    show,
    string_field,
)
from funcx_endpoint.webservice.api_context import HandlerGroup
from funcx_endpoint.webservice.auth import API
from funcx_endpoint.webservice.http import APIError, Call, Router, bad_request, not_found
from funcx_endpoint.webservice.records import CONTAINER_TYPES, PROVIDED, ContainerInfo, ImageInfo
from funcx_endpoint.webservice.storage import TokenInfo

__all__ = ["MAX_LOCATION", "ContainersAPI", "container_type", "image_location"]

#: The longest image location accepted (a registry reference or a path).
MAX_LOCATION = 4096
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ID = "(?P<container_id>[^/]+)"
_TYPE = "(?P<container_type>[^/]+)"


def container_type(value: Any, what: str = "type") -> str:
    """``value`` as a known container type, in lower case; else a 400 APIError."""
    if isinstance(value, str) and value.lower() in CONTAINER_TYPES:
        return value.lower()
    if value is None:
        raise bad_request(
            f"{what} is required: one of {', '.join(CONTAINER_TYPES)}", "MISSING_FIELD"
        )
    raise bad_request(
        f"{what} must be one of {', '.join(CONTAINER_TYPES)}, got {show(value)}",
        "INVALID_CONTAINER_TYPE",
    )


def image_location(body: Dict[str, Any]) -> str:
    """``body["location"]``: where the image is (a registry reference or a path)."""
    location = string_field(body, "location", required=True, max_length=MAX_LOCATION)
    assert location is not None
    if not location.strip():
        raise APIError(422, "INVALID_VALUE", "location must not be blank")
    if _CONTROL.search(location):
        # Endpoints put it on command lines.
        raise bad_request(
            "location must not contain control characters (newlines, tabs...)", "INVALID_VALUE"
        )
    return location


def _image_view(image: ImageInfo) -> Dict[str, Any]:
    return {
        "type": image.image_type,
        "location": image.location,
        "build_status": image.build_status,
        "build_stderr": image.build_stderr,
        "created_at": image.created,
        "modified_at": image.modified,
    }


def _container_view(container: ContainerInfo) -> Dict[str, Any]:
    return {
        "container_uuid": container.container_id,
        "name": container.name,
        "description": container.description,
        "public": container.public,
        "created_at": container.created,
        "modified_at": container.modified,
    }


class ContainersAPI(HandlerGroup):
    """The container handlers; :meth:`install` adds them to a router."""

    def install(self, router: Router) -> None:
        # The build paths first: /v2/containers/build/<id> has the shape of <id>/<type>.
        router.add("POST", "/v2/containers/build", self.build_container, API)
        router.add("GET", f"/v2/containers/build/{_ID}", self.build_status, API)
        router.add("POST", "/v2/containers", self.register_container, API)
        router.add("GET", f"/v2/containers/{_ID}", self.get_container, API)
        router.add("GET", f"/v2/containers/{_ID}/{_TYPE}", self.get_container_image, API)
        router.add("PUT", f"/v2/containers/{_ID}/{_TYPE}", self.put_container_image, API)

    async def register_container(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        body = await call.json_object()
        image_type = container_type(body.get("type"))
        location = image_location(body)
        name = string_field(body, "name", required=False, max_length=MAX_NAME) or ""
        description = string_field(body, "description", required=False, max_length=MAX_TEXT)
        public = boolean_field(body, "public")
        now = self.context.clock.seconds()
        container_id = str(uuid.uuid4())
        await self.context.storage.insert_container(
            ContainerInfo(
                container_id,
                me.identity_id,
                name,
                description,
                public,
                now,
                now,
                (ImageInfo(image_type, location, now, now, PROVIDED, None),),
            )
        )
        self.log.info(
            "Container {container} registered ({image_type})",
            container=container_id,
            image_type=image_type,
        )
        return 200, {"container_id": container_id}

    async def _visible(self, call: Call) -> ContainerInfo:
        """The container the path names, if the caller may see it; else 404."""
        me: TokenInfo = call.identity
        container_id = canonical_uuid(call.params["container_id"], "the container id")
        found = await self.context.storage.get_container(container_id)
        if found is None or not found.visible_to(me.identity_id):
            raise not_found(f"Container {container_id} not found", "CONTAINER_NOT_FOUND")
        return found

    async def get_container(self, call: Call) -> Tuple[int, Any]:
        container = await self._visible(call)
        view = _container_view(container)
        view["images"] = [_image_view(image) for image in container.images]
        return 200, {"container": view}

    async def get_container_image(self, call: Call) -> Tuple[int, Any]:
        image_type = container_type(call.params["container_type"], "the container type")
        container = await self._visible(call)
        image = container.image(image_type)
        if image is None:
            raise not_found(
                f"Container {container.container_id} has no {image_type} image (it has: "
                f"{', '.join(i.image_type for i in container.images) or 'none'})",
                "CONTAINER_NOT_FOUND",
            )
        return 200, {"container": {**_container_view(container), **_image_view(image)}}

    async def put_container_image(self, call: Call) -> Tuple[int, Any]:
        me: TokenInfo = call.identity
        image_type = container_type(call.params["container_type"], "the container type")
        body = await call.json_object()
        location = image_location(body)
        container = await self._visible(call)
        if container.owner != me.identity_id:
            raise APIError(
                403,
                "CONTAINER_FORBIDDEN",
                f"Container {container.container_id} belongs to another user; only its owner "
                f"may change it",
            )
        now = self.context.clock.seconds()
        old = container.image(image_type)
        image = ImageInfo(
            image_type, location, now if old is None else old.created, now, PROVIDED, None
        )
        await self.context.storage.put_image(container.container_id, image)
        container = attr.evolve(container, modified=now)
        return 200, {"container": {**_container_view(container), **_image_view(image)}}

    async def build_container(self, call: Call) -> Tuple[int, Any]:
        raise APIError(
            501,
            "CONTAINER_BUILD_UNAVAILABLE",
            "this service does not build containers: build the image yourself and register "
            "its location with register_container(location, container_type)",
        )

    async def build_status(self, call: Call) -> Tuple[int, Any]:
        container = await self._visible(call)
        statuses = [image.build_status for image in container.images]
        return 200, {"status": statuses[0] if statuses else PROVIDED}
