"""Where finished images go: ``Finished`` (one image, encoded, with its metadata line),
``Outputs`` (the PNG tree, WebDataset and Parquet shards, the tensor files, the contact
sheet) and ``RunResult`` (what a run did). The engine fills them; the tasks and the manifest
read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core import presets
from core.presets import ClassInfo
from core.soft_labels import SOFT_LABELS_FILE
from core.spec import DatasetSpec
from worker.outputs import formats, parquet, soft_labels
from worker.outputs.archive import ArchiveWriter, image_name, wants_png
from worker.outputs.preview import PreviewCollector
from worker.outputs.webdataset import sample_key


@dataclass(frozen=True)
class Finished:
    """One output image, encoded, with its metadata line."""

    cls: ClassInfo
    number: int
    #: None only when an archive is assembled from parts and nothing needs the pixels.
    image: np.ndarray | None
    png: bytes | None
    meta: dict[str, Any]


@dataclass
class Outputs:
    """Where each finished image goes: the PNG tree, WebDataset shards, Parquet shards and/or
    the in-memory tensor lists."""

    spec: DatasetSpec
    writer: ArchiveWriter
    count: int = 0
    per_class: dict[int, int] = field(default_factory=dict)
    preview: PreviewCollector = field(default_factory=PreviewCollector)
    _kept: list[tuple[int, int, np.ndarray]] = field(default_factory=list)
    #: The job's soft-label teacher (``soft_labels``): each image's logits. A shard's part
    #: has none; its assembly labels every image.
    teacher: soft_labels.Logits | None = None
    soft: soft_labels.Collector | None = field(default=None, init=False)
    parquet_shards: parquet.ShardWriter | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        asked = self.spec.soft_labels
        if asked is not None and self.teacher is not None:
            self.soft = soft_labels.Collector(
                [c.label for c in self.spec.classes()],
                temperature=asked.temperature,
                top_k=asked.top_k,
                teacher=self.teacher,
            )
        if "parquet" in self.spec.formats:
            # Beside the zip, like the WebDataset tars; the writer copies them in on commit.
            directory = self.writer.partial.parent
            self.parquet_shards = parquet.ShardWriter.for_spec(
                self.spec, directory=directory, with_soft=self.soft is not None
            )
            self.writer.attach(self.parquet_shards)

    def wants_pixels(self, class_index: int, number: int) -> bool:
        """Whether ``add`` needs this image's array (tensors, soft labels, a preview tile)."""
        per_sample = self.spec.augment.n_copies + 1
        return (
            self.keeps_pixels
            or self.soft is not None
            or self.preview.wants(
                class_index=class_index, sample=number // per_sample, copy=number % per_sample
            )
        )

    def add(self, done: Finished) -> None:
        per_sample = self.spec.augment.n_copies + 1
        if done.image is not None:
            self.preview.offer(
                class_index=done.cls.index,
                label=done.cls.label,
                sample=done.number // per_sample,
                copy=done.number % per_sample,
                image=done.image,
            )
        extra: dict[str, Any] = {}
        if self.soft is not None:
            if done.image is None:
                raise ValueError(f"soft labels need the pixels of image {done.number}")
            extra = self.soft.add(done.cls.index, done.number, done.image)
        if done.png is not None:
            name = image_name(done.cls.index, done.cls.label, done.number)
            meta = {"label": done.cls.index, "label_name": done.cls.label, **done.meta, **extra}
            if "imagefolder" in self.spec.formats:
                self.writer.add_png(name, done.png, **meta)
            if "webdataset" in self.spec.formats:
                key = sample_key(done.cls.index, done.number)
                self.writer.add_sample(key, name, done.png, **meta)
            if self.parquet_shards is not None:
                self.parquet_shards.add(name, done.png, meta)
        if self.keeps_pixels:
            if done.image is None:
                raise ValueError(f"tensors need the pixels of image {done.number}")
            self._kept.append((done.cls.index, done.number, done.image))
        self.count += 1
        self.per_class[done.cls.index] = self.per_class.get(done.cls.index, 0) + 1

    @property
    def wants_png(self) -> bool:
        """Whether ``add`` needs every image's PNG bytes (imagefolder, webdataset, parquet)."""
        return wants_png(self.spec.formats)

    def webdataset_entry(self) -> dict[str, Any]:
        """The manifest's ``formats`` entry for the WebDataset shards, if asked for."""
        if "webdataset" not in self.spec.formats:
            return {}
        return {"webdataset": self.writer.webdataset.description()}

    def parquet_entry(self) -> dict[str, Any]:
        """The manifest's ``formats`` entry for the Parquet shards, if asked for; finishes
        them (the entry names every shard, and the count is in each name)."""
        if self.parquet_shards is None:
            return {}
        self.parquet_shards.finish()
        return {"parquet": self.parquet_shards.description()}

    def write_soft_labels(self, provenance: dict[str, Any]) -> dict[str, Any] | None:
        """Add soft_labels.pt, if asked for; returns the manifest's ``soft_labels`` entry."""
        if self.soft is None:
            return None
        teacher = str(provenance.get("teacher", "reference"))
        self.writer.add_file(SOFT_LABELS_FILE, self.soft.file_bytes(teacher))
        return self.soft.description(provenance)

    @property
    def keeps_pixels(self) -> bool:
        """Whether every image's array is kept for a tensor file."""
        return "tensors" in self.spec.formats or "challenge" in self.spec.formats

    def write_tensors(self) -> dict[str, Any]:
        """Add tensors.pt (and normalized.pt for presets) and the challenge's ``<preset>.pt``
        as asked; returns their manifest entries."""
        if not self.keeps_pixels:
            return {}
        ordered = sorted(self._kept, key=lambda row: (row[0], row[1]))
        images = [row[2] for row in ordered]
        labels = [row[0] for row in ordered]
        described: dict[str, Any] = {}
        if "challenge" in self.spec.formats and self.spec.preset:
            described.update(self._write_challenge(images))
        if "tensors" not in self.spec.formats:
            return described
        classes = [c.label for c in self.spec.classes()]
        self.writer.add_file("tensors.pt", formats.tensors_pt(images, labels, classes))
        described |= {
            "tensors.pt": {
                "images": "uint8, N x 3 x H x W, values 0..255, RGB, class-major",
                "labels": "int64, N, class index",
                "classes": "list of class names by index",
            }
        }
        if self.spec.preset:
            preset = presets.get(self.spec.preset)
            data = formats.normalized_pt(images, labels, mean=preset.mean, std=preset.std)
            self.writer.add_file("normalized.pt", data)
            described["normalized.pt"] = {
                "images": "float32, N x 3 x H x W, (x / 255 - mean) / std, class-major",
                "labels": "int64, N, class index",
                "mean": list(preset.mean),
                "std": list(preset.std),
            }
        return described

    def _write_challenge(self, images: list[np.ndarray]) -> dict[str, Any]:
        assert self.spec.preset is not None
        rules = presets.CHALLENGE[self.spec.preset]
        name = f"{rules.preset}.pt"
        self.writer.add_file(name, formats.challenge_pt(images, mean=rules.mean, std=rules.std))
        warnings = []
        per_class = min(self.per_class.values(), default=0)
        if per_class != rules.ipc or max(self.per_class.values(), default=0) != rules.ipc:
            warnings.append(
                f"the challenge's evaluate.py asserts {rules.ipc} images per class "
                f"({rules.ipc * len(self.spec.classes())} in all); this file has {len(images)}"
            )
        if self.spec.size != rules.side:
            warnings.append(
                f"the challenge's evaluate.py asserts {rules.side} x {rules.side} px; these are "
                f"{self.spec.size} x {self.spec.size}"
            )
        return {
            name: {
                "images": "float32, N x 3 x H x W, (x / 255 - mean) / std, class-major; one "
                "bare tensor (no dict): labels are implied by order, "
                f"{rules.ipc} per class in the preset's order",
                "for": "ECCV 2024 Dataset Distillation Challenge, evaluate.py",
                "mean": list(rules.mean),
                "std": list(rules.std),
                "warnings": warnings,
            }
        }


@dataclass(frozen=True)
class RunResult:
    """What ``run`` did: images sampled, seconds in the model and in all, the copies' source."""

    generated: int
    seconds_sampling: float
    seconds_generating: float
    #: Side in px of the image augmented copies were cut from.
    source_size: int
    #: ``select``: each class's selection record (``worker.selection.oversample``), in order.
    selected: tuple[dict[str, Any], ...] = ()
