"""Containers: registration, their images (one per type), and reading them for tasks.

Plain functions of a :class:`~funcx_endpoint.webservice.db.Tx` (one
transaction): :class:`~funcx_endpoint.webservice.storage.Storage` runs them
in database threads.  Who may see a container is the API's decision
(:meth:`~funcx_endpoint.webservice.records.ContainerInfo.visible_to`).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from funcx_endpoint.webservice.db import Tx
from funcx_endpoint.webservice.records import ContainerInfo, ImageInfo

_CONTAINER_SELECT = (
    "SELECT container_id, owner, name, description, public, created, modified FROM containers"
)
_IMAGE_SELECT = (
    "SELECT container_id, image_type, location, created, modified, build_status, build_stderr "
    "FROM container_images"
)
_IMAGE_INSERT = (
    "INSERT INTO container_images (container_id, image_type, location, build_status, "
    "build_stderr, created, modified) VALUES (?, ?, ?, ?, ?, ?, ?)"
)


def _image_row(container_id: str, image: ImageInfo) -> Tuple[Any, ...]:
    """The values of :data:`_IMAGE_INSERT` for ``image`` of container ``container_id``."""
    return (
        container_id,
        image.image_type,
        image.location,
        image.build_status,
        image.build_stderr,
        image.created,
        image.modified,
    )


def insert_container(tx: Tx, container: ContainerInfo) -> None:
    """Store a new container and its images."""
    tx.execute(
        "INSERT INTO containers (container_id, owner, name, description, public, created, "
        "modified) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            container.container_id,
            container.owner,
            container.name,
            container.description,
            1 if container.public else 0,
            container.created,
            container.modified,
        ),
    )
    tx.executemany(
        _IMAGE_INSERT,
        [_image_row(container.container_id, image) for image in container.images],
    )


def get_container(tx: Tx, container_id: str) -> Optional[ContainerInfo]:
    """The container with this id, with its images (None if unknown)."""
    return get_containers(tx, [container_id]).get(container_id)


def get_containers(tx: Tx, container_ids: Sequence[str]) -> Dict[str, ContainerInfo]:
    """Those of ``container_ids`` that exist, with their images, by id."""
    ids = sorted(set(container_ids))
    if not ids:
        return {}
    rows = tx.rows_in(_CONTAINER_SELECT + " WHERE container_id IN ({ids})", ids)
    images: Dict[str, List[ImageInfo]] = {}
    for row in tx.rows_in(
        _IMAGE_SELECT + " WHERE container_id IN ({ids}) ORDER BY created, image_type", ids
    ):
        images.setdefault(row[0], []).append(ImageInfo(*row[1:]))
    return {row[0]: _container(row, images.get(row[0], [])) for row in rows}


def _container(row: Sequence[Any], images: List[ImageInfo]) -> ContainerInfo:
    container_id, owner, name, description, public, created, modified = row
    return ContainerInfo(
        container_id, owner, name, description, bool(public), created, modified, tuple(images)
    )


def put_image(tx: Tx, container_id: str, image: ImageInfo) -> None:
    """Give a stored container ``image``, replacing its image of that type if it had one."""
    tx.execute(
        _IMAGE_INSERT + " ON CONFLICT (container_id, image_type) DO UPDATE SET "
        "location = excluded.location, build_status = excluded.build_status, "
        "build_stderr = excluded.build_stderr, modified = excluded.modified",
        _image_row(container_id, image),
    )
    tx.execute(
        "UPDATE containers SET modified = ? WHERE container_id = ?", (image.modified, container_id)
    )
