"""The models a deployment serves: aliases, families, sampling defaults, one queue each.

``DISTILL_MODELS`` names them by alias (``sdxl-turbo=stabilityai/sdxl-turbo,dit=facebook/
DiT-XL-2-256``); unset, the deployment serves one model, ``DISTILL_MODEL``, under an alias
made from its name. A request's ``model`` picks an alias (default: the first). Each worker
serves one alias (``DISTILL_MODEL`` names it, or its id) and drains only that model's queue:
the first alias keeps ``DISTILL_QUEUE_NAME`` itself (so a one-model deployment's queue is what
it always was), the others get ``<queue>-<alias>``.

What the API must know before any worker is up (is this model class-conditional? what are its
defaults?) comes from a catalogue of published models, or, for a local directory, from its
``model_index.json`` and component configs: no torch here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from core.settings import ConfigError, Settings

Family = Literal["sdxl", "sd", "dit", "text2image"]
#: Families conditioned on ImageNet-1K class ids rather than text.
CLASS_CONDITIONAL: frozenset[str] = frozenset({"dit"})
#: The diffusers pipeline class each family loads through (text families go through
#: ``AutoPipelineForText2Image``, which picks the class from the model's own index).
#: A local model directory's own tiny decoder (an ``AutoencoderTiny``), found by the worker
#: before ``DISTILL_TINY_DECODER``'s default id; the pipeline's loader ignores a folder its
#: model_index.json does not name.
TINY_DECODER_DIR = "tiny_decoder"
#: Where a local model directory may hold its own CLIP scorer (``select.scorer: clip``).
CLIP_SCORER_DIR = "clip_scorer"

PIPELINES: dict[str, str] = {
    "sdxl": "StableDiffusionXLPipeline",
    "sd": "StableDiffusionPipeline",
    "dit": "DiTPipeline",
}
_FAMILY_OF_PIPELINE = {cls: family for family, cls in PIPELINES.items()}

_ALIAS = re.compile(r"^[a-z0-9][a-z0-9._-]{0,39}$")


@dataclass(frozen=True)
class License:
    """A model's licence as its Hub card states it (``license``, ``license_name``,
    ``license_link``) and its name in words."""

    id: str
    title: str
    name: str | None = None
    link: str | None = None
    note: str | None = None


_SAI_NC = "Stability AI Non-Commercial Research Community License"
_SAI_NOTE = (
    "Non-commercial research use only; commercial use needs a licence from Stability AI "
    "(https://stability.ai/license)."
)

#: Licences of the Hub models the service is used with, as their model cards state them.
KNOWN_LICENSES: dict[str, License] = {
    "stabilityai/sdxl-turbo": License(
        "other",
        _SAI_NC,
        name="sai-nc-community",
        link="https://huggingface.co/stabilityai/sdxl-turbo/blob/main/LICENSE.md",
        note=_SAI_NOTE,
    ),
    "stabilityai/sd-turbo": License(
        "other",
        _SAI_NC,
        name="sai-nc-community",
        link="https://huggingface.co/stabilityai/sd-turbo/blob/main/LICENSE.md",
        note=_SAI_NOTE,
    ),
    "madebyollin/taesdxl": License("mit", "MIT License"),
    "facebook/dit-xl-2-256": License(
        "cc-by-nc-4.0",
        "Creative Commons Attribution-NonCommercial 4.0 International",
        note="Non-commercial use only.",
    ),
    "facebook/dit-xl-2-512": License(
        "cc-by-nc-4.0",
        "Creative Commons Attribution-NonCommercial 4.0 International",
        note="Non-commercial use only.",
    ),
    "stabilityai/stable-diffusion-xl-base-1.0": License(
        "openrail++", "CreativeML Open RAIL++-M License"
    ),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": License(
        "creativeml-openrail-m", "CreativeML Open RAIL-M License"
    ),
}


def licence_of(model: str) -> License | None:
    """A published model's licence as its model card states it; None when not known here."""
    return KNOWN_LICENSES.get(model.strip().lower())


@dataclass(frozen=True)
class Defaults:
    """What a model samples with unless a request says otherwise."""

    family: Family
    resolution: int
    steps: int
    guidance_scale: float


#: Published models whose facts are known without downloading them.
CATALOGUE: dict[str, Defaults] = {
    # Adversarially distilled: one step, no classifier-free guidance.
    "stabilityai/sdxl-turbo": Defaults("sdxl", 512, 1, 0.0),
    "stabilityai/sd-turbo": Defaults("sd", 512, 1, 0.0),
    "stabilityai/stable-diffusion-xl-base-1.0": Defaults("sdxl", 1024, 30, 5.0),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": Defaults("sd", 512, 30, 7.5),
    # DiT-XL/2 as the dataset-distillation literature samples it: guidance 4 (two forward
    # passes a step), a bounded number of DPM-style steps.
    "facebook/DiT-XL-2-256": Defaults("dit", 256, 25, 4.0),
    "facebook/DiT-XL-2-512": Defaults("dit", 512, 25, 4.0),
}
#: Defaults of a model not in the catalogue, by family. Text families default to the
#: service's turbo setting (one step, no guidance): give ``steps`` and ``guidance_scale``
#: in the request for a model that needs more.
FAMILY_DEFAULTS: dict[str, tuple[int, float]] = {
    "sdxl": (1, 0.0),
    "sd": (1, 0.0),
    "text2image": (1, 0.0),
    "dit": (25, 4.0),
}


