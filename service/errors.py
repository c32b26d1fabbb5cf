"""One error tree for the API, mapped to problem+json responses in one place.

    ServiceError                 500  anything we raise on purpose
    ├── Unauthorized             401  API keys are on and none (or a wrong one) was sent
    ├── JobNotFound              404  unknown (or expired) job id
    ├── PresetNotFound           404  unknown preset name
    ├── ReferenceNotFound        404  unknown reference set id (or another key's)
    ├── ReferenceRejected        413, 415 or 422  an upload core.references refused
    ├── UploadAbandoned          400  the client went away before the upload's body ended
    ├── JobConflict              409  the job is not in a state that allows this
    ├── JobExpired               410  the job ended more than DISTILL_RESULT_TTL ago
    ├── ArchiveGone              410  the job succeeded but its archive is no longer on disk
    ├── PayloadTooLarge          413  request body over DISTILL_MAX_BODY_BYTES
    ├── BadIdempotencyKey        422  an Idempotency-Key reused with a different body
    ├── InvalidField             422  one field refused ("<field>: why" -> errors[0].field)
    │   └── TooManyImages        422  classes x ipc over DISTILL_MAX_JOB_IMAGES
    ├── UnsupportedMediaType     415  body is not application/json
    └── Unavailable              503  try again later (with Retry-After)
        └── QueueFull            503  too many jobs waiting

Validation errors (422) and Redis being unreachable (503) come from outside the tree and are
mapped here too, so no traceback ever reaches a caller.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.augmentation import POLICY_TAGS
from core.references import ReferenceSetError
from service.schemas import FieldError, Problem

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
#: ``augment.copies: message``: a detail that names its field first.
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.+)$", re.DOTALL)


class ServiceError(Exception):
    status = 500
    title = "Internal error"
    headers: dict[str, str] | None = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class JobNotFound(ServiceError):
    status = 404
    title = "Job not found"


class Unauthorized(ServiceError):
    status = 401
    title = "Unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers = {"WWW-Authenticate": 'Bearer realm="distill"'}


class JobExpired(ServiceError):
    status = 410
    title = "Job expired"


class BadIdempotencyKey(ServiceError):
    status = 422
    title = "Idempotency-Key reused"


class InvalidField(ServiceError):
    """A request the service refuses for one field; ``detail`` starts with ``<field>: ``,
    which becomes the problem's ``errors[0].field``."""

    status = 422
    title = "Invalid request"

    def field_errors(self) -> list[FieldError] | None:
        found = _FIELD_PREFIX.match(self.detail)
        if found is None:
            return None
        return [FieldError(field=found[1], message=found[2], type="value_error")]


class TooManyImages(InvalidField):
    pass


class InvalidCursor(ServiceError):
    status = 422
    title = "Invalid cursor"


class PresetNotFound(ServiceError):
    status = 404
    title = "Preset not found"


class ReferenceNotFound(ServiceError):
    status = 404
    title = "Reference set not found"


class ReferenceRejected(ServiceError):
    """An upload ``core.references`` refused; its status (413, 415, 422) comes with it."""

    def __init__(self, error: ReferenceSetError) -> None:
        super().__init__(str(error))
        self.status = error.status
        self.title = {
            413: "Reference set too large",
            415: "Unsupported media type",
        }.get(error.status, "Invalid reference set")


class UploadAbandoned(ServiceError):
    """The client disconnected before the body was complete. Nobody reads the answer; its
    status is for the access log."""

    status = 400
    title = "Upload incomplete"


class JobConflict(ServiceError):
    status = 409
    title = "Job not in the right state"


class ArchiveGone(ServiceError):
    status = 410
    title = "Archive no longer available"


class PayloadTooLarge(ServiceError):
    status = 413
    title = "Request body too large"


class UnsupportedMediaType(ServiceError):
    status = 415
    title = "Unsupported media type"


class Unavailable(ServiceError):
    status = 503
    title = "Service unavailable"

    def __init__(self, detail: str, *, retry_after: int = 5) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after)}


class QueueFull(Unavailable):
    title = "Queue full"


def problem_response(
    status: int,
    title: str,
    detail: str,
    *,
    request: Request | None = None,
    errors: list[FieldError] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = Problem(
        title=title,
        status=status,
        detail=detail,
        instance=request.url.path if request is not None else None,
        errors=errors,
    )
    return JSONResponse(
        body.model_dump(exclude_none=True),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def field_path(loc: tuple[int | str, ...] | list[Any]) -> str:
    """``('body', 'augment', 'policy', 'steps', 0, 'name')`` -> ``augment.policy[0].name``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    out = ""
    for n, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        elif (part in POLICY_TAGS and n and parts[n - 1] == "policy") or not part.isidentifier():
            continue  # a union branch's tag (e.g. "list[constrained-str]"), not a field
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def _message(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "invalid"))
    return msg.removeprefix("Value error, ")


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        FieldError(field=field_path(err["loc"]), message=_message(err), type=str(err["type"]))
        for err in exc.errors()
    ]
    detail = "; ".join(f"{e.field}: {e.message}" for e in errors[:5])
    return problem_response(422, "Invalid request", detail, request=request, errors=errors)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    errors = exc.field_errors() if isinstance(exc, InvalidField) else None
    return problem_response(
        exc.status, exc.title, exc.detail, request=request, errors=errors, headers=exc.headers
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400:
        # FastAPI's answer to a body it cannot decode (bad UTF-8, say): an invalid request.
        error = FieldError(
            field="body", message="body is not valid UTF-8 JSON", type="json_invalid"
        )
        return problem_response(
            422, "Invalid request", "body: " + error.message, request=request, errors=[error]
        )
    titles = {404: "Not found", 405: "Method not allowed", 413: PayloadTooLarge.title}
    title = titles.get(exc.status_code, "HTTP error")
    headers = dict(exc.headers) if exc.headers else None
    return problem_response(
        exc.status_code, title, str(exc.detail), request=request, headers=headers
    )


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unreachable: %s", exc)
    return problem_response(
        503,
        "Service unavailable",
        "the job store (Redis) is unreachable; retry shortly",
        request=request,
        headers={"Retry-After": "5"},
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(
        500, "Internal error", "an unexpected error occurred; it has been logged", request=request
    )


def install(app: FastAPI) -> None:
    """Register every handler on ``app``."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RedisConnectionError, _redis_down)
    app.add_exception_handler(RedisTimeoutError, _redis_down)
    app.add_exception_handler(Exception, _unexpected)
