"""The container a task asks to run in, and its images (PROTOCOL.md section 4)."""

from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional, Sequence, Union

from funcx_endpoint.wire.errors import MessageError
from funcx_endpoint.wire.fields import (
    _dict,
    _list,
    _optional_int,
    _optional_str,
    _Record,
    _required,
    _show,
    _str,
    _uuid,
)

__all__ = ["Container", "ContainerImage"]


class ContainerImage(_Record):
    """One image of a container (e.g. a docker or singularity location).

    ``created_at``/``modified_at`` may be None when read (funcx_common requires
    them, this reader does not); they are written as 0 then, since funcX 1.0.13
    endpoints drop a task whose image lacks them.
    """

    __slots__ = (
        "image_type",
        "location",
        "created_at",
        "modified_at",
        "build_status",
        "build_stderr",
    )

    def __init__(
        self,
        image_type: str,
        location: str,
        created_at: Optional[int] = None,
        modified_at: Optional[int] = None,
        build_status: Optional[str] = None,
        build_stderr: Optional[str] = None,
    ) -> None:
        self.image_type: str = _str(image_type, "image_type")
        self.location: str = _str(location, "location")
        self.created_at: Optional[int] = _optional_int(created_at, "created_at")
        self.modified_at: Optional[int] = _optional_int(modified_at, "modified_at")
        self.build_status: Optional[str] = _optional_str(build_status, "build_status")
        self.build_stderr: Optional[str] = _optional_str(build_stderr, "build_stderr")

    def to_wire(self) -> Dict[str, Any]:
        """The JSON-ready dict of this image."""
        return {
            "image_type": self.image_type,
            "location": self.location,
            "created_at": self.created_at or 0,
            "modified_at": self.modified_at or 0,
            "build_status": self.build_status,
            "build_stderr": self.build_stderr,
        }

    @classmethod
    def from_wire(cls, data: Any, where: str = "image") -> ContainerImage:
        """The image a JSON-decoded dict describes, or MessageError."""
        data = _dict(data, where)
        image_type = _required(data, "image_type", where)
        location = _required(data, "location", where)
        try:
            return cls(
                image_type,
                location,
                data.get("created_at"),
                data.get("modified_at"),
                data.get("build_status"),
                data.get("build_stderr"),
            )
        except MessageError as exc:
            raise MessageError(f"{where}: {exc}") from None


class Container(_Record):
    """A container a task asks to run in: its id, name and images."""

    __slots__ = ("container_id", "name", "images")

    def __init__(
        self,
        container_id: Union[str, uuid.UUID],
        name: str,
        images: Sequence[ContainerImage] = (),
    ) -> None:
        self.container_id: str = _uuid(container_id, "container_id")
        self.name: str = _str(name, "name")
        images = list(images)
        for image in images:
            if type(image) is not ContainerImage:
                raise MessageError(f"images must hold ContainerImages, got {_show(image)}")
        self.images: List[ContainerImage] = images

    def image_for(self, image_type: str) -> Optional[ContainerImage]:
        """The first image of type ``image_type``, if any."""
        for image in self.images:
            if image.image_type == image_type:
                return image
        return None

    def to_wire(self) -> Dict[str, Any]:
        """The JSON-ready dict of this container."""
        return {
            "container_id": self.container_id,
            "name": self.name,
            "images": [image.to_wire() for image in self.images],
        }

    @classmethod
    def from_wire(cls, data: Any, where: str = "container") -> Container:
        """The container a JSON-decoded dict describes, or MessageError."""
        data = _dict(data, where)
        container_id = _required(data, "container_id", where)
        name = _required(data, "name", where)
        images = [
            ContainerImage.from_wire(item, f"{where}.images[{i}]")
            for i, item in enumerate(_list(_required(data, "images", where), f"{where}.images"))
        ]
        try:
            return cls(container_id, name, images)
        except MessageError as exc:
            raise MessageError(f"{where}: {exc}") from None
