"""The job contract: what a caller may ask for, validated once at the door and again by the worker.

Pure pydantic, no torch: the API process imports it. Every field is bounded. The request's
``augment`` field and its transform whitelist are in ``core.augmentation``.
"""

from __future__ import annotations

import hashlib
import math
import unicodedata
from collections.abc import Sequence
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core import presets
from core.augmentation import AugmentSpec
from core.limits import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_STRENGTH,
    GUIDANCE_DECIMALS,
    MAX_BUDGET_SECONDS,
    MAX_IMAGE_SIZE,
    MAX_IPC,
    MAX_LABEL_CHARS,
    MAX_LABELS,
    MAX_SEED,
    MAX_STEPS,
    MAX_TEMPLATES,
    MAX_TOTAL_IMAGES,
    MIN_IMAGE_SIZE,
    REAL_METHODS,
    Format,
    Guidance,
    GuidanceRange,
    Method,
    PromptOverride,
    Template,
    check_template,
    has_control_chars,
)
from core.oversample import SelectRequest
from core.presets import ClassInfo, PresetName
from core.prompts import DEFAULT_STRATEGY, DEFAULT_TEMPLATE, Strategy, choose, variants
from core.soft_labels import SoftLabelsRequest


class DatasetSpec(BaseModel):
    """A dataset request: classes, images per class (or a time budget), size, seed, prompts."""

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
                },
                {
                    "preset": "cifar100",
                    "budget_seconds": 600,
                    "prompt_template": ["a photo of a {label}", "a close-up photo of a {label}"],
                    "prompts": [{"label": "orange", "prompt": "a photo of an orange, the fruit"}],
                    "formats": ["imagefolder", "tensors"],
                },
            ]
        },
    )

    labels: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_LABELS,
        description="Class names in class-index order (index i is labels[i]); or use preset.",
    )
    preset: PresetName | None = Field(
        default=None, description="A standard class list in its dataset's index order."
    )
    ipc: StrictInt | None = Field(
        default=None, ge=1, le=MAX_IPC, description="Images per class; or use budget_seconds."
    )
    budget_seconds: StrictFloat | None = Field(
        default=None,
        ge=1,
        le=MAX_BUDGET_SECONDS,
        description="Generate as many images per class as fit in this many seconds.",
    )
    image_size: StrictInt | None = Field(
        default=None,
        ge=MIN_IMAGE_SIZE,
        le=MAX_IMAGE_SIZE,
        description="Output side in pixels; default the preset's native size, else 32.",
    )
    seed: StrictInt = Field(
        default=0, ge=0, le=MAX_SEED, description="Same request + seed = same data."
    )
    resolution: StrictInt | None = Field(
        default=None,
        ge=128,
        le=1024,
        multiple_of=64,
        description="Sampling side in px; default the worker's (512 for SDXL-Turbo). 256 costs "
        "about a quarter of 512.",
    )
    decoder: Literal["vae", "tiny"] = Field(
        default="vae",
        description="Latents to pixels: vae, the model's own decoder; tiny, an AutoencoderTiny "
        "(TAESDXL) that costs about 1/18 of it, for small outputs where its lost detail is "
        "shrunk away (needs the service's DISTILL_TINY_DECODER).",
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=40,
        description="Alias of a model this service serves (GET /v1/models); default its first.",
    )
    steps: StrictInt | None = Field(
        default=None,
        ge=1,
        le=MAX_STEPS,
        description="Denoising steps; default the model's (turbo models 1, DiT 25).",
    )
    guidance_scale: Guidance | GuidanceRange | None = Field(
        default=None,
        description="Classifier-free guidance scale, 0 to 20 (above 1 doubles the model's work "
        "per step); default the model's (turbo models 0, DiT 4). Or [low, high] (0 <= low < "
        "high <= 20, high above 1), text-to-image models only: each image draws its own scale "
        "uniformly in the range from a generator seeded by (job seed, class, image).",
    )
    method: Method = Field(
        default="generate",
        description="generate (text or class to image); random_real, herding, kcenter (ipc real "
        "images per class picked from the reference set: the real-image baselines); prototypes "
        "(image-to-image from k-means centres of the reference set's VAE latents).",
    )
    reference: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="A reference set (POST /v1/references id, or a named set of the service) "
        "whose class folders hold each class's real images; needed by every method but generate.",
    )
    strength: StrictFloat | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="prototypes: how far each prototype is re-noised before denoising (1: all "
        "the way, 0.7 by default).",
    )
    prompt_template: (
        Template | Annotated[list[Template], Field(min_length=1, max_length=MAX_TEMPLATES)]
    ) = Field(
        default=DEFAULT_TEMPLATE,
        description="Prompt with {label}; a list is cycled across each class's images.",
    )
    prompts: list[PromptOverride] = Field(
        default_factory=list, max_length=MAX_LABELS, description="Per-class prompt overrides."
    )
    prompt_strategy: Strategy = Field(
        default=DEFAULT_STRATEGY,
        description="template: prompt_template. synonyms, definitions, domains, backgrounds: "
        "each image's prompt is drawn (seeded by the job seed, class and image) from the "
        "class's WordNet synonyms ('a photo of a {synonym}'), its WordNet gloss or hypernym "
        "('a photo of a {label}, {gloss}'), image domains ('a {domain} of a {label}') or "
        "backgrounds ('a photo of a {label} {background}'). Needs the default prompt_template; "
        "a class in prompts keeps its override; without WordNet, 'a photo of a {label}'.",
    )
    augment: AugmentSpec = Field(default_factory=AugmentSpec)
    formats: list[Format] = Field(
        default_factory=lambda: list[Format](["imagefolder"]),
        min_length=1,
        max_length=5,
        description="imagefolder (PNG tree + metadata.jsonl), tensors (tensors.pt, and "
        "normalized.pt for presets), challenge (<preset>.pt: the ECCV 2024 Dataset Distillation "
        "Challenge's file, presets cifar100 and tinyimagenet), webdataset (tar shards "
        "webdataset/train-NNNNNN.tar of <key>.png, <key>.cls and <key>.json samples, at most "
        "10,000 samples or 1 GiB each), parquet (the Hugging Face Hub's layout, "
        "data/train-NNNNN-of-NNNNN.parquet of about 500 MB each: image, label as a ClassLabel "
        "naming the classes, and the metadata.jsonl columns).",
    )
    soft_labels: SoftLabelsRequest | None = Field(
        default=None,
        description="Label every image with a teacher's logits: soft_labels.pt (float16, "
        "images x classes, class-major) and each image's top_k classes and probabilities at "
        "the temperature as metadata columns soft_top_k and soft_top_p. The reference "
        "teacher is trained on the request's reference set (which method generate then "
        "takes). Not with the challenge format, whose file holds hard labels only.",
    )
    select: SelectRequest | None = Field(
        default=None,
        description="Sample oversample times each class's images, score them with the scorer "
        "(reference: a ConvNet trained on the request's reference set, which method generate "
        "then takes), drop those it puts in another class and keep ipc / (copies + 1) per "
        "class by keep; augmented copies are made from the kept images. Method generate with "
        "ipc only. The manifest records each class's pool, scores and what was dropped.",
    )
    callback_url: str | None = Field(
        default=None,
        max_length=2000,
        description="POSTed a signed event (Standard Webhooks) when the job ends.",
    )

    @field_validator("callback_url")
    @classmethod
    def _check_callback(cls, url: str | None) -> str | None:
        if url is None:
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an absolute http(s) URL")
        if parts.username or parts.password:
            raise ValueError("must not carry credentials")
        if has_control_chars(url) or " " in url:
            raise ValueError("contains spaces or control characters")
        return url

    @field_validator("labels")
    @classmethod
    def _check_labels(cls, labels: list[str] | None) -> list[str] | None:
        if labels is None:
            return None
        seen: dict[str, int] = {}
        for index, label in enumerate(labels):
            where = f"labels[{index}]"
            if not label.strip():
                raise ValueError(f"{where} is empty")
            if len(label) > MAX_LABEL_CHARS:
                raise ValueError(f"{where} is longer than {MAX_LABEL_CHARS} characters")
            if has_control_chars(label):
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
    def _check_templates(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, str):
            return check_template(value)
        for index, template in enumerate(value):
            try:
                check_template(template)
            except ValueError as exc:
                raise ValueError(f"[{index}] {exc}") from None
        return value

    @field_validator("formats")
    @classmethod
    def _unique_formats(cls, formats: list[str], info: ValidationInfo) -> list[str]:
        if len(set(formats)) != len(formats):
            raise ValueError("lists a format twice")
        preset = info.data.get("preset")
        if "challenge" in formats and preset not in presets.CHALLENGE:
            raise ValueError(
                "challenge is the ECCV 2024 Dataset Distillation Challenge's file, for presets "
                f"{' and '.join(presets.CHALLENGE)} only (this request's preset: {preset})"
            )
        return formats

    @model_validator(mode="after")
    def _resolve(self) -> DatasetSpec:
        if (self.labels is None) == (self.preset is None):
            raise ValueError("give exactly one of labels or preset")
        if (self.ipc is None) == (self.budget_seconds is None):
            raise ValueError("give exactly one of ipc or budget_seconds")
        if self.image_size is None:
            size = presets.get(self.preset).image_size if self.preset else DEFAULT_IMAGE_SIZE
            object.__setattr__(self, "image_size", size)
        names = {c.label for c in self.classes()} | {c.wnid for c in self.classes() if c.wnid}
        seen: set[str] = set()
        for index, override in enumerate(self.prompts):
            if override.label not in names:
                raise ValueError(
                    f"prompts[{index}].label {override.label!r} is not a class of this job"
                )
            if override.label in seen:
                raise ValueError(f"prompts[{index}].label {override.label!r} is overridden twice")
            seen.add(override.label)
        if (
            self.method == "generate"
            and self.reference is not None
            and not self.trains_on_reference
        ):
            raise ValueError(
                "reference: method generate uses no reference images (unless soft_labels' "
                "teacher or select's scorer is reference)"
            )
        if self.soft_labels is not None:
            self.soft_labels.check(
                reference=self.reference, formats=self.formats, classes=len(self.classes())
            )
        if self.select is not None:
            self.select.check(
                method=self.method,
                reference=self.reference,
                ipc=self.ipc,
                generated=(self.total_generated, self.generated_per_class),
                size=self.size,
            )
        if self.method != "generate" and self.reference is None:
            raise ValueError(f"reference: method {self.method} needs a reference set")
        if self.prompt_strategy != DEFAULT_STRATEGY and self.templates != (DEFAULT_TEMPLATE,):
            raise ValueError(
                f"prompt_strategy: {self.prompt_strategy} makes its own prompts; it takes the "
                f"default prompt_template ({DEFAULT_TEMPLATE!r}), or use prompt_strategy template"
            )
        if self.prompt_strategy != DEFAULT_STRATEGY and self.real:
            raise ValueError(f"prompt_strategy: method {self.method} makes no prompts")
        if self.strength is not None and self.method != "prototypes":
            raise ValueError("strength: only method prototypes re-noises images")
        if self.real and self.budget_seconds is not None:
            raise ValueError(
                f"budget_seconds: method {self.method} takes ipc (a fixed number of images "
                "per class from the reference set)"
            )
        if self.ipc is not None and self.total_images > MAX_TOTAL_IMAGES:
            total, limit = self.total_images, MAX_TOTAL_IMAGES
            raise ValueError(f"classes x ipc = {total} images exceeds the limit of {limit}")
        return self

    # ---- derived views (the worker and the manifest use these) ----

    @property
    def trains_on_reference(self) -> bool:
        """Whether the reference set trains a network for a generated job: the soft-label
        teacher or the select scorer ``reference`` (one network serves both)."""
        teacher = self.soft_labels is not None and self.soft_labels.teacher == "reference"
        scorer = self.select is not None and self.select.scorer == "reference"
        return teacher or scorer

    @property
    def pool_per_class(self) -> int:
        """Images sampled per class: ``generated_per_class``, times ``oversample`` with
        ``select``."""
        factor = self.select.oversample if self.select is not None else 1
        return self.generated_per_class * factor

    def classes(self) -> tuple[ClassInfo, ...]:
        """The job's classes in class-index order."""
        if self.preset is not None:
            return presets.get(self.preset).classes
        return presets.from_labels(self.labels or [])

    @property
    def size(self) -> int:
        """``image_size`` after defaults (always set once validated)."""
        return self.image_size or DEFAULT_IMAGE_SIZE

    @property
    def real(self) -> bool:
        """Whether the archive holds real images of the reference set (no model runs)."""
        return self.method in REAL_METHODS

    def reference_source(self) -> dict[str, str]:
        """``reference`` as ``core.references`` looks it up: a stored set's id (32 hex
        digits, what POST /v1/references answers), else the name of a named set."""
        ref = self.reference or ""
        if len(ref) == 32 and all(ch in "0123456789abcdef" for ch in ref):
            return {"reference_id": ref}
        return {"name": ref}

    @property
    def guidance_range(self) -> tuple[float, float] | None:
        """``guidance_scale``'s ``[low, high]``, or None when it is one number (or unset)."""
        scale = self.guidance_scale
        return (float(scale[0]), float(scale[1])) if isinstance(scale, tuple) else None

    def guidance_for(self, image_seed: int) -> float | None:
        """The guidance scale of the generated image (or ``select`` candidate) whose seed is
        ``image_seed`` when ``guidance_scale`` is a range: uniform in it, from a draw seeded
        by that seed alone, rounded to ``GUIDANCE_DECIMALS``. None otherwise."""
        scales = self.guidance_scales([image_seed])
        return None if scales is None else scales[0]

    def guidance_scales(self, image_seeds: Sequence[int]) -> list[float] | None:
        """``guidance_for`` of each seed of a batch; None when ``guidance_scale`` is not a
        range (the batch then runs at one scale)."""
        span = self.guidance_range
        if span is None:
            return None
        draws = (derive_seed(seed, "guidance") / 2**63 for seed in image_seeds)
        return [round(span[0] + (span[1] - span[0]) * d, GUIDANCE_DECIMALS) for d in draws]

    @property
    def denoise_strength(self) -> float:
        return self.strength if self.strength is not None else DEFAULT_STRENGTH

    @property
    def templates(self) -> tuple[str, ...]:
        t = self.prompt_template
        return (t,) if isinstance(t, str) else tuple(t)

    @property
    def total_images(self) -> int:
        """Images in the archive for a fixed-ipc job (0 for a time-budget job: not known yet)."""
        return len(self.classes()) * (self.ipc or 0)

    @property
    def generated_per_class(self) -> int:
        """Images sampled per class for a fixed-ipc job; the rest are augmented copies."""
        return math.ceil((self.ipc or 0) / (self.augment.n_copies + 1))

    @property
    def total_generated(self) -> int:
        return len(self.classes()) * self.generated_per_class

    def prompt(self, cls: ClassInfo, sample: int = 0) -> str:
        """The prompt for a class's ``sample``-th generated image."""
        for override in self.prompts:
            if override.label in (cls.label, cls.wnid):
                return override.prompt
        if self.prompt_strategy != DEFAULT_STRATEGY:
            seed = derive_seed(self.seed, "prompt", cls.key, sample)
            return choose(self.prompt_strategy, cls, seed=seed)
        templates = self.templates
        return templates[sample % len(templates)].format(label=cls.prompt_name)

    def prompt_variants(self, cls: ClassInfo) -> tuple[str, ...]:
        """Every prompt a class's images may get: its override, else its strategy's."""
        for override in self.prompts:
            if override.label in (cls.label, cls.wnid):
                return (override.prompt,)
        if self.prompt_strategy != DEFAULT_STRATEGY:
            return variants(self.prompt_strategy, cls)
        return tuple(t.format(label=cls.prompt_name) for t in self.templates)


def derive_seed(job_seed: int, *parts: str | int) -> int:
    """A 63-bit seed for one image or copy, from the job seed and the item's identity.

    Seeds depend on the class name and the image's number within its class, never on batch
    layout or class position, so the same request gives the same images however it is run.
    """
    text = "\x1f".join(str(p) for p in (job_seed, *parts))
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)
