"""A job's evaluations as the API sees them: submit one (enqueued for any worker of the first
model), read one, list them.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

from redis import Redis
from rq import Callback

from core import (
    evaluations,
    keys,
)
from core.evaluations import EvaluationRequest
from core.settings import Settings
from core.states import JobState
from service.errors import (
    InvalidField,
    JobConflict,
    JobNotFound,
)
from service.jobs import JOB_ID, fetch, queue_for, visible_record
from service.schemas import (
    Evaluation,
    EvaluationProgress,
)
from service.views import as_time


def _evaluation_view(eval_id: str, record: dict[str, str]) -> Evaluation:
    def number(name: str) -> int | None:
        return int(record[name]) if name in record else None

    return Evaluation(
        id=eval_id,
        job_id=record["job_id"],
        state=record.get("state", "queued"),
        testset=record["testset"],
        request=json.loads(record["request"]),
        progress=EvaluationProgress(
            run=number("run"), runs=number("runs"), epoch=number("epoch"), epochs=number("epochs")
        ),
        result=json.loads(record["result"]) if "result" in record else None,
        error=record.get("error"),
        created_at=as_time(record["created_at"]) or dt.datetime.now(dt.UTC),
        finished_at=as_time(record.get("finished_at")),
    )


def submit_evaluation(
    redis: Redis, settings: Settings, job_id: str, request: EvaluationRequest, *, owner: str
) -> Evaluation:
    """Queue an evaluation of a succeeded job's archive on a named test set."""
    job = fetch(redis, settings, job_id, owner=owner, archive_url="")
    if job.state is not JobState.succeeded:
        raise JobConflict(
            f"job {job_id} is {job.state.value}; only a finished dataset is evaluated"
        )
    if settings.testsets_dir is not None and not evaluations.testset_path(
        settings.testsets_dir, request.testset
    ):
        known = ", ".join(evaluations.available_testsets(settings.testsets_dir)) or "none"
        raise InvalidField(f"testset: no test set {request.testset!r} (available: {known})")
    if request.labels == "soft" and job.request.soft_labels is None:
        raise InvalidField(
            f"labels: soft trains on the archive's soft_labels.pt, and job {job_id} was made "
            "without soft_labels"
        )
    eval_id = uuid.uuid4().hex
    evaluations.create(redis, eval_id, job_id=job_id, request=request, ttl=settings.result_ttl)
    queue_for(redis, settings).enqueue(
        keys.EVALUATE_TASK,
        eval_id,
        job_id=eval_id,
        job_timeout=settings.job_timeout,
        result_ttl=settings.result_ttl,
        failure_ttl=settings.result_ttl,
        on_failure=Callback(keys.ON_EVALUATION_FAILURE),
        description=f"evaluate {job_id} on {request.testset}",
    )
    return get_evaluation(redis, settings, job_id, eval_id, owner=owner)


def get_evaluation(
    redis: Redis, settings: Settings, job_id: str, eval_id: str, *, owner: str
) -> Evaluation:
    visible_record(redis, settings, job_id, owner)
    record = evaluations.read(redis, eval_id) if JOB_ID.match(eval_id) else {}
    if not record or record.get("job_id") != job_id:
        raise JobNotFound(f"job {job_id} has no evaluation {eval_id!r}")
    return _evaluation_view(eval_id, record)


def list_evaluations(
    redis: Redis, settings: Settings, job_id: str, *, owner: str
) -> list[Evaluation]:
    visible_record(redis, settings, job_id, owner)
    views = []
    for eval_id in evaluations.for_job(redis, job_id):
        record = evaluations.read(redis, eval_id)
        if record:
            views.append(_evaluation_view(eval_id, record))
    return views
