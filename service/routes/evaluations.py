"""/v1/jobs/{id}/evaluations: score a finished dataset with the benchmark ConvNet."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response, status

from core.evaluations import EvaluationRequest
from service import evaluating
from service.auth import owner_for
from service.deps import OwnerDep, RedisDep, SettingsDep, problems
from service.schemas import Evaluation, EvaluationList

# Every /v1 route needs an API key when DISTILL_API_KEYS is set.
router = APIRouter(prefix="/v1", dependencies=[Depends(owner_for)])


@router.post(
    "/jobs/{job_id}/evaluations",
    status_code=status.HTTP_202_ACCEPTED,
    operation_id="createEvaluation",
    tags=["evaluations"],
    summary="Measure the dataset: train the benchmark ConvNet on it, test on a named test set",
    response_model=Evaluation,
    responses=problems(401, 404, 409, 410, 422, 503),
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
    evaluation = evaluating.submit_evaluation(redis, settings, job_id, body, owner=owner)
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
    responses=problems(401, 404, 410, 503),
)
def list_evaluations(
    job_id: str, redis: RedisDep, settings: SettingsDep, owner: OwnerDep
) -> EvaluationList:
    found = evaluating.list_evaluations(redis, settings, job_id, owner=owner)
    return EvaluationList(evaluations=found)


@router.get(
    "/jobs/{job_id}/evaluations/{eval_id}",
    operation_id="getEvaluation",
    tags=["evaluations"],
    summary="One evaluation: state, progress, accuracy per run, mean, std, protocol",
    response_model=Evaluation,
    responses=problems(401, 404, 410, 503),
)
def get_evaluation(
    job_id: str, eval_id: str, redis: RedisDep, settings: SettingsDep, owner: OwnerDep
) -> Evaluation:
    return evaluating.get_evaluation(redis, settings, job_id, eval_id, owner=owner)
