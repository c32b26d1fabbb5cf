"""Every dependency a route takes, as ``Annotated`` aliases, and the helpers that document a
route's answers (problems, binary bodies): one place, shared by every router."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from pydantic import BaseModel
from redis import Redis

from core.settings import Settings
from service.auth import owner_for
from service.errors import PROBLEM_JSON
from service.schemas import Problem


# Dependencies that only read app state are coroutines: FastAPI runs a plain ``def`` dependency
# in its threadpool, and on a polled route those hand-offs cost more than the route itself.
async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_redis(request: Request) -> Redis:
    redis: Redis = request.app.state.redis
    return redis


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
RedisDep = Annotated[Redis, Depends(get_redis)]
#: The caller's owner id (``public`` without API keys); 401 without a known key when on.
OwnerDep = Annotated[str, Depends(owner_for)]

#: A binary body, declared so that generated clients hand the caller its bytes.
BINARY = {"type": "string", "format": "binary"}

#: What each problem status means, unless a router says it otherwise.
PROBLEM_TEXTS: dict[int, str] = {
    401: "API keys are on and none, or an unknown one, was sent",
    404: "Unknown job id (or another key's job)",
    409: "The job is not in a state that allows this",
    410: "The job expired (DISTILL_RESULT_TTL) or its archive was removed",
    413: "Request body too large",
    415: "Body is not application/json",
    416: "The Range asks for no byte of the archive (Content-Range: bytes */size); "
    "a Range of another unit or a malformed one is ignored (200, the whole archive)",
    422: "Invalid request; `errors` names each offending field",
    429: "Too many requests",
    503: "Redis unreachable or queue full; see Retry-After",
}


def problems(
    *codes: int, texts: Mapping[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` entries for problem+json answers with these ``codes``
    (``texts`` overrides ``PROBLEM_TEXTS``)."""
    said = {**PROBLEM_TEXTS, **(texts or {})}
    return {
        code: {"model": Problem, "content": {PROBLEM_JSON: {}}, "description": said[code]}
        for code in sorted(codes)
    }


def binary(media_type: str) -> dict[str, Any]:
    """A binary body of ``media_type``, also declared as ``application/octet-stream``: client
    generators that know no zip or png type (openapi-python-client, say) then keep the
    response as raw bytes instead of dropping it."""
    return {media_type: {"schema": BINARY}, "application/octet-stream": {"schema": BINARY}}


def as_json(model: BaseModel) -> Response:
    """A model already built by us, serialized once (the polled routes skip FastAPI's second
    validation of the return value; the route's response_model still documents it)."""
    return Response(content=model.model_dump_json(), media_type="application/json")
