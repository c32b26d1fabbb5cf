"""Jobs as the API sees them: enqueue, fetch, cancel, list; RQ states mapped to ``JobState``.

The API talks to Redis only. It enqueues the worker's task by its dotted name, so this process
never imports torch or diffusers.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable

from redis import Redis
from rq import Callback, Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from core import (
    evaluations,
    keys,
    models,
    presets,
    queueing,
    records,
    references,
    shards,
    states,
    webhooks,
)
from core import workers as core_workers
from core.evaluations import EvaluationRequest
from core.records import ShardRecord, Snapshot
from core.settings import Settings
from core.spec import DatasetSpec
from core.states import ErrorType, JobState
from service.auth import PUBLIC
from service.downloads import StoredFile
from service.errors import (
    ArchiveGone,
    BadIdempotencyKey,
    InvalidCursor,
    InvalidField,
    JobConflict,
    JobExpired,
    JobNotFound,
    QueueFull,
    TooManyImages,
)
from service.schemas import (
    Archive,
    Evaluation,
    EvaluationProgress,
    JobError,
    JobPublic,
    Progress,
    Shard,
    Timings,
    WebhookStatus,
)

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")
#: Most index entries one page request reads while filtering by state.
MAX_SCAN = 2000


def _queue(redis: Redis, settings: Settings) -> Queue:
    return Queue(settings.queue_name, connection=redis)


def _time(value: float | str | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(float(value), tz=dt.UTC) if value else None


def resolve_model(settings: Settings, spec: DatasetSpec) -> tuple[models.ModelEntry, DatasetSpec]:
    """The served model a request names, and the request with the model's defaults filled in
    (alias, steps, guidance), so that the record says what ran. 422 naming the field for a
    model this service does not serve, or a request that model cannot take."""
    try:
        entry = models.lookup(settings, spec.model)
    except KeyError as exc:
        raise InvalidField(f"model: {exc.args[0]}") from None
    what = f"model {entry.alias!r} ({entry.id})"
    if entry.class_conditional and not spec.real:
        for name in ("prompt_template", "prompts"):
            if name in spec.model_fields_set and (name != "prompts" or spec.prompts):
                raise InvalidField(
                    f"{name}: {what} is class-conditional: it is conditioned on ImageNet-1K "
                    "class ids and takes no prompts"
                )
        try:
            presets.imagenet_ids(spec.classes())
        except presets.NotImageNet as exc:
            where = (
                f"preset: {spec.preset!r} has classes that are not ImageNet-1K ones: "
                if (spec.preset)
                else "labels: "
            )
            raise InvalidField(
                f"{where}{what} takes ImageNet-1K classes (wnids or names): {exc}"
            ) from None
        native = entry.defaults.resolution
        if spec.resolution is not None and spec.resolution != native:
            raise InvalidField(f"resolution: {what} samples at {native} px only")
    if spec.method == "prototypes" and entry.family not in ("sdxl", "sd"):
        raise InvalidField(
            f"method: prototypes runs image-to-image from VAE latents, which {what} "
            f"(family {entry.family}) does not do; use an SDXL or SD model"
        )
    if spec.decoder == "tiny" and entry.family != "sdxl":
        raise InvalidField(
            f"decoder: the tiny decoder decodes SDXL latents; {what} is of family "
            f"{entry.family}: use 'vae'"
        )
    resolved = spec.model_copy(
        update={
            "model": entry.alias,
            "steps": spec.steps or entry.defaults.steps,
            "guidance_scale": (
                entry.defaults.guidance_scale
                if spec.guidance_scale is None
                else spec.guidance_scale
            ),
        }
    )
    return entry, resolved


def _check_reference(redis: Redis, settings: Settings, spec: DatasetSpec, owner: str) -> None:
    """A method that starts from real images needs a reference set of the caller's (or a
    named one) with a folder of enough images for every class: else a 422 naming
    ``reference`` and listing what is missing."""
    if spec.method == "generate":
        return
    counts = references.folder_counts(
        redis, settings.references_dir, owner=owner, **spec.reference_source()
    )
    if counts is None:
        known = ", ".join(references.named_sets(settings.references_dir)) or "none"
        raise InvalidField(
            f"reference: no reference set {spec.reference!r} of yours, and no named set of "
            f"that name (named sets: {known})"
        )
    classes = [(c.label, c.wnid) for c in spec.classes()]
    try:
        folders = references.match(classes, counts)
    except ValueError as exc:
        raise InvalidField(f"reference: {exc}") from None
    need = spec.generated_per_class
    short = [
        f"{label} ({folder}: {counts[folder]})"
        for (label, _), folder in zip(classes, folders, strict=True)
        if counts[folder] < need
    ]
    if short:
        what = "prototypes" if spec.method == "prototypes" else "images"
        raise InvalidField(
            f"reference: {spec.method} needs {need} {what} per class "
            f"(ceil(ipc / (copies + 1))), but {len(short)} class(es) have fewer images: "
            + ", ".join(short)
        )


def settings_for_job(settings: Settings, alias: str | None) -> Settings:
    """``settings`` scoped to the model alias a recorded job runs on (its queue, workers)."""
    try:
        entry = models.lookup(settings, alias)
    except KeyError:
        entry = models.default(settings)  # a model since removed from the deployment
    return models.scoped(settings, entry)


def _check_decoder(redis: Redis, settings: Settings, spec: DatasetSpec) -> None:
    """``decoder: tiny`` where the model's ready workers all run without one is a 422 saying
    why (with no ready worker yet the job waits; a worker without one fails it clearly)."""
    if spec.decoder != "tiny":
        return
    entry = models.lookup(settings, spec.model)
    ready = [
        w
        for w in core_workers.live(redis, entry.queue, heartbeat_ttl=settings.heartbeat_ttl)
        if w.ready
    ]
    if ready and not any("tiny" in w.decoders for w in ready):
        why = next(
            (w.unavailable["tiny_decoder"] for w in ready if "tiny_decoder" in w.unavailable), ""
        )
        raise InvalidField(
            f"decoder: no worker of {entry.alias} has a tiny decoder loaded"
            + (f" ({why})" if why else "")
            + "; use 'vae'"
        )


def _check_limits(settings: Settings, spec: DatasetSpec) -> None:
    """What this deployment refuses (422 naming the field): webhooks it cannot sign or send
    there, a decoder it does not have, more images than it allows."""
    if spec.callback_url:
        if settings.webhook_secret is None:
            raise InvalidField(
                "callback_url: this service has no DISTILL_WEBHOOK_SECRET, so it sends no webhooks"
            )
        try:
            webhooks.check_destination(
                spec.callback_url, allow_private=settings.webhook_allow_private
            )
        except webhooks.WebhookRefused as exc:
            raise InvalidField(f"callback_url: {exc}") from None
    if spec.decoder == "tiny" and settings.tiny_decoder is None:
        raise InvalidField(
            "decoder: this service has no tiny decoder (DISTILL_TINY_DECODER=none); use 'vae'"
        )
    if spec.total_images > settings.max_job_images:
        raise TooManyImages(
            f"ipc: classes x ipc = {spec.total_images} images exceeds this service's limit of "
            f"{settings.max_job_images} (DISTILL_MAX_JOB_IMAGES)"
        )


def _claim_idempotency(
    redis: Redis,
    settings: Settings,
    *,
    owner: str,
    key: str,
    payload: dict[str, object],
    job_id: str,
) -> tuple[str, str | None]:
    """Claim ``key`` for ``job_id``; returns (the Redis key, the earlier job's id on a replay).

    A replay with another body is a 422.
    """
    body_hash = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    redis_key = keys.idempotency(owner, hashlib.sha256(key.encode()).hexdigest())
    claim = f"{job_id} {body_hash}"
    if redis.set(redis_key, claim, nx=True, ex=settings.result_ttl + records.TOMBSTONE_S):
        return redis_key, None
    stored: bytes = redis.get(redis_key) or b""  # type: ignore[assignment]
    first_id, _, first_hash = stored.decode().partition(" ")
    if first_hash != body_hash:
        raise BadIdempotencyKey("Idempotency-Key was already used with a different request body")
    return redis_key, first_id


def _enqueue(
    redis: Redis,
    settings: Settings,
    spec: DatasetSpec,
    *,
    payload: dict[str, object],
    job_id: str,
    owner: str,
) -> None:
    """Put a recorded job on the queue: its first shards, or the job in one piece."""
    pieces = shards.plan(spec, shard_images=settings.shard_images, batch_size=settings.batch_size)
    if pieces:
        shards.create(redis, job_id, pieces, queue=settings.queue_name)
        shards.top_up(redis, settings, job_id)
        return
    queue = _queue(redis, settings)
    queue.enqueue(
        keys.DISTILL_TASK,
        payload,
        job_id=job_id,
        description=f"distill {spec.preset or len(spec.classes())} classes",
        **queueing.enqueue_options(settings),
    )
    queueing.place(redis, queue.key, job_id, owner)


def submit(
    redis: Redis,
    settings: Settings,
    spec: DatasetSpec,
    *,
    owner: str,
    idempotency_key: str | None,
    archive_url_for: Callable[[str], str],
) -> tuple[JobPublic, bool]:
    """Accept a job: record it, then enqueue it for the next free worker.

    Returns the job and whether it was created now (False: an ``Idempotency-Key`` replay).
    """
    entry, spec = resolve_model(settings, spec)
    _check_limits(settings, spec)
    _check_decoder(redis, settings, spec)
    _check_reference(redis, settings, spec, owner)
    payload = spec.model_dump(mode="json")
    job_id = uuid.uuid4().hex
    idem_key = None
    if idempotency_key is not None:
        idem_key, first_id = _claim_idempotency(
            redis, settings, owner=owner, key=idempotency_key, payload=payload, job_id=job_id
        )
        if first_id is not None:
            return fetch(
                redis, settings, first_id, owner=owner, archive_url=archive_url_for(first_id)
            ), False
    own = models.scoped(settings, entry)
    waiting = _queue(redis, own).count
    if waiting >= settings.max_queued_jobs:
        if idem_key:
            redis.delete(idem_key)
        raise QueueFull(
            f"{waiting} jobs are waiting (limit {settings.max_queued_jobs}); retry later",
            retry_after=30,
        )
    extra: dict[str, str | int] = {"archive_url": archive_url_for(job_id)}
    if spec.callback_url:
        extra.update(webhooks.record_fields(settings, spec.callback_url))
    records.create(
        redis,
        job_id,
        request=payload,
        total=spec.total_images,
        ttl=settings.result_ttl,
        owner=owner,
        extra=extra,
    )
    try:
        _enqueue(redis, own, spec, payload=payload, job_id=job_id, owner=owner)
    except Exception:
        records.forget(redis, job_id, owner)
        if idem_key:
            redis.delete(idem_key)
        raise
    return fetch(redis, settings, job_id, owner=owner, archive_url=archive_url_for(job_id)), True


def _record(redis: Redis, settings: Settings, job_id: str, owner: str) -> Snapshot:
    """The job's snapshot; 404 when unknown or another owner's, 410 when expired."""
    found = (
        records.snapshot(redis, job_id, queue=models.queues(settings))
        if _JOB_ID.match(job_id)
        else None
    )
    return _visible(found, job_id, owner)


def _visible(found: Snapshot | None, job_id: str, owner: str) -> Snapshot:
    # Another key's job is indistinguishable from a missing one.
    if found is None or not found.record.request or (found.record.owner or PUBLIC) != owner:
        raise JobNotFound(f"no job with id {job_id!r}")
    if found.record.expired():
        raise JobExpired(
            f"job {job_id} ended more than its retention ({found.record.ttl} s) ago; "
            "its archive has been removed"
        )
    return found


def fetch(
    redis: Redis, settings: Settings, job_id: str, *, owner: str, archive_url: str
) -> JobPublic:
    """The public view of one job (404 unknown, 410 expired): one Redis round trip."""
    return view(_record(redis, settings, job_id, owner), archive_url=archive_url)


def _state(snap: Snapshot) -> tuple[JobState, JobError | None]:
    record = snap.record
    error = (
        JobError(type=record.error_type, detail=record.error_detail or "")
        if record.error_type
        else None
    )
    if record.outcome is not None:
        return record.outcome, error
    if record.sharded:
        return (JobState.running if record.started_at else JobState.queued), error
    if snap.rq_status is None:
        lost = JobError(type=ErrorType.lost, detail="the job's queue entry expired or was removed")
        return JobState.failed, error or lost
    state = states.from_rq(snap.rq_status)
    if state is JobState.failed and error is None:
        error = JobError(type=ErrorType.internal, detail="the job failed")
    return state, error


def _progress(snap: Snapshot, state: JobState, spec: DatasetSpec) -> Progress:
    record = snap.record
    written, generated = record.written, record.generated
    if record.sharded and record.outcome is None:
        written = sum(s.written for s in snap.shards)
        generated = sum(s.generated for s in snap.shards)
    total: int | None = record.total or None
    if total is None and state is JobState.succeeded:
        total = written  # a time-budget job: its size is known once it ends
    rate = eta = None
    if record.started_at and state is JobState.running:
        elapsed = max(time.time() - record.started_at, 1e-6)
        rate = written / elapsed if written else None
        if spec.budget_seconds is not None:
            eta = max(spec.budget_seconds - elapsed, 0.0)
        elif rate and total is not None:
            eta = (total - written) / rate
    elif record.started_at and record.finished_at:
        elapsed = max(record.finished_at - record.started_at, 1e-6)
        rate = written / elapsed if written else None
    return Progress(
        generated=generated,
        written=written,
        total=total,
        images_per_second=round(rate, 3) if rate else None,
        eta_seconds=round(eta, 1) if eta is not None else None,
        ipc_reached=record.ipc_reached,
    )


def view(snap: Snapshot, *, archive_url: str) -> JobPublic:
    """The public view of a job, from its snapshot alone."""
    record = snap.record
    state, error = _state(snap)
    spec = DatasetSpec.model_validate_json(record.request)
    archive = None
    if state is JobState.succeeded and record.archive_sha256 and record.archive_size is not None:
        archive = Archive(
            url=archive_url, size_bytes=record.archive_size, sha256=record.archive_sha256
        )
    timings = None
    if record.seconds_total is not None:
        timings = Timings(
            seconds_total=record.seconds_total,
            seconds_sampling=record.seconds_sampling or 0.0,
            seconds_assembling=record.seconds_assembling,
        )
    return JobPublic(
        id=record.id,
        state=state,
        created_at=_time(record.created_at) or dt.datetime.now(dt.UTC),
        started_at=_time(record.started_at),
        finished_at=_time(record.finished_at),
        request=spec,
        progress=_progress(snap, state, spec),
        queue_position=snap.queue_position if state is JobState.queued else None,
        cancel_requested=record.cancel_requested,
        worker=record.worker,
        attempts=(
            max((s.attempts for s in snap.shards), default=0) if record.sharded else record.attempts
        ),
        shards=[_shard_view(spec, s) for s in snap.shards] if record.sharded else None,
        last_interruption=record.last_interruption,
        webhook=(
            WebhookStatus.model_validate(
                {"url": record.callback_url, "attempts": snap.webhook_attempts}
            )
            if record.callback_url
            else None
        ),
        error=error,
        archive=archive,
        timings=timings,
    )


def _shard_view(request: DatasetSpec, shard: ShardRecord) -> Shard:
    first, last = shards.describe(request, shard)
    return Shard(
        index=shard.index,
        state=shard.state.value,
        first_class=first,
        last_class=last,
        images=shard.images,
        generated=shard.generated,
        written=shard.written,
        worker=shard.worker,
        attempts=shard.attempts,
        started_at=_time(shard.started_at),
        finished_at=_time(shard.finished_at),
        last_interruption=shard.last_interruption,
        error=shard.error,
    )


def wait_until_terminal(
    redis: Redis,
    settings: Settings,
    job: JobPublic,
    *,
    owner: str,
    seconds: float,
    archive_url: str,
) -> JobPublic:
    """Wait until the job ends or ``seconds`` pass; returns its latest view.

    Checks one hash field every 20 ms (a cheap Redis call), builds the full view once at the end.
    """
    deadline = time.monotonic() + seconds
    key = keys.job(job.id)
    checks = 0
    while not job.state.is_terminal and time.monotonic() < deadline:
        time.sleep(min(0.02, max(deadline - time.monotonic(), 0)))
        checks += 1
        # Every second, the full view too (a job whose queue entry vanished is failed).
        if redis.hexists(key, "outcome") or checks % 50 == 0:
            job = fetch(redis, settings, job.id, owner=owner, archive_url=archive_url)
    return job


def cancel(
    redis: Redis, settings: Settings, job_id: str, *, owner: str, archive_url: str
) -> JobPublic:
    """Cancel a job: at once when queued, between batches when running."""
    current = fetch(redis, settings, job_id, owner=owner, archive_url=archive_url)
    if current.state in (JobState.succeeded, JobState.failed):
        raise JobConflict(f"job {job_id} already {current.state.value}; nothing to cancel")
    if current.state is JobState.canceled:
        return current
    # The flag first: a worker that dequeues the job right now sees it before sampling.
    records.request_cancel(redis, job_id)
    if current.shards is not None:
        # Queued shards are dropped now; running ones stop between batches, and the last
        # to stop records the cancel. With none running, it is canceled here.
        shards.cancel(redis, settings_for_job(settings, current.request.model), job_id)
        return fetch(redis, settings, job_id, owner=owner, archive_url=archive_url)
    try:
        rq_job: Job | None = Job.fetch(job_id, connection=redis)
    except NoSuchJobError:
        rq_job = None
    if rq_job is not None and rq_job.get_status() != JobStatus.STARTED:
        try:
            rq_job.cancel()
        except InvalidJobOperation:
            pass  # it started or ended meanwhile; the flag stops it between batches
        else:
            records.finish(redis, job_id, outcome=JobState.canceled)
    return fetch(redis, settings, job_id, owner=owner, archive_url=archive_url)


def _encode_cursor(score: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{score!r}:{job_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        score, _, job_id = raw.partition(":")
        return float(score), job_id
    except (ValueError, UnicodeDecodeError):
        raise InvalidCursor("cursor is not one this API returned") from None


def list_page(
    redis: Redis,
    settings: Settings,
    *,
    owner: str,
    state: JobState | None,
    limit: int,
    cursor: str | None,
    archive_url_for: Callable[[str], str],
) -> tuple[list[JobPublic], str | None]:
    """One page of the owner's jobs, newest first, optionally in one state.

    Returns the jobs and the cursor of the next page (None at the end). Without a state
    filter a page is one index read and one pipeline.
    """
    index = keys.jobs_index(owner)
    high: float | str = "+inf"
    after_id = None
    if cursor:
        high, after_id = _decode_cursor(cursor)
    found: list[JobPublic] = []
    scanned = 0
    while len(found) < limit and scanned < MAX_SCAN:
        want = limit - len(found)
        rows: list[tuple[bytes, float]] = redis.zrevrangebyscore(  # type: ignore[assignment]
            index,
            high,
            "-inf",
            start=0,
            num=want + 1 if state is None else want + 50,
            withscores=True,
        )
        fresh = [
            (member.decode(), score)
            for member, score in rows
            # Same-score members come in reverse id order: skip those already returned.
            if not (after_id is not None and score == high and member.decode() >= after_id)
        ]
        if not fresh:
            return found, None
        batch = fresh[:want] if state is None else fresh
        snaps = records.snapshots(redis, [i for i, _ in batch], queue=models.queues(settings))
        for (job_id, score), snap in zip(batch, snaps, strict=True):
            scanned += 1
            high, after_id = score, job_id
            try:
                job = view(_visible(snap, job_id, owner), archive_url=archive_url_for(job_id))
            except (JobNotFound, JobExpired):
                continue
            if state is None or job.state is state:
                found.append(job)
                if len(found) == limit:
                    break
        if state is None and len(rows) <= want:
            return found, None  # the index has nothing older
    return found, _encode_cursor(float(high), str(after_id))


def preview_file(redis: Redis, settings: Settings, job_id: str, *, owner: str) -> StoredFile:
    """The job's contact sheet in storage; 404 until it exists (the job succeeded)."""
    _record(redis, settings, job_id, owner)
    found = StoredFile.find(settings, keys.preview(job_id))
    if found is None:
        raise JobNotFound(f"job {job_id} has no preview (yet): it appears when the job succeeds")
    return found


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
        created_at=_time(record["created_at"]) or dt.datetime.now(dt.UTC),
        finished_at=_time(record.get("finished_at")),
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
    eval_id = uuid.uuid4().hex
    evaluations.create(redis, eval_id, job_id=job_id, request=request, ttl=settings.result_ttl)
    _queue(redis, settings).enqueue(
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
    _record(redis, settings, job_id, owner)
    record = evaluations.read(redis, eval_id) if _JOB_ID.match(eval_id) else {}
    if not record or record.get("job_id") != job_id:
        raise JobNotFound(f"job {job_id} has no evaluation {eval_id!r}")
    return _evaluation_view(eval_id, record)


def list_evaluations(
    redis: Redis, settings: Settings, job_id: str, *, owner: str
) -> list[Evaluation]:
    _record(redis, settings, job_id, owner)
    views = []
    for eval_id in evaluations.for_job(redis, job_id):
        record = evaluations.read(redis, eval_id)
        if record:
            views.append(_evaluation_view(eval_id, record))
    return views


def archive_file(redis: Redis, settings: Settings, job_id: str, *, owner: str) -> StoredFile:
    """The finished archive in storage; 409 until the job succeeded, 410 if it was removed."""
    job = fetch(redis, settings, job_id, owner=owner, archive_url="")
    if job.state is not JobState.succeeded or job.archive is None:
        raise JobConflict(
            f"job {job_id} is {job.state.value}; the archive exists once it succeeded"
        )
    found = StoredFile.find(settings, keys.archive(job_id), sha256=job.archive.sha256)
    if found is None:
        raise ArchiveGone(f"the archive of job {job_id} is no longer in storage")
    return found
