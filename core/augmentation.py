"""The augmentation a request may ask for: the transform whitelist and ``AugmentSpec``.

Pure pydantic, no torch: the API process imports it (through ``core.spec``), and
``worker/augment.py`` builds the albumentations pipeline from what it validated. Every
transform's parameters are checked against a model here because albumentations ignores
unknown arguments with only a warning.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StrictInt,
    Tag,
    ValidationError,
    model_validator,
)

MAX_COPIES = 20

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

Probability = Annotated[StrictFloat, Field(ge=0.0, le=1.0)]


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
        Annotated[StrictFloat, Field(ge=0, le=1)]
        | tuple[
            Annotated[StrictFloat, Field(ge=-1, le=1)], Annotated[StrictFloat, Field(ge=-1, le=1)]
        ]
    ) = 0.2
    contrast_limit: (
        Annotated[StrictFloat, Field(ge=0, le=1)]
        | tuple[
            Annotated[StrictFloat, Field(ge=-1, le=1)], Annotated[StrictFloat, Field(ge=-1, le=1)]
        ]
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
        Annotated[StrictFloat, Field(ge=0, le=180)]
        | tuple[
            Annotated[StrictFloat, Field(ge=-180, le=180)],
            Annotated[StrictFloat, Field(ge=-180, le=180)],
        ]
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
        Annotated[StrictFloat, Field(gt=0, le=500)], Annotated[StrictFloat, Field(gt=0, le=500)]
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
    scale: tuple[
        Annotated[StrictFloat, Field(gt=0, le=1)], Annotated[StrictFloat, Field(gt=0, le=1)]
    ] = (
        0.5,
        1.0,
    )
    ratio: tuple[
        Annotated[StrictFloat, Field(gt=0, le=10)], Annotated[StrictFloat, Field(gt=0, le=10)]
    ] = (
        0.75,
        4 / 3,
    )

    @model_validator(mode="after")
    def _ranges(self) -> ResizedCropParams:
        _ordered(self.scale, name="scale")
        _ordered(self.ratio, name="ratio")
        return self


class ColorJitterParams(_Params):
    brightness: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.2
    contrast: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.2
    saturation: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.2
    hue: Annotated[StrictFloat, Field(ge=0, le=0.5)] = 0.05
    p: Probability = 0.5


class BlurParams(_Params):
    sigma_limit: tuple[
        Annotated[StrictFloat, Field(gt=0, le=10)], Annotated[StrictFloat, Field(gt=0, le=10)]
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
    copies: Annotated[StrictInt, Field(ge=0, le=MAX_COPIES)] | None = Field(
        default=None,
        description="Augmented copies per generated image; default 4, or 0 with policy none.",
    )
    crop_scale: Annotated[StrictFloat, Field(ge=1.0, le=4.0)] = Field(
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
