"""The CPU side of one sampled image: keep it, make its augmented copies, PNG-encode them all.

No torch here: this module runs in the worker's post-processing pool, threads or separate
processes (``DISTILL_POSTPROCESS_MODE``). Results do not depend on which thread or process
made them, nor on what it made before: copy k of sampled image n of a class is drawn from
``derive_seed(job seed, class key, n, "copy", k)`` alone.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any, Literal

import albumentations as A
import numpy as np

from core.presets import ClassInfo
from core.spec import DatasetSpec, derive_seed
from worker.augment import augment, build_transform
from worker.outputs.archive import encode_png, image_name, wants_png
from worker.outputs.sink import Finished

_local = threading.local()


def _transform(spec: DatasetSpec) -> A.Compose | None:
    """This thread's pipeline for the job's policy (a Compose carries RNG state, so threads do
    not share one; ``augment`` replaces that state for every copy)."""
    cache: dict[str, A.Compose | None] = getattr(_local, "transforms", None) or {}
    _local.transforms = cache
    key = f"{spec.size}:{spec.augment.model_dump_json()}"
    if key not in cache:
        if len(cache) > 16:
            cache.clear()
        cache[key] = build_transform(spec.augment, image_size=spec.size)
    return cache[key]


def finish_item(
    spec: DatasetSpec,
    cls: ClassInfo,
    sample: int,
    seed: int,
    prompt: str,
    small: np.ndarray,
    source: np.ndarray,
    origin: str | None = None,
) -> list[Finished]:
    """Everything one sampled image becomes: itself and its augmented copies, encoded.

    ``origin``: where a real image came from (``reference:sha256:<digest>``); such an image
    is of kind ``real`` rather than ``generated``."""
    copies = spec.augment.n_copies
    first = sample * (copies + 1)
    encode = wants_png(spec.formats)
    base_name = image_name(cls.index, cls.label, first)
    common: dict[str, Any] = {"prompt": prompt, "seed": seed}
    scale = None if origin else spec.guidance_for(seed)
    if scale is not None:
        common["guidance_scale"] = scale
    done = [
        Finished(
            cls,
            first,
            small,
            encode_png(small) if encode else None,
            {**common, "kind": "real" if origin else "generated", "source": origin},
        )
    ]
    wanted = copies if spec.ipc is None else min(copies, spec.ipc - first - 1)
    transform = _transform(spec)
    if transform is not None and wanted > 0:
        for k in range(1, wanted + 1):
            image = augment(
                transform, source, seed=derive_seed(spec.seed, cls.key, sample, "copy", k)
            )
            done.append(
                Finished(
                    cls,
                    first + k,
                    image,
                    encode_png(image) if encode else None,
                    {**common, "kind": "augmented", "source": base_name, "copy": k},
                )
            )
    return done


Row = tuple[ClassInfo, int, int, str, np.ndarray, np.ndarray, str | None]


def finish_items(spec: DatasetSpec, rows: list[Row]) -> list[Finished]:
    """``finish_item`` for several sampled images: one task per chunk keeps the pool's
    per-task cost (pickling, a round trip to a process) off every image."""
    return [done for row in rows for done in finish_item(spec, *row)]


def _child_init() -> None:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    # One core per process: OpenCV's own threads would only fight the pool.
    import cv2

    cv2.setNumThreads(1)


def make_pool(mode: Literal["threads", "processes"], workers: int) -> Executor:
    """A post-processing pool. Processes sidestep the GIL that albumentations holds; they are
    started by a fork server, which never copies a CUDA context."""
    if mode == "processes":
        context = multiprocessing.get_context("forkserver")
        return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_child_init)
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="postprocess")
