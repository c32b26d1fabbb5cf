"""Teachers and scorers: classifiers that label a job's images (``soft_labels``) or score
its candidates (``select``).

``fit(per_class_images, seed=..., epochs=...)`` trains the benchmark ConvNet (the
evaluator's network, initialisation, SGD and schedule, no augmentation) on real images, class
by class, with inputs normalised by the images' own per-channel mean and std. Coreset
selection embeds with such a network; the ``reference`` teacher and the ``reference`` select
scorer are one trained on the job's classes of its reference set (``reference_network``).
A pretrained teacher (``worker.model.classifier``, loaded by the worker) gives the logits of
its columns for the job's classes (``Pretrained``, ``core.soft_labels.teacher_columns``).

``Teacher.logits(image)`` labels one image at a time, so an image's logits never depend on
which images share its batch: a job sharded any way, or assembled from parts, gets the same
numbers. ``Teacher.score(images)`` scores a class's pool in fixed chunks (a pool is always
one whole class, so its chunks are the same however the job is cut). The same images, seed,
epochs and torch threads give the same network.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from core.settings import Settings
from core.soft_labels import REFERENCE, TEACHER_PART_PREFIX, UnmatchedTeacher, teacher_columns
from core.spec import DatasetSpec
from worker import runtime
from worker.evaluate.network import ConvNet
from worker.evaluate.train import Hyper, build_model, resolve_device, train_once
from worker.selection import references

if TYPE_CHECKING:
    from worker.model.classifier import Classifier

#: Epochs of the reference teacher: as the coreset features', a minute or two on a CPU for a
#: CIFAR-sized set.
TEACHER_EPOCHS = 10
#: Teachers kept per worker process (a job and its assembly, or repeated requests, reuse one).
CACHE_SIZE = 2


@dataclass(frozen=True)
class Fitted:
    """A trained ConvNet and the normalisation it was trained with."""

    model: ConvNet
    mean: torch.Tensor  # float32 (1, 3, 1, 1), on the [0, 1] scale
    std: torch.Tensor
    device: torch.device
    images: int
    train_accuracy: float

    def inputs(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> normalised float32 (N, 3, S, S) on the network's device."""
        return _normalised(images, self.mean, self.std).to(self.device)


def _normalised(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return (tensor.to(torch.float32) / 255.0 - mean) / std


def fit(
    per_class_images: Sequence[np.ndarray],
    *,
    seed: int,
    epochs: int,
    device: str | torch.device | None = None,
    depth: int = 3,
    batch_size: int = 256,
) -> Fitted:
    """ConvNet-``depth`` trained for ``epochs`` on every image (uint8 (N, S, S, 3) per
    class; class ``c`` is label ``c``) with ``seed``."""
    target = resolve_device(device)
    counts = [len(x) for x in per_class_images]
    every = np.concatenate([np.asarray(x, dtype=np.uint8) for x in per_class_images])
    if every.ndim != 4 or every.shape[1] != every.shape[2] or every.shape[3] != 3:
        raise ValueError(f"images must be uint8 (N, S, S, 3), not {every.shape}")
    pixels = torch.from_numpy(every).to(torch.float64).div(255.0)
    mean = pixels.mean(dim=(0, 1, 2)).to(torch.float32).view(1, 3, 1, 1)
    std = pixels.std(dim=(0, 1, 2), unbiased=False).clamp_min(1e-6).to(torch.float32)
    std = std.view(1, 3, 1, 1)
    del pixels
    inputs = _normalised(every, mean, std).to(target)
    labels = torch.repeat_interleave(
        torch.arange(len(counts)), torch.tensor(counts, dtype=torch.int64)
    ).to(target)
    hyper = Hyper(epochs=epochs, runs=1, depth=depth, batch_size=batch_size)
    model = build_model(len(counts), int(every.shape[1]), hyper, seed).to(target)
    train_once(model, inputs, labels, hyper, seed=seed, use_dsa=False)
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(inputs), batch_size):
            predicted = model(inputs[start : start + batch_size]).argmax(dim=1)
            correct += int((predicted == labels[start : start + batch_size]).sum())
    return Fitted(model, mean, std, target, len(every), correct / len(every))


