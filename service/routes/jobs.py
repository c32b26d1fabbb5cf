"""/v1/jobs: submit, list, read, cancel, download the archive and its contact sheet."""

from __future__ import annotations

import re
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Header, Query, Request, Response, status
from fastapi.responses import FileResponse

from core.spec import DatasetSpec
from core.states import JobState
from service import admission, downloads, jobs
from service.auth import owner_for
from service.deps import (
    OwnerDep,
    RedisDep,
    SettingsDep,
    as_json,
    binary,
    problems,
)
from service.schemas import JobList, JobPublic

# Every /v1 route needs an API key when DISTILL_API_KEYS is set.
router = APIRouter(prefix="/v1", dependencies=[Depends(owner_for)])


#: The archive's route, below the router's prefix.
ARCHIVE_PATH = "/jobs/{job_id}/archive"


def archive_url(request: Request, job_id: str) -> str:
    """The download URL of ``job_id``'s archive, as this request reached the API (what
    ``request.url_for("download_archive", ...)`` gives, without searching every route on
    each status read)."""
    base = str(request.base_url).rstrip("/")
    return base + router.prefix + ARCHIVE_PATH.format(job_id=quote(job_id, safe=""))


@router.post(
    "/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="createJob",
    tags=["jobs"],
    summary="Request a distilled dataset",
    response_model=JobPublic,
    responses={
        200: {"model": JobPublic, "description": "Finished within Prefer: wait=N"},
        **problems(401, 413, 415, 422, 503),
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
    job, created = admission.submit(
        redis,
        settings,
        spec,
        owner=owner,
        idempotency_key=idempotency_key,
        archive_url_for=lambda i: archive_url(request, i),
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
            archive_url=archive_url(request, job.id),
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
    responses=problems(401, 422, 503),
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
        archive_url_for=lambda i: archive_url(request, i),
    )
    return as_json(JobList(jobs=found, next_cursor=next_cursor))


@router.get(
    "/jobs/{job_id}",
    operation_id="getJob",
    tags=["jobs"],
    summary="A job's state, progress and result",
    response_model=JobPublic,
    responses=problems(401, 404, 410, 503),
)
async def get_job(job_id: str, request: Request) -> Response:
    # The polled read: its state comes straight from the app rather than through four more
    # dependencies (their solving was a fifth of its time); the router's owner_for has
    # already refused a bad key, and is asked again here for the owner (a few comparisons).
    state = request.app.state
    owner = await owner_for(request)
    url = archive_url(request, job_id)
    found = await jobs.fetch_async(
        state.async_redis, state.settings, job_id, owner=owner, archive_url=url
    )
    return as_json(found)


@router.post(
    "/jobs/{job_id}/cancel",
    operation_id="cancelJob",
    tags=["jobs"],
    summary="Cancel a queued or running job",
    response_model=JobPublic,
    responses=problems(401, 404, 409, 410, 503),
)
def cancel_job(
    job_id: str, request: Request, redis: RedisDep, settings: SettingsDep, owner: OwnerDep
) -> JobPublic:
    return jobs.cancel(
        redis, settings, job_id, owner=owner, archive_url=archive_url(request, job_id)
    )


@router.get(
    ARCHIVE_PATH,
    operation_id="downloadArchive",
    tags=["jobs"],
    summary="Download the finished dataset (zip; Range and ETag supported)",
    response_class=FileResponse,
    responses={
        200: {"content": binary("application/zip"), "description": "The archive"},
        206: {"content": binary("application/zip"), "description": "Part of the archive"},
        304: {"description": "Not modified (If-None-Match matched the ETag)"},
        307: {"description": "With DISTILL_PRESIGN and S3 storage: a presigned download URL"},
        **problems(401, 404, 409, 410, 416, 503),
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
        200: {"content": binary("image/png"), "description": "The contact sheet"},
        **problems(401, 404, 410, 503),
    },
)
def get_preview(job_id: str, redis: RedisDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    return downloads.serve_preview(jobs.preview_file(redis, settings, job_id, owner=owner))
