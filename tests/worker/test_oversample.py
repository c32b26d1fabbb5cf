"""Which candidates of a class's pool a ``select`` job keeps (worker.selection.oversample)."""

from __future__ import annotations

import numpy as np
import pytest

from core.shards import plan
from core.spec import DatasetSpec
from worker.selection import coreset
from worker.selection.oversample import (
    choose,
    difficulty_targets,
    eligible,
    match_difficulty,
)


def _probs(rows: list[list[float]]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64)


POOL = _probs(
    [
        [0.5, 0.3, 0.2],  # 0: own class 1 is not top-1
        [0.1, 0.8, 0.1],  # 1: right
        [0.2, 0.7, 0.1],  # 2: right
        [0.4, 0.35, 0.25],  # 3: wrong, but the best of the wrong by p(own)
        [0.1, 0.6, 0.3],  # 4: right
        [0.6, 0.1, 0.3],  # 5: wrong
    ]
)


def test_misclassified_candidates_are_dropped_unless_too_few_would_be_left() -> None:
    assert eligible(POOL, 1, 2) == ([1, 2, 4], [0, 3, 5], [])
    assert eligible(POOL, 1, 3) == ([1, 2, 4], [0, 3, 5], [])
    # Four needed, three right: the wrong one with the highest p(own) comes back (3: 0.35).
    assert eligible(POOL, 1, 4) == ([1, 2, 3, 4], [0, 3, 5], [3])
    assert eligible(POOL, 1, 5) == ([0, 1, 2, 3, 4], [0, 3, 5], [0, 3])
    assert eligible(POOL, 1, 6) == ([0, 1, 2, 3, 4, 5], [0, 3, 5], [0, 3, 5])


def test_confident_keeps_the_highest_probabilities_of_the_class_in_order() -> None:
    features = np.zeros((6, 2))
    choice = choose("confident", POOL, features, own=1, k=2, reference_confidence=np.ones(3))
    assert choice.kept == [1, 2]
    assert choice.misclassified == [0, 3, 5] and choice.restored == []
    record = choice.record(_cls())
    assert record["dropped"] == [0, 3, 5] and record["pool"] == 6
    assert record["kept_scores"] == [0.8, 0.7]
    assert record["scores"] == [0.3, 0.8, 0.7, 0.35, 0.6, 0.1]
    # A misclassified candidate never outranks a right one, though 0.35 < 0.6 anyway.
    assert choose(
        "confident", POOL, features, own=1, k=4, reference_confidence=np.ones(3)
    ).kept == [
        1,
        2,
        4,
        3,
    ]


def _cls():  # type: ignore[no-untyped-def]
    return DatasetSpec(labels=["a", "b", "c"], ipc=1).classes()[1]


def test_herding_and_kcenter_run_on_the_features_of_what_is_left() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(6, 4))
    left = [1, 2, 4]
    for keep, pick in (("herding", coreset.herding), ("kcenter", coreset.kcenter)):
        choice = choose(keep, POOL, features, own=1, k=2, reference_confidence=np.ones(3))
        assert choice.kept == [left[i] for i in pick(features[left], 2)]
        assert set(choice.kept) <= set(left)


def test_difficulty_matches_the_reference_quantiles_nearest_first() -> None:
    targets = difficulty_targets(np.array([0.0, 0.1, 0.2, 0.9]), 2)
    # Linear quantiles: 0.25 -> 0.075 (a quarter of 0..0.1 at 0.75), 0.75 -> 0.2 + 0.25 * 0.7.
    assert targets == pytest.approx([0.075, 0.375])
    difficulty = np.array([0.25, 0.75, 0.5, 0.625])
    # Each target takes the nearest value left; the last, with 0.25 and 0.75 both 0.25 away,
    # the lower index.
    assert match_difficulty(difficulty, np.array([0.5, 0.5, 0.5])) == [2, 3, 0]
    choice = choose(
        "difficulty",
        POOL,
        np.zeros((6, 2)),
        own=1,
        k=2,
        reference_confidence=np.array([0.9, 0.8, 0.3]),
    )
    # Reference difficulties 0.1, 0.2, 0.7: quantiles 0.25 -> 0.15, 0.75 -> 0.45;
    # candidates left 1, 2, 4 have difficulties 0.2, 0.3, 0.4.
    assert choice.targets == pytest.approx([0.15, 0.45])
    assert choice.kept == [1, 4]
    assert choice.record(_cls())["difficulty_targets"] == pytest.approx([0.15, 0.45])


def test_a_pool_too_small_or_an_unknown_rule_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot keep 7"):
        choose("confident", POOL, np.zeros((6, 1)), own=1, k=7, reference_confidence=np.ones(3))
    with pytest.raises(ValueError, match="unknown keep"):
        choose("best", POOL, np.zeros((6, 1)), own=1, k=1, reference_confidence=np.ones(3))


def test_a_select_jobs_shards_hold_whole_classes() -> None:
    spec = DatasetSpec(
        labels=[f"c{i}" for i in range(7)],
        ipc=10,
        reference="ref",
        select={"oversample": 2},
        augment={"policy": "none"},
    )
    shards = plan(spec, shard_images=25, batch_size=4)
    assert len(shards) >= 2
    assert shards[0].start == 0 and shards[-1].stop == 70
    for shard in shards:
        assert shard.start % 10 == 0 and shard.stop % 10 == 0
        assert shard.images == shard.stop - shard.start
    # Twice the candidates per kept image: shards of about half the images.
    plain = plan(spec.model_copy(update={"select": None}), shard_images=25, batch_size=4)
    assert len(shards) > len(plain)
