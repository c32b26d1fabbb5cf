"""Every name the processes agree on: Redis keys, storage keys and RQ task names. No logic.

Redis::

    distill:job:<id>              hash   one job: request, owner, progress, outcome, archive, error
    distill:job:<id>:webhook      list   webhook delivery attempts (JSON), oldest first
    distill:job:<id>:evals        list   evaluation ids of a job, oldest first
    distill:jobs:<owner>          zset   one owner's job ids by creation time (listing)
    distill:idem:<owner>:<hash>   str    "<job id> <body hash>" of an Idempotency-Key
    distill:shards:<id>           hash   a sharded job's shards: field "<k>:<name>" per shard
    distill:shards-done:<id>      set    indexes of the shards whose part is stored
    distill:sharded               set    sharded jobs in flight (maintenance looks here)
    distill:eval:<id>             hash   one evaluation: job, test set, progress, result
    distill:reference:<id>        hash   one reference set: name, owner, classes, counts, digest
    distill:references:<owner>    zset   one owner's reference set ids by creation time
    distill:worker:<name>         hash   one worker's status; expires unless it beats
    distill:workers:<queue>       set    names of the workers serving a queue (the registry)
    distill:teacher-labels:<sha>  str    a loaded teacher's class names (JSON), by their digest
    distill:gpu:<uuid>            str    the worker that holds a GPU (expires unless refreshed)
    distill:maintenance:<queue>   str    lock: the one process tending a queue right now
    distill:sweep:<queue>         str    set while a retention sweep of the store is not due
    distill:stats:counters        hash   jobs_submitted, jobs_<outcome>, images_*
    distill:stats:hist:<name>     hash   b<i>, sum, count of one histogram
    distill:stats:last_job        hash   images_per_second, seconds, images, finished_at

Store (relative to ``DISTILL_STORAGE``)::

    <id>.zip                      the archive
    <id>.preview.png              its contact sheet
    <id>.manifest.json            the manifest with evaluation results
    parts/<id>/<kkkk>.zip         one shard's part archive
    references/<id>.zip           a reference set, normalized (``core.references``)

RQ entries: a job in one piece is RQ job ``<id>``; a shard ``<id>-s<kkkk>``; the assembly
``<id>-assemble``; the removal of a job's parts ``<id>-cleanup``.
"""

from __future__ import annotations

PREFIX = "distill"

# RQ entry points, enqueued by name so the API never imports the model code. Renaming one
# strands the entries already queued under the old name (the README says how to drain them).
DISTILL_TASK = "worker.tasks.distill"
SHARD_TASK = "worker.tasks.distill_shard"
ASSEMBLE_TASK = "worker.tasks.assemble"
CLEANUP_TASK = "worker.tasks.discard_parts"
EVALUATE_TASK = "worker.evaluate.task.run_evaluation"
DELIVER_TASK = "service.webhooks.deliver"
#: The failure callbacks; they run in whichever process notices the failure (a worker, or
#: the maintenance loop of any process), so they live here, torch-free.
ON_FAILURE = "core.failures.on_failure"
ON_EVALUATION_FAILURE = "core.failures.on_evaluation_failure"

SHARDED = f"{PREFIX}:sharded"
COUNTERS = f"{PREFIX}:stats:counters"
LAST_JOB = f"{PREFIX}:stats:last_job"


def job(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def webhook_attempts(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:webhook"


def job_evaluations(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}:evals"


def jobs_index(owner: str) -> str:
    return f"{PREFIX}:jobs:{owner}"


def idempotency(owner: str, key_hash: str) -> str:
    return f"{PREFIX}:idem:{owner}:{key_hash}"


def shards(job_id: str) -> str:
    return f"{PREFIX}:shards:{job_id}"


def shards_done(job_id: str) -> str:
    return f"{PREFIX}:shards-done:{job_id}"


def evaluation(eval_id: str) -> str:
    return f"{PREFIX}:eval:{eval_id}"


def reference(reference_id: str) -> str:
    return f"{PREFIX}:reference:{reference_id}"


def references_index(owner: str) -> str:
    return f"{PREFIX}:references:{owner}"


def worker(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


def workers(queue: str) -> str:
    return f"{PREFIX}:workers:{queue}"


def teacher_labels(digest: str) -> str:
    return f"{PREFIX}:teacher-labels:{digest}"


def gpu(uuid: str) -> str:
    return f"{PREFIX}:gpu:{uuid}"


def maintenance_lock(queue: str) -> str:
    return f"{PREFIX}:maintenance:{queue}"


def sweep_due(queue: str) -> str:
    return f"{PREFIX}:sweep:{queue}"


def histogram(name: str) -> str:
    return f"{PREFIX}:stats:hist:{name}"


def rq_queue(queue: str) -> str:
    """RQ's list of waiting entries (``Queue.key``)."""
    return f"rq:queue:{queue}"


def rq_job(rq_id: str) -> str:
    """RQ's hash of one entry (``Job.key``); its ``status`` field is RQ's state."""
    return f"rq:job:{rq_id}"


# Storage keys.


def archive(job_id: str) -> str:
    return f"{job_id}.zip"


def preview(job_id: str) -> str:
    return f"{job_id}.preview.png"


def evaluated_manifest(job_id: str) -> str:
    return f"{job_id}.manifest.json"


def part(job_id: str, index: int) -> str:
    return f"parts/{job_id}/{index:04d}.zip"


def parts_prefix(job_id: str) -> str:
    return f"parts/{job_id}/"


REFERENCES_PREFIX = "references/"


def reference_archive(reference_id: str) -> str:
    return f"{REFERENCES_PREFIX}{reference_id}.zip"


# RQ entry ids.


def shard_entry(job_id: str, index: int) -> str:
    return f"{job_id}-s{index:04d}"


def assembly_entry(job_id: str) -> str:
    return f"{job_id}-assemble"


def cleanup_entry(job_id: str) -> str:
    return f"{job_id}-cleanup"


def parent_of(entry: str) -> str:
    """The job an RQ entry belongs to (``<id>-s0001`` and ``<id>-assemble`` belong to ``<id>``)."""
    return entry.split("-", 1)[0]
