"""Oversample and select (``select``, ``core.oversample``): which of a class's candidates stay.

The engine samples each class's pool (``pool_per_class`` candidates: candidate ``j`` has a
plain job's image ``j``'s seed and prompt), hands it to ``Selector.choose`` at the output
size, and post-processes the kept candidates as images ``0..k-1`` of the class, in the order
they were kept. The choice depends on the class's pool, the scorer and ``keep`` alone, so a
job cut into shards (each holding whole classes) keeps the same images as one in one piece.

Every step is deterministic: ties go to the lowest candidate number.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from core.oversample import SCORE_DECIMALS
from core.presets import ClassInfo
from core.settings import Settings
from core.spec import DatasetSpec
from worker import runtime
from worker.model.clip import ClipModel
from worker.selection import coreset, references, teachers


class Scorer(Protocol):
    """What a selector needs of its scorer."""

    provenance: dict[str, Any]
    #: Per class, p(class) of its reference images (``keep: difficulty``); else empty.
    confidences: tuple[np.ndarray, ...]

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities float64 (N, C), features float64 (N, D)) of uint8 images."""
        ...


class ScorerUnavailable(ValueError):
    """The job's scorer is not loaded in this worker (the job fails as invalid_request)."""


@dataclass(frozen=True)
class Choice:
    """One class's selection: the kept candidates (in keep order) and why."""

    kept: list[int]
    #: p(class) of every candidate, in candidate order.
    scores: np.ndarray
    #: Candidates the scorer put in another class, in candidate order.
    misclassified: list[int]
    #: Of those, the ones taken back so that enough were left.
    restored: list[int]
    #: ``keep: difficulty``: the reference images' difficulty quantiles matched, in order.
    targets: list[float] | None = None

    def record(self, cls: ClassInfo) -> dict[str, Any]:
        """The class's entry in the manifest's ``select`` section."""
        return {
            "label": cls.label,
            "pool": len(self.scores),
            "misclassified": self.misclassified,
            "dropped": [j for j in self.misclassified if j not in self.restored],
            "kept": self.kept,
            "kept_scores": [round(float(self.scores[j]), SCORE_DECIMALS) for j in self.kept],
            "scores": [round(float(s), SCORE_DECIMALS) for s in self.scores],
            **(
                {"difficulty_targets": [round(t, SCORE_DECIMALS) for t in self.targets]}
                if self.targets is not None
                else {}
            ),
        }


def eligible(probs: np.ndarray, own: int, k: int) -> tuple[list[int], list[int], list[int]]:
    """(candidates left after dropping those whose top-1 is not ``own``; those misclassified;
    those of them taken back to leave ``k``), each in candidate order."""
    scores = probs[:, own]
    top1 = probs.argmax(axis=1)
    right = [j for j in range(len(probs)) if top1[j] == own]
    wrong = [j for j in range(len(probs)) if top1[j] != own]
    back = sorted(sorted(wrong, key=lambda j: (-scores[j], j))[: max(k - len(right), 0)])
    return sorted(right + back), wrong, back


def difficulty_targets(reference: np.ndarray, k: int) -> np.ndarray:
    """The quantiles ``(i + 0.5) / k``, ``i = 0..k-1``, of ``reference`` (linear)."""
    return np.quantile(np.asarray(reference, dtype=np.float64), (np.arange(k) + 0.5) / k)


def match_difficulty(difficulty: np.ndarray, targets: np.ndarray) -> list[int]:
    """One index of ``difficulty`` per target, in the targets' order: the nearest value not
    yet taken."""
    free = np.ones(len(difficulty), dtype=bool)
    chosen = []
    for target in targets:
        gap = np.where(free, np.abs(difficulty - target), np.inf)
        index = int(np.argmin(gap))
        chosen.append(index)
        free[index] = False
    return chosen


def choose(
    keep: str,
    probs: np.ndarray,
    features: np.ndarray,
    *,
    own: int,
    k: int,
    reference_confidence: np.ndarray,
) -> Choice:
    """Keep ``k`` of a pool scored ``probs`` (N, C) with ``features`` (N, D); ``own`` is the
    class's column, ``reference_confidence`` its reference images' p(class)."""
    if not 1 <= k <= len(probs):
        raise ValueError(f"cannot keep {k} of a pool of {len(probs)}")
    scores = probs[:, own]
    left, wrong, back = eligible(probs, own, k)
    if keep == "confident":
        picked = sorted(left, key=lambda j: (-scores[j], j))[:k]
    elif keep in ("herding", "kcenter"):
        pick = coreset.herding if keep == "herding" else coreset.kcenter
        picked = [left[i] for i in pick(features[left], k)]
    elif keep == "difficulty":
        targets = difficulty_targets(1.0 - reference_confidence, k)
        picked = [left[i] for i in match_difficulty(1.0 - scores[left], targets)]
        return Choice(picked, scores, wrong, back, [float(t) for t in targets])
    else:
        raise ValueError(f"unknown keep {keep!r}")
    return Choice(kept=picked, scores=scores, misclassified=wrong, restored=back)