class Teacher:
    """A trained network that gives each image its logits, and what it is."""

    def __init__(self, fitted: Fitted, provenance: dict[str, Any]) -> None:
        self.fitted = fitted
        self.provenance = provenance
        self.classes = int(fitted.model.classifier.out_features)
        #: Per class, p(class) of each image the network was trained on (its reference
        #: images, in their digest order): what ``keep: difficulty`` matches.
        self.confidences: tuple[np.ndarray, ...] = ()

    @torch.inference_mode()
    def logits(self, image: np.ndarray) -> np.ndarray:
        """float32 (C,) logits of one uint8 (S, S, 3) image."""
        batch = self.fitted.inputs(np.asarray(image, dtype=np.uint8)[None])
        out: np.ndarray = self.fitted.model(batch)[0].to("cpu", torch.float32).numpy()
        return out

    @torch.inference_mode()
    def score(self, images: np.ndarray, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities float64 (N, C), penultimate features float64 (N, D)) of uint8
        (N, S, S, 3) images, in fixed chunks of ``batch_size``: the same images in the same
        order give the same numbers."""
        probs, feats = [], []
        for start in range(0, len(images), batch_size):
            batch = self.fitted.inputs(np.asarray(images[start : start + batch_size]))
            embedded = self.fitted.model.embed(batch)
            logits = self.fitted.model.classifier(embedded)
            probs.append(torch.softmax(logits.to(torch.float64), dim=1).to("cpu"))
            feats.append(embedded.to("cpu", torch.float64))
        return torch.cat(probs).numpy(), torch.cat(feats).numpy()


_cache: OrderedDict[tuple[Any, ...], Teacher] = OrderedDict()


class SoftTeacher(Protocol):
    """What labels a job's images: logits of one image over the job's classes, and what the
    manifest says of it."""

    provenance: dict[str, Any]

    def logits(self, image: np.ndarray) -> np.ndarray: ...


class TeacherUnavailable(ValueError):
    """The job's pretrained teacher is not loaded in this worker, or cannot label its classes
    (the job fails as invalid_request)."""

    error_type = "invalid_request"


class Pretrained:
    """A pretrained classifier's logits of the job's classes, in the job's class order."""

    def __init__(self, classifier: Classifier, columns: list[int]) -> None:
        self.classifier = classifier
        self.columns = np.asarray(columns, dtype=np.int64)
        self.provenance: dict[str, Any] = {
            **classifier.describe(),
            "columns": [
                {"column": int(c), "name": classifier.labels[c]} for c in self.columns.tolist()
            ],
        }

    def logits(self, image: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.classifier.logits(image)[self.columns]
        return out


def for_job(spec: DatasetSpec, settings: Settings) -> SoftTeacher | None:
    """The job's soft-label teacher (None without ``soft_labels``), from this worker's cache
    when it has one. ``references.ReferenceUnavailable`` when its reference set is gone,
    ``TeacherUnavailable`` when its pretrained teacher is not here or lacks a class."""
    soft = spec.soft_labels
    if soft is None:
        return None
    if soft.teacher == REFERENCE:
        return reference_network(spec, settings)
    here = runtime.current()
    classifier = here.teachers.get(soft.teacher)
    if classifier is None:
        why = here.generator.unavailable.get(f"{TEACHER_PART_PREFIX}{soft.teacher}")
        loaded = ", ".join(sorted(here.teachers)) or "none"
        raise TeacherUnavailable(
            f"soft_labels.teacher: this worker has no teacher {soft.teacher!r} "
            + (f"({why})" if why else f"(it loaded: {loaded})")
        )
    try:
        columns = teacher_columns(soft.teacher, classifier.labels, spec.classes())
    except UnmatchedTeacher as exc:
        raise TeacherUnavailable(str(exc)) from None
    return Pretrained(classifier, columns)


def reference_network(spec: DatasetSpec, settings: Settings) -> Teacher:
    """ConvNet-3 trained on the job's classes of its reference set at the job's size with
    the job seed: the ``reference`` teacher and the ``reference`` select scorer, trained once
    per job (and kept for the next ones). ``references.ReferenceUnavailable`` when the set
    is gone."""
    classes = [(c.label, c.wnid) for c in spec.classes()]
    key = ("reference", spec.reference, tuple(classes), spec.size, spec.seed)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    with references.source(settings, **spec.reference_source()) as opened:
        per_class = references.load_for_classes(opened, classes, size=spec.size)
    fitted = fit([c.images for c in per_class], seed=spec.seed, epochs=TEACHER_EPOCHS)
    teacher = Teacher(
        fitted,
        {
            "teacher": "reference",
            "network": f"ConvNet-3, width 128, {TEACHER_EPOCHS} epochs, no augmentation",
            "trained_on": {
                "reference": spec.reference,
                "images": fitted.images,
                "folders": [c.folder for c in per_class],
                "image_size": spec.size,
            },
            "seed": spec.seed,
            "train_accuracy": round(fitted.train_accuracy, 6),
            "batch": "one image per forward pass",
        },
    )
    teacher.confidences = tuple(
        teacher.score(c.images)[0][:, index] for index, c in enumerate(per_class)
    )
    _cache[key] = teacher
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return teacher
