"""Admission: a request checked against this deployment (model, decoder, reference set,
limits, idempotency), recorded, then enqueued on its model's queue by the task's dotted name.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable

from redis import Redis

from core import (
    keys,
    models,
    presets,
    queueing,
    records,
    references,
    shards,
    webhooks,
)
from core import workers as core_workers
from core.oversample import CLIP_PART
from core.settings import Settings
from core.soft_labels import REFERENCE, TEACHER_PART_PREFIX, UnmatchedTeacher, teacher_columns
from core.spec import DatasetSpec
from core.workers import WorkerInfo
from service.errors import (
    BadIdempotencyKey,
    InvalidField,
    QueueFull,
    TooManyImages,
)
from service.jobs import fetch, queue_for
from service.schemas import (
    JobPublic,
)


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
        given = {
            "prompt_template": "prompt_template" in spec.model_fields_set,
            "prompts": bool(spec.prompts),
            "prompt_strategy": spec.prompt_strategy != "template",
        }
        for name, asked in given.items():
            if asked:
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
    if spec.guidance_range is not None and entry.family not in ("sdxl", "sd"):
        raise InvalidField(
            f"guidance_scale: a [low, high] range draws a scale per image, which {what} "
            f"(family {entry.family}) does not take; give one number"
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
    """A method that starts from real images (or a soft-label teacher trained on them) needs
    a reference set of the caller's (or a named one) with a folder of enough images for every
    class: else a 422 naming ``reference`` and listing what is missing."""
    if spec.reference is None:
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
    # A set that only trains a network (the soft-label teacher, the select scorer) needs one
    # image of each class.
    need = 1 if spec.method == "generate" else spec.generated_per_class
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


def _missing_part(
    ready: list[WorkerInfo], loaded: Callable[[WorkerInfo], bool], part: str
) -> str | None:
    """Why (" (<reason>)", or "") when the model's ready workers all run without an optional
    part (``loaded`` says whether a worker has it; ``part`` names its ``unavailable`` entry,
    whose first reason is the why); None when one has it or none is ready yet (the job then
    waits, and a worker without the part fails it clearly)."""
    if not ready or any(loaded(w) for w in ready):
        return None
    why = next((w.unavailable[part] for w in ready if part in w.unavailable), "")
    return f" ({why})" if why else ""


def _check_optional_parts(redis: Redis, settings: Settings, spec: DatasetSpec) -> None:
    """``decoder: tiny``, ``select.scorer: clip`` or a pretrained ``soft_labels.teacher``
    where no ready worker of the model has that part is a 422 saying why. The model's
    workers are read once, and only for a request that asks for such a part."""
    teacher = spec.soft_labels.teacher if spec.soft_labels is not None else REFERENCE
    clip = spec.select is not None and spec.select.scorer == "clip"
    if spec.decoder != "tiny" and not clip and teacher == REFERENCE:
        return
    entry = models.lookup(settings, spec.model)
    live = core_workers.live(redis, entry.queue, heartbeat_ttl=settings.heartbeat_ttl)
    ready = [w for w in live if w.ready]
    if spec.decoder == "tiny":
        why = _missing_part(ready, lambda w: "tiny" in w.decoders, "tiny_decoder")
        if why is not None:
            raise InvalidField(
                f"decoder: no worker of {entry.alias} has a tiny decoder loaded{why}; use 'vae'"
            )
    if clip:
        why = _missing_part(ready, lambda w: "clip" in w.scorers, CLIP_PART)
        if why is not None:
            raise InvalidField(
                f"select.scorer: no worker of {entry.alias} has a CLIP model loaded{why}; use "
                "'reference' (with a reference set) or set DISTILL_CLIP_SCORER"
            )
    if teacher != REFERENCE:
        _check_teacher(redis, teacher, spec, ready=ready, alias=entry.alias)


def _check_teacher(
    redis: Redis, name: str, spec: DatasetSpec, *, ready: list[WorkerInfo], alias: str
) -> None:
    """A pretrained teacher that no ready worker of the model loaded, or that cannot label
    every class of the job (by the class names a worker published), is a 422 saying why."""
    why = _missing_part(ready, lambda w: name in w.teachers, f"{TEACHER_PART_PREFIX}{name}")
    if why is not None:
        loaded = sorted({t for w in ready for t in w.teachers})
        raise InvalidField(
            f"soft_labels.teacher: no worker of {alias} has the teacher {name!r} loaded{why}; "
            f"loaded teachers: {', '.join(loaded) or 'none'} (and 'reference', with a "
            "reference set); workers load them from DISTILL_TEACHERS"
        )
    holder = next((w for w in ready if name in w.teachers), None)
    labels = core_workers.teacher_labels(redis, holder.teachers[name]) if holder else None
    if labels is None:
        return  # no worker is ready yet: the worker checks the classes itself
    try:
        teacher_columns(name, labels, spec.classes())
    except UnmatchedTeacher as exc:
        raise InvalidField(str(exc)) from None


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
    queue = queue_for(redis, settings)
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
    _check_optional_parts(redis, settings, spec)
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
    waiting = queue_for(redis, own).count
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
