"""Serving stored files: archives (ETag, Range, If-Range, If-None-Match) and previews.

A local store answers with Starlette's FileResponse (sendfile, Range handled there). A remote
store either streams through the API with ranged reads, or, with ``DISTILL_PRESIGN``, answers
307 to a presigned URL so the bytes go straight from the bucket to the client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi import Request, Response
from fastapi.responses import FileResponse, RedirectResponse, StreamingResponse

from core.settings import Settings
from core.storage import Storage, StorageError, attachment, open_storage
from service.errors import ArchiveGone, JobNotFound, Unavailable, problem_response

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
ARCHIVE_CACHE = "private, max-age=0, must-revalidate"


@dataclass(frozen=True)
class StoredFile:
    """A finished file as the routes serve it: where it is, how big, and its digest."""

    storage: Storage
    key: str
    size: int
    #: Hex SHA-256 (the ETag); None where the service keeps none (previews).
    sha256: str | None = None

    @classmethod
    def find(cls, settings: Settings, key: str, *, sha256: str | None = None) -> StoredFile | None:
        """The stored file under ``key``, or None; 503 while the store cannot be reached."""
        try:
            storage = open_storage(settings)
            size = storage.size(key)
        except StorageError as exc:
            raise Unavailable(f"archive storage unavailable: {exc}") from exc
        if size is None:
            return None
        return cls(storage=storage, key=key, size=size, sha256=sha256)


def etag_matches(request: Request, etag: str) -> bool:
    header = request.headers.get("if-none-match", "")
    return any(tag.strip() in (etag, "*") for tag in header.split(",") if tag.strip())


class RangeNotSatisfiable(Exception):
    """The range asks for no byte of the file (416)."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The single range ``header`` asks for, as inclusive (start, end); None for the whole
    file (no header, a malformed one, or several ranges, which RFC 9110 lets a server ignore).
    """
    if not header:
        return None
    match = _RANGE.match(header)
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last n bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(size - suffix, 0), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable
    return start, min(end, size - 1)


def serve_archive(
    found: StoredFile,
    request: Request,
    *,
    filename: str,
    presign: bool,
    presign_seconds: int,
) -> Response:
    """The archive download: 304, 307 to a presigned URL, 200, 206 or 416 (problem+json).

    A ``Range`` this server does not serve (another unit, a malformed or multi-part range, or
    one under an ``If-Range`` for another version) is ignored, as RFC 9110 allows: 200 with
    the whole archive. Only a well-formed range that asks for no byte of it is a 416.
    """
    etag = f'"{found.sha256}"'
    if etag_matches(request, etag):
        return Response(status_code=304, headers={"ETag": etag})
    wanted = None
    # A Range under an If-Range for another version would splice two archives: send it whole.
    if_range = request.headers.get("if-range")
    if if_range is None or if_range.strip() == etag:
        try:
            wanted = byte_range(request.headers.get("range"), found.size)
        except RangeNotSatisfiable:
            return problem_response(
                416,
                "Range not satisfiable",
                f"the archive has {found.size} bytes; Range: {request.headers.get('range')} "
                "asks for none of them",
                request=request,
                headers={"Content-Range": f"bytes */{found.size}", "ETag": etag},
            )
    if wanted is None:
        # Whatever Range was sent is ignored: keep FileResponse from reading it either.
        request.scope["headers"] = [
            (k, v) for k, v in request.scope["headers"] if k.lower() not in (b"range", b"if-range")
        ]
    path = found.storage.local_path(found.key)
    if path is not None:
        return FileResponse(
            path,
            media_type="application/zip",
            filename=filename,
            headers={"ETag": etag, "Cache-Control": ARCHIVE_CACHE},
        )
    if presign:
        try:
            url = found.storage.presign(found.key, seconds=presign_seconds, filename=filename)
        except StorageError as exc:
            raise Unavailable(f"archive storage unavailable: {exc}") from exc
        if url is not None:
            # The URL expires: the redirect itself must not be cached.
            return RedirectResponse(
                url, status_code=307, headers={"ETag": etag, "Cache-Control": "private, no-store"}
            )
    headers = {
        "ETag": etag,
        "Cache-Control": ARCHIVE_CACHE,
        "Accept-Ranges": "bytes",
        "Content-Disposition": attachment(filename),
    }
    start, end = wanted if wanted is not None else (0, found.size - 1)
    try:
        # Opened here, so an object removed since it was found is a 410, not a broken stream.
        chunks = found.storage.read_range(found.key, start, end if wanted else None)
    except FileNotFoundError:
        raise ArchiveGone(f"the archive {found.key} is no longer in storage") from None
    except StorageError as exc:
        raise Unavailable(f"archive storage unavailable: {exc}") from exc
    headers["Content-Length"] = str(end - start + 1)
    if wanted is None:
        return StreamingResponse(chunks, media_type="application/zip", headers=headers)
    headers["Content-Range"] = f"bytes {start}-{end}/{found.size}"
    return StreamingResponse(chunks, status_code=206, media_type="application/zip", headers=headers)


def serve_preview(found: StoredFile) -> Response:
    headers = {"Cache-Control": "private"}
    path = found.storage.local_path(found.key)
    if path is not None:
        return FileResponse(path, media_type="image/png", headers=headers)
    try:
        data = found.storage.get_bytes(found.key)
    except FileNotFoundError:
        raise JobNotFound(f"{found.key} is no longer in storage") from None
    except StorageError as exc:
        raise Unavailable(f"archive storage unavailable: {exc}") from exc
    return Response(data, media_type="image/png", headers=headers)
