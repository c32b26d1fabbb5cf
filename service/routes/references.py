"""Reference-set routes: upload real images, list, read and delete them (``core.references``).

An upload is the request body itself (a zip or tar), not JSON, so the JSON body guard lets
``UPLOAD_PATHS`` through and this route enforces ``DISTILL_MAX_REFERENCE_BYTES`` while it
streams the body to a scratch file: nothing over the limit is ever held or kept. The file is
then validated and normalized off the event loop and the result stored; a refused upload
leaves nothing behind (no stored object, no record). A client that goes away mid-upload is
the client's doing: one INFO line, the scratch file removed, nothing kept.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from redis import Redis
from starlette.requests import ClientDisconnect

from core import references
from core.references import ReferenceInfo, ReferenceSetError, ReferenceTooLarge, UnsupportedArchive
from core.settings import Settings
from core.storage import open_storage
from service.auth import owner_for
from service.deps import BINARY, OwnerDep, RedisDep, SettingsDep, problems
from service.errors import ReferenceNotFound, ReferenceRejected, UploadAbandoned

#: The logger name these routes had before they moved under routes/: log lines read as before.
log = logging.getLogger("service.references")

UPLOAD_PATHS = frozenset({"/v1/references"})
#: What an upload may be sent as; the content decides what it really is.
MEDIA_TYPES = (
    "application/zip",
    "application/x-zip-compressed",
    "application/x-tar",
    "application/gzip",
    "application/x-gzip",
    "application/x-compressed-tar",
    "application/x-bzip2",
    "application/x-xz",
    "application/octet-stream",
)


class ReferenceList(BaseModel):
    references: list[ReferenceInfo]


#: What each problem status means on these routes.
_TEXTS = {
    401: "API keys are on and none, or an unknown one, was sent",
    404: "Unknown reference set id (or another key's)",
    413: "Over DISTILL_MAX_REFERENCE_BYTES (sent or expanded), _IMAGES or _PIXELS; the "
    "detail names the member",
    415: "Not a zip or a tar, or sent with a content type that is neither",
    422: "A member the service refuses (path, link, nested archive, not an image...), "
    "named in the detail; or an invalid query parameter",
    503: "Redis unreachable; see Retry-After",
}


ReferenceId = Annotated[str, PathParam(description="The set's id (32 hex digits).")]

router = APIRouter(prefix="/v1", dependencies=[Depends(owner_for)], tags=["references"])


async def _receive(request: Request, target: Path, limit: int) -> None:
    """The body into ``target``, refusing (413) as soon as it passes ``limit`` bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise ReferenceRejected(ReferenceTooLarge(f"body of {length} bytes exceeds {limit} bytes"))
    received = 0
    try:
        with open(target, "wb") as handle:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    raise ReferenceRejected(ReferenceTooLarge(f"body exceeds {limit} bytes"))
                handle.write(chunk)
    except ClientDisconnect:
        # The caller's doing, not an error of ours (the route removes the scratch file).
        log.info(
            "reference upload abandoned: the client disconnected",
            extra={
                "received_bytes": received,
                "declared_bytes": int(length) if length.isdigit() else None,
            },
        )
        raise UploadAbandoned(f"the client disconnected after {received} bytes") from None


def _ingest_and_store(
    redis: Redis,
    settings: Settings,
    upload: Path,
    *,
    reference_id: str,
    name: str | None,
    owner: str,
) -> ReferenceInfo:
    output = upload.with_name(f".ref-{reference_id}.zip.part")
    try:
        normalized, info = references.ingest(
            upload,
            max_bytes=settings.max_reference_bytes,
            max_images=settings.max_reference_images,
            max_pixels=settings.max_reference_pixels,
            output=output,
            reference_id=reference_id,
            name=name,
            owner=owner,
        )
        return references.store(
            redis, open_storage(settings), normalized, info, ttl=settings.result_ttl
        )
    except ReferenceSetError as exc:
        raise ReferenceRejected(exc) from None
    finally:
        output.unlink(missing_ok=True)


@router.post(
    "/references",
    status_code=status.HTTP_201_CREATED,
    operation_id="createReference",
    summary="Upload a reference set: a zip or tar of class folders of real images",
    response_model=ReferenceInfo,
    responses=problems(401, 413, 415, 422, 503, texts=_TEXTS),
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "The archive itself (zip, or tar plain/gz/bz2/xz) of an ImageFolder "
            "tree: class folders of images, optionally under one top-level folder. Sent as "
            "application/octet-stream or as any of: " + ", ".join(MEDIA_TYPES[:-1]) + ".",
            # One binary type here, the one code generators understand; the route accepts all.
            "content": {"application/octet-stream": {"schema": BINARY}},
        }
    },
)
async def create_reference(
    request: Request,
    response: Response,
    redis: RedisDep,
    settings: SettingsDep,
    owner: OwnerDep,
    name: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            pattern=references.NAME.pattern,
            description="A label for the set, shown when it is listed.",
        ),
    ] = None,
) -> ReferenceInfo:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in MEDIA_TYPES:
        raise ReferenceRejected(
            UnsupportedArchive(
                f"send the archive as one of {', '.join(MEDIA_TYPES)} (got {media or 'none'})"
            )
        )
    reference_id = uuid.uuid4().hex
    scratch = Path(settings.data_dir)
    scratch.mkdir(parents=True, exist_ok=True)
    upload = scratch / f".ref-{reference_id}.zip.upload"
    try:
        await _receive(request, upload, settings.max_reference_bytes)
        info = await run_in_threadpool(
            _ingest_and_store,
            redis,
            settings,
            upload,
            reference_id=reference_id,
            name=name,
            owner=owner,
        )
    finally:
        upload.unlink(missing_ok=True)
    response.headers["Location"] = request.url_for("get_reference", reference_id=info.id).path
    return info


@router.get(
    "/references",
    operation_id="listReferences",
    summary="Your reference sets, newest first",
    response_model=ReferenceList,
    responses=problems(401, 503, texts=_TEXTS),
)
def list_references(redis: RedisDep, owner: OwnerDep) -> ReferenceList:
    return ReferenceList(references=references.list_for(redis, owner))


@router.get(
    "/references/{reference_id}",
    operation_id="getReference",
    summary="One reference set: classes, image counts, digests",
    response_model=ReferenceInfo,
    responses=problems(401, 404, 503, texts=_TEXTS),
)
def get_reference(reference_id: ReferenceId, redis: RedisDep, owner: OwnerDep) -> ReferenceInfo:
    found = references.read(redis, reference_id, owner=owner)
    if found is None:
        raise ReferenceNotFound(f"no reference set {reference_id!r}")
    return found


@router.delete(
    "/references/{reference_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    operation_id="deleteReference",
    summary="Delete a reference set and its stored images",
    response_class=Response,
    responses={204: {"description": "Deleted"}, **problems(401, 404, 503, texts=_TEXTS)},
)
def delete_reference(
    reference_id: ReferenceId, redis: RedisDep, settings: SettingsDep, owner: OwnerDep
) -> Response:
    if not references.delete(redis, open_storage(settings), reference_id, owner=owner):
        raise ReferenceNotFound(f"no reference set {reference_id!r}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
