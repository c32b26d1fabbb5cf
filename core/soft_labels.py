"""The ``soft_labels`` request field: a teacher's logits for every image of the archive.

A teacher classifier labels each image of the finished dataset. The archive then holds
``soft_labels.pt`` (``SOFT_LABELS_FILE``: float16 logits, one row per image in the
archive's class-major order, columns in class-index order, with the file names and the
temperature) and, in ``metadata.jsonl``, WebDataset and Parquet rows, each image's ``top_k``
classes (``soft_top_k``) with their probabilities at the temperature (``soft_top_p``).
Evaluations with ``labels: "soft"`` train on those logits (KL divergence at the temperature,
as the soft-label literature trains) and report the hard-label score beside the soft one.

Teachers:

- ``reference``: the benchmark ConvNet-3 trained on the job's classes of its reference set
  (the request's ``reference``) at the job's image size, with the job seed.
- A pretrained classifier, named as the worker's ``DISTILL_TEACHERS`` names it (a hub id or a
  local directory holding a ``transformers`` image classifier with its
  ``preprocessor_config.json``). Workers load their teachers once, publish each one's class
  names (``keys.teacher_labels``), and the job's classes are matched to the teacher's by
  ``teacher_columns``: a job's soft labels are the teacher's logits of the job's classes, in
  the job's class order.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator

from core import presets
from core.presets import ClassInfo

#: The archive member holding the logits.
SOFT_LABELS_FILE = "soft_labels.pt"
#: The metadata columns of each image's top classes and their probabilities.
TOP_K_COLUMN = "soft_top_k"
TOP_P_COLUMN = "soft_top_p"
#: The teacher trained on the request's reference set; any other name is a pretrained one.
REFERENCE = "reference"
#: A pretrained teacher that did not load is reported under ``unavailable`` as
#: ``teacher <name>`` (``/readyz``, ``GET /v1/models``).
TEACHER_PART_PREFIX = "teacher "
#: A teacher with this many classes is taken as an ImageNet-1K classifier in the standard
#: class order (as published ImageNet classifiers are): a class with a wnid is its column.
IMAGENET_CLASSES = 1000
DEFAULT_TEMPERATURE = 4.0
DEFAULT_TOP_K = 5
#: Decimals the probabilities in metadata rows keep.
TOP_P_DECIMALS = 6


class SoftLabelsRequest(BaseModel):
    """``soft_labels``: which teacher labels the images, at what temperature."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    teacher: str = Field(
        default=REFERENCE,
        min_length=1,
        max_length=300,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="reference: ConvNet-3 (the evaluator's network) trained for 10 epochs on "
        "the job's classes of the request's reference set, with the job seed. Otherwise a "
        "pretrained classifier the model's workers load (DISTILL_TEACHERS: a hub id or a "
        "local path, as GET /v1/models lists it); the job's classes are matched to its "
        "class names (a 1000-class teacher is read as ImageNet-1K, by wnid).",
    )
    temperature: StrictFloat | StrictInt = Field(
        default=DEFAULT_TEMPERATURE,
        ge=1,
        le=20,
        description="Softmax temperature of the probabilities in metadata rows and of the "
        "KL loss an evaluation with labels soft trains with.",
    )
    top_k: StrictInt = Field(
        default=DEFAULT_TOP_K,
        ge=1,
        le=1000,
        description="Classes per image listed in the metadata columns soft_top_k and "
        "soft_top_p (at most the job's number of classes).",
    )

    @field_validator("temperature")
    @classmethod
    def _as_float(cls, value: float) -> float:
        # 2 and 2.0 are one request: the manifest, and so the archive's bytes, say 2.0.
        return float(value)

    def check(self, *, reference: str | None, formats: Sequence[str], classes: int) -> None:
        """What a request with these soft labels must also have; ValueError naming the field."""
        if self.teacher == REFERENCE and reference is None:
            raise ValueError(
                "soft_labels.teacher: reference trains the teacher on the request's reference "
                "set; give reference"
            )
        if "challenge" in formats:
            raise ValueError(
                "soft_labels: the challenge's file holds hard labels only; ask for "
                "imagefolder, tensors, webdataset or parquet"
            )
        if self.top_k > classes:
            raise ValueError(
                f"soft_labels.top_k: {self.top_k} is more than the job's {classes} classes"
            )


class UnmatchedTeacher(ValueError):
    """Job classes a teacher has no single class for, by job position."""

    def __init__(self, teacher: str, problems: list[tuple[int, str, str]]) -> None:
        self.problems = problems
        super().__init__(
            f"soft_labels.teacher: {teacher!r} cannot label every class: "
            + "; ".join(f"labels[{index}] {label!r} {why}" for index, label, why in problems)
        )


def _names(text: str) -> set[str]:
    """A class name's comparable forms: the whole and each comma-separated part, case and
    underscores aside ("tench, Tinca tinca" -> {"tench, tinca tinca", "tench", "tinca tinca"})."""
    whole = " ".join(text.replace("_", " ").casefold().split())
    return {whole} | {part.strip() for part in whole.split(",") if part.strip()}


def teacher_columns(teacher: str, labels: Sequence[str], classes: Sequence[ClassInfo]) -> list[int]:
    """Each job class's column in the teacher's logits (``labels``: its class names by
    index), in job order.

    With a 1000-class teacher, an ImageNet-1K class (by wnid or name, as
    ``presets.imagenet_ids`` finds it) is its ImageNet-1K id, where the teacher's name there
    shares a name with it (so a teacher in another order is matched by name instead).
    Otherwise a class is the one teacher class that has its label as a name, else the one
    that shares a name with its synonyms. ``UnmatchedTeacher`` lists each class that has no
    such column, or whose column an earlier class took.
    """
    names = [_names(label) for label in labels]
    columns: list[int] = []
    problems: list[tuple[int, str, str]] = []
    for position, cls in enumerate(classes):
        found = _column(cls, names)
        if isinstance(found, str):
            problems.append((position, cls.label, found))
            continue
        if found in columns:
            taken = columns.index(found)
            problems.append((position, cls.label, f"has the column of labels[{taken}] ({found})"))
        columns.append(found)
    if problems:
        raise UnmatchedTeacher(teacher, problems)
    return columns


def _column(cls: ClassInfo, names: list[set[str]]) -> int | str:
    """The teacher column of one class, or why it has none."""
    own = _names(cls.label)
    synonyms = set().union(own, *(_names(s) for s in cls.synonyms))
    if len(names) == IMAGENET_CLASSES:
        try:
            (found,) = presets.imagenet_ids((cls,))
        except presets.NotImageNet:
            found = None
        if found is not None:
            imagenet = presets.get("imagenet1k").classes[found]
            if names[found] & set().union(*(_names(s) for s in imagenet.synonyms), synonyms):
                return found
    for wanted in (own, synonyms):
        hits = [i for i, have in enumerate(names) if have & wanted]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            shown = ", ".join(str(i) for i in hits[:5]) + (", ..." if len(hits) > 5 else "")
            return f"names several of the teacher's classes ({shown})"
    return f"is none of the teacher's {len(names)} class names"