class Selector:
    """A job's scorer and rule: ``choose(cls, pool)`` for each class's pool."""

    def __init__(self, spec: DatasetSpec, scorer: Scorer) -> None:
        assert spec.select is not None
        self.spec = spec
        self.request = spec.select
        self.scorer = scorer

    def choose(self, cls: ClassInfo, pool: np.ndarray) -> Choice:
        """The kept candidates of ``pool``, uint8 (P, S, S, 3) at the output size."""
        probs, features = self.scorer.score(pool)
        return choose(
            self.request.keep,
            probs,
            features,
            own=cls.index,
            k=self.spec.generated_per_class,
            reference_confidence=(
                self.scorer.confidences[cls.index]
                if self.request.keep == "difficulty"
                else np.empty(0)
            ),
        )

    def provenance(self, classes: list[dict[str, Any]]) -> dict[str, Any]:
        """The manifest's ``select`` section, given every class's ``Choice.record``."""
        scorer = {k: v for k, v in self.scorer.provenance.items() if k not in ("teacher", "batch")}
        return {
            "oversample": self.request.oversample,
            "keep": self.request.keep,
            "pool_per_class": self.spec.pool_per_class,
            "kept_per_class": self.spec.generated_per_class,
            "candidates": "candidate j of a class has the seed and prompt of image j of the "
            "same request without select; kept[n] is the candidate that became sampled image "
            "n of the class (its augmented copies follow it)",
            "scorer": {
                "scorer": self.request.scorer,
                **scorer,
                "scores": "p(class): softmax of the scorer's logits at temperature 1, on the "
                "candidate at the output size; scored in fixed chunks of the class's pool",
            },
            "rule": "drop candidates whose top-1 class is not their own, taking back the best "
            "of them (by p(class)) while fewer than kept_per_class are left; then keep "
            + _RULES[self.request.keep],
            "classes": classes,
        }


_RULES = {
    "confident": "the highest p(class), ties to the lower candidate",
    "herding": "by herding on the scorer's features (worker.selection.coreset)",
    "kcenter": "by greedy k-center on the scorer's features",
    "difficulty": "for each quantile (i + 0.5) / kept_per_class of the reference images' "
    "1 - p(class), ascending, the candidate nearest to it not yet kept",
}


def for_job(spec: DatasetSpec, settings: Settings) -> Selector | None:
    """The job's selector (None without ``select``); its scorer comes from this worker's
    cache when it has one. ``references.ReferenceUnavailable`` when its reference set is
    gone."""
    if spec.select is None:
        return None
    if spec.select.scorer == "clip":
        clip = runtime.current().clip
        if clip is None:
            why = runtime.current().generator.unavailable.get("clip_scorer", "not loaded")
            raise ScorerUnavailable(f"select.scorer: this worker has no CLIP scorer ({why})")
        return Selector(spec, _clip_scorer(clip, spec, settings))
    return Selector(spec, teachers.reference_network(spec, settings))


#: The clip scorers of the last jobs: a job's piece and its publishing share one (its
#: reference images, for ``keep: difficulty``, are read and scored once).
_clip_cache: OrderedDict[tuple[str, str], ClipScorer] = OrderedDict()


def _clip_scorer(clip: ClipModel, spec: DatasetSpec, settings: Settings) -> ClipScorer:
    key = (clip.source, spec.model_dump_json())
    if key not in _clip_cache:
        _clip_cache[key] = ClipScorer(clip, spec, settings)
        while len(_clip_cache) > teachers.CACHE_SIZE:
            _clip_cache.popitem(last=False)
    _clip_cache.move_to_end(key)
    return _clip_cache[key]


class ClipScorer:
    """``select.scorer: clip`` for one job: CLIP zero-shot over the job's classes.

    A class's text embedding is the normalised mean of the unit embeddings of its prompts
    (every prompt its images may get, ``DatasetSpec.prompt_variants``); a candidate's
    logits are CLIP's logit scale times its cosine similarity to each class's; its features
    are its unit image embedding."""

    def __init__(self, clip: ClipModel, spec: DatasetSpec, settings: Settings) -> None:
        classes = spec.classes()
        self.clip = clip
        prompts = [spec.prompt_variants(c) for c in classes]
        means = np.stack([clip.texts(p).mean(axis=0) for p in prompts])
        self.text = means / np.linalg.norm(means, axis=1, keepdims=True).clip(1e-12)
        self.scale = clip.logit_scale
        self.provenance: dict[str, Any] = {
            **clip.describe(),
            "zero_shot": "softmax over the job's classes of logit_scale x cosine(image, "
            "class), a class's text embedding being the mean of its prompts' unit embeddings",
            "logit_scale": round(self.scale, SCORE_DECIMALS),
            "prompts_per_class": [len(p) for p in prompts],
        }
        self.confidences: tuple[np.ndarray, ...] = ()
        if spec.select is not None and spec.select.keep == "difficulty":
            wanted = [(c.label, c.wnid) for c in classes]
            with references.source(settings, **spec.reference_source()) as opened:
                per_class = references.load_for_classes(opened, wanted, size=spec.size)
            self.confidences = tuple(
                self.score(c.images)[0][:, index] for index, c in enumerate(per_class)
            )

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        features = self.clip.images(images)
        logits = self.scale * features @ self.text.T
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True), features
