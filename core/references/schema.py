"""What a reference set is, as recorded and answered: ``ReferenceInfo`` and its classes, the
limits an upload is held to, and the errors a refused upload raises (each with the HTTP status
the API answers with)::

    ReferenceSetError      422  an upload the service refuses (``member`` names the member)
    ├── ReferenceTooLarge  413  over a size limit: bytes, pixels, images
    └── UnsupportedArchive 415  neither a zip nor a tar
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

MAX_CLASSES = 1000
#: The normalized zip's own file: classes, each image's digest, size and member name.
MANIFEST = "reference.json"


class ReferenceSetError(ValueError):
    """An upload the service refuses. ``member`` names the archive member at fault (None for
    the archive as a whole); ``status`` is the HTTP status the API answers with."""

    status = 422

    def __init__(self, message: str, *, member: str | None = None) -> None:
        super().__init__(f"member {member!r}: {message}" if member is not None else message)
        self.member = member


class ReferenceTooLarge(ReferenceSetError):
    """Over a size limit: bytes, pixels, images (413)."""

    status = 413


class UnsupportedArchive(ReferenceSetError):
    """Neither a zip nor a tar (415)."""

    status = 415


class ReferenceClass(BaseModel):
    """One class folder of a set."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="The class folder's name, as uploaded.")
    images: int = Field(description="Distinct images in the folder.")
    digest: str = Field(description="sha256 over the folder's image digests, sorted.")


class ReferenceInfo(BaseModel):
    """A stored reference set, as recorded in Redis and answered by the API."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str | None = Field(None, description="The uploader's label for the set, if any.")
    owner: str = Field("public", exclude=True)
    created_at: dt.datetime
    expires_at: dt.datetime | None = None
    classes: list[ReferenceClass]
    images: int = Field(description="Images over all classes.")
    bytes: int = Field(description="Bytes of image data (the original files) kept.")
    digest: str = Field(
        description="sha256 over every class name and image digest: same images, same digest."
    )


@dataclass(frozen=True)
class Limits:
    """What one upload may hold."""

    max_bytes: int
    max_images: int
    max_pixels: int
    max_classes: int = MAX_CLASSES
