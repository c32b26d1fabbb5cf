"""Which real images to keep: coreset selection over a reference set, class by class.

``select(method, per_class_images, k=..., seed=...)`` returns, for each class, the indices of
the ``k`` images a real-image baseline keeps:

- ``random_real``: ``k`` drawn without replacement by a numpy ``Generator`` seeded with
  ``[seed, class position]``, so a class's draw does not depend on the other classes.
- ``herding`` (Welling 2009; the herding baseline of DC-Bench): greedily add the image whose
  feature keeps the running mean of the chosen features closest to the class mean.
- ``kcenter`` (greedy k-center, Sener & Savarese 2018): start from the image closest to the
  class mean, then repeatedly add the image farthest from everything chosen so far.

Herding and k-center measure distances between features: the penultimate layer (``embed``)
of the benchmark ConvNet (``worker.evaluate``), trained on the whole reference set for a few
epochs with the seed. Callers may pass their own features instead.

Indices come back in selection order (a greedy method's first ``j`` picks are its pick for
``j``); ties go to the lowest index. The same images, ``k``, seed and torch threads give the
same indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np
import torch

from worker.selection.teachers import fit

Method = Literal["random_real", "herding", "kcenter"]
METHODS: tuple[str, ...] = get_args(Method)
#: Epochs of the feature network: enough for class-aware features, a minute or two on a CPU
#: for a CIFAR-sized set.
FEATURE_EPOCHS = 10


def _check(method: str, per_class: Sequence[np.ndarray], k: int) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown selection method {method!r}; known: {', '.join(METHODS)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    if not per_class:
        raise ValueError("no classes to select from")
    short = [f"class {c} has {len(x)}" for c, x in enumerate(per_class) if len(x) < k]
    if short:
        raise ValueError(f"k={k} images per class asked for, but " + "; ".join(short))


def select(
    method: str,
    per_class_images: Sequence[np.ndarray],
    *,
    k: int,
    seed: int,
    features: Sequence[np.ndarray] | None = None,
    feature_epochs: int = FEATURE_EPOCHS,
    device: str | torch.device | None = None,
) -> list[list[int]]:
    """For each class (uint8 arrays (N, S, S, 3)), the indices of the ``k`` images kept.

    ``features`` (one (N, D) array per class) replaces the ConvNet features that herding
    and k-center otherwise compute (``embed_classes``). ValueError names the method, ``k``
    or the classes with fewer than ``k`` images.
    """
    _check(method, per_class_images, k)
    if method == "random_real":
        return [
            [int(i) for i in np.random.default_rng([seed, c]).choice(len(x), k, replace=False)]
            for c, x in enumerate(per_class_images)
        ]
    if features is None:
        features = embed_classes(per_class_images, seed=seed, epochs=feature_epochs, device=device)
    if len(features) != len(per_class_images):
        raise ValueError(f"{len(features)} feature arrays for {len(per_class_images)} classes")
    pick = herding if method == "herding" else kcenter
    out = []
    for c, (images, feats) in enumerate(zip(per_class_images, features, strict=True)):
        if len(feats) != len(images):
            raise ValueError(f"class {c}: {len(feats)} feature rows for {len(images)} images")
        out.append(pick(np.asarray(feats, dtype=np.float64), k))
    return out


def herding(features: np.ndarray, k: int) -> list[int]:
    """Greedy herding: step ``t`` adds the unchosen row ``x`` minimising
    ``|| (t + 1) * mean - (sum of chosen) - x ||``, i.e. the running mean's distance to the
    class mean after adding ``x``."""
    x = np.asarray(features, dtype=np.float64)
    mean = x.mean(axis=0)
    chosen: list[int] = []
    total = np.zeros_like(mean)
    free = np.ones(len(x), dtype=bool)
    for t in range(k):
        distance = ((x - ((t + 1) * mean - total)) ** 2).sum(axis=1)
        distance[~free] = np.inf
        index = int(np.argmin(distance))
        chosen.append(index)
        free[index] = False
        total += x[index]
    return chosen


def kcenter(features: np.ndarray, k: int) -> list[int]:
    """Greedy k-center: the row closest to the mean, then each time the unchosen row whose
    distance to its nearest chosen row is largest."""
    x = np.asarray(features, dtype=np.float64)
    first = int(np.argmin(((x - x.mean(axis=0)) ** 2).sum(axis=1)))
    chosen = [first]
    nearest = ((x - x[first]) ** 2).sum(axis=1)
    free = np.ones(len(x), dtype=bool)
    free[first] = False
    while len(chosen) < k:
        candidates = np.where(free, nearest, -np.inf)
        index = int(np.argmax(candidates))
        chosen.append(index)
        free[index] = False
        nearest = np.minimum(nearest, ((x - x[index]) ** 2).sum(axis=1))
    return chosen


def embed_classes(
    per_class_images: Sequence[np.ndarray],
    *,
    seed: int,
    epochs: int = FEATURE_EPOCHS,
    device: str | torch.device | None = None,
    depth: int = 3,
    batch_size: int = 256,
) -> list[np.ndarray]:
    """ConvNet-``depth`` penultimate features of every image, per class (float64 (N, D)).

    The network is ``teachers.fit``'s: the evaluator's (same initialisation, SGD and
    schedule, no augmentation), trained for ``epochs`` on all the images with the seed;
    inputs are normalised with the set's own per-channel mean and std.
    """
    fitted = fit(
        per_class_images,
        seed=seed,
        epochs=epochs,
        device=device,
        depth=depth,
        batch_size=batch_size,
    )
    counts = [len(x) for x in per_class_images]
    every = np.concatenate([np.asarray(x, dtype=np.uint8) for x in per_class_images])
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(every), batch_size):
            batch = fitted.inputs(every[start : start + batch_size])
            chunks.append(fitted.model.embed(batch).to("cpu"))
    flat = torch.cat(chunks).to(torch.float64).numpy()
    return [part for part in np.split(flat, np.cumsum(counts)[:-1])]
