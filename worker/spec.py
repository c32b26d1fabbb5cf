"""The job contract: what a caller may ask for, validated once at the door and again by the worker.

Pure pydantic, no torch: the API process imports it. Every field is bounded; augmentation
parameters are checked against a whitelist here because albumentations ignores unknown
arguments with only a warning.
"""

from __future__ import annotations

import hashlib
import math
import string
import unicodedata
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

MAX_LABELS = 1000
MAX_LABEL_CHARS = 100
MAX_IPC = 1000
MAX_COPIES = 20
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 512
MAX_TOTAL_IMAGES = 100_000
MAX_TEMPLATE_CHARS = 300
MAX_SEED = 2**32 - 1

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

Probability = Annotated[float, Field(ge=0.0, le=1.0)]


def _has_control_chars(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") for ch in text)


def _ordered(value: float | tuple[float, float], *, name: str) -> float | tuple[float, float]:
    if isinstance(value, tuple) and value[0] > value[1]:
        raise ValueError(f"{name} range must be (low, high) with low <= high, got {value}")
    return value


# ---- augmentation whitelist: one params model per transform --------------------------------


class _Params(BaseModel):
    model_config = _STRICT


class FlipParams(_Params):
    p: Probability = 0.5


class BrightnessContrastParams(_Params):
    brightness_limit: (
        Annotated[float, Field(ge=0, le=1)]
        | tuple[Annotated[float, Field(ge=-1, le=1)], Annotated[float, Field(ge=-1, le=1)]]
    ) = 0.2
    contrast_limit: (
        Annotated[float, Field(ge=0, le=1)]
        | tuple[Annotated[float, Field(ge=-1, le=1)], Annotated[float, Field(ge=-1, le=1)]]
    ) = 0.2
    p: Probability = 0.5

    @model_validator(mode="after")
    def _ranges(self) -> BrightnessContrastParams:
        _ordered(self.brightness_limit, name="brightness_limit")
        _ordered(self.contrast_limit, name="contrast_limit")
        return self


BorderMode = Literal["reflect_101", "reflect", "replicate", "wrap", "constant"]


class RotateParams(_Params):
    limit: (
        Annotated[float, Field(ge=0, le=180)]
        | tuple[Annotated[float, Field(ge=-180, le=180)], Annotated[float, Field(ge=-180, le=180)]]
    ) = 90
    # Mirrored borders by default: black corners teach a classifier about black corners.
    border_mode: BorderMode = "reflect_101"
    p: Probability = 0.5

    @model_validator(mode="after")
    def _ranges(self) -> RotateParams:
        _ordered(self.limit, name="limit")
        return self


class GammaParams(_Params):
    gamma_limit: tuple[
        Annotated[float, Field(gt=0, le=500)], Annotated[float, Field(gt=0, le=500)]
    ] = (
        80,
        120,
    )
    p: Probability = 0.5

    @model_validator(mode="after")
    def _ranges(self) -> GammaParams:
        _ordered(self.gamma_limit, name="gamma_limit")
        return self


class CropParams(_Params):
    """RandomCrop takes no parameters: the crop is always ``image_size`` square."""


class ResizedCropParams(_Params):
    scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = (
        0.5,
        1.0,
    )
    ratio: tuple[Annotated[float, Field(gt=0, le=10)], Annotated[float, Field(gt=0, le=10)]] = (
        0.75,
        4 / 3,
    )

    @model_validator(mode="after")
    def _ranges(self) -> ResizedCropParams:
        _ordered(self.scale, name="scale")
        _ordered(self.ratio, name="ratio")
        return self


class ColorJitterParams(_Params):
    brightness: Annotated[float, Field(ge=0, le=1)] = 0.2
    contrast: Annotated[float, Field(ge=0, le=1)] = 0.2
    saturation: Annotated[float, Field(ge=0, le=1)] = 0.2
    hue: Annotated[float, Field(ge=0, le=0.5)] = 0.05
    p: Probability = 0.5


class BlurParams(_Params):
    sigma_limit: tuple[
        Annotated[float, Field(gt=0, le=10)], Annotated[float, Field(gt=0, le=10)]
    ] = (
        0.5,
        1.5,
    )
    p: Probability = 0.5

    @model_validator(mode="after")
    def _ranges(self) -> BlurParams:
        _ordered(self.sigma_limit, name="sigma_limit")
        return self


class ToGrayParams(_Params):
    p: Probability = 0.1


TRANSFORM_PARAMS: dict[str, type[_Params]] = {
    "HorizontalFlip": FlipParams,
    "VerticalFlip": FlipParams,
    "RandomBrightnessContrast": BrightnessContrastParams,
    "Rotate": RotateParams,
    "RandomGamma": GammaParams,
    "RandomCrop": CropParams,
    "RandomResizedCrop": ResizedCropParams,
    "ColorJitter": ColorJitterParams,
    "GaussianBlur": BlurParams,
    "ToGray": ToGrayParams,
}
#: Transforms that cut an ``image_size`` window out of a larger image.
CROPS = frozenset({"RandomCrop", "RandomResizedCrop"})

TransformName = Literal[
    "HorizontalFlip",
    "VerticalFlip",
    "RandomBrightnessContrast",
    "Rotate",
    "RandomGamma",
    "RandomCrop",
    "RandomResizedCrop",
    "ColorJitter",
    "GaussianBlur",
    "ToGray",
]


class TransformStep(BaseModel):
    """One albumentations transform from the whitelist, with validated parameters."""

    model_config = _STRICT

    name: TransformName
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_params(self) -> TransformStep:
        model = TRANSFORM_PARAMS[self.name]
        try:
            parsed = model.model_validate(self.params)
        except ValidationError as exc:
            problems = "; ".join(
                f"params.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                if err["loc"]
                else f"params: {err['msg']}"
                for err in exc.errors()
            )
            raise ValueError(f"invalid parameters for {self.name}: {problems}") from None
        object.__setattr__(self, "params", parsed.model_dump(mode="json"))
        return self


#: The paper's post-generation augmentation, in its order.
PAPER_POLICY: tuple[TransformStep, ...] = (
    TransformStep(name="RandomCrop"),
    TransformStep(name="HorizontalFlip", params={"p": 0.8}),
    TransformStep(name="VerticalFlip", params={"p": 0.8}),
    TransformStep(name="RandomBrightnessContrast", params={"p": 0.5}),
    TransformStep(name="Rotate", params={"limit": 60, "p": 0.8}),
    TransformStep(name="RandomGamma", params={"p": 0.5}),
)

PolicyName = Literal["paper", "none"]


#: Discriminator tags of the policy union; pydantic puts them in error locations.
POLICY_TAGS = ("named", "steps")


def _policy_kind(value: Any) -> str:
    return POLICY_TAGS[1] if isinstance(value, list | tuple) else POLICY_TAGS[0]


class AugmentSpec(BaseModel):
    """Post-generation augmentation: each generated image is kept plus ``copies`` variants."""

    model_config = _STRICT

    policy: Annotated[
        Annotated[PolicyName, Tag(POLICY_TAGS[0])]
        | Annotated[
            Annotated[list[TransformStep], Field(min_length=1, max_length=16)], Tag(POLICY_TAGS[1])
        ],
        Discriminator(_policy_kind),
    ] = Field(
        default="paper",
        description='"paper" (the paper\'s six transforms), "none", or a list of transforms.',
    )
    copies: Annotated[int, Field(ge=0, le=MAX_COPIES)] | None = Field(
        default=None,
        description="Augmented copies per generated image; default 4, or 0 with policy none.",
    )
    crop_scale: Annotated[float, Field(ge=1.0, le=4.0)] = Field(
        default=1.25,
        description="Crops are cut from the image resized to crop_scale x image_size.",
    )

    @model_validator(mode="after")
    def _resolve_copies(self) -> AugmentSpec:
        if self.copies is None:
            object.__setattr__(self, "copies", 0 if self.policy == "none" else 4)
        elif self.policy == "none" and self.copies > 0:
            raise ValueError("copies must be 0 when policy is 'none' (copies would be duplicates)")
        return self

    @property
    def n_copies(self) -> int:
        return self.copies or 0

    def steps(self) -> tuple[TransformStep, ...]:
        """The transforms this policy applies, in order."""
        if self.policy == "paper":
            return PAPER_POLICY
        if self.policy == "none":
            return ()
        return tuple(self.policy)


class DatasetSpec(BaseModel):
    """A dataset request: classes, images per class, output size, seed, prompts, augmentation."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        frozen=True,
        json_schema_extra={
            "examples": [
                {
                    "labels": ["cat", "dog"],
                    "ipc": 10,
                    "image_size": 32,
                    "seed": 0,
                    "prompt_template": "a photo of a {label}",
                    "augment": {"policy": "paper", "copies": 4},
                }
            ]
        },
    )

    labels: list[str] = Field(
        min_length=1,
        max_length=MAX_LABELS,
        description="Class names, in class-index order (index i is labels[i]).",
    )
    ipc: int = Field(ge=1, le=MAX_IPC, description="Images per class in the archive.")
    image_size: int = Field(
        default=32, ge=MIN_IMAGE_SIZE, le=MAX_IMAGE_SIZE, description="Output side in pixels."
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Same request + seed = same data.")
    prompt_template: str = Field(
        default="a photo of a {label}",
        min_length=1,
        max_length=MAX_TEMPLATE_CHARS,
        description="Text prompt; {label} is replaced by the class name.",
    )
    augment: AugmentSpec = Field(default_factory=AugmentSpec)

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, labels: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        for index, label in enumerate(labels):
            where = f"labels[{index}]"
            if not label.strip():
                raise ValueError(f"{where} is empty")
            if len(label) > MAX_LABEL_CHARS:
                raise ValueError(f"{where} is longer than {MAX_LABEL_CHARS} characters")
            if _has_control_chars(label):
                raise ValueError(f"{where} contains control characters")
            if label != label.strip():
                raise ValueError(f"{where} has leading or trailing whitespace")
            key = unicodedata.normalize("NFKC", label).casefold()
            if key in seen:
                raise ValueError(f"{where} {label!r} duplicates labels[{seen[key]}]")
            seen[key] = index
        return labels

    @field_validator("prompt_template")
    @classmethod
    def _check_template(cls, template: str) -> str:
        if _has_control_chars(template):
            raise ValueError("contains control characters")
        try:
            fields = [
                (name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
            ]
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

    @model_validator(mode="after")
    def _check_size(self) -> DatasetSpec:
        if self.total_images > MAX_TOTAL_IMAGES:
            raise ValueError(
                f"labels x ipc = {self.total_images} images exceeds the limit of {MAX_TOTAL_IMAGES}"
            )
        return self

    @property
    def total_images(self) -> int:
        """Images in the archive: ``ipc`` per class."""
        return len(self.labels) * self.ipc

    @property
    def generated_per_class(self) -> int:
        """Images sampled from the model per class; the rest are augmented copies."""
        return math.ceil(self.ipc / (self.augment.n_copies + 1))

    @property
    def total_generated(self) -> int:
        return len(self.labels) * self.generated_per_class

    def prompt(self, label: str) -> str:
        """The text prompt for one class (underscores read as spaces)."""
        return self.prompt_template.format(label=label.replace("_", " "))


def derive_seed(job_seed: int, *parts: str | int) -> int:
    """A 63-bit seed for one image or copy, from the job seed and the item's identity.

    Seeds depend on the class name and the image's number within its class, never on batch
    layout or class position, so the same request gives the same images however it is run.
    """
    text = "\x1f".join(str(p) for p in (job_seed, *parts))
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)
