"""The ``select`` request field: sample more images than a class needs, keep the best.

A job with ``select`` samples a *pool* of ``oversample`` times each class's images. Candidate
``j`` of a class has the seed and the prompt that image ``j`` of a plain job has, so
candidates ``0..k-1`` are exactly the plain job's images and ``oversample: 1`` keeps them.
The scorer gives every candidate its class probability and its features:

1. A candidate the scorer puts in another class (top-1 is not its own) is dropped, unless
   fewer than the ``k`` needed would be left: the best of the dropped, by the probability of
   their own class, are taken back until ``k`` are.
2. ``keep`` picks ``k`` of what is left:
   - ``confident``: the highest probability of their own class.
   - ``herding``, ``kcenter``: the coreset methods of the real-image baselines, on the
     scorer's features.
   - ``difficulty``: the candidates whose difficulty, ``1 - p(class)``, matches the quantiles
     of the reference images' difficulties for that class.

Augmented copies are made from the kept images only. Scorers:

- ``reference``: the benchmark ConvNet-3 trained on the job's classes of its reference set,
  with the job seed. It is the network the soft-label teacher ``reference`` uses, trained
  once per job.
- ``clip``: the deployment's CLIP model (``DISTILL_CLIP_SCORER``: a hub id or a local
  directory, looked for first beside the model as ``<model>/clip_scorer``), zero-shot: a
  candidate's probabilities are the softmax over the job's classes of CLIP's scaled cosine
  similarity between the image and the mean text embedding of each class's prompts; its
  features are the normalised image embedding. It needs no reference set, except for
  ``keep: difficulty``, whose target distribution is the reference images'. A worker that
  cannot load it runs without it, says why in ``/readyz`` and ``GET /v1/models``, and
  requests for it are a 422.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from core.limits import MAX_POOL_BYTES, MAX_TOTAL_IMAGES

Keep = Literal["confident", "kcenter", "herding", "difficulty"]
KEEPS: tuple[str, ...] = ("confident", "kcenter", "herding", "difficulty")
Scorer = Literal["reference", "clip"]
SCORERS: tuple[str, ...] = ("reference", "clip")
#: The ``unavailable`` entry of a worker that runs without its CLIP scorer.
CLIP_PART = "clip_scorer"
MAX_OVERSAMPLE = 8
DEFAULT_OVERSAMPLE = 4
#: Decimals of the scores in the manifest.
SCORE_DECIMALS = 6


class SelectRequest(BaseModel):
    """``select``: how large each class's pool is, what scores it, and which images stay."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    oversample: StrictInt = Field(
        default=DEFAULT_OVERSAMPLE,
        ge=1,
        le=MAX_OVERSAMPLE,
        description="Candidates sampled per image kept: the model runs this many times the "
        "plain job's images (candidate j has a plain job's image j's seed and prompt).",
    )
    scorer: Scorer = Field(
        default="reference",
        description="reference: ConvNet-3 (the evaluator's network) trained for 10 epochs on "
        "the job's classes of the request's reference set, with the job seed; clip: the "
        "deployment's CLIP model (GET /v1/models lists it under scorers when loaded), "
        "zero-shot against each class's prompts.",
    )
    keep: Keep = Field(
        default="confident",
        description="confident: the highest probability of their own class; herding, "
        "kcenter: the coreset methods on the scorer's features; difficulty: matching the "
        "reference images' distribution of 1 - p(class). Candidates the scorer puts in "
        "another class are dropped first (keeping at least the images needed, best first).",
    )

    def check(
        self,
        *,
        method: str,
        reference: str | None,
        ipc: int | None,
        generated: tuple[int, int],
        size: int,
    ) -> None:
        """What a request with this ``select`` must also have (``generated``: the images it
        samples in all and per class without ``select``); ValueError naming the field."""
        if method != "generate":
            raise ValueError(
                f"select: method {method} samples no pool to select from; it takes method generate"
            )
        if self.scorer == "reference" and reference is None:
            raise ValueError(
                "select.scorer: reference trains the scorer on the request's reference set; "
                "give reference"
            )
        if self.keep == "difficulty" and reference is None:
            raise ValueError(
                "select.keep: difficulty matches the reference images' distribution of "
                "1 - p(class); give reference"
            )
        if ipc is None:
            raise ValueError(
                "select: takes ipc (each class's pool is oversample x its images, which a "
                "time budget does not fix in advance)"
            )
        total, per_class = generated
        pool = total * self.oversample
        if pool > MAX_TOTAL_IMAGES:
            raise ValueError(
                f"select.oversample: {self.oversample} x {total} sampled "
                f"images = {pool} candidates exceeds the limit of {MAX_TOTAL_IMAGES}"
            )
        # A class's pool is held in memory, at the output size and the copies' source size.
        candidates = per_class * self.oversample
        held = candidates * size * size * 3 * 2
        if held > MAX_POOL_BYTES:
            raise ValueError(
                f"select.oversample: a class's pool of {candidates} candidates at "
                f"{size} px needs about {held / 2**30:.1f} GiB of memory, over the "
                f"{MAX_POOL_BYTES / 2**30:.0f} GiB a worker holds; ask for fewer images per "
                "class, a smaller oversample or a smaller image_size"
            )