@dataclass(frozen=True)
class ModelEntry:
    """One served model: its alias, what it loads, its queue and its defaults."""

    alias: str
    id: str
    queue: str
    defaults: Defaults

    @property
    def family(self) -> Family:
        return self.defaults.family

    @property
    def class_conditional(self) -> bool:
        return self.family in CLASS_CONDITIONAL

    @property
    def pipeline(self) -> str:
        """The diffusers class it loads as (text-to-image models not in a known family: the
        class ``AutoPipelineForText2Image`` picks)."""
        return PIPELINES.get(self.family, "AutoPipelineForText2Image")


def alias_for(model: str) -> str:
    """The alias of a deployment's single model: its name, lower-cased, e.g. ``sdxl-turbo``."""
    name = model.rstrip("/").rsplit("/", 1)[-1].lower()
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", name).strip("-._")[:40]
    return cleaned or "default"


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def local_defaults(directory: Path) -> Defaults | None:
    """A local pipeline directory's family and native resolution from its configs."""
    index = _read_json(directory / "model_index.json")
    if index is None:
        return None
    family: Family = _FAMILY_OF_PIPELINE.get(str(index.get("_class_name")), "text2image")  # type: ignore[assignment]
    steps, guidance = FAMILY_DEFAULTS[family]
    denoiser = _read_json(
        directory / ("transformer" if family == "dit" else "unet") / "config.json"
    )
    vae = _read_json(directory / "vae" / "config.json") or {}
    blocks = vae.get("block_out_channels")
    scale = 2 ** (len(blocks) - 1) if isinstance(blocks, list) and blocks else 8
    sample = denoiser.get("sample_size") if denoiser else None
    resolution = int(sample) * scale if isinstance(sample, int) else 512
    return Defaults(family, resolution, steps, guidance)


@lru_cache(maxsize=64)
def defaults_for(model: str) -> Defaults:
    """What is known of ``model`` (hub id or local directory) without loading it (read once
    per process: every request resolves its model)."""
    if model in CATALOGUE:
        return CATALOGUE[model]
    local = local_defaults(Path(model)) if Path(model).is_dir() else None
    if local is not None:
        return local
    steps, guidance = FAMILY_DEFAULTS["text2image"]
    return Defaults("text2image", 512, steps, guidance)


def parse(text: str) -> list[tuple[str, str]]:
    """``alias=id,alias=id`` -> [(alias, id)]; ConfigError names what is wrong."""
    pairs: list[tuple[str, str]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        alias, sep, model = (s.strip() for s in part.partition("="))
        if not sep or not model:
            raise ConfigError(f"DISTILL_MODELS: {part!r} is not alias=model")
        if not _ALIAS.match(alias):
            raise ConfigError(
                f"DISTILL_MODELS: alias {alias!r} must be 1-40 of a-z, 0-9, '.', '_', '-'"
            )
        if any(alias == a for a, _ in pairs):
            raise ConfigError(f"DISTILL_MODELS: alias {alias!r} is given twice")
        pairs.append((alias, model))
    if not pairs:
        raise ConfigError("DISTILL_MODELS names no model")
    return pairs


def catalogue(settings: Settings) -> dict[str, ModelEntry]:
    """The deployment's models by alias, the default first."""
    if settings.models:
        pairs = parse(settings.models)
    else:
        pairs = [(alias_for(settings.model), settings.model)]
    base = settings.queue_name
    return {
        alias: ModelEntry(
            alias=alias,
            id=model,
            queue=base if n == 0 else f"{base}-{alias}",
            defaults=defaults_for(model),
        )
        for n, (alias, model) in enumerate(pairs)
    }


def default(settings: Settings) -> ModelEntry:
    return next(iter(catalogue(settings).values()))


def lookup(settings: Settings, alias: str | None) -> ModelEntry:
    """The entry ``alias`` names (None: the default); KeyError names the known aliases."""
    served = catalogue(settings)
    if alias is None:
        return next(iter(served.values()))
    if alias not in served:
        raise KeyError(f"unknown model {alias!r}; this service serves: {', '.join(served)}")
    return served[alias]


def own(settings: Settings) -> ModelEntry:
    """The model a worker serves: ``DISTILL_MODEL`` as an alias or an id of the catalogue."""
    served = catalogue(settings)
    if settings.model in served:
        return served[settings.model]
    for entry in served.values():
        if entry.id == settings.model:
            return entry
    if not settings.models:
        return next(iter(served.values()))
    raise ConfigError(
        f"DISTILL_MODEL={settings.model!r} is neither an alias nor a model of DISTILL_MODELS "
        f"({', '.join(served)})"
    )


def scoped(settings: Settings, entry: ModelEntry) -> Settings:
    """``settings`` as a process serving ``entry`` sees them: its queue and its model id.

    Everything keyed by ``queue_name`` (workers, maintenance, shards, fairness) is then per
    model.
    """
    return settings.model_copy(update={"queue_name": entry.queue, "model": entry.id})


def queues(settings: Settings) -> list[str]:
    """Every model queue of the deployment, the default's first."""
    return [entry.queue for entry in catalogue(settings).values()]
