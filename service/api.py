"""Routes only: each one reads the request, calls ``service.jobs`` and shapes the answer."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from redis import Redis

from core import presets
from core.evaluations import EvaluationRequest
from core.settings import Settings
from core.spec import DatasetSpec
from core.states import JobState
from service import downloads, health, jobs
from service.auth import OwnerDep, owner_for
from service.errors import PROBLEM_JSON, PresetNotFound
from service.schemas import (
    Evaluation,
    EvaluationList,
    Health,
    JobList,
    JobPublic,
    ModelList,
    PresetDetail,
    PresetList,
    Problem,
    Readiness,
)


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_redis(request: Request) -> Redis:
    redis: Redis = request.app.state.redis
    return redis


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
RedisDep = Annotated[Redis, Depends(get_redis)]


#: A binary body, declared so that generated clients hand the caller its bytes.
_BINARY = {"type": "string", "format": "binary"}


def _binary(media_type: str) -> dict[str, Any]:
    """A binary body of ``media_type``, also declared as ``application/octet-stream``: client
    generators that know no zip or png type (openapi-python-client, say) then keep the
    response as raw bytes instead of dropping it."""
    return {media_type: {"schema": _BINARY}, "application/octet-stream": {"schema": _BINARY}}


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {
        code: {"model": Problem, "content": {PROBLEM_JSON: {}}, "description": text}
        for code, text in {
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
        }.items()
        if code in codes
    }


def _json(model: BaseModel) -> Response:
    """A model already built by us, serialized once (the polled routes skip FastAPI's second
    validation of the return value; the route's response_model still documents it)."""
    return Response(content=model.model_dump_json(), media_type="application/json")


def _archive_url(request: Request, job_id: str) -> str:
    return str(request.url_for("download_archive", job_id=job_id))


# Every /v1 route needs an API key when DISTILL_API_KEYS is set.
router = APIRouter(prefix="/v1", dependencies=[Depends(owner_for)])


@router.post(
    "/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="createJob",
    tags=["jobs"],
    summary="Request a distilled dataset",
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "Finished within Prefer: wait=N"},
        **_problems(401, 413, 415, 422, 503),
    },
)
def create_job(
    spec: DatasetSpec,
    request: Request,
    response: Response,
    redis: RedisDep,
    settings: SettingsDep,
    owner: OwnerDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=200,
            description="Retrying with the same key and body returns the same job.",
        ),
    ] = None,
    prefer: Annotated[
        str | None,
        Header(
            max_length=200,
            description="wait=N (N <= 60): answer 200 with the finished job if it ends by then.",
        ),
    ] = None,
) -> JobPublic:
    job, created = jobs.submit(
        redis,
        settings,
        spec,
        owner=owner,
        idempotency_key=idempotency_key,
        archive_url_for=lambda i: _archive_url(request, i),
    )
    response.headers["Location"] = request.url_for("get_job", job_id=job.id).path
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    wait = _prefer_wait(prefer)
    if wait is not None:
        response.headers["Preference-Applied"] = f"wait={wait}"
        job = jobs.wait_until_terminal(
            redis,
            settings,
            job,
            owner=owner,
            seconds=wait,
            archive_url=_archive_url(request, job.id),
        )
    if job.state.is_terminal:
        response.status_code = status.HTTP_200_OK
    return job


_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*(\d+)", re.IGNORECASE)
MAX_PREFER_WAIT = 60


def _prefer_wait(prefer: str | None) -> int | None:
    """Seconds from ``Prefer: wait=N`` (RFC 7240), capped at 60; None when absent."""
    match = _PREFER_WAIT.search(prefer or "")
    return min(int(match.group(1)), MAX_PREFER_WAIT) if match else None


@router.get(
    "/jobs",
    operation_id="listJobs",
    tags=["jobs"],
    summary="Your jobs, newest first, a page at a time",
    response_model=JobList,
    responses=_problems(401, 422, 503),
)
def list_jobs(
    request: Request,
    redis: RedisDep,
    settings: SettingsDep,
    owner: OwnerDep,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[
        str | None, Query(max_length=200, description="next_cursor of the previous page.")
    ] = None,
) -> Response:
    found, next_cursor = jobs.list_page(
        redis,
        settings,
        owner=owner,
        state=state,
        limit=limit,
        cursor=cursor,
        archive_url_for=lambda i: _archive_url(request, i),
    )
    return _json(JobList(jobs=found, next_cursor=next_cursor))


@router.get(
    "/jobs/{job_id}",
    operation_id="getJob",
    tags=["jobs"],
    summary="A job's state, progress and result",
    response_model=JobPublic,
    responses=_problems(401, 404, 410, 503),
)
def get_job(
    job_id: str, request: Request, redis: RedisDep, settings: SettingsDep, owner: OwnerDep
) -> Response:
    return _json(
        jobs.fetch(redis, settings, job_id, owner=owner, archive_url=_archive_url(request, job_id))
    )


@router.post(
    "/jobs/{job_id}/cancel",
    operation_id="cancelJob",
    tags=["jobs"],
    summary="Cancel a queued or running job",
    response_model=JobPublic,
    responses=_problems(401, 404, 409, 410, 503),
)
def cancel_job(
    job_id: str, request: Request, redis: RedisDep, settings: SettingsDep, owner: OwnerDep
) -> JobPublic:
    return jobs.cancel(
        redis, settings, job_id, owner=owner, archive_url=_archive_url(request, job_id)
    )


