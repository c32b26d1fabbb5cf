"""The generation engine: plan -> sample in batches -> resize -> augment -> encode -> archive.

Used by the RQ task (``worker.tasks``) and by the benchmarks. It knows nothing about Redis:
the caller passes ``Hooks`` for progress, cancellation and shutdown.

The CPU side overlaps the model: while batch k+1 is sampled, a thread pool augments and
PNG-encodes batch k (OpenCV and zlib release the GIL), and the main thread writes finished
images into the zip in their fixed order, so the archive does not depend on thread timing.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from core import presets
from core.limits import MAX_IPC, MAX_TOTAL_IMAGES
from core.presets import ClassInfo, class_prompt
from core.spec import DatasetSpec, derive_seed
from worker import postprocess
from worker.augment import source_size
from worker.model.generator import Conditioning, Generator, SamplingParams
from worker.outputs.sink import Finished, Outputs, RunResult
from worker.selection.oversample import Selector
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
    selector: Selector | None = None,
) -> RunResult | None:
    """Make every image of ``spec`` (or only ``items``, one shard's) into ``outputs``.

    Returns None when canceled.

    ``pool`` does the CPU side (a worker keeps one for its lifetime; ``workers`` is its size,
    and each batch is split into that many tasks); without one, a pool of ``workers`` threads.
    Raises ``Interrupted`` when ``hooks.should_stop()`` turns true between batches.
    ``source`` (``worker.selection``) gives each batch's pixels instead of plain sampling: the
    picked real images, or image-to-image from prototypes. ``selector`` (``select``)
    samples each class's pool and keeps its chosen candidates (``items`` then hold whole
    classes).
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
                selector=selector,
            )
    batches = _Batches(
        spec,
        generator,
        outputs,
        hooks=hooks,
        pool=pool,
        workers=workers,
        source=source,
        selector=selector,
    )
    iterator = iter(items if items is not None else plan(spec))
    try:
        if not batches.run_all(iterator, batch_size=batch_size):
            return None
    finally:
        # Canceled or interrupted: let in-flight items finish before the pool is reused.
        batches.cancel_pending()
    return RunResult(
        generated=batches.generated,
        seconds_sampling=batches.sampling,
        seconds_generating=time.perf_counter() - batches.started,
        source_size=batches.src_size,
        selected=tuple(batches.choices),
    )


