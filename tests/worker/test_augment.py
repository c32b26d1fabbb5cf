from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.spec import AugmentSpec
from tests.conftest import CIFAR10_TEST
from worker.augment import augment, build_transform, source_size


def _photos(count: int) -> list[np.ndarray]:
    """Real CIFAR-10 photographs upscaled to a 40 px copy source (or skip without them)."""
    folder = CIFAR10_TEST / "00003"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    files = sorted(Path(folder).iterdir())[:count]
    return [np.asarray(Image.open(f).convert("RGB").resize((40, 40), Image.BICUBIC)) for f in files]


def test_paper_policy_crops_from_a_larger_source() -> None:
    spec = AugmentSpec(policy="paper", crop_scale=1.25)
    assert source_size(spec, image_size=32) == 40
    assert source_size(AugmentSpec(policy=[{"name": "HorizontalFlip"}]), image_size=32) == 32  # type: ignore[list-item]
    assert build_transform(AugmentSpec(policy="none"), image_size=32) is None


def test_copies_differ_from_source_and_each_other_and_repeat_by_seed() -> None:
    transform = build_transform(AugmentSpec(), image_size=32)
    assert transform is not None
    for photo in _photos(5):
        base = np.asarray(Image.fromarray(photo).resize((32, 32), Image.BICUBIC))
        copies = [augment(transform, photo, seed=s) for s in range(4)]
        assert all(c.shape == (32, 32, 3) and c.dtype == np.uint8 for c in copies)
        assert all(not np.array_equal(c, base) for c in copies)
        for i in range(4):
            for j in range(i + 1, 4):
                assert not np.array_equal(copies[i], copies[j])
        assert np.array_equal(augment(transform, photo, seed=2), copies[2])


def test_crops_land_at_different_offsets() -> None:
    transform = build_transform(AugmentSpec(policy=[{"name": "RandomCrop"}]), image_size=32)  # type: ignore[list-item]
    assert transform is not None
    ramp = np.zeros((40, 40, 3), np.uint8)
    ramp[..., 0] = np.arange(40, dtype=np.uint8)[None, :] * 6
    ramp[..., 1] = np.arange(40, dtype=np.uint8)[:, None] * 6
    corners = {tuple(augment(transform, ramp, seed=s)[0, 0, :2]) for s in range(30)}
    assert len(corners) > 10


def test_rotation_mirrors_borders_unless_asked_for_constant() -> None:
    white = np.full((32, 32, 3), 255, np.uint8)
    mirrored = AugmentSpec(policy=[{"name": "Rotate", "params": {"limit": [45, 45], "p": 1}}])  # type: ignore[list-item]
    black = AugmentSpec(
        policy=[
            {"name": "Rotate", "params": {"limit": [45, 45], "p": 1, "border_mode": "constant"}}
        ]  # type: ignore[list-item]
    )
    t_mirror = build_transform(mirrored, image_size=32)
    t_black = build_transform(black, image_size=32)
    assert t_mirror is not None and t_black is not None
    assert augment(t_mirror, white, seed=0).min() == 255
    assert augment(t_black, white, seed=0)[0, 0].max() == 0


def test_every_whitelisted_transform_builds_and_runs() -> None:
    from core.spec import TRANSFORM_PARAMS

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    for name in TRANSFORM_PARAMS:
        spec = AugmentSpec(policy=[{"name": name}])  # type: ignore[list-item]
        transform = build_transform(spec, image_size=32)
        assert transform is not None
        source = image if source_size(spec, image_size=32) == 40 else image[:32, :32]
        assert augment(transform, source, seed=1).shape == (32, 32, 3), name
