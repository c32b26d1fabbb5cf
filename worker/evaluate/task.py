"""The evaluation task: train the benchmark ConvNet on a finished archive, test on a named set.

Its records, request and test-set lookup are in ``core.evaluations``.
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from typing import Any

from redis import Redis
from rq import get_current_job

from core import keys
from core.evaluations import EvaluationRequest, read, set_fields, testset_path
from core.storage import open_storage
from worker import runtime

log = logging.getLogger("distill.jobs")


def run_evaluation(eval_id: str) -> dict[str, Any]:
    """The RQ job: evaluate the job's archive on the named test set."""
    from worker.evaluate import Progress, evaluate

    rt = runtime.current()
    settings = rt.settings
    job = get_current_job()
    assert job is not None
    redis: Redis = job.connection
    record = read(redis, eval_id)
    request = EvaluationRequest.model_validate_json(record["request"])
    job_id = record["job_id"]
    storage = open_storage(settings)
    testset = testset_path(settings.testsets_dir, request.testset)
    if testset is None:
        raise FileNotFoundError(f"test set {request.testset!r} is not on this worker")
    set_fields(redis, eval_id, state="running", started_at=repr(time.time()), worker=rt.worker_name)

    def progress(p: Progress) -> None:
        set_fields(redis, eval_id, run=p.run, runs=p.runs, epoch=p.epoch, epochs=p.epochs)

    # A file on this machine whatever the store (a download when it is remote, removed after).
    with storage.local_copy(keys.archive(job_id)) as archive:
        with zipfile.ZipFile(archive) as zf:
            manifest = json.loads(zf.read("manifest.json"))
        result = evaluate(
            archive,
            testset,
            runs=request.runs,
            epochs=request.epochs,
            profile=request.profile,
            progress=progress,
            labels=request.labels,
        ).to_dict()
    result["testset"] = request.testset
    # A copy of the manifest with the evaluation in it, beside the archive.
    copy = keys.evaluated_manifest(job_id)
    try:
        existing = json.loads(storage.get_bytes(copy))
    except FileNotFoundError:
        existing = manifest
    existing.setdefault("evaluations", []).append({"id": eval_id, **result})
    storage.put_bytes(copy, json.dumps(existing, indent=2, ensure_ascii=False).encode())
    set_fields(
        redis, eval_id, state="succeeded", finished_at=repr(time.time()), result=json.dumps(result)
    )
    log.info(
        "evaluation succeeded",
        extra={"job_id": job_id, "evaluation_id": eval_id, "mean": result["mean"]},
    )
    return result
