"""k-means for prototypes and the image-to-image step count."""

from __future__ import annotations

import numpy as np
import pytest

from worker.model.generator import image_to_image_steps
from worker.selection.sources import kmeans


def test_kmeans_finds_separated_clusters_in_a_stable_order() -> None:
    rng = np.random.default_rng(0)
    blobs = [rng.normal(centre, 0.1, (n, 8)) for centre, n in ((0.0, 5), (10.0, 9), (-10.0, 3))]
    points = np.concatenate(blobs)
    centres, assign = kmeans(points, 3, seed=[1, 2])
    # Largest cluster first: the 9 points around 10, then 5 around 0, then 3 around -10.
    assert [int((assign == j).sum()) for j in range(3)] == [9, 5, 3]
    assert np.allclose(centres[:, 0], [10.0, 0.0, -10.0], atol=0.2)
    again = kmeans(points, 3, seed=[1, 2])
    assert np.array_equal(again[0], centres) and np.array_equal(again[1], assign)
    _, labels = kmeans(points, len(points), seed=[0])
    assert sorted(np.bincount(labels)) == [1] * len(points)
    with pytest.raises(ValueError, match="between 1 and the 17 points"):
        kmeans(points, 18, seed=[0])


@pytest.mark.parametrize(
    ("steps", "strength", "total"),
    [(1, 0.7, 2), (1, 1.0, 1), (1, 1 / 3, 3), (4, 0.5, 8), (2, 0.3, 7)],
)
def test_image_to_image_runs_the_asked_steps(steps: int, strength: float, total: int) -> None:
    assert image_to_image_steps(steps, strength) == total
    assert int(total * strength) == steps  # what diffusers' get_timesteps keeps
    with pytest.raises(ValueError):
        image_to_image_steps(1, 0.0)
