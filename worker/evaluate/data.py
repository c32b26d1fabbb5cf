"""Inputs of an evaluation: the distilled archive, the real test set, and how they line up.

The archive is read straight from its zip: ``tensors.pt`` when it holds one (the same images
as ``train/``, one load instead of thousands of PNG decodes), else the ``train/`` ImageFolder
with its ``metadata.jsonl`` labels. Class names and any preset come from ``manifest.json``.

The test set is an ImageFolder tree (a directory, or a zip of one): class folders sorted by
name give the class indices, as torchvision's ImageFolder does. Its order must match the
archive's, or every test image would be scored against the wrong class; ``check_class_order``
refuses a mismatch and says where it is.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image

from worker.outputs.archive import slugify

#: File endings torchvision's ImageFolder accepts.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BY_NAME = "by name"
BY_INDEX = "by index only"


class EvaluationError(ValueError):
    """An input the evaluation cannot use; the message says what and where."""


class ClassOrderError(EvaluationError):
    """The test set's classes are not the archive's classes in the archive's order."""


@dataclass(frozen=True)
class TrainSet:
    """The distilled images: uint8 (N, 3, H, W), int64 labels, class names by index."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    wnids: tuple[str | None, ...]
    preset: dict[str, Any] | None
    source: str
    #: Each image's ``train/`` file name, when read from the ImageFolder tree (None: from
    #: tensors.pt, class-major).
    files: tuple[str, ...] | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])


@dataclass(frozen=True)
class TestSet:
    """Real images: uint8 (N, 3, H, W), int64 labels, the class folder names by index."""

    images: torch.Tensor
    labels: torch.Tensor
    folders: tuple[str, ...]
    resized: int = 0

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std on the [0, 1] scale, and where they came from."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _hidden(parts: Iterable[str]) -> bool:
    """Folders no dataset means to include: dot folders and macOS zip resource forks."""
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def _decode(data: bytes, name: str, size: tuple[int, int] | None = None) -> tuple[np.ndarray, bool]:
    """HxWx3 uint8 RGB and whether it was resized: with ``size`` (h, w), other sizes are
    resized to it (bicubic; PIL filters over the whole source, so shrinking antialiases)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"cannot read image {name}: {exc}") from exc
    if size is not None and rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        return np.asarray(rgb, dtype=np.uint8), True
    return np.asarray(rgb, dtype=np.uint8), False


def _stack(arrays: Sequence[np.ndarray], names: Sequence[str], what: str) -> torch.Tensor:
    """(N, H, W, 3) arrays of one size -> (N, 3, H, W) uint8; a size mismatch is an error."""
    if not arrays:
        raise EvaluationError(f"{what} holds no images")
    first = arrays[0].shape
    for array, name in zip(arrays, names, strict=True):
        if array.shape != first:
            raise EvaluationError(
                f"{what} images differ in size: {names[0]} is {first[1]}x{first[0]}, "
                f"{name} is {array.shape[1]}x{array.shape[0]}"
            )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# --- the archive ---------------------------------------------------------------------------


