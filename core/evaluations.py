"""Evaluation jobs: train the benchmark ConvNet on a finished archive, test on a named test set.

Records (no torch here; the task imports the evaluator lazily)::

    distill:eval:<id>          hash   job_id, testset, request, state, progress, result, error
    distill:job:<id>:evals     list   evaluation ids of a job, oldest first

Test sets live in ``DISTILL_TESTSETS_DIR`` (one ImageFolder directory or zip per name); a
request names one, never a path.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from redis import Redis
from redis.typing import EncodableT, FieldT

from core import keys, records

log = logging.getLogger("distill.jobs")

TESTSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class EvaluationRequest(BaseModel):
    """``POST /v1/jobs/{id}/evaluations``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    testset: str = Field(
        min_length=1,
        max_length=64,
        pattern=TESTSET_NAME.pattern,
        description="Name of a test set in the worker's DISTILL_TESTSETS_DIR.",
    )
    profile: Literal["full", "fast"] = Field(
        "full", description="full: the challenge's 1000 epochs x 3 runs; fast: a smoke check."
    )
    runs: int | None = Field(None, ge=1, le=10, description="Default: the profile's.")
    epochs: int | None = Field(None, ge=1, le=5000, description="Default: the profile's.")
    labels: Literal["hard", "soft"] = Field(
        "hard",
        description="hard: train on the class indices (the challenge's protocol). soft: train "
        "on the archive's soft_labels.pt (KL divergence at its temperature; the job needs "
        "soft_labels), and report the same runs on hard labels beside it in result.hard.",
    )


def testset_path(directory: Path | None, name: str) -> Path | None:
    """The test set called ``name`` (a directory or ``name.zip``), or None."""
    if directory is None or not TESTSET_NAME.match(name):
        return None
    for candidate in (Path(directory) / name, Path(directory) / f"{name}.zip"):
        if candidate.exists() and candidate.resolve().parent == Path(directory).resolve():
            return candidate
    return None


def available_testsets(directory: Path | None) -> list[str]:
    if directory is None or not Path(directory).is_dir():
        return []
    names = {p.name.removesuffix(".zip") for p in Path(directory).iterdir()}
    return sorted(n for n in names if TESTSET_NAME.match(n))


def create(
    redis: Redis, eval_id: str, *, job_id: str, request: EvaluationRequest, ttl: int
) -> None:
    with redis.pipeline() as pipe:
        pipe.hset(
            keys.evaluation(eval_id),
            mapping={
                "job_id": job_id,
                "testset": request.testset,
                "request": request.model_dump_json(),
                "state": "queued",
                "created_at": repr(time.time()),
            },
        )
        pipe.expire(keys.evaluation(eval_id), ttl + records.TOMBSTONE_S)
        pipe.rpush(keys.job_evaluations(job_id), eval_id)
        pipe.expire(keys.job_evaluations(job_id), ttl + records.TOMBSTONE_S)
        pipe.execute()
    log.info("evaluation queued", extra={"job_id": job_id, "evaluation_id": eval_id})


def read(redis: Redis, eval_id: str) -> dict[str, str]:
    raw: dict[bytes, bytes] = redis.hgetall(keys.evaluation(eval_id))  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def for_job(redis: Redis, job_id: str) -> list[str]:
    ids: list[bytes] = redis.lrange(keys.job_evaluations(job_id), 0, -1)  # type: ignore[assignment]
    return [i.decode() for i in ids]


def set_fields(redis: Redis, eval_id: str, **fields: str | int | float) -> None:
    mapping: dict[FieldT, EncodableT] = {}
    mapping.update(fields)
    redis.hset(keys.evaluation(eval_id), mapping=mapping)
