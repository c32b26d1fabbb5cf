"""The generation engine: plan -> sample in batches -> resize -> augment -> encode -> archive.

Used by the RQ task (``worker.tasks``) and by the benchmarks. It knows nothing about Redis:
the caller passes ``Hooks`` for progress, cancellation and shutdown.

The CPU side overlaps the model: while batch k+1 is sampled, a thread pool augments and
PNG-encodes batch k (OpenCV and zlib release the GIL), and the main thread writes finished
images into the zip in their fixed order, so the archive does not depend on thread timing.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Protocol

from core import presets
from core.presets import ClassInfo, class_prompt
from core.spec import MAX_IPC, MAX_TOTAL_IMAGES, DatasetSpec, derive_seed
from worker import postprocess
from worker.augment import source_size
from worker.model.generator import Conditioning, Generator, SamplingParams
from worker.outputs.sink import Finished, Outputs, RunResult
from worker.selection.sources import Source

#: Batches whose post-processing may be in flight while the next one is sampled.
MAX_PENDING_BATCHES = 2

# Written into every manifest (part of the archive's bytes): change it only with the scheme.
SEED_SCHEME = (
    "image seed = blake2b-64(job seed, class key, n); augmented copy k = 1..copies of image n"
    " draws every transform from one numpy default_rng and one random.Random, both seeded with"
    " blake2b-64(job seed, class key, n, 'copy', k); class key = wnid if the class has one,"
    " else its label (derive_seed, core/spec.py)"
)


class Hooks(Protocol):
    def should_cancel(self) -> bool: ...

    def should_stop(self) -> bool: ...

    def on_batch(self, *, generated: int, written: int, added: tuple[int, int]) -> None: ...


class NoHooks:
    """Run to the end, report nothing (benchmarks)."""

    def should_cancel(self) -> bool:
        return False

    def should_stop(self) -> bool:
        return False

    def on_batch(self, *, generated: int, written: int, added: tuple[int, int]) -> None:
        return None


class Interrupted(Exception):
    """The worker is shutting down; the job goes back to the front of the queue."""


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


def plan(spec: DatasetSpec) -> Sequence[Item] | Iterator[Item]:
    if spec.budget_seconds is None:
        return fixed_plan(spec)
    return budget_rounds(spec.classes(), copies=spec.augment.n_copies)


def run(
    spec: DatasetSpec,
    generator: Generator,
    outputs: Outputs,
    *,
    batch_size: int,
    hooks: Hooks,
    pool: Executor | None = None,
    workers: int = 2,
    items: Sequence[Item] | None = None,
    source: Source | None = None,
) -> RunResult | None:
    """Make every image of ``spec`` (or only ``items``, one shard's) into ``outputs``.

    Returns None when canceled.

    ``pool`` does the CPU side (a worker keeps one for its lifetime; ``workers`` is its size,
    and each batch is split into that many tasks); without one, a pool of ``workers`` threads.
    Raises ``Interrupted`` when ``hooks.should_stop()`` turns true between batches.
    ``source`` (``worker.selection``) gives each batch's pixels instead of plain sampling: the
    picked real images, or image-to-image from prototypes.
    """
    if pool is None:
        with postprocess.make_pool("threads", workers) as own:
            return run(
                spec,
                generator,
                outputs,
                batch_size=batch_size,
                hooks=hooks,
                pool=own,
                workers=workers,
                items=items,
                source=source,
            )
    size = spec.size
    src_size = source_size(spec.augment, image_size=size)
    budget = spec.budget_seconds
    started = time.perf_counter()
    sampling = 0.0
    slowest_batch = 0.0
    generated = 0
    pending: deque[tuple[int, list[Future[list[Finished]]]]] = deque()

    def drain(keep: int) -> None:
        while len(pending) > keep:
            sampled, futures = pending.popleft()
            before = outputs.count
            for future in futures:
                for done in future.result():
                    outputs.add(done)
            hooks.on_batch(
                generated=generated - sum(n for n, _ in pending),
                written=outputs.count,
                added=(sampled, outputs.count - before),
            )

    # A class-conditional model takes each class's ImageNet-1K id; its "prompt" in the
    # metadata says which class it was.
    class_ids = (
        dict(zip(spec.classes(), presets.imagenet_ids(spec.classes()), strict=True))
        if generator.class_conditional and source is None
        else None
    )
    iterator = iter(items if items is not None else plan(spec))
    params = SamplingParams.from_spec(spec)
    try:
        while True:
            batch = [item for _, item in zip(range(batch_size), iterator, strict=False)]
            if not batch:
                break
            if hooks.should_cancel():
                return None
            if hooks.should_stop():
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
            ids = [class_ids[it.cls] for it in batch] if class_ids is not None else None
            if spec.real:
                prompts = ["" for _ in batch]  # real images: no prompt made them
            elif ids is None:
                prompts = [spec.prompt(it.cls, it.sample) for it in batch]
            else:
                prompts = [class_prompt(it.cls, i) for it, i in zip(batch, ids, strict=True)]
            if source is not None:
                pairs = [(it.cls, it.sample) for it in batch]
                images = source.render(pairs, prompts, seeds, sizes=(size, src_size))
            else:
                images = generator.render(
                    prompts,
                    seeds,
                    sizes=(size, src_size),
                    params=params,
                    extra=Conditioning(class_ids=ids),
                )
            sampling += time.perf_counter() - t0
            rows: list[postprocess.Row] = [
                (
                    item.cls,
                    item.sample,
                    seed,
                    prompt,
                    images[size][i],
                    images[src_size][i],
                    source.origin(item.cls, item.sample) if source is not None else None,
                )
                for i, (item, seed, prompt) in enumerate(zip(batch, seeds, prompts, strict=True))
            ]
            chunk = -(-len(rows) // workers)
            futures = [
                pool.submit(postprocess.finish_items, spec, rows[start : start + chunk])
                for start in range(0, len(rows), chunk)
            ]
            generated += len(batch)
            pending.append((len(batch), futures))
            drain(keep=MAX_PENDING_BATCHES - 1)
            slowest_batch = max(slowest_batch, time.perf_counter() - t0)
        drain(keep=0)
    finally:
        # Canceled or interrupted: let in-flight items finish before the pool is reused.
        for _, futures in pending:
            for future in futures:
                future.cancel()
    return RunResult(
        generated=generated,
        seconds_sampling=sampling,
        seconds_generating=time.perf_counter() - started,
        source_size=src_size,
    )
