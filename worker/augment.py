"""Post-generation augmentation (PDA): build the albumentations pipeline for a job. Pure, no I/O.

Copies are cut from a source larger than the output (``crop_scale`` x ``image_size``) when the
policy crops, so crops actually differ; without a crop the source is the output-size image.
Each copy is drawn from generators made from its own seed alone: it depends neither on which
copies came before it in the same thread or process, nor on the global RNGs of Python, NumPy
or OpenCV (albumentations 2.x draws only from the generators its transforms are given).
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np

from core.augmentation import CROPS, AugmentSpec, TransformStep

_BORDERS = {
    "reflect_101": cv2.BORDER_REFLECT_101,
    "reflect": cv2.BORDER_REFLECT,
    "replicate": cv2.BORDER_REPLICATE,
    "wrap": cv2.BORDER_WRAP,
    "constant": cv2.BORDER_CONSTANT,
}


def source_size(spec: AugmentSpec, *, image_size: int) -> int:
    """Side of the image that copies are made from."""
    if any(step.name in CROPS for step in spec.steps()):
        return max(image_size, round(image_size * spec.crop_scale))
    return image_size


def _transform(step: TransformStep, *, image_size: int) -> A.BasicTransform:
    params = dict(step.params)
    for key in ("brightness_limit", "contrast_limit", "limit", "gamma_limit", "scale", "ratio"):
        if isinstance(params.get(key), list):
            params[key] = tuple(params[key])
    if step.name == "RandomCrop":
        return A.RandomCrop(height=image_size, width=image_size, p=1.0)
    if step.name == "RandomResizedCrop":
        return A.RandomResizedCrop(size=(image_size, image_size), p=1.0, **params)
    if step.name == "Rotate":
        params["border_mode"] = _BORDERS[params["border_mode"]]
        return A.Rotate(**params)
    if step.name == "GaussianBlur":
        return A.GaussianBlur(blur_limit=0, **params)
    transform_class = getattr(A, step.name)
    return transform_class(**params)


def build_transform(spec: AugmentSpec, *, image_size: int) -> A.Compose | None:
    """The job's augmentation as one ``A.Compose``, or None when the policy does nothing.

    The output is always ``image_size`` square: a crop cuts it from the larger source, and a
    policy without a crop works on the output-size image.
    """
    steps = spec.steps()
    if not steps:
        return None
    transforms = [_transform(step, image_size=image_size) for step in steps]
    return A.Compose(transforms, strict=True, seed=0, is_check_shapes=False)


def augment(transform: A.Compose, image: np.ndarray, *, seed: int) -> np.ndarray:
    """One augmented copy of ``image`` (HxWx3 uint8), a function of ``image`` and ``seed`` only.

    Every transform of ``transform`` draws from one NumPy and one Python generator, both
    seeded with ``seed`` (``Compose.set_random_state``); ``set_random_seed`` would build two
    per transform, which costs more than the 32 px transforms themselves.
    """
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return np.ascontiguousarray(transform(image=image)["image"])
