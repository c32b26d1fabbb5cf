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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq import get_current_job

from worker import formats, presets, records, runtime
from worker.archive import ArchiveWriter, class_dir, image_name
from worker.augment import augment, build_transform, source_size
from worker.errors import InsufficientSpace
from worker.generator import Generator
from worker.presets import ClassInfo
from worker.spec import MAX_IPC, MAX_TOTAL_IMAGES, DatasetSpec, derive_seed

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
SEED_SCHEME = (
    "image seed = blake2b-64(job seed, class key, n); copy seed = blake2b-64(job seed, class key,"
    " n, 'copy', k); class key = wnid if the class has one, else its label (worker/spec.py)"
)


@dataclass(frozen=True)
class Item:
    """One image to sample: its class and its number among the class's sampled images."""

    cls: ClassInfo
    sample: int


def fixed_plan(spec: DatasetSpec) -> list[Item]:
    """Every image of a fixed-ipc job, class by class, in class-index order."""
    return [Item(c, n) for c in spec.classes() for n in range(spec.generated_per_class)]


def budget_rounds(classes: Sequence[ClassInfo], *, copies: int) -> Iterator[Item]:
    """Round-robin: sample n of every class before sample n + 1 of any, up to the caps."""
    max_samples = min(
        -(-MAX_IPC // (copies + 1)), MAX_TOTAL_IMAGES // (len(classes) * (copies + 1))
    )
    for n in range(max(max_samples, 1)):
        for cls in classes:
            yield Item(cls, n)


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


@dataclass
class Outputs:
    """Where each finished image goes: the PNG tree and/or the in-memory tensor lists."""

    spec: DatasetSpec
    writer: ArchiveWriter
    count: int = 0
    per_class: dict[int, int] = field(default_factory=dict)
    _kept: list[tuple[int, int, np.ndarray]] = field(default_factory=list)

    def add(self, cls: ClassInfo, number: int, image: np.ndarray, **meta: Any) -> str:
        name = image_name(cls.index, cls.label, number)
        if "imagefolder" in self.spec.formats:
            self.writer.add_image(name, image, label=cls.index, label_name=cls.label, **meta)
        if "tensors" in self.spec.formats:
            self._kept.append((cls.index, number, image))
        self.count += 1
        self.per_class[cls.index] = self.per_class.get(cls.index, 0) + 1
        return name

    def write_tensors(self) -> dict[str, Any]:
        """Add tensors.pt (and normalized.pt for presets); returns their manifest entry."""
        if "tensors" not in self.spec.formats:
            return {}
        ordered = sorted(self._kept, key=lambda row: (row[0], row[1]))
        images = [row[2] for row in ordered]
        labels = [row[0] for row in ordered]
        classes = [c.label for c in self.spec.classes()]
        self.writer.add_file("tensors.pt", formats.tensors_pt(images, labels, classes))
        described: dict[str, Any] = {
            "tensors.pt": {
                "images": "uint8, N x 3 x H x W, values 0..255, RGB, class-major",
                "labels": "int64, N, class index",
                "classes": "list of class names by index",
            }
        }
        if self.spec.preset:
            preset = presets.get(self.spec.preset)
            data = formats.normalized_pt(images, labels, mean=preset.mean, std=preset.std)
            self.writer.add_file("normalized.pt", data)
            described["normalized.pt"] = {
                "images": "float32, N x 3 x H x W, (x / 255 - mean) / std, class-major",
                "labels": "int64, N, class index",
                "mean": list(preset.mean),
                "std": list(preset.std),
            }
        return described


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


class Interrupted(Exception):
    """The worker is shutting down; the job goes back to the front of the queue."""


def distill(payload: dict[str, Any]) -> dict[str, Any]:
    """Generate the dataset ``payload`` describes; returns the archive's path, size and digest."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("distill() runs as an RQ job")
    try:
        return _distill(job, payload)
    except Interrupted:
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
    items: Sequence[Item] | Iterator[Item]
    if spec.budget_seconds is None:
        items = fixed_plan(spec)
    else:
        items = budget_rounds(spec.classes(), copies=spec.augment.n_copies)

    with ArchiveWriter(final=final, partial=partial) as writer:
        outputs = Outputs(spec=spec, writer=writer)
        run = _generate(
            redis, job.id, spec, generator, items, outputs, batch_size=settings.batch_size
        )
        if run is None or patiently(lambda: records.cancel_requested(redis, job.id)):
            done = {"written": outputs.count}
            patiently(lambda: records.finish(redis, job.id, outcome=records.CANCELED, fields=done))
            return {"canceled": True}
        tensors = outputs.write_tensors()
        finished = time.time()
        manifest = _manifest(spec, generator=generator, outputs=outputs, tensors=tensors, run=run)
        info = writer.commit(manifest)

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


def _generate(
    redis: Redis,
    job_id: str,
    spec: DatasetSpec,
    generator: Generator,
    items: Sequence[Item] | Iterator[Item],
    outputs: Outputs,
    *,
    batch_size: int,
) -> dict[str, Any] | None:
    """Sample, resize, augment and store every item; None when canceled."""
    copies = spec.augment.n_copies
    size = spec.size
    transform = build_transform(spec.augment, image_size=size)
    src_size = source_size(spec.augment, image_size=size)
    budget = spec.budget_seconds
    started = time.perf_counter()
    sampling = 0.0
    slowest_batch = 0.0
    generated = 0
    iterator = iter(items)
    while True:
        batch = [item for _, item in zip(range(batch_size), iterator, strict=False)]
        if not batch:
            break
        if patiently(lambda: records.cancel_requested(redis, job_id)):
            return None
        if runtime.stopping():
            raise Interrupted
        # Stop before a batch that would overrun the budget (the first round always runs).
        elapsed = time.perf_counter() - started
        if (
            budget is not None
            and generated >= len(spec.classes())
            and elapsed + slowest_batch > budget
        ):
            break
        t0 = time.perf_counter()
        seeds = [derive_seed(spec.seed, it.cls.key, it.sample) for it in batch]
        prompts = [spec.prompt(it.cls, it.sample) for it in batch]
        images = generator.render(prompts, seeds, sizes=(size, src_size))
        sampling += time.perf_counter() - t0
        before = outputs.count
        for row, (item, seed, prompt) in enumerate(zip(batch, seeds, prompts, strict=True)):
            per_sample = copies + 1
            first = item.sample * per_sample
            common = {"prompt": prompt, "seed": seed}
            source = outputs.add(
                item.cls, first, images[size][row], **common, kind="generated", source=None
            )
            for copy in range(1, copies + 1):
                number = first + copy
                if transform is None or (spec.ipc is not None and number >= spec.ipc):
                    break
                copy_seed = derive_seed(spec.seed, item.cls.key, item.sample, "copy", copy)
                outputs.add(
                    item.cls,
                    number,
                    augment(transform, images[src_size][row], seed=copy_seed),
                    **common,
                    kind="augmented",
                    source=source,
                    augment_seed=copy_seed,
                )
        generated += len(batch)
        slowest_batch = max(slowest_batch, time.perf_counter() - t0)
        progress = {"generated": generated, "written": outputs.count}
        added = (len(batch), outputs.count - before)
        patiently(lambda: records.save_progress(redis, job_id, **progress, added=added))  # noqa: B023
    return {
        "generated": generated,
        "seconds_sampling": sampling,
        "seconds_generating": time.perf_counter() - started,
        "source_size": src_size,
    }


def _manifest(
    spec: DatasetSpec,
    *,
    generator: Generator,
    outputs: Outputs,
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
        "request": spec.model_dump(mode="json"),
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
            "copy_source_size": run["source_size"],
            "resize": "bicubic with antialiasing, on the model's device, from the sampled image",
            "augment_steps": [step.model_dump(mode="json") for step in spec.augment.steps()],
            "seeds": SEED_SCHEME,
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
        "versions": library_versions(),
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
