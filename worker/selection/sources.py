"""Jobs that start from a reference set: the images the engine gets instead of plain sampling.

``prepare(spec, settings, generator, source_side)`` returns, for a job whose ``method`` is not
``generate``, a ``Source`` the engine asks for each batch's pixels:

- ``random_real``, ``herding``, ``kcenter`` (``RealImages``): each class's reference images
  (centre square, bicubic, digest order; ``worker.references``) at the copy-source side,
  ``ceil(ipc / (copies + 1))`` of them chosen by ``worker.coreset.select`` on the images at the
  output size (herding and k-center on features of the benchmark ConvNet trained on the whole
  set with the job's seed). The n-th sampled image of a class is its n-th pick; augmented
  copies follow as usual. Nothing is generated.
- ``prototypes`` (``Prototypes``): each class's reference images at the sampling resolution are
  encoded with the model's VAE (posterior mean), clustered with k-means in latent space (k =
  the class's images to generate, seeded with the job seed and the class key; a time-budget
  job: ``BUDGET_PROTOTYPES`` at most, cycled), and cluster n's centre starts the class's n-th
  image: an image-to-image pass with the class prompt at
  ``strength`` (D4M's prototype-guided generation).

Both record what they took (``provenance``): the reference, and per class the digests of the
picked images or, for prototypes, each cluster's size, its member nearest the centre and a
digest over its members.
Same request, same reference, same seed: same picks, same bytes. A worker keeps the last
prepared sources, so the shards and the assembly of one job on one worker prepare once.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from core.presets import ClassInfo
from core.references.matching import match
from core.settings import Settings
from core.spec import DatasetSpec
from worker.model.generator import Conditioning, Generator, SamplingParams, image_to_image_steps
from worker.model.latents import shrink
from worker.selection import coreset, references

#: Lloyd iterations at most (k-means stops earlier once no assignment changes).
KMEANS_ITERATIONS = 100
#: Clusters per class of a time-budget prototypes job (its images per class are not known in
#: advance): sample n starts from centre n mod k, k = min(this, the class's reference images).
BUDGET_PROTOTYPES = 50
#: Prepared sources a worker keeps (shards and the assembly of one job reuse them).
CACHE_SIZE = 2


class Source(Protocol):
    """Pixels for a batch of (class, sample) items, in place of plain sampling."""

    def render(
        self,
        items: Sequence[tuple[ClassInfo, int]],
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        sizes: Sequence[int],
    ) -> dict[int, np.ndarray]: ...

    def origin(self, cls: ClassInfo, sample: int) -> str | None: ...

    def provenance(self) -> dict[str, Any]: ...


@dataclass
class RealImages:
    """The picked reference images of each class, at the copy-source side."""

    spec: DatasetSpec
    picks: dict[str, tuple[np.ndarray, tuple[str, ...], str]]  # key -> (images, digests, folder)
    features: str

    def render(
        self,
        items: Sequence[tuple[ClassInfo, int]],
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        sizes: Sequence[int],
    ) -> dict[int, np.ndarray]:
        return shrink(_floats(np.stack([self.picks[cls.key][0][n] for cls, n in items])), sizes)

    def origin(self, cls: ClassInfo, sample: int) -> str | None:
        return f"reference:sha256:{self.picks[cls.key][1][sample]}"

    def provenance(self) -> dict[str, Any]:
        return {
            "reference": self.spec.reference,
            "method": self.spec.method,
            "features": self.features,
            "images": "centre square of each reference image, bicubic, then bicubic with "
            "antialiasing to the output size",
            "classes": [
                {
                    "label": c.label,
                    "folder": self.picks[c.key][2],
                    "picked": list(self.picks[c.key][1]),
                }
                for c in self.spec.classes()
            ],
        }


@dataclass
class Prototypes:
    """Each class's k-means centres of VAE latents, the starts of image-to-image passes."""

    spec: DatasetSpec
    generator: Generator
    centres: dict[str, torch.Tensor]  # key -> (k, C, h, w)
    clusters: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)

    def render(
        self,
        items: Sequence[tuple[ClassInfo, int]],
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        sizes: Sequence[int],
    ) -> dict[int, np.ndarray]:
        latents = torch.stack(
            [self.centres[cls.key][n % len(self.centres[cls.key])] for cls, n in items]
        )
        return self.generator.render(
            prompts,
            seeds,
            sizes=sizes,
            params=SamplingParams.from_spec(self.spec),
            extra=Conditioning(init_latents=latents, guidance=self.spec.guidance_scales(seeds)),
        )

    def origin(self, cls: ClassInfo, sample: int) -> str | None:
        return None  # generated: its prototype is in the manifest

    def provenance(self) -> dict[str, Any]:
        steps = self.spec.steps or self.generator.steps
        strength = self.spec.denoise_strength
        return {
            "reference": self.spec.reference,
            "method": "prototypes",
            "encoder": f"{type(self.generator.pipeline.vae).__name__}: posterior mean, scaled",
            "clustering": f"k-means (k-means++ start, Lloyd, at most {KMEANS_ITERATIONS} "
            "iterations) on flattened latents, seeded with the job seed and the class key; "
            "centres ordered by cluster size, then by their first member",
            "strength": strength,
            "image_to_image": {
                "pipeline": type(self.generator.image_to_image).__name__,
                "num_inference_steps": image_to_image_steps(steps, strength),
                "denoising_steps_run": steps,
            },
            "resolution": self.spec.resolution or self.generator.resolution,
            "classes": [
                {
                    "label": c.label,
                    "folder": self.folders[c.key],
                    "prototypes": self.clusters[c.key],
                }
                for c in self.spec.classes()
            ],
        }


