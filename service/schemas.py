"""HTTP models: what the API answers. The request body is ``core.spec.DatasetSpec``."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, Field

from core.evaluations import EvaluationRequest
from core.spec import DatasetSpec
from core.states import JobState


class Progress(BaseModel):
    generated: int = Field(description="Images sampled from the model so far.")
    written: int = Field(description="Images (generated + augmented) written to the archive.")
    total: int | None = Field(
        description="Images the archive will hold; null for a time-budget job until it ends."
    )
    images_per_second: float | None = Field(
        description="Written images per second since the job started."
    )
    eta_seconds: float | None = Field(description="Estimated seconds until the archive is done.")
    ipc_reached: int | None = Field(
        None, description="Images per class the finished archive holds (all classes have >=)."
    )


class Timings(BaseModel):
    seconds_total: float = Field(description="From the job's start on a worker to its end.")
    seconds_sampling: float = Field(
        description="Of which: inside the model (batches); summed over shards."
    )
    seconds_assembling: float | None = Field(
        None, description="A sharded job: copying its parts into the archive."
    )


class WebhookAttempt(BaseModel):
    at: float = Field(description="Unix time of the attempt.")
    url: str
    status_code: int | None = None
    error: str | None = None


class WebhookStatus(BaseModel):
    url: str
    attempts: list[WebhookAttempt] = Field(default_factory=list)


class JobError(BaseModel):
    type: str = Field(description="worker_lost, timeout, disk_full, invalid_request or internal.")
    detail: str


class Archive(BaseModel):
    url: str
    size_bytes: int
    sha256: str


class Shard(BaseModel):
    """One piece of a sharded job: a run of its images, made by one worker."""

    index: int
    state: str = Field(description="queued, running, succeeded, failed or canceled.")
    first_class: int = Field(description="Index of the first class this shard makes images of.")
    last_class: int = Field(description="Index of the last class (inclusive).")
    images: int = Field(description="Output images (sampled + copies) this shard makes.")
    generated: int
    written: int
    worker: str | None = Field(None, description="Worker that ran or is running the shard.")
    attempts: int = 0
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    last_interruption: str | None = None
    error: str | None = None


class JobPublic(BaseModel):
    id: str
    state: JobState
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    request: DatasetSpec = Field(description="The request as accepted, defaults filled in.")
    progress: Progress
    queue_position: int | None = Field(
        None, description="Jobs ahead of this one (0 = next), while queued."
    )
    cancel_requested: bool = False
    worker: str | None = Field(None, description="Worker that ran or is running the job.")
    attempts: int = Field(0, description="Runs started; a job is re-run once if its worker dies.")
    last_interruption: str | None = Field(
        None, description="Why an earlier run stopped (worker lost or shut down), if one did."
    )
    error: JobError | None = None
    archive: Archive | None = None
    timings: Timings | None = Field(None, description="Set once the job succeeded.")
    webhook: WebhookStatus | None = Field(
        None, description="The callback URL and every delivery attempt so far."
    )
    shards: list[Shard] | None = Field(
        None,
        description="A large job runs as shards on many workers (DISTILL_SHARD_IMAGES); "
        "null for a job that runs in one piece.",
    )


class EvaluationProgress(BaseModel):
    run: int | None = None
    runs: int | None = None
    epoch: int | None = None
    epochs: int | None = None


class Evaluation(BaseModel):
    id: str
    job_id: str
    state: str = Field(description="queued, running, succeeded or failed.")
    testset: str
    request: EvaluationRequest
    progress: EvaluationProgress
    result: dict[str, Any] | None = Field(
        None, description="accuracies per run, mean, std, protocol, seconds, device."
    )
    error: str | None = None
    created_at: dt.datetime
    finished_at: dt.datetime | None = None


class EvaluationList(BaseModel):
    evaluations: list[Evaluation]


class JobList(BaseModel):
    jobs: list[JobPublic]
    next_cursor: str | None = Field(
        None, description="Pass as ?cursor= for the next page; null on the last page."
    )


class PresetClass(BaseModel):
    index: int
    label: str = Field(description="Readable name; the first synonym for WordNet classes.")
    wnid: str | None = None
    synonyms: list[str] = Field(default_factory=list)


class PresetSummary(BaseModel):
    name: str
    title: str
    num_classes: int
    image_size: int = Field(description="The dataset's native resolution (default image_size).")
    mean: list[float] = Field(description="Per-channel RGB mean on the [0, 1] scale.")
    std: list[float]
    first_class: str
    last_class: str


class PresetDetail(PresetSummary):
    classes: list[PresetClass] = Field(description="In class-index order.")


class PresetList(BaseModel):
    presets: list[PresetSummary]


class FieldError(BaseModel):
    field: str = Field(description="Dotted path of the offending field, e.g. augment.copies.")
    message: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details, served as application/problem+json."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] | None = None


class Health(BaseModel):
    status: str


class WorkerStatus(BaseModel):
    name: str
    state: str
    model: str
    alias: str | None = Field(None, description="The model alias it serves (GET /v1/models).")
    device: str | None = None
    images_per_second: float | None = Field(
        None, description="Output images per second of its last job or shard."
    )
    current_job: str | None = Field(None, description="RQ job it runs now (a job or a shard).")
    seconds_since_heartbeat: float
    batch_size: int | None = Field(
        None, description="Images per pipeline call (DISTILL_BATCH_SIZE, or the fastest found)."
    )
    decoders: list[str] = Field(
        default_factory=list, description="Decoders it has loaded: vae, and tiny when configured."
    )
    scorers: list[str] = Field(
        default_factory=list,
        description="select scorers it can run: reference, and clip when it loaded one.",
    )
    teachers: list[str] = Field(
        default_factory=list,
        description="Pretrained soft_labels teachers it loaded (DISTILL_TEACHERS), by name.",
    )
    compile: str | None = Field(None, description="off, regional or full (DISTILL_COMPILE).")
    compile_seconds: float | None = Field(
        None, description="Seconds its start-up spent compiling and warming up the graphs."
    )
    unavailable: dict[str, str] = Field(
        default_factory=dict,
        description="Optional parts it runs without, with why (tiny_decoder: requests for "
        "decoder 'tiny' get a 422; clip_scorer: for select scorer 'clip'; 'teacher <name>': "
        "for that soft_labels teacher).",
    )


class Readiness(BaseModel):
    status: str = Field(description="ready or unavailable")
    redis: str
    storage: str | None = Field(
        None, description="ok, or why the archive store cannot be used (unset if Redis is down)."
    )
    workers: list[WorkerStatus]
    detail: str
    models: dict[str, int] = Field(
        default_factory=dict,
        description="Ready workers per model alias: a model with 0 takes jobs that wait.",
    )


class ModelInfo(BaseModel):
    """One model this service serves."""

    alias: str = Field(description="What a request's model field names.")
    id: str = Field(description="Hub id or local directory the workers load.")
    family: str = Field(description="sdxl, sd, dit (class-conditional) or text2image.")
    pipeline: str = Field(description="The diffusers pipeline class it is loaded as.")
    conditioning: str = Field(description="text (prompts) or class (ImageNet-1K classes).")
    resolution: int = Field(description="Native sampling side in px.")
    steps: int = Field(description="Default denoising steps.")
    guidance_scale: float = Field(description="Default classifier-free guidance scale.")
    licence: str | None = Field(None, description="The licence its model card states, if known.")
    default: bool = Field(description="Whether a request without model gets this one.")
    ready_workers: int = Field(description="Workers with it loaded, beating now.")
    decoders: list[str] = Field(
        default_factory=list,
        description="Decoders its ready workers have loaded (vae; tiny where one loaded it).",
    )
    scorers: list[str] = Field(
        default_factory=list,
        description="select scorers its ready workers can run (reference; clip where one "
        "loaded it): a request for another is a 422.",
    )
    teachers: list[str] = Field(
        default_factory=list,
        description="Pretrained soft_labels teachers its ready workers loaded, by the name a "
        "request gives (besides reference, which needs a reference set): another is a 422.",
    )
    unavailable: dict[str, str] = Field(
        default_factory=dict,
        description="Optional parts no ready worker of it has, with why (e.g. tiny_decoder, "
        "clip_scorer, 'teacher <name>').",
    )


class ModelList(BaseModel):
    models: list[ModelInfo]
