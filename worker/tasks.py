"""The RQ job: ``distill(payload)`` turns one DatasetSpec into one archive on disk.

prompts -> model (batched, one seed per image) -> resize -> augmented copies -> archive.
Progress is saved after every batch and a cancel request is honoured between batches.

Two ways to size a job: ``ipc`` (a fixed count per class, sampled class by class) or
``budget_seconds`` (rounds of one image per class until the budget would be overrun, so every
class ends within one sampled image of the others).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import get_current_job

from core import presets, records, shards
from core.errors import InsufficientSpace
from core.presets import ClassInfo
from core.spec import DatasetSpec
from core.storage import Storage, open_storage
from worker import engine, postprocess, runtime
from worker.archive import ArchiveInfo, ArchiveWriter, class_dir, decode_png
from worker.augment import source_size
from worker.generator import Generator

log = logging.getLogger(__name__)
T = TypeVar("T")

_VERSIONED = (
    "distill-service",
    "torch",
    "diffusers",
    "transformers",
    "albumentations",
    "opencv-python-headless",
    "numpy",
    "pillow",
)


@cache
def library_versions() -> dict[str, str]:
    """Versions of what made the archive; looked up once per worker process."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat()


#: How long a running job waits for Redis to come back before it gives up.
REDIS_PATIENCE_S = 120.0