def kmeans(points: np.ndarray, k: int, *, seed: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(centres (k, D), assignment (N,)) of ``points`` (N, D): k-means++ start, then Lloyd.

    Deterministic for a seed; an emptied cluster takes the point farthest from its centre.
    Centres come back ordered by cluster size (largest first), then by first member.
    """
    x = np.asarray(points, dtype=np.float64)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the {n} points, got {k}")
    rng = np.random.default_rng(list(seed))
    centres = [x[rng.integers(n)]]
    nearest = ((x - centres[0]) ** 2).sum(axis=1)
    for _ in range(1, k):
        total = nearest.sum()
        pick = int(rng.choice(n, p=nearest / total)) if total > 0 else int(rng.integers(n))
        centres.append(x[pick])
        nearest = np.minimum(nearest, ((x - x[pick]) ** 2).sum(axis=1))
    c = np.stack(centres)
    assign = np.full(n, -1)
    for _ in range(KMEANS_ITERATIONS):
        distances = (x**2).sum(1)[:, None] - 2 * x @ c.T + (c**2).sum(1)[None, :]
        new = distances.argmin(axis=1)
        for j in range(k):
            if not (new == j).any():
                far = int(distances[np.arange(n), new].argmax())
                new[far] = j
        if (new == assign).all():
            break
        assign = new
        c = np.stack([x[assign == j].mean(axis=0) for j in range(k)])
    order = sorted(
        range(k), key=lambda j: (-(assign == j).sum(), int(np.flatnonzero(assign == j)[0]))
    )
    remap = np.empty(k, dtype=int)
    remap[order] = np.arange(k)
    return c[order], remap[assign]


def _key(spec: DatasetSpec) -> str:
    request = spec.model_dump(mode="json", exclude={"callback_url", "formats"})
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


_cache: OrderedDict[str, Source] = OrderedDict()


def prepare(
    spec: DatasetSpec, settings: Settings, generator: Generator, *, source_side: int
) -> Source | None:
    """The job's ``Source`` (None for ``generate``), from this worker's cache if it has it."""
    if spec.method == "generate":
        return None
    key = _key(spec)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    source: Source
    if spec.real:
        source = _real(spec, settings, source_side=source_side)
    else:
        source = _prototypes(spec, settings, generator)
    _cache[key] = source
    while len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return source


def _cluster(
    flat: np.ndarray, centre: np.ndarray, members: np.ndarray, digests: Sequence[str]
) -> dict[str, Any]:
    """A cluster as the manifest records it: size, the member nearest the centre, and one
    digest over its members' digests (sorted), so a set of thousands stays small."""
    nearest = members[((flat[members] - centre) ** 2).sum(axis=1).argmin()]
    joined = "\n".join(sorted(digests[i] for i in members)).encode()
    return {
        "size": len(members),
        "nearest": digests[int(nearest)],
        "members_sha256": hashlib.sha256(joined).hexdigest(),
    }


def _floats(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> (N, 3, S, S) floats in [0, 1], as ``shrink`` takes them."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def _job_classes(spec: DatasetSpec) -> list[tuple[str, str | None]]:
    return [(c.label, c.wnid) for c in spec.classes()]


def _real(spec: DatasetSpec, settings: Settings, *, source_side: int) -> RealImages:
    k = spec.generated_per_class
    with references.source(settings, **spec.reference_source()) as path:
        loaded = references.load_for_classes(path, _job_classes(spec), size=source_side)
    small = [shrink(_floats(c.images), (spec.size,))[spec.size] for c in loaded]
    picked = coreset.select(spec.method, small, k=k, seed=spec.seed)
    features = (
        "none (a seeded draw)"
        if spec.method == "random_real"
        else f"penultimate layer of ConvNet-3 trained {coreset.FEATURE_EPOCHS} epochs on the "
        f"whole reference set at {spec.size} px, seed {spec.seed}"
    )
    picks = {
        cls.key: (c.images[idx], tuple(c.digests[i] for i in idx), c.folder)
        for cls, c, idx in zip(spec.classes(), loaded, picked, strict=True)
    }
    return RealImages(spec=spec, picks=picks, features=features)


def _prototypes(spec: DatasetSpec, settings: Settings, generator: Generator) -> Prototypes:
    side = spec.resolution or generator.resolution
    result = Prototypes(spec=spec, generator=generator, centres={})
    with references.source(settings, **spec.reference_source()) as path:
        folders = references.folder_counts(path)
        matched = match(_job_classes(spec), folders)
        for cls, folder in zip(spec.classes(), matched, strict=True):
            # One class at a time: only its latents stay in memory.
            (images,) = references.load(path, [folder], size=side)
            latents = generator.encode_latents(images.images)
            k = spec.generated_per_class if spec.ipc else min(BUDGET_PROTOTYPES, len(latents))
            flat = latents.reshape(len(latents), -1).numpy()
            seed = [spec.seed, int.from_bytes(hashlib.sha256(cls.key.encode()).digest()[:4], "big")]
            centres, assign = kmeans(flat, k, seed=seed)
            result.centres[cls.key] = (
                torch.from_numpy(centres).float().reshape(k, *latents.shape[1:])
            )
            result.folders[cls.key] = folder
            result.clusters[cls.key] = [
                _cluster(flat, centres[j], np.flatnonzero(assign == j), images.digests)
                for j in range(k)
            ]
    return result