class _Batches:
    """One run's batches: their prompts and seeds, their sampling, their post-processing in
    the pool, and the writing of finished images in order."""

    def __init__(
        self,
        spec: DatasetSpec,
        generator: Generator,
        outputs: Outputs,
        *,
        hooks: Hooks,
        pool: Executor,
        workers: int,
        source: Source | None,
        selector: Selector | None = None,
    ) -> None:
        self.spec = spec
        self.generator = generator
        self.outputs = outputs
        self.hooks = hooks
        self.pool = pool
        self.workers = workers
        self.source = source
        self.selector = selector
        #: ``select``: each class's ``Choice.record``, in the order the classes ran.
        self.choices: list[dict[str, Any]] = []
        self.size = spec.size
        self.src_size = source_size(spec.augment, image_size=self.size)
        self.started = time.perf_counter()
        self.sampling = 0.0
        self.slowest_batch = 0.0
        self.generated = 0
        self.pending: deque[tuple[int, list[Future[list[Finished]]]]] = deque()
        # A class-conditional model takes each class's ImageNet-1K id; its "prompt" in the
        # metadata says which class it was.
        self.class_ids: dict[ClassInfo, int] | None = (
            dict(zip(spec.classes(), presets.imagenet_ids(spec.classes()), strict=True))
            if generator.class_conditional and source is None
            else None
        )
        self.params = SamplingParams.from_spec(spec)

    def run_all(self, iterator: Iterator[Item], *, batch_size: int) -> bool:
        """Sample batch after batch until the plan or the budget ends; False when canceled."""
        if self.selector is not None:
            return self._run_pools(iterator, batch_size=batch_size, selector=self.selector)
        spec = self.spec
        while True:
            batch = [item for _, item in zip(range(batch_size), iterator, strict=False)]
            if not batch:
                break
            if not self._check():
                return False
            # Stop before a batch that would overrun the budget (the first round always runs).
            elapsed = time.perf_counter() - self.started
            if (
                spec.budget_seconds is not None
                and self.generated >= len(spec.classes())
                and elapsed + self.slowest_batch > spec.budget_seconds
            ):
                break
            self.step(batch)
        self.drain(keep=0)
        return True

    def _check(self) -> bool:
        """False when canceled; ``Interrupted`` on shutdown (between batches)."""
        if self.hooks.should_cancel():
            return False
        if self.hooks.should_stop():
            raise Interrupted
        return True

    def _run_pools(self, iterator: Iterator[Item], *, batch_size: int, selector: Selector) -> bool:
        """``select``: sample each class's pool in batches of its own (so a batch never holds
        two classes, however the job is cut), choose, and post-process the kept images."""
        per_class = self.spec.generated_per_class
        for cls, group in itertools.groupby(iterator, key=lambda item: item.cls):
            numbers = [item.sample for item in group]
            if numbers != list(range(per_class)):
                raise ValueError(f"select: a piece holds whole classes, not {cls.label} {numbers}")
            pool = [Item(cls, j) for j in range(self.spec.pool_per_class)]
            seeds: list[int] = []
            prompts: list[str] = []
            parts: list[dict[int, np.ndarray]] = []
            for start in range(0, len(pool), batch_size):
                if not self._check():
                    return False
                t0 = time.perf_counter()
                batch = pool[start : start + batch_size]
                batch_seeds = [derive_seed(self.spec.seed, it.cls.key, it.sample) for it in batch]
                ids = [self.class_ids[cls]] * len(batch) if self.class_ids is not None else None
                batch_prompts = self._prompts(batch, ids)
                parts.append(self._sample(batch, batch_prompts, batch_seeds, ids))
                seeds += batch_seeds
                prompts += batch_prompts
                self.sampling += time.perf_counter() - t0
                self.generated += len(batch)
                self.hooks.on_batch(
                    generated=self.generated, written=self.outputs.count, added=(len(batch), 0)
                )
            small = np.concatenate([p[self.size] for p in parts])
            src = np.concatenate([p[self.src_size] for p in parts])
            del parts
            choice = selector.choose(cls, small)
            self.choices.append(choice.record(cls))
            rows: list[postprocess.Row] = [
                (cls, n, seeds[j], prompts[j], small[j], src[j], None)
                for n, j in enumerate(choice.kept)
            ]
            self._queue(rows, sampled=0)
            self.drain(keep=MAX_PENDING_BATCHES - 1)
        self.drain(keep=0)
        return True

    def step(self, batch: list[Item]) -> None:
        """Sample one batch, hand its post-processing to the pool, write what is finished."""
        t0 = time.perf_counter()
        seeds = [derive_seed(self.spec.seed, it.cls.key, it.sample) for it in batch]
        ids = [self.class_ids[it.cls] for it in batch] if self.class_ids is not None else None
        prompts = self._prompts(batch, ids)
        images = self._sample(batch, prompts, seeds, ids)
        self.sampling += time.perf_counter() - t0
        self._submit(batch, seeds, prompts, images)
        self.drain(keep=MAX_PENDING_BATCHES - 1)
        self.slowest_batch = max(self.slowest_batch, time.perf_counter() - t0)

    def _prompts(self, batch: list[Item], ids: list[int] | None) -> list[str]:
        if self.spec.real:
            return ["" for _ in batch]  # real images: no prompt made them
        if ids is None:
            return [self.spec.prompt(it.cls, it.sample) for it in batch]
        return [class_prompt(it.cls, i) for it, i in zip(batch, ids, strict=True)]

    def _sample(
        self, batch: list[Item], prompts: list[str], seeds: list[int], ids: list[int] | None
    ) -> dict[int, np.ndarray]:
        """The batch's pixels at the output and copy-source sizes."""
        sizes = (self.size, self.src_size)
        if self.source is not None:
            pairs = [(it.cls, it.sample) for it in batch]
            return self.source.render(pairs, prompts, seeds, sizes=sizes)
        extra = Conditioning(class_ids=ids, guidance=self.spec.guidance_scales(seeds))
        return self.generator.render(prompts, seeds, sizes=sizes, params=self.params, extra=extra)

    def _submit(
        self,
        batch: list[Item],
        seeds: list[int],
        prompts: list[str],
        images: dict[int, np.ndarray],
    ) -> None:
        """Split the batch's post-processing into ``workers`` tasks and queue them."""
        source = self.source
        rows: list[postprocess.Row] = [
            (
                item.cls,
                item.sample,
                seed,
                prompt,
                images[self.size][i],
                images[self.src_size][i],
                source.origin(item.cls, item.sample) if source is not None else None,
            )
            for i, (item, seed, prompt) in enumerate(zip(batch, seeds, prompts, strict=True))
        ]
        self.generated += len(batch)
        self._queue(rows, sampled=len(batch))

    def _queue(self, rows: list[postprocess.Row], *, sampled: int) -> None:
        """Hand ``rows`` to the pool in ``workers`` tasks; ``sampled``: images they count."""
        chunk = -(-len(rows) // self.workers)
        futures = [
            self.pool.submit(postprocess.finish_items, self.spec, rows[start : start + chunk])
            for start in range(0, len(rows), chunk)
        ]
        self.pending.append((sampled, futures))

    def drain(self, keep: int) -> None:
        """Write finished batches in their order until at most ``keep`` are in flight."""
        while len(self.pending) > keep:
            sampled, futures = self.pending.popleft()
            before = self.outputs.count
            for future in futures:
                for done in future.result():
                    self.outputs.add(done)
            self.hooks.on_batch(
                generated=self.generated - sum(n for n, _ in self.pending),
                written=self.outputs.count,
                added=(sampled, self.outputs.count - before),
            )

    def cancel_pending(self) -> None:
        for _, futures in self.pending:
            for future in futures:
                future.cancel()
