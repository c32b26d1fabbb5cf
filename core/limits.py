"""The job contract's bounds and its small field types: limits, the prompt template rule,
guidance scales and ranges, per-class prompt overrides (``core.spec`` builds the request from
them). Pure pydantic, no torch."""

from __future__ import annotations

import string
import unicodedata
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, field_validator

MAX_LABELS = 1000
MAX_LABEL_CHARS = 100
MAX_IPC = 1000
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 512
MAX_TOTAL_IMAGES = 100_000
MAX_TEMPLATE_CHARS = 300
MAX_SEED = 2**32 - 1
MAX_STEPS = 50
MAX_GUIDANCE = 20.0
DEFAULT_IMAGE_SIZE = 32
#: Memory a ``select`` job's pool of one class may take (``SelectRequest.check``).
MAX_POOL_BYTES = 4 * 2**30

STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


def has_control_chars(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in text)


MAX_TEMPLATES = 16
MAX_BUDGET_SECONDS = 24 * 3600
Format = Literal["imagefolder", "tensors", "challenge", "webdataset", "parquet"]
Method = Literal["generate", "random_real", "herding", "kcenter", "prototypes"]
#: Methods that keep real images of the reference set instead of generating any.
REAL_METHODS = frozenset({"random_real", "herding", "kcenter"})
DEFAULT_STRENGTH = 0.7


def check_template(template: str) -> str:
    if has_control_chars(template):
        raise ValueError("contains control characters")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)]
    except ValueError as exc:
        raise ValueError(f"is not a valid template: {exc}") from None
    names = [name for name, _, _ in fields if name is not None]
    if "label" not in names:
        raise ValueError("must contain {label}")
    for name, spec, conv in fields:
        if name is None:
            continue
        if name != "label" or spec or conv:
            raise ValueError(f"may only use the field {{label}}, found {{{name}}}")
    return template


Template = Annotated[str, Field(min_length=1, max_length=MAX_TEMPLATE_CHARS)]
Guidance = Annotated[StrictFloat, Field(ge=0.0, le=MAX_GUIDANCE)]
#: Decimals of a per-image guidance scale drawn from a range (as recorded and as sampled).
GUIDANCE_DECIMALS = 4


def _check_range(value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not low < high:
        raise ValueError(f"a range needs low < high, got [{low}, {high}]")
    if high <= 1.0:
        raise ValueError(
            f"a range's high end must be above 1 (guidance is off at 1 and below), got {high}"
        )
    return value


GuidanceRange = Annotated[tuple[Guidance, Guidance], AfterValidator(_check_range)]


class PromptOverride(BaseModel):
    """A fixed prompt for one class, for names that are ambiguous on their own."""

    model_config = STRICT

    label: str = Field(
        min_length=1, max_length=MAX_LABEL_CHARS, description="Class name (or wnid)."
    )
    prompt: str = Field(
        min_length=1, max_length=MAX_TEMPLATE_CHARS, description="Prompt used as is."
    )

    @field_validator("prompt")
    @classmethod
    def _clean(cls, prompt: str) -> str:
        if has_control_chars(prompt):
            raise ValueError("contains control characters")
        return prompt