@router.get(
    "/jobs/{job_id}/archive",
    operation_id="downloadArchive",
    tags=["jobs"],
    summary="Download the finished dataset (zip; Range and ETag supported)",
    response_class=FileResponse,
    responses={
        200: {"content": _binary("application/zip"), "description": "The archive"},
        206: {"content": _binary("application/zip"), "description": "Part of the archive"},
        304: {"description": "Not modified (If-None-Match matched the ETag)"},
        307: {"description": "With DISTILL_PRESIGN and S3 storage: a presigned download URL"},
        **_problems(401, 404, 409, 410, 416, 503),
    },
)
def download_archive(
    job_id: str, request: Request, redis: RedisDep, settings: SettingsDep, owner: OwnerDep
) -> Response:
    found = jobs.archive_file(redis, settings, job_id, owner=owner)
    return downloads.serve_archive(
        found,
        request,
        filename=f"distill-{job_id}.zip",
        presign=settings.presign,
        presign_seconds=settings.presign_seconds,
    )


@router.get(
    "/jobs/{job_id}/preview.png",
    operation_id="getPreview",
    tags=["jobs"],
    summary="Contact sheet of a finished job: generated images and their augmented copies",
    response_class=FileResponse,
    responses={
        200: {"content": _binary("image/png"), "description": "The contact sheet"},
        **_problems(401, 404, 410, 503),
    },
)
def get_preview(job_id: str, redis: RedisDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    return downloads.serve_preview(jobs.preview_file(redis, settings, job_id, owner=owner))


@router.post(
    "/jobs/{job_id}/evaluations",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="createEvaluation",
    tags=["evaluations"],
    summary="Measure the dataset: train the benchmark ConvNet on it, test on a named test set",
    response_model=Evaluation,
    responses=_problems(401, 404, 409, 410, 422, 503),
)
def create_evaluation(
    job_id: str,
    body: EvaluationRequest,
    response: Response,
    request: Request,
    redis: RedisDep,
    settings: SettingsDep,
    owner: OwnerDep,
) -> Evaluation:
    evaluation = jobs.submit_evaluation(redis, settings, job_id, body, owner=owner)
    response.headers["Location"] = request.url_for(
        "get_evaluation", job_id=job_id, eval_id=evaluation.id
    ).path
    return evaluation


@router.get(
    "/jobs/{job_id}/evaluations",
    operation_id="listEvaluations",
    tags=["evaluations"],
    summary="A job's evaluations",
    response_model=EvaluationList,
    responses=_problems(401, 404, 410, 503),
)
def list_evaluations(
    job_id: str, redis: RedisDep, settings: SettingsDep, owner: OwnerDep
) -> EvaluationList:
    return EvaluationList(evaluations=jobs.list_evaluations(redis, settings, job_id, owner=owner))


@router.get(
    "/jobs/{job_id}/evaluations/{eval_id}",
    operation_id="getEvaluation",
    tags=["evaluations"],
    summary="One evaluation: state, progress, accuracy per run, mean, std, protocol",
    response_model=Evaluation,
    responses=_problems(401, 404, 410, 503),
)
def get_evaluation(
    job_id: str, eval_id: str, redis: RedisDep, settings: SettingsDep, owner: OwnerDep
) -> Evaluation:
    return jobs.get_evaluation(redis, settings, job_id, eval_id, owner=owner)


def _preset_summary(preset: presets.Preset) -> dict[str, object]:
    classes = preset.classes
    return {
        "name": preset.name,
        "title": preset.title,
        "num_classes": len(classes),
        "image_size": preset.image_size,
        "mean": list(preset.mean),
        "std": list(preset.std),
        "first_class": classes[0].label,
        "last_class": classes[-1].label,
    }


@router.get(
    "/models",
    operation_id="listModels",
    tags=["models"],
    summary="The models this service serves, usable as `model`",
    response_model=ModelList,
)
def list_models(redis: RedisDep, settings: SettingsDep) -> ModelList:
    return health.model_list(redis, settings)


@router.get(
    "/presets",
    operation_id="listPresets",
    tags=["presets"],
    summary="Standard class lists usable as `preset`",
    response_model=PresetList,
)
def list_presets() -> PresetList:
    return PresetList.model_validate(
        {"presets": [_preset_summary(p) for p in presets.PRESETS.values()]}
    )


@router.get(
    "/presets/{name}",
    operation_id="getPreset",
    tags=["presets"],
    summary="One preset with every class in class-index order",
    response_model=PresetDetail,
    responses=_problems(404),
)
def get_preset(name: str) -> PresetDetail:
    if name not in presets.PRESETS:
        raise PresetNotFound(f"no preset {name!r}; known: {', '.join(presets.PRESETS)}")
    preset = presets.PRESETS[name]
    classes = [
        {"index": c.index, "label": c.label, "wnid": c.wnid, "synonyms": list(c.synonyms)}
        for c in preset.classes
    ]
    return PresetDetail.model_validate({**_preset_summary(preset), "classes": classes})


health_router = APIRouter()


@health_router.get(
    "/metrics",
    dependencies=[Depends(owner_for)],
    operation_id="metrics",
    tags=["health"],
    summary="Prometheus metrics for the whole service (all workers)",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)


@health_router.get(
    "/healthz", operation_id="health", tags=["health"], summary="The API process is alive"
)
def healthz() -> Health:
    return Health(status="ok")


@health_router.get(
    "/readyz",
    operation_id="readiness",
    tags=["health"],
    summary="Redis reachable and a worker with its model loaded",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready; `detail` says why"}},
)
def readyz(redis: RedisDep, settings: SettingsDep) -> Response:
    state = health.readiness(redis, settings)
    code = 200 if state.status == "ready" else 503
    return JSONResponse(state.model_dump(mode="json"), status_code=code)
