"""The ``soft_labels`` request field: a teacher's logits for every image of the archive.

A teacher classifier labels each image of the finished dataset. The archive then holds
``soft_labels.pt`` (``SOFT_LABELS_FILE``: float16 logits, one row per image in the
archive's class-major order, columns in class-index order, with the file names and the
temperature) and, in ``metadata.jsonl``, WebDataset and Parquet rows, each image's ``top_k``
classes (``soft_top_k``) with their probabilities at the temperature (``soft_top_p``).
Evaluations with ``labels: "soft"`` train on those logits (KL divergence at the temperature,
as the soft-label literature trains) and report the hard-label score beside the soft one.

Teachers: ``reference``, the benchmark ConvNet-3 trained on the job's classes of its
reference set (the request's ``reference``) at the job's image size, with the job seed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, field_validator

#: The archive member holding the logits.
SOFT_LABELS_FILE = "soft_labels.pt"
#: The metadata columns of each image's top classes and their probabilities.
TOP_K_COLUMN = "soft_top_k"
TOP_P_COLUMN = "soft_top_p"
Teacher = Literal["reference"]
TEACHERS: tuple[str, ...] = ("reference",)
DEFAULT_TEMPERATURE = 4.0
DEFAULT_TOP_K = 5
#: Decimals the probabilities in metadata rows keep.
TOP_P_DECIMALS = 6


class SoftLabelsRequest(BaseModel):
    """``soft_labels``: which teacher labels the images, at what temperature."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    teacher: Teacher = Field(
        default="reference",
        description="reference: ConvNet-3 (the evaluator's network) trained for 10 epochs on "
        "the job's classes of the request's reference set, with the job seed.",
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
