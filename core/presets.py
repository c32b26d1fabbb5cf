"""Label presets: standard class lists shipped as data files, in each dataset's class-index order.

``core/presets/<name>.tsv`` holds one class per line, line *i* being class index *i*:
CIFAR files hold the label name; ImageNet-style files hold ``wnid<TAB>synonyms``. Order is
part of the data: a list in another order silently mislabels every image.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

PresetName = Literal["cifar10", "cifar100", "tinyimagenet", "imagenet1k", "imagenette", "imagewoof"]

# Mean/std per channel (RGB, [0, 1] scale) as used by the dataset-distillation benchmarks.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ClassInfo:
    """One class: its index, a readable label, and its WordNet id where the dataset has one."""

    index: int
    label: str
    wnid: str | None = None
    synonyms: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Identity used to derive seeds: the wnid where there is one (names can repeat)."""
        return self.wnid or self.label

    @property
    def prompt_name(self) -> str:
        """The name as it reads in a prompt: underscores as spaces."""
        return self.label.replace("_", " ")


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    file: str

    @property
    def classes(self) -> tuple[ClassInfo, ...]:
        return _load(self.file)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "cifar10",
            "CIFAR-10",
            32,
            (0.4914, 0.4822, 0.4465),
            (0.2023, 0.1994, 0.2010),
            "cifar10.tsv",
        ),
        Preset(
            "cifar100",
            "CIFAR-100 (fine labels)",
            32,
            (0.5071, 0.4866, 0.4409),
            (0.2673, 0.2564, 0.2762),
            "cifar100.tsv",
        ),
        Preset(
            "tinyimagenet",
            "Tiny-ImageNet-200",
            64,
            _IMAGENET_MEAN,
            _IMAGENET_STD,
            "tinyimagenet.tsv",
        ),
        Preset(
            "imagenet1k",
            "ImageNet-1K (ILSVRC-2012)",
            224,
            _IMAGENET_MEAN,
            _IMAGENET_STD,
            "imagenet1k.tsv",
        ),
        # fast.ai's 10-class ImageNet subsets (github.com/fastai/imagenette), classes in their
        # published order (sorted wnids), at 256 px as the generative dataset-distillation
        # papers (Minimax diffusion, D4M, IGD) train and evaluate on them.
        Preset(
            "imagenette",
            "ImageNette (10 easy ImageNet-1K classes)",
            256,
            _IMAGENET_MEAN,
            _IMAGENET_STD,
            "imagenette.tsv",
        ),
        Preset(
            "imagewoof",
            "ImageWoof (10 dog breeds of ImageNet-1K)",
            256,
            _IMAGENET_MEAN,
            _IMAGENET_STD,
            "imagewoof.tsv",
        ),
    )
}


@cache
def _load(file: str) -> tuple[ClassInfo, ...]:
    text = resources.files("core").joinpath("presets", file).read_text(encoding="utf-8")
    classes = []
    for index, line in enumerate(text.splitlines()):
        columns = line.split("\t")
        if len(columns) == 1:
            classes.append(ClassInfo(index=index, label=columns[0].strip()))
            continue
        wnid, words = columns[0].strip(), columns[1]
        synonyms = tuple(w.strip() for w in words.split(",") if w.strip())
        classes.append(ClassInfo(index=index, label=synonyms[0], wnid=wnid, synonyms=synonyms))
    return tuple(classes)


def get(name: str) -> Preset:
    """The preset called ``name``; KeyError names the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def from_labels(labels: list[str]) -> tuple[ClassInfo, ...]:
    """Classes for a caller's own label list, in the caller's order."""
    return tuple(ClassInfo(index=i, label=label) for i, label in enumerate(labels))


class NotImageNet(ValueError):
    """Classes that are not ImageNet-1K classes (or name more than one), by job position."""

    def __init__(self, problems: list[tuple[int, str, str]]) -> None:
        self.problems = problems
        super().__init__(
            "; ".join(f"labels[{index}] {label!r}: {why}" for index, label, why in problems)
        )


@cache
def _imagenet_lookup() -> tuple[dict[str, int], dict[str, list[int]]]:
    by_wnid: dict[str, int] = {}
    by_name: dict[str, list[int]] = {}
    for cls in PRESETS["imagenet1k"].classes:
        assert cls.wnid is not None
        by_wnid[cls.wnid] = cls.index
        for name in dict.fromkeys(s.casefold() for s in cls.synonyms):
            by_name.setdefault(name, []).append(cls.index)
    return by_wnid, by_name


def imagenet_ids(classes: tuple[ClassInfo, ...]) -> list[int]:
    """Each class's ImageNet-1K class id (its index in the standard order), in job order.

    A class matches by its wnid, or by a label that is a wnid or one of a class's names (case
    does not matter). ``NotImageNet`` lists every class that matches none, or several
    ("crane" is a bird and a machine: give the wnid).
    """
    by_wnid, by_name = _imagenet_lookup()
    ids: list[int] = []
    problems: list[tuple[int, str, str]] = []
    for position, cls in enumerate(classes):
        if cls.wnid is not None and cls.wnid in by_wnid:
            ids.append(by_wnid[cls.wnid])
            continue
        if cls.label in by_wnid:
            ids.append(by_wnid[cls.label])
            continue
        found = by_name.get(cls.label.replace("_", " ").casefold(), [])
        if len(found) == 1:
            ids.append(found[0])
            continue
        if found:
            wnids = ", ".join(PRESETS["imagenet1k"].classes[i].wnid or "" for i in found)
            problems.append((position, cls.label, f"names several ImageNet-1K classes ({wnids})"))
        else:
            problems.append((position, cls.label, "is not an ImageNet-1K class (wnid or name)"))
    if problems:
        raise NotImageNet(problems)
    return ids


@dataclass(frozen=True)
class Challenge:
    """What the ECCV 2024 Dataset Distillation Challenge's evaluator loads for one preset:
    ``<preset>.pt``, one float32 tensor N x 3 x side x side, class-major, 10 images per class,
    normalized with these constants (its script's own)."""

    preset: str
    side: int
    ipc: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CHALLENGE = {
    "cifar100": Challenge(
        "cifar100", 32, 10, mean=(0.5071, 0.4866, 0.4409), std=(0.2673, 0.2564, 0.2762)
    ),
    "tinyimagenet": Challenge(
        "tinyimagenet", 64, 10, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    ),
}


def class_prompt(cls: ClassInfo, imagenet_id: int) -> str:
    """What a class-conditional image was conditioned on, as its metadata's prompt."""
    return f"ImageNet-1K class {imagenet_id} ({cls.wnid or cls.label})"
