"""``soft_labels.pt`` and the soft-label metadata columns (``core.soft_labels``).

``Collector`` takes each finished image as it is added, asks the teacher for its logits,
keeps them as float16 and returns the image's metadata columns: ``soft_top_k``, its
``top_k`` classes by probability (ties to the lower index), and ``soft_top_p``, those
probabilities at the temperature, rounded to ``TOP_P_DECIMALS``. The probabilities are
those of the stored float16 logits, so the file and the columns agree.

The file (``torch.load(path, weights_only=True)``)::

    {"logits": float16 (N, C), "labels": int64 (N,), "files": [train/ file names],
     "classes": [class names by index], "temperature": float, "teacher": str}

Rows are class-major, each class in image order: ``tensors.pt``'s order, and the order of
the ImageFolder tree sorted by file name.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from core.soft_labels import SOFT_LABELS_FILE, TOP_K_COLUMN, TOP_P_COLUMN, TOP_P_DECIMALS
from worker.outputs.archive import image_name

Logits = Callable[[np.ndarray], np.ndarray]


def probabilities(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax of ``logits / temperature`` along the last axis, in float64."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    out: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return out


class Collector:
    """Every image's float16 logits, by (class, number), and its metadata columns."""

    def __init__(
        self, classes: Sequence[str], *, temperature: float, top_k: int, teacher: Logits
    ) -> None:
        if not 1 <= top_k <= len(classes):
            raise ValueError(f"top_k must be 1..{len(classes)}, not {top_k}")
        self.classes = list(classes)
        self.temperature = float(temperature)
        self.top_k = top_k
        self.teacher = teacher
        self._rows: dict[tuple[int, int], np.ndarray] = {}

    def add(self, class_index: int, number: int, image: np.ndarray) -> dict[str, list[Any]]:
        """Label one image; returns its ``soft_top_k`` and ``soft_top_p`` columns."""
        logits = np.asarray(self.teacher(image), dtype=np.float32)
        if logits.shape != (len(self.classes),):
            raise ValueError(
                f"the teacher gave {logits.shape} logits for {len(self.classes)} classes"
            )
        stored = logits.astype(np.float16)
        self._rows[(class_index, number)] = stored
        p = probabilities(stored, self.temperature)
        top = np.argsort(-p, kind="stable")[: self.top_k]
        return {
            TOP_K_COLUMN: [int(i) for i in top],
            TOP_P_COLUMN: [round(float(p[i]), TOP_P_DECIMALS) for i in top],
        }

    def __len__(self) -> int:
        return len(self._rows)

    def file_bytes(self, teacher: str) -> bytes:
        """``soft_labels.pt``, rows class-major."""
        order = sorted(self._rows)
        logits = np.stack([self._rows[k] for k in order]) if order else None
        buffer = io.BytesIO()
        torch.save(
            {
                "logits": (
                    torch.from_numpy(logits)
                    if logits is not None
                    else torch.zeros((0, len(self.classes)), dtype=torch.float16)
                ),
                "labels": torch.tensor([c for c, _ in order], dtype=torch.int64),
                "files": [image_name(c, self.classes[c], n) for c, n in order],
                "classes": list(self.classes),
                "temperature": self.temperature,
                "teacher": teacher,
            },
            buffer,
        )
        return buffer.getvalue()

    def description(self, provenance: dict[str, Any]) -> dict[str, Any]:
        """The manifest's ``soft_labels`` entry."""
        return {
            "file": SOFT_LABELS_FILE,
            "images": len(self._rows),
            "logits": "float16, N x C: one row per image, class-major, each class in image "
            "order (tensors.pt's order); columns in class-index order",
            "temperature": self.temperature,
            "top_k": self.top_k,
            "columns": {
                TOP_K_COLUMN: f"the image's {self.top_k} most probable classes",
                TOP_P_COLUMN: f"their probabilities at temperature {self.temperature:g}",
            },
            "teacher": provenance,
            "load": f'torch.load("{SOFT_LABELS_FILE}", weights_only=True)',
        }


@dataclass(frozen=True)
class SoftLabels:
    """``soft_labels.pt`` as read back: float32 logits (N, C) and the rest, validated."""

    logits: torch.Tensor
    labels: torch.Tensor
    files: tuple[str, ...]
    classes: tuple[str, ...]
    temperature: float


def read(archive: zipfile.ZipFile) -> SoftLabels:
    """The archive's soft labels; ValueError saying what is wrong with the file."""
    try:
        data = torch.load(io.BytesIO(archive.read(SOFT_LABELS_FILE)), weights_only=True)
    except KeyError:
        raise ValueError(f"the archive holds no {SOFT_LABELS_FILE}") from None
    except Exception as exc:  # torch raises many types for a bad file
        raise ValueError(f"cannot load {SOFT_LABELS_FILE}: {exc}") from exc
    if not isinstance(data, dict) or not {"logits", "labels", "files", "classes"} <= data.keys():
        raise ValueError(f"{SOFT_LABELS_FILE} lacks logits, labels, files or classes")
    logits, labels = data["logits"], data["labels"]
    files, classes = list(data["files"]), [str(c) for c in data["classes"]]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{SOFT_LABELS_FILE} 'logits' must be N x C")
    if logits.shape[1] != len(classes):
        raise ValueError(
            f"{SOFT_LABELS_FILE} has {logits.shape[1]} columns, {len(classes)} classes"
        )
    if not isinstance(labels, torch.Tensor) or labels.shape != (logits.shape[0],):
        raise ValueError(f"{SOFT_LABELS_FILE} 'labels' must be one per row")
    if len(files) != logits.shape[0]:
        raise ValueError(f"{SOFT_LABELS_FILE} names {len(files)} files for {logits.shape[0]} rows")
    temperature = float(data.get("temperature", 1.0))
    if not 0 < temperature < float("inf"):
        raise ValueError(f"{SOFT_LABELS_FILE} temperature {temperature} is not positive")
    return SoftLabels(
        logits=logits.to(torch.float32),
        labels=labels.to(torch.int64),
        files=tuple(str(f) for f in files),
        classes=tuple(classes),
        temperature=temperature,
    )
