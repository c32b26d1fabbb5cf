"""Every error the client raises, in one tree.

DistillError                    anything this package raises on purpose
├── ApiError                    the server answered with an error (problem+json fields)
│   ├── InvalidRequest          400, 413, 415, 422: the request is wrong; ``errors`` says where
│   ├── Unauthorized            401, 403: no API key, or an unknown one
│   ├── NotFound                404: unknown job (or another key's), unknown preset
│   ├── Conflict                409: the job is not in a state that allows this
│   ├── Gone                    410: the job or its archive is past its retention
│   ├── Unavailable             429, 503: try again later (``retry_after``), retries used up
│   └── ServerError             other 5xx
├── ServerUnreachable           no answer at all: refused, reset, timed out (retries used up)
├── WaitTimeout                 ``Client.wait`` gave up; the job is still going
├── DownloadError               the archive could not be fetched completely
│   └── ChecksumMismatch        the bytes do not hash to the job's SHA-256
└── WebhookVerificationError    a webhook's signature or timestamp does not check out
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from client.types import Job


@dataclass(frozen=True)
class FieldError:
    """One offending field of a 422: a dotted path (``augment.copies``), a message, a type."""

    field: str
    message: str
    type: str


class DistillError(Exception):
    """Base of every error this package raises."""


class ApiError(DistillError):
    """The server answered with an error status; carries the RFC 9457 problem fields."""

    def __init__(
        self,
        status: int,
        title: str,
        detail: str,
        *,
        type: str = "about:blank",
        instance: str | None = None,
        errors: list[FieldError] | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.instance = instance
        self.errors: list[FieldError] = errors or []
        self.retry_after = retry_after
        self.headers: dict[str, str] = headers or {}
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.status} {self.title}"
        return f"{text}: {self.detail}" if self.detail else text

    @property
    def fields(self) -> list[str]:
        """The offending fields' dotted paths (empty unless the server listed some)."""
        return [e.field for e in self.errors]

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        """The typed error for an error response, parsed from its problem+json body."""
        status = response.status_code
        body: Any = None
        try:
            body = json.loads(response.content) if response.content else None
        except ValueError:
            body = None
        title = response.reason_phrase or "HTTP error"
        detail = ""
        type_ = "about:blank"
        instance: str | None = None
        errors: list[FieldError] = []
        if isinstance(body, dict):
            title = str(body.get("title") or title)
            type_ = str(body.get("type") or type_)
            instance = body.get("instance") if isinstance(body.get("instance"), str) else None
            raw_detail = body.get("detail")
            if isinstance(raw_detail, str):
                detail = raw_detail
            elif isinstance(raw_detail, list):  # FastAPI's own validation shape
                errors = [_fastapi_error(item) for item in raw_detail if isinstance(item, dict)]
                detail = "; ".join(f"{e.field}: {e.message}" for e in errors)
            for item in body.get("errors") or []:
                if isinstance(item, dict):
                    errors.append(
                        FieldError(
                            field=str(item.get("field", "")),
                            message=str(item.get("message", "")),
                            type=str(item.get("type", "")),
                        )
                    )
        elif response.content:
            detail = response.text.strip()[:500]
        error_class = error_class_for(status)
        return error_class(
            status,
            title,
            detail,
            type=type_,
            instance=instance,
            errors=errors,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
            headers=dict(response.headers),
        )


class InvalidRequest(ApiError):
    """400, 413, 415 or 422: the request itself is wrong; ``errors`` names each field."""


class Unauthorized(ApiError):
    """401 (or 403): API keys are on and none, or an unknown one, was sent."""


class NotFound(ApiError):
    """404: unknown job id (or another key's job), or unknown preset."""


class Conflict(ApiError):
    """409: the job is not in a state that allows this (archive not ready, already finished)."""


class Gone(ApiError):
    """410: the job ended longer ago than the service keeps results, or its archive is gone."""


class Unavailable(ApiError):
    """429 or 503 after every retry: the service is busy or its job store is down."""


class ServerError(ApiError):
    """Any other 5xx."""


class ServerUnreachable(DistillError):
    """The server could not be reached (refused, reset, timed out) after every retry."""

    def __init__(self, url: str, cause: BaseException) -> None:
        self.url = url
        self.cause = cause
        super().__init__(f"cannot reach {url}: {cause or type(cause).__name__}")


class WaitTimeout(DistillError):
    """``Client.wait`` ran out of time; ``job`` is the last state seen (not terminal)."""

    def __init__(self, job: Job, timeout: float) -> None:
        self.job = job
        self.timeout = timeout
        super().__init__(f"job {job['id']} still {job['state']} after {timeout:g} s")


class DownloadError(DistillError):
    """The archive could not be downloaded completely; a ``.part`` file may remain to resume."""


class ChecksumMismatch(DownloadError):
    """The downloaded bytes do not hash to the expected SHA-256; the ``.part`` was removed."""

    def __init__(self, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"SHA-256 mismatch: expected {expected}, got {actual}")


class WebhookVerificationError(DistillError):
    """A webhook is missing a header, is outside the time tolerance or has no valid signature."""


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    410: Gone,
    413: InvalidRequest,
    415: InvalidRequest,
    422: InvalidRequest,
    429: Unavailable,
    503: Unavailable,
}


def error_class_for(status: int) -> type[ApiError]:
    """The ``ApiError`` subclass for an HTTP status."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return ServerError if status >= 500 else ApiError


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())


def _fastapi_error(item: dict[str, Any]) -> FieldError:
    loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "path", "header")]
    return FieldError(
        field=".".join(loc) or "body",
        message=str(item.get("msg", "invalid")),
        type=str(item.get("type", "")),
    )
