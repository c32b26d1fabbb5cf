"""Shard plans: contiguous, batch-aligned, covering every image once, independent of workers."""

from __future__ import annotations

import itertools

import pytest

from core import shards
from core.spec import DatasetSpec
from worker import engine


def _spec(**fields: object) -> DatasetSpec:
    return DatasetSpec.model_validate({"labels": [f"c{i}" for i in range(20)], "ipc": 10, **fields})


@pytest.mark.parametrize(
    ("fields", "shard_images", "batch"),
    [
        ({}, 40, 4),
        ({"ipc": 7}, 30, 4),  # the last sample of a class has fewer copies
        ({"augment": {"policy": "none"}}, 33, 8),
        ({"labels": ["cat", "dog"], "ipc": 500}, 100, 8),  # few classes: ranges within a class
        ({"preset": "cifar100", "labels": None, "ipc": 50}, 1000, 16),
    ],
)
def test_shards_cover_the_plan_once_in_order_on_batch_boundaries(
    fields: dict[str, object], shard_images: int, batch: int
) -> None:
    spec = _spec(**fields)
    plan = shards.plan(spec, shard_images=shard_images, batch_size=batch)
    assert len(plan) >= 2
    assert plan[0].start == 0 and plan[-1].stop == spec.total_generated
    for before, after in itertools.pairwise(plan):
        assert before.stop == after.start
    assert all(s.start % batch == 0 for s in plan)
    assert [s.index for s in plan] == list(range(len(plan)))
    assert sum(s.images for s in plan) == spec.total_images
    per_sample = spec.augment.n_copies + 1
    # No shard is much larger than asked (one batch of rounding at most).
    assert max(s.stop - s.start for s in plan) <= max(shard_images // per_sample, 1) + batch
    # The items are exactly the unsharded plan's.
    flat = [item for s in plan for item in engine.fixed_plan(spec)[s.start : s.stop]]
    assert flat == engine.fixed_plan(spec)


def test_few_classes_split_within_a_class() -> None:
    spec = _spec(labels=["cat", "dog"], ipc=500, augment={"policy": "none"})
    plan = shards.plan(spec, shard_images=100, batch_size=10)
    assert len(plan) == 10
    assert [shards.describe(spec, s) for s in plan[:6]] == [(0, 0)] * 5 + [(1, 1)]


def test_small_and_time_budget_jobs_run_in_one_piece() -> None:
    assert shards.plan(_spec(), shard_images=200, batch_size=4) == []
    budget = DatasetSpec.model_validate({"labels": ["a", "b"], "budget_seconds": 5})
    assert shards.plan(budget, shard_images=1, batch_size=4) == []


def test_shard_count_is_capped() -> None:
    spec = _spec(preset="imagenet1k", labels=None, ipc=100, augment={"policy": "none"})
    plan = shards.plan(spec, shard_images=1, batch_size=4)
    assert len(plan) <= shards.MAX_SHARDS
    assert plan[-1].stop == spec.total_generated


def test_plan_does_not_depend_on_anything_but_request_size_and_batch() -> None:
    spec = _spec()
    assert shards.plan(spec, shard_images=40, batch_size=4) == shards.plan(
        DatasetSpec.model_validate(spec.model_dump(mode="json")), shard_images=40, batch_size=4
    )