def _read_json(archive: zipfile.ZipFile, name: str) -> Any:
    try:
        return json.loads(archive.read(name).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise EvaluationError(f"{name} in the archive is not valid JSON: {exc}") from exc


def _manifest_classes(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes:
        raise EvaluationError("manifest.json has no 'classes' list")
    ordered = sorted(classes, key=lambda c: int(c.get("index", -1)))
    if [int(c["index"]) for c in ordered] != list(range(len(ordered))):
        raise EvaluationError("manifest.json 'classes' indices are not 0..n-1")
    return ordered


def _from_tensors(archive: zipfile.ZipFile) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    try:
        data = torch.load(io.BytesIO(archive.read("tensors.pt")), weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise EvaluationError(f"cannot load tensors.pt from the archive: {exc}") from exc
    if not isinstance(data, dict) or not {"images", "labels"} <= data.keys():
        raise EvaluationError("tensors.pt is not a dict with 'images' and 'labels'")
    images, labels = data["images"], data["labels"]
    if not (
        isinstance(images, torch.Tensor)
        and images.dtype == torch.uint8
        and images.dim() == 4
        and images.shape[1] == 3
    ):
        raise EvaluationError("tensors.pt 'images' must be uint8 N x 3 x H x W")
    if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],):
        raise EvaluationError("tensors.pt 'labels' must be one integer per image")
    classes = [str(c) for c in data.get("classes", [])]
    return images.contiguous(), labels.to(torch.int64), classes


def _from_imagefolder(
    archive: zipfile.ZipFile, folder_index: dict[str, int] | None
) -> tuple[torch.Tensor, torch.Tensor, list[str], tuple[str, ...]]:
    """``train/`` images with labels from metadata.jsonl, else from their folders."""
    names = set(archive.namelist())
    rows: list[tuple[str, int]] = []
    if "train/metadata.jsonl" in names:
        text = archive.read("train/metadata.jsonl").decode("utf-8")
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((f"train/{row['file_name']}", int(row["label"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise EvaluationError(
                    f"train/metadata.jsonl line {number} lacks file_name/label: {exc}"
                ) from exc
        missing = [name for name, _ in rows if name not in names]
        if missing:
            raise EvaluationError(f"train/metadata.jsonl names {missing[0]}, not in the archive")
    else:
        files = sorted(
            n for n in names if n.startswith("train/") and n.count("/") >= 2 and _is_image(n)
        )
        folders = sorted({n.split("/")[1] for n in files})
        # Without metadata the manifest's folder -> index map decides; failing that, sorted
        # folder order, which is how the archive names its folders.
        index = folder_index or {f"train/{f}": i for i, f in enumerate(folders)}
        for name in files:
            folder = "train/" + name.split("/")[1]
            if folder not in index:
                raise EvaluationError(f"{name} is in a folder the manifest does not list")
            rows.append((name, index[folder]))
    if not rows:
        raise EvaluationError("the archive holds neither tensors.pt nor images under train/")
    file_names = tuple(name.removeprefix("train/") for name, _ in rows)
    arrays = [_decode(archive.read(name), name)[0] for name, _ in rows]
    images = _stack(arrays, [name for name, _ in rows], "the archive's train/")
    return images, torch.tensor([label for _, label in rows], dtype=torch.int64), [], file_names


def load_archive(path: Path) -> TrainSet:
    """The training set held by an archive zip written by this service (see module doc)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise EvaluationError(f"{path} is not a zip archive")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        manifest = _read_json(archive, "manifest.json") if "manifest.json" in names else None
        entries = _manifest_classes(manifest) if manifest is not None else None
        folder_index = (
            {str(c["folder"]): int(c["index"]) for c in entries if c.get("folder")}
            if entries
            else None
        )
        files: tuple[str, ...] | None = None
        if "tensors.pt" in names:
            images, labels, tensor_classes = _from_tensors(archive)
            source = "tensors.pt"
        else:
            images, labels, tensor_classes, files = _from_imagefolder(archive, folder_index)
            source = "train/"
    if entries is not None:
        classes = [str(c["label"]) for c in entries]
        wnids = [c.get("wnid") for c in entries]
        if tensor_classes and tensor_classes != classes:
            raise EvaluationError("tensors.pt 'classes' differ from manifest.json 'classes'")
    elif tensor_classes:
        classes, wnids = tensor_classes, [None] * len(tensor_classes)
    else:
        raise EvaluationError("the archive has no manifest.json naming its classes")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        raise EvaluationError(f"labels fall outside the {len(classes)} classes of the manifest")
    preset = manifest.get("preset") if manifest is not None else None
    return TrainSet(
        images=images,
        labels=labels,
        classes=tuple(classes),
        wnids=tuple(None if w is None else str(w) for w in wnids),
        preset=preset if isinstance(preset, dict) else None,
        source=source,
        files=files,
    )


# --- the test set --------------------------------------------------------------------------


def _directory_members(root: Path) -> list[tuple[str, list[Path]]]:
    """(class folder, image files sorted) for each class folder, folders sorted by name."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _hidden([e.name]))
    out = []
    for name in classes:
        files: list[Path] = []
        for base, dirs, filenames in os.walk(root / name, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not _hidden([d]))
            files += [Path(base) / f for f in sorted(filenames) if _is_image(f)]
        out.append((name, files))
    return out


def _zip_members(archive: zipfile.ZipFile) -> list[tuple[str, list[str]]]:
    """Like ``_directory_members`` for a zip: the root is the deepest folder common to all."""
    images = [
        n
        for n in archive.namelist()
        if not n.endswith("/") and _is_image(n) and not _hidden(PurePosixPath(n).parts[:-1])
    ]
    if not images:
        raise EvaluationError("the test zip holds no images")
    parents = [PurePosixPath(n).parent.parts for n in images]
    common = list(parents[0])
    for parts in parents[1:]:
        while tuple(common) != parts[: len(common)]:
            common.pop()
    if all(len(parts) == len(common) for parts in parents):
        common = common[:-1]  # one class folder only: the root is above it
    depth = len(common)
    by_class: dict[str, list[str]] = {}
    for name, parts in zip(images, parents, strict=True):
        if len(parts) == depth:
            raise EvaluationError(f"{name} is not inside a class folder")
        by_class.setdefault(parts[depth], []).append(name)
    return [(folder, sorted(by_class[folder])) for folder in sorted(by_class)]


def testset_folders(path: Path) -> tuple[str, ...]:
    """The test set's class folders in index order, without decoding any image."""
    path = Path(path)
    if path.is_dir():
        return tuple(folder for folder, _ in _directory_members(path))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return tuple(folder for folder, _ in _zip_members(archive))
    raise EvaluationError(f"{path} is neither a directory nor a zip of class folders")


def load_testset(path: Path, *, resize_to: tuple[int, int] | None = None) -> TestSet:
    """An ImageFolder test set from a directory or a zip of one.

    Images must all have one size; with ``resize_to`` (h, w) any other size is resized to
    it (bicubic) and counted in ``resized``.
    """
    path = Path(path)
    arrays: list[np.ndarray] = []
    names: list[str] = []
    labels: list[int] = []
    resized = 0

    def add(data: bytes, name: str, label: int) -> None:
        nonlocal resized
        array, changed = _decode(data, name, resize_to)
        resized += changed
        arrays.append(array)
        names.append(name)
        labels.append(label)

    if path.is_dir():
        members = _directory_members(path)
        for label, (_, files) in enumerate(members):
            for file in files:
                add(file.read_bytes(), str(file), label)
        folders = [folder for folder, _ in members]
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            zip_members = _zip_members(archive)
            for label, (_, entries) in enumerate(zip_members):
                for entry in entries:
                    add(archive.read(entry), entry, label)
        folders = [folder for folder, _ in zip_members]
    else:
        raise EvaluationError(f"{path} is neither a directory nor a zip of class folders")
    per_class = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(folders))
    empty = [f for f, n in zip(folders, per_class, strict=True) if n == 0]
    if empty:
        raise EvaluationError(f"test class folder {empty[0]!r} holds no images")
    return TestSet(
        images=_stack(arrays, names, "the test set"),
        labels=torch.tensor(labels, dtype=torch.int64),
        folders=tuple(folders),
        resized=resized,
    )


# --- class order ---------------------------------------------------------------------------

_INDEX_PREFIX = re.compile(r"^\d+_(?=.)")


def _keys(name: str) -> set[str]:
    """Comparable forms of a folder or class name: case, spaces, underscores and punctuation
    do not matter (``slugify``), and a leading ``NNN_`` index prefix may be dropped."""
    return {slugify(name), slugify(_INDEX_PREFIX.sub("", name.strip()))}


def check_class_order(
    classes: Sequence[str],
    folders: Sequence[str],
    *,
    wnids: Sequence[str | None] = (),
) -> str:
    """``"by name"`` or ``"by index only"`` when ``folders`` (sorted test class folders) are
    the archive's ``classes`` in the same order; ``ClassOrderError`` otherwise.

    Folder ``003_cat``, ``cat`` or ``Cat`` matches class ``cat``; a wnid folder matches its
    class's wnid. Folders that are bare numbers (``00000``, ``00001``, ...) carry no names:
    then they must be ``0..n-1`` in order and only the count is really checked.
    """
    if len(classes) != len(folders):
        raise ClassOrderError(
            f"the archive has {len(classes)} classes but the test set has {len(folders)} "
            f"class folders"
        )
    if all(f.isdigit() for f in folders):
        numbers = [int(f) for f in folders]
        if numbers != list(range(len(folders))):
            first = next(i for i, n in enumerate(numbers) if n != i)
            raise ClassOrderError(
                f"numbered test folders must be 0..{len(folders) - 1} in sorted order; "
                f"position {first} holds folder {folders[first]!r} (zero-pad the numbers so "
                f"that name order is number order)"
            )
        return BY_INDEX
    padded = list(wnids) + [None] * (len(classes) - len(wnids))
    for position, (label, wnid, folder) in enumerate(zip(classes, padded, folders, strict=True)):
        expected = _keys(label) | ({wnid.lower()} if wnid else set())
        if not (_keys(folder) | {folder.lower()}) & expected:
            same_set = {slugify(c) for c in classes} == {
                slugify(_INDEX_PREFIX.sub("", f)) for f in folders
            }
            hint = " (the same classes in another order)" if same_set else ""
            raise ClassOrderError(
                f"class order differs at index {position}: the archive's class {position} is "
                f"{label!r} but test folder {position} (sorted by name) is {folder!r}{hint}"
            )
    return BY_NAME


# --- normalisation -------------------------------------------------------------------------


def _triple(values: Sequence[float], what: str) -> tuple[float, float, float]:
    if len(values) != 3:
        raise EvaluationError(f"{what} needs 3 values (R, G, B), got {len(values)}")
    a, b, c = (float(v) for v in values)
    return a, b, c


def normalization(
    train: TrainSet,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Normalization:
    """Given values, else the archive's preset, else statistics of the training images.

    The last case is the only one possible for a custom label list: per-channel mean and
    (population) std over every pixel of the distilled images, on the [0, 1] scale. A
    distilled set is small, so these differ somewhat from the real dataset's statistics.
    """
    if (mean is None) != (std is None):
        raise EvaluationError("give both mean and std, or neither")
    if mean is not None and std is not None:
        s = _triple(std, "std")
        if min(s) <= 0:
            raise EvaluationError("std values must be positive")
        return Normalization(_triple(mean, "mean"), s, "given")
    if train.preset and "mean" in train.preset and "std" in train.preset:
        return Normalization(
            _triple(train.preset["mean"], "preset mean"),
            _triple(train.preset["std"], "preset std"),
            f"preset {train.preset.get('name', '?')}",
        )
    pixels = train.images.to(torch.float64).div(255.0)
    computed_mean = pixels.mean(dim=(0, 2, 3)).tolist()
    computed_std = pixels.std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6).tolist()
    return Normalization(
        _triple(computed_mean, "mean"),
        _triple(computed_std, "std"),
        "computed from the training images",
    )