def patiently(call: Callable[[], T]) -> T:
    """Run a Redis call, retrying through a Redis restart for up to ``REDIS_PATIENCE_S``."""
    deadline = time.monotonic() + REDIS_PATIENCE_S
    delay = 0.2
    while True:
        try:
            return call()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("redis unavailable (%s); retrying in %.1f s", exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


#: Free space kept on the data volume beyond a job's estimate.
SPACE_MARGIN_BYTES = 16 * 2**20


def estimate_bytes(spec: DatasetSpec, images: int | None = None) -> int:
    """An upper estimate of a fixed-ipc job's archive size (0 for a time-budget job), or of
    ``images`` of its images (one shard's).

    PNG of noisy pixels is about the raw size; zip headers add about 100 bytes a member.
    """
    images = spec.total_images if images is None else images
    raw = spec.size * spec.size * 3
    total = 0
    if "imagefolder" in spec.formats:
        total += images * (raw + 300)
    if "tensors" in spec.formats:
        total += images * raw * (5 if spec.preset else 1)
    return total


def check_space(spec: DatasetSpec, directory: Path, *, images: int | None = None) -> None:
    """Fail before sampling when the archive cannot fit (ENOSPC is still caught on write)."""
    directory.mkdir(parents=True, exist_ok=True)
    needed = estimate_bytes(spec, images) + SPACE_MARGIN_BYTES
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise InsufficientSpace(
            f"the archive needs about {needed / 2**20:.1f} MiB but the data volume has "
            f"{free / 2**20:.1f} MiB free"
        )


class RedisHooks:
    """Progress into the job's record (or one shard's); the job's cancel flag or end and the
    worker's shutdown are checked between batches."""

    def __init__(self, redis: Redis, job_id: str, *, progress_key: str | None = None) -> None:
        self.redis = redis
        self.job_id = job_id
        self.progress_key = progress_key or records.job_key(job_id)

    def should_cancel(self) -> bool:
        # A shard also stops when another shard's failure ended the job.
        return patiently(lambda: records.ending(self.redis, self.job_id))

    def should_stop(self) -> bool:
        return runtime.stopping()

    def on_batch(self, *, generated: int, written: int, added: tuple[int, int]) -> None:
        patiently(
            lambda: records.save_progress(
                self.redis, self.progress_key, generated=generated, written=written, added=added
            )
        )


def _current_job() -> Any:
    job = get_current_job()
    if job is None:
        raise RuntimeError("this runs as an RQ job, inside `python -m worker`")
    return job


def _as_job(
    body: Callable[[Any], dict[str, Any]], requeue: Callable[[Any, str], None]
) -> dict[str, Any]:
    """Run ``body(job)`` for the current RQ job with the shared fault rules.

    A worker shutdown (``Interrupted``) records the re-queue (``requeue(job, reason)``) and
    has the worker put the job back at the front. Any other error fails it at once: the
    job's own error would repeat on another worker, so only a lost worker (RQ's
    abandoned-job cleanup) uses the retries.
    """
    job = _current_job()
    try:
        return body(job)
    except engine.Interrupted:
        requeue(job, f"worker {runtime.current().worker_name} shut down")
        runtime.mark_interrupted(job.id)
        return {"interrupted": True}
    except Exception:
        job.retries_left = 0
        raise


def distill(payload: dict[str, Any]) -> dict[str, Any]:
    """Generate the dataset ``payload`` describes; returns the archive's key, size and digest."""
    return _as_job(
        lambda job: _distill(job, payload),
        lambda job, reason: records.requeued(job.connection, job.id, reason=reason),
    )


def _targets(store: Storage, key: str, scratch: Path) -> tuple[Path, Path]:
    """(final, partial) local files for an archive stored under ``key``.

    A directory store gets both beside the key's own path (one rename publishes it); an object
    store gets them in the worker's scratch directory, uploaded once complete.
    """
    local = store.local_path(key)
    if local is not None:
        return local, local.with_name(f".{local.name}.part")
    stem = key.replace("/", "-")
    return scratch / f".{stem}.upload", scratch / f".{stem}.part"


def _distill(job: Any, payload: dict[str, Any]) -> dict[str, Any]:
    rt = runtime.current()
    settings = rt.settings
    redis: Redis = job.connection
    spec = DatasetSpec.model_validate(payload)
    generator = rt.generator
    store = open_storage(settings)
    key = records.archive_key(job.id)
    final, partial = _targets(store, key, settings.data_dir)
    patiently(lambda: records.mark_started(redis, job.id, worker=rt.worker_name, partial=partial))
    check_space(spec, partial.parent)

    started = time.time()
    with ArchiveWriter(final=final, partial=partial) as writer:
        outputs = engine.Outputs(spec=spec, writer=writer)
        run = engine.run(
            spec,
            generator,
            outputs,
            batch_size=settings.batch_size,
            pool=rt.pool,
            workers=settings.postprocess_workers,
            hooks=RedisHooks(redis, job.id),
        )
        if run is None or patiently(lambda: records.cancel_requested(redis, job.id)):
            done = {"written": outputs.count}
            patiently(lambda: records.finish(redis, job.id, outcome=records.CANCELED, fields=done))
            return {"canceled": True}
        tensors = outputs.write_tensors()
        sheet = outputs.preview.render(spec.size)
        writer.add_file("preview.png", sheet)
        finished = time.time()
        manifest = _manifest(spec, generator=generator, outputs=outputs, tensors=tensors, run=run)
        info = writer.commit(manifest)
    _publish(store, key, info.path, sheet, job_id=job.id)
    runtime.record_rate(outputs.count / max(finished - started, 1e-6))

    return _succeed(
        redis,
        job.id,
        key=key,
        info=info,
        outputs=outputs,
        generated=run["generated"],
        seconds_sampling=run["seconds_sampling"],
        seconds_total=finished - started,
    )


def _succeed(
    redis: Redis,
    job_id: str,
    *,
    key: str,
    info: ArchiveInfo,
    outputs: engine.Outputs,
    generated: int,
    seconds_sampling: float,
    seconds_total: float,
    **extra: str | int | float,
) -> dict[str, Any]:
    """Record a published archive as the job's success; returns the task's result."""
    fields: dict[str, str | int | float] = {
        "archive_key": key,
        "archive_size": info.size_bytes,
        "archive_sha256": info.sha256,
        "written": outputs.count,
        "generated": generated,
        "ipc_reached": min(outputs.per_class.get(c.index, 0) for c in outputs.spec.classes()),
        "seconds_sampling": round(seconds_sampling, 3),
        "seconds_total": round(seconds_total, 3),
        **extra,
    }
    patiently(lambda: records.finish(redis, job_id, outcome=records.SUCCEEDED, fields=fields))
    return {"key": key, "size_bytes": info.size_bytes, "sha256": info.sha256}


def _publish(store: Storage, key: str, local: Path, sheet: bytes, *, job_id: str) -> None:
    """Put a committed archive and its contact sheet (shown without the zip) in the store."""
    patiently(lambda: store.put(key, local))
    patiently(lambda: store.put_bytes(records.preview_key(job_id), sheet))


def distill_shard(job_id: str, index: int) -> dict[str, Any]:
    """Make one shard of a sharded job into a part archive in the store."""
    return _as_job(
        lambda job: _distill_shard(job, job_id, index),
        lambda job, reason: shards.mark_requeued(job.connection, job_id, index, reason=reason),
    )


def _distill_shard(job: Any, job_id: str, index: int) -> dict[str, Any]:
    rt = runtime.current()
    settings = rt.settings
    redis: Redis = job.connection
    record = patiently(lambda: records.read(redis, job_id))
    if not record or records.ending_record(record):
        shards.mark_stopped(redis, job_id, index, state=shards.CANCELED)
        settle(redis, job_id)
        return {"canceled": True}
    spec = DatasetSpec.model_validate(json.loads(record["request"]))
    # A part always holds PNGs (lossless): assembly decodes them for tensor formats.
    part_spec = spec.model_copy(update={"formats": ["imagefolder"]})
    bounds = shards.read(redis, job_id, index)
    start, stop = int(bounds["start"]), int(bounds["stop"])
    store = open_storage(settings)
    key = shards.part_key(job_id, index)
    final, partial = _targets(store, key, settings.data_dir)
    patiently(
        lambda: shards.mark_running(redis, job_id, index, worker=rt.worker_name, partial=partial)
    )
    check_space(spec, partial.parent, images=int(bounds["images"]))
    started = time.time()
    hooks = RedisHooks(redis, job_id, progress_key=shards.shard_key(job_id, index))
    with ArchiveWriter(final=final, partial=partial) as writer:
        outputs = engine.Outputs(spec=part_spec, writer=writer)
        run = engine.run(
            part_spec,
            rt.generator,
            outputs,
            batch_size=settings.batch_size,
            pool=rt.pool,
            workers=settings.postprocess_workers,
            hooks=hooks,
            items=engine.fixed_plan(spec)[start:stop],
        )
        if run is None or hooks.should_cancel():
            shards.mark_stopped(redis, job_id, index, state=shards.CANCELED)
            settle(redis, job_id)
            return {"canceled": True}
        info = writer.commit(
            {
                "format": "distill-service/part-v1",
                "job_id": job_id,
                "shard": index,
                "samples": [start, stop],
                "images": outputs.count,
            }
        )
    size = patiently(lambda: store.put(key, info.path))
    seconds = time.time() - started
    runtime.record_rate(outputs.count / max(seconds, 1e-6))
    patiently(
        lambda: shards.mark_done(
            redis,
            job_id,
            index,
            fields={
                "written": outputs.count,
                "generated": run["generated"],
                "seconds_sampling": round(run["seconds_sampling"], 3),
                "part_size": size,
            },
        )
    )
    if patiently(lambda: records.ending(redis, job_id)):
        settle(redis, job_id)
        return {"canceled": True}
    patiently(lambda: shards.top_up(redis, settings, job_id))
    patiently(lambda: shards.maybe_assemble(redis, settings, job_id))
    return {"key": key, "size_bytes": size, "images": outputs.count}


def settle(redis: Redis, job_id: str) -> None:
    """A canceled (or failed) sharded job whose shards have all stopped: record the end and
    remove its parts."""
    if patiently(lambda: shards.end_if_stopped(redis, job_id)):
        discard_parts(job_id)


def discard_parts(job_id: str) -> int:
    """Remove a sharded job's part archives from the store; returns how many."""
    store = open_storage(runtime.current().settings)
    removed = patiently(lambda: store.delete_prefix(shards.parts_prefix(job_id)))
    shards.forget(_current_job().connection, job_id)
    return removed


def assemble(job_id: str) -> dict[str, Any]:
    """Copy every shard's part, in shard order, into the job's archive; publish it."""
    # Assembly does not check for shutdown: it finishes, then the worker stops.
    return _as_job(lambda job: _assemble(job, job_id), lambda job, reason: None)


def _assemble(job: Any, job_id: str) -> dict[str, Any]:
    rt = runtime.current()
    settings = rt.settings
    redis: Redis = job.connection
    record = patiently(lambda: records.read(redis, job_id))
    if not record or "outcome" in record:
        return {"skipped": True}
    spec = DatasetSpec.model_validate(json.loads(record["request"]))
    count = int(record["shards"])
    store = open_storage(settings)
    key = records.archive_key(job_id)
    final, partial = _targets(store, key, settings.data_dir)
    patiently(
        lambda: redis.hset(
            records.job_key(job_id),
            mapping={"assembly": shards.RUNNING, "worker": rt.worker_name, "partial": str(partial)},
        )
    )
    check_space(spec, partial.parent)
    started = time.perf_counter()
    classes = spec.classes()
    rows = shards.read_all(redis, job_id, count)
    with ArchiveWriter(final=final, partial=partial) as writer:
        outputs = engine.Outputs(spec=spec, writer=writer)
        for index in range(count):
            if patiently(lambda: records.ending(redis, job_id)):
                patiently(lambda: redis.hset(records.job_key(job_id), "assembly", shards.CANCELED))
                settle(redis, job_id)
                return {"canceled": True}
            with store.local_copy(shards.part_key(job_id, index)) as path:
                _copy_part(path, outputs, classes)
        tensors = outputs.write_tensors()
        sheet = outputs.preview.render(spec.size)
        writer.add_file("preview.png", sheet)
        run = {
            "generated": sum(int(r.get("generated", 0)) for r in rows),
            "source_size": source_size(spec.augment, image_size=spec.size),
        }
        manifest = _manifest(
            spec, generator=rt.generator, outputs=outputs, tensors=tensors, run=run
        )
        info = writer.commit(manifest)
    _publish(store, key, info.path, sheet, job_id=job_id)
    assembling = time.perf_counter() - started
    finished = time.time()
    first_start = min(float(r["started_at"]) for r in rows if r.get("started_at"))
    result = _succeed(
        redis,
        job_id,
        key=key,
        info=info,
        outputs=outputs,
        generated=run["generated"],
        seconds_sampling=sum(float(r.get("seconds_sampling", 0)) for r in rows),
        seconds_total=finished - first_start,
        seconds_assembling=round(assembling, 3),
        assembly=shards.SUCCEEDED,
    )
    discard_parts(job_id)
    return result


def _copy_part(path: Path, outputs: engine.Outputs, classes: Sequence[ClassInfo]) -> None:
    """Append one part's images, in their order, to the archive being assembled.

    PNG bytes and metadata lines are copied as they are; pixels are decoded only where the
    tensor files or the contact sheet need them.
    """
    with zipfile.ZipFile(path) as part:
        lines = part.read("train/metadata.jsonl").decode("utf-8").splitlines()
        for line in lines:
            row = json.loads(line)
            name = row.pop("file_name")
            cls = classes[int(row.pop("label"))]
            row.pop("label_name")
            number = int(name.rsplit("_", 1)[1].removesuffix(".png"))
            png = part.read(f"train/{name}")
            image = decode_png(png) if outputs.wants_pixels(cls.index, number) else None
            keep_png = png if "imagefolder" in outputs.spec.formats else None
            outputs.add(postprocess.Finished(cls, number, image, keep_png, row))


def _manifest(
    spec: DatasetSpec,
    *,
    generator: Generator,
    outputs: engine.Outputs,
    tensors: dict[str, Any],
    run: dict[str, Any],
) -> dict[str, Any]:
    """What the archive holds and everything needed to make it again.

    A fixed-ipc job's manifest holds no times or ids, so the same request on the same model,
    device and batch size gives the same archive, byte for byte. A time-budget job records its
    budget and times: they decided how many images it holds.
    """
    preset = presets.get(spec.preset) if spec.preset else None
    manifest: dict[str, Any] = {
        "format": "distill-service/archive-v1",
        "request": spec.model_dump(mode="json", exclude={"callback_url"}),
        "preset": (
            {"name": preset.name, "title": preset.title, "mean": preset.mean, "std": preset.std}
            if preset
            else None
        ),
        "classes": [
            {
                "index": c.index,
                "label": c.label,
                "wnid": c.wnid,
                "folder": f"train/{class_dir(c.index, c.label)}",
                "prompts": sorted({spec.prompt(c, n) for n in range(len(spec.templates))}),
                "images": outputs.per_class.get(c.index, 0),
            }
            for c in spec.classes()
        ],
        # Keyed like torchvision's ImageFolder: by folder name (labels can repeat in ImageNet).
        "class_to_idx": {class_dir(c.index, c.label): c.index for c in spec.classes()},
        "model": generator.provenance(),
        "sampling": {
            "batch_size": runtime.current().settings.batch_size,
            "output_size": spec.size,
            "resolution": spec.resolution or generator.resolution,
            "copy_source_size": run["source_size"],
            "resize": "bicubic with antialiasing, on the model's device, from the sampled image",
            "augment_steps": [step.model_dump(mode="json") for step in spec.augment.steps()],
            "seeds": engine.SEED_SCHEME,
        },
        "counts": {
            "classes": len(spec.classes()),
            "images_per_class": min(outputs.per_class.values(), default=0),
            "images": outputs.count,
            "generated": run["generated"],
            "augmented": outputs.count - run["generated"],
        },
        "formats": {
            **(
                {
                    "imagefolder": "train/<index>_<name>/<index>_<n>.png, RGB uint8 PNG; "
                    "train/metadata.jsonl for the Hugging Face imagefolder loader"
                }
                if "imagefolder" in spec.formats
                else {}
            ),
            **tensors,
        },
        "versions": dict(library_versions()),
    }
    if spec.budget_seconds is not None:
        manifest["budget"] = {
            "seconds": spec.budget_seconds,
            "seconds_used": round(run["seconds_generating"], 3),
            "seconds_sampling": round(run["seconds_sampling"], 3),
            "model_load_seconds": round(generator.load_seconds, 3),
            "model_load_counted": False,
            "ipc_reached": min(outputs.per_class.values(), default=0),
            "finished_at": _iso(time.time()),
        }
    return manifest
