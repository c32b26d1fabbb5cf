"""The RQ job: ``distill(payload)`` turns one DatasetSpec into one archive on disk.

prompts -> model (batched, one seed per image) -> resize -> augmented copies -> archive.
Progress is saved after every batch and a cancel request is honoured between batches.
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from redis import Redis
from rq import get_current_job

from worker import records, runtime
from worker.archive import ArchiveWriter, class_dir, image_name
from worker.augment import augment, build_transform, source_size
from worker.generator import GUIDANCE_SCALE, NUM_INFERENCE_STEPS
from worker.spec import DatasetSpec, derive_seed

log = logging.getLogger(__name__)

_VERSIONED = (
    "distill-service",
    "torch",
    "diffusers",
    "transformers",
    "albumentations",
    "numpy",
    "pillow",
)


@dataclass(frozen=True)
class Item:
    """One image to sample: class index, label, and its number among the class's samples."""

    class_index: int
    label: str
    sample: int


def plan(spec: DatasetSpec) -> list[Item]:
    """Every image to sample, class by class, in class-index order."""
    return [
        Item(index, label, n)
        for index, label in enumerate(spec.labels)
        for n in range(spec.generated_per_class)
    ]


def batches(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).isoformat()


def distill(payload: dict[str, Any]) -> dict[str, Any]:
    """Generate the dataset ``payload`` describes; returns the archive's path, size and digest."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("distill() runs as an RQ job")
    rt = runtime.current()
    settings = rt.settings
    redis: Redis = job.connection
    spec = DatasetSpec.model_validate(payload)
    generator = rt.generator
    final = records.archive_path(settings.data_dir, job.id)
    partial = records.partial_path(settings.data_dir, job.id)
    records.mark_started(redis, job.id, worker=rt.worker_name, partial=partial)

    copies = spec.augment.n_copies
    transform = build_transform(spec.augment, image_size=spec.image_size)
    src_size = source_size(spec.augment, image_size=spec.image_size)
    items = plan(spec)
    started = time.time()
    sampling_s = 0.0
    generated = written = 0

    with ArchiveWriter(final=final, partial=partial) as writer:
        for batch in batches(items, settings.batch_size):
            if records.cancel_requested(redis, job.id):
                return _canceled(redis, job.id, written=written)
            seeds = [derive_seed(spec.seed, it.label, it.sample) for it in batch]
            t0 = time.perf_counter()
            images = generator.render(
                [spec.prompt(it.label) for it in batch],
                seeds,
                sizes=(spec.image_size, src_size),
            )
            sampling_s += time.perf_counter() - t0
            generated += len(batch)
            for row, (item, seed) in enumerate(zip(batch, seeds, strict=True)):
                first = item.sample * (copies + 1)
                source = image_name(item.class_index, item.label, first)
                common = {
                    "label": item.class_index,
                    "label_name": item.label,
                    "prompt": spec.prompt(item.label),
                    "seed": seed,
                }
                writer.add_image(
                    source, images[spec.image_size][row], **common, kind="generated", source=None
                )
                for copy in range(1, copies + 1):
                    number = first + copy
                    if number >= spec.ipc or transform is None:
                        break
                    copy_seed = derive_seed(spec.seed, item.label, item.sample, "copy", copy)
                    writer.add_image(
                        image_name(item.class_index, item.label, number),
                        augment(transform, images[src_size][row], seed=copy_seed),
                        **common,
                        kind="augmented",
                        source=source,
                        augment_seed=copy_seed,
                    )
            added = (len(batch), writer.count - written)
            written = writer.count
            records.save_progress(redis, job.id, generated=generated, written=written, added=added)

        if records.cancel_requested(redis, job.id):
            return _canceled(redis, job.id, written=written)
        finished = time.time()
        manifest = _manifest(
            spec,
            job_id=job.id,
            generator_facts=generator.describe(),
            batch_size=settings.batch_size,
            source_size=src_size,
            counts={"generated": generated, "images": written},
            timings={
                "started_at": _iso(started),
                "finished_at": _iso(finished),
                "seconds_total": round(finished - started, 3),
                "seconds_sampling": round(sampling_s, 3),
            },
        )
        info = writer.commit(manifest)

    records.finish(
        redis,
        job.id,
        outcome=records.SUCCEEDED,
        fields={
            "archive_path": str(info.path),
            "archive_size": info.size_bytes,
            "archive_sha256": info.sha256,
            "written": written,
            "generated": generated,
        },
    )
    log.info("job %s: %d images in %.2f s -> %s", job.id, written, finished - started, info.path)
    return {"path": str(info.path), "size_bytes": info.size_bytes, "sha256": info.sha256}


def _canceled(redis: Redis, job_id: str, *, written: int) -> dict[str, Any]:
    records.finish(redis, job_id, outcome=records.CANCELED, fields={"written": written})
    log.info("job %s: canceled after %d images", job_id, written)
    return {"canceled": True}


def _manifest(
    spec: DatasetSpec,
    *,
    job_id: str,
    generator_facts: dict[str, str | int],
    batch_size: int,
    source_size: int,
    counts: dict[str, int],
    timings: dict[str, Any],
) -> dict[str, Any]:
    return {
        "format": "distill-service/archive-v1",
        "job_id": job_id,
        "request": spec.model_dump(mode="json"),
        "classes": [
            {
                "index": index,
                "label": label,
                "folder": f"train/{class_dir(index, label)}",
                "prompt": spec.prompt(label),
            }
            for index, label in enumerate(spec.labels)
        ],
        "class_to_idx": {label: index for index, label in enumerate(spec.labels)},
        "model": generator_facts,
        "sampling": {
            "num_inference_steps": NUM_INFERENCE_STEPS,
            "guidance_scale": GUIDANCE_SCALE,
            "batch_size": batch_size,
            "copy_source_size": source_size,
            "augment_steps": [step.model_dump(mode="json") for step in spec.augment.steps()],
        },
        "counts": {
            "classes": len(spec.labels),
            "images_per_class": spec.ipc,
            "images": counts["images"],
            "generated": counts["generated"],
            "augmented": counts["images"] - counts["generated"],
        },
        "versions": library_versions(),
        "timings": timings,
    }
