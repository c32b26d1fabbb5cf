"""/v1/models: the models this deployment serves, their defaults and ready workers."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from service import health
from service.auth import owner_for
from service.deps import RedisDep, SettingsDep
from service.schemas import ModelList

# Every /v1 route needs an API key when DISTILL_API_KEYS is set.
router = APIRouter(prefix="/v1", dependencies=[Depends(owner_for)])


@router.get(
    "/models",
    operation_id="listModels",
    tags=["models"],
    summary="The models this service serves, usable as `model`",
    response_model=ModelList,
)
def list_models(redis: RedisDep, settings: SettingsDep) -> ModelList:
    return health.model_list(redis, settings)
