"""The RQ job: ``distill(payload)`` turns one DatasetSpec into one archive on disk.

prompts -> model (batched, one seed per image) -> resize -> augmented copies -> archive.
Progress is saved after every batch and a cancel request is honoured between batches.

Two ways to size a job: ``ipc`` (a fixed count per class, sampled class by class) or
``budget_seconds`` (rounds of one image per class until the budget would be overrun, so every
class ends within one sampled image of the others).
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import shutil
import time
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import get_current_job

from worker import engine, presets, records, runtime
from worker.archive import ArchiveWriter, class_dir
from worker.errors import InsufficientSpace
from worker.generator import Generator
from worker.spec import DatasetSpec

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


def estimate_bytes(spec: DatasetSpec) -> int:
    """An upper estimate of a fixed-ipc job's archive size (0 for a time-budget job).

    PNG of noisy pixels is about the raw size; zip headers add about 100 bytes a member.
    """
    images = spec.total_images
    raw = spec.size * spec.size * 3
    total = 0
    if "imagefolder" in spec.formats:
        total += images * (raw + 300)
    if "tensors" in spec.formats:
        total += images * raw * (5 if spec.preset else 1)
    return total


def check_space(spec: DatasetSpec, directory: Path) -> None:
    """Fail before sampling when the archive cannot fit (ENOSPC is still caught on write)."""
    needed = estimate_bytes(spec) + SPACE_MARGIN_BYTES
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise InsufficientSpace(
            f"the archive needs about {needed / 2**20:.1f} MiB but the data volume has "
            f"{free / 2**20:.1f} MiB free"
        )


class RedisHooks:
    """Progress into the job record; cancel flag and worker shutdown checked between batches."""

    def __init__(self, redis: Redis, job_id: str) -> None:
        self.redis = redis
        self.job_id = job_id

    def should_cancel(self) -> bool:
        return patiently(lambda: records.cancel_requested(self.redis, self.job_id))

    def should_stop(self) -> bool:
        return runtime.stopping()

    def on_batch(self, *, generated: int, written: int, added: tuple[int, int]) -> None:
        patiently(
            lambda: records.save_progress(
                self.redis, self.job_id, generated=generated, written=written, added=added
            )
        )


def distill(payload: dict[str, Any]) -> dict[str, Any]:
    """Generate the dataset ``payload`` describes; returns the archive's path, size and digest."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("distill() runs as an RQ job")
    try:
        return _distill(job, payload)
    except engine.Interrupted:
        worker = runtime.current().worker_name
        records.requeued(job.connection, job.id, reason=f"worker {worker} shut down")
        runtime.mark_interrupted(job.id)
        return {"interrupted": True}
    except Exception:
        # The job's own error would repeat on another worker: fail now. Only a lost worker
        # (RQ's abandoned-job cleanup) uses the retries.
        job.retries_left = 0
        raise


def _distill(job: Any, payload: dict[str, Any]) -> dict[str, Any]:
    rt = runtime.current()
    settings = rt.settings
    redis: Redis = job.connection
    spec = DatasetSpec.model_validate(payload)
    generator = rt.generator
    final = records.archive_path(settings.data_dir, job.id)
    partial = records.partial_path(settings.data_dir, job.id)
    patiently(lambda: records.mark_started(redis, job.id, worker=rt.worker_name, partial=partial))
    check_space(spec, settings.data_dir)

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
        # Beside the archive too, so the API can show it without opening the zip.
        preview_file = records.preview_path(settings.data_dir, job.id)
        preview_file.write_bytes(sheet)

    ipc_reached = min(outputs.per_class.get(c.index, 0) for c in spec.classes())
    succeeded: dict[str, str | int | float] = {
        "archive_path": str(info.path),
        "archive_size": info.size_bytes,
        "archive_sha256": info.sha256,
        "written": outputs.count,
        "generated": run["generated"],
        "ipc_reached": ipc_reached,
        "seconds_sampling": round(run["seconds_sampling"], 3),
        "seconds_total": round(finished - started, 3),
    }
    patiently(lambda: records.finish(redis, job.id, outcome=records.SUCCEEDED, fields=succeeded))
    return {"path": str(info.path), "size_bytes": info.size_bytes, "sha256": info.sha256}


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
