"""Prompt strategies: which words each generated image of a class is conditioned on.

``template`` is the request's ``prompt_template`` (the default, unchanged). The other
strategies give a class several prompts and pick one per image, from a ``random.Random``
seeded with that image's own seed (``derive_seed(job seed, "prompt", class key, image)``,
made by the caller), so the same request gets the same prompt for each image however it is
batched or sharded:

- ``synonyms``: "a photo of a {lemma}", one of the class's WordNet lemma names;
- ``definitions``: "a photo of a {label}, {gloss}" and "a photo of a {label}, a kind of
  {hypernym}" (the class's WordNet definition and parent; Sariyildiz et al., CVPR 2023);
- ``domains``: "a {domain} of a {label}", a domain of ``DOMAINS`` (Shipard et al., CVPR-W 2023);
- ``backgrounds``: "a photo of a {label} {background}", a background of ``BACKGROUNDS``.

WordNet comes from ``core/presets/wordnet.json`` (written by ``scripts/wordnet_presets.py``),
one entry per preset class keyed by ``ClassInfo.key``: its wnid where it has one, else its
label, so a request's own label finds an entry only where it is a preset's label (``cat``).
A class with no entry (``aquarium_fish``, most free-text labels) falls back to its label:
``synonyms`` and ``definitions`` then give "a photo of a {label}" for every image.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal, get_args

from core.presets import ClassInfo

Strategy = Literal["template", "synonyms", "domains", "backgrounds", "definitions"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
DEFAULT_STRATEGY: Strategy = "template"

#: Image domains of the ``domains`` strategy, in its order (each reads after "a").
DOMAINS = (
    "photo",
    "painting",
    "sketch",
    "cartoon",
    "3D render",
    "watercolor painting",
    "pencil drawing",
    "black and white photo",
    "close-up photo",
    "sculpture",
)

#: Surroundings of the ``backgrounds`` strategy, in its order (each reads after the label).
BACKGROUNDS = (
    "in a forest",
    "on a beach",
    "indoors",
    "in a city street",
    "in a grassy field",
    "in the snow",
    "in the desert",
    "in the mountains",
    "near water",
    "on a table",
    "at night",
    "on a plain white background",
)

#: The default prompt_template, and what a class without WordNet gets from its strategies.
DEFAULT_TEMPLATE = "a photo of a {label}"


@dataclass(frozen=True)
class Sense:
    """A class's WordNet synset: its lemma names, its hypernym's first lemma, its gloss."""

    synset: str
    synonyms: tuple[str, ...]
    hypernym: str | None
    gloss: str


@cache
def _senses() -> dict[str, Sense]:
    text = resources.files("core").joinpath("presets", "wordnet.json").read_text(encoding="utf-8")
    return {
        key: Sense(
            synset=entry["synset"],
            synonyms=tuple(entry["synonyms"]),
            hypernym=entry["hypernym"],
            gloss=entry["gloss"],
        )
        for key, entry in json.loads(text).items()
    }


def sense(cls: ClassInfo) -> Sense | None:
    """The class's WordNet entry (by its wnid, else its label); None where it has none."""
    return _senses().get(cls.key)


def variants(strategy: str, cls: ClassInfo) -> tuple[str, ...]:
    """Every prompt ``strategy`` may pick for ``cls``, in a fixed order (never empty).

    ``template`` has none of its own (the request's templates are used): ValueError."""
    label = cls.prompt_name
    if strategy == "domains":
        return tuple(f"a {domain} of a {label}" for domain in DOMAINS)
    if strategy == "backgrounds":
        return tuple(f"a photo of a {label} {where}" for where in BACKGROUNDS)
    if strategy not in ("synonyms", "definitions"):
        raise ValueError(f"prompt_strategy {strategy!r} has no variants of its own")
    found = sense(cls)
    fallback = (DEFAULT_TEMPLATE.format(label=label),)
    if found is None:
        return fallback
    if strategy == "synonyms":
        return tuple(f"a photo of a {name}" for name in found.synonyms) or fallback
    out = []
    if found.gloss:
        out.append(f"a photo of a {label}, {found.gloss}")
    if found.hypernym:
        out.append(f"a photo of a {label}, a kind of {found.hypernym}")
    return tuple(out) or fallback


def choose(strategy: str, cls: ClassInfo, *, seed: int) -> str:
    """One of ``variants(strategy, cls)``, drawn from a generator seeded with ``seed``."""
    options = variants(strategy, cls)
    return options[random.Random(seed).randrange(len(options))]
