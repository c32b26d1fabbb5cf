from __future__ import annotations

import random
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
from PIL import Image

from core.augmentation import AugmentSpec
from core.spec import DatasetSpec, derive_seed
from tests.conftest import CIFAR10_TEST
from worker.augment import augment, build_transform, source_size
from worker.postprocess import finish_item


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
    from core.augmentation import TRANSFORM_PARAMS

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    for name in TRANSFORM_PARAMS:
        spec = AugmentSpec(policy=[{"name": name}])  # type: ignore[list-item]
        transform = build_transform(spec, image_size=32)
        assert transform is not None
        source = image if source_size(spec, image_size=32) == 40 else image[:32, :32]
        assert augment(transform, source, seed=1).shape == (32, 32, 3), name


def _paper() -> A.Compose:
    transform = build_transform(AugmentSpec(), image_size=32)
    assert transform is not None
    return transform


def test_a_copy_depends_on_its_own_seed_alone() -> None:
    rng = np.random.default_rng(3)
    source = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    kept = source.copy()
    seeds = [derive_seed(5, "cat", 0, "copy", k) for k in range(1, 9)]
    alone = [augment(_paper(), source, seed=s) for s in seeds]
    # One transform for all, in the other order, the global RNGs reseeded before each copy:
    # a copy comes from its own generators, not from what the transform made before nor from
    # Python's, NumPy's or OpenCV's global state.
    shared = _paper()
    for i in reversed(range(len(seeds))):
        random.seed(i)
        np.random.seed(i)
        cv2.setRNGSeed(i)
        assert np.array_equal(augment(shared, source, seed=seeds[i]), alone[i]), i
        assert np.array_equal(augment(shared, source, seed=seeds[i]), alone[i]), i
    assert np.array_equal(source, kept)  # no transform wrote into the source
    assert len({c.tobytes() for c in alone}) == len(seeds)


def test_finish_item_draws_copy_k_from_its_documented_seed() -> None:
    spec = DatasetSpec(labels=["cat", "dog"], ipc=10, image_size=32, seed=9)
    cls = spec.classes()[1]
    rng = np.random.default_rng(4)
    small = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    source = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    done = finish_item(spec, cls, 1, 123, "a photo of a dog", small, source)
    assert [d.number for d in done] == [5, 6, 7, 8, 9]
    images = [d.image for d in done]
    for k in range(1, 5):
        expected = augment(_paper(), source, seed=derive_seed(9, "dog", 1, "copy", k))
        assert images[k] is not None and np.array_equal(images[k], expected), k
        assert done[k].meta["copy"] == k
    # Fewer copies wanted (ipc 8: two for this image): those made are the same ones.
    short = finish_item(spec.model_copy(update={"ipc": 8}), cls, 1, 123, "p", small, source)
    assert len(short) == 3
    for k in (1, 2):
        image = short[k].image
        assert image is not None and np.array_equal(image, images[k]), k
