"""Prompt embeddings, each distinct prompt through the text encoders once per worker.

All images of a class share its prompt, so a job of 100 classes runs the encoders 100 times,
not once per image; each prompt goes through them alone, so its embedding is the same
whatever the worker encoded before. The pipeline is then called with ``prompt_embeds`` (and
SDXL's ``pooled_prompt_embeds``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: Prompts a worker keeps encoded (two embeddings of a few hundred KiB each in float16).
PROMPT_CACHE_SIZE = 4096

Row = dict[str, torch.Tensor]


@dataclass
class PromptCache:
    """A least-recently-used cache of text embeddings for one SDXL or SD pipeline."""

    pipeline: Any
    family: str
    device: torch.device
    #: Distinct prompts whose embeddings are kept (least recently used out).
    size: int = PROMPT_CACHE_SIZE
    #: Text-encoder passes run and served from the cache (benchmarks and status).
    stats: dict[str, int] = field(default_factory=lambda: {"encoded": 0, "cached": 0})
    rows: OrderedDict[tuple[str, bool], Row] = field(default_factory=OrderedDict, repr=False)

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str], *, guided: bool = False) -> dict[str, torch.Tensor]:
        """The pipeline's embedding arguments for ``prompts``, in order: ``prompt_embeds``
        (and SDXL's ``pooled_prompt_embeds``), with their ``negative_*`` twins when
        ``guided`` (classifier-free guidance against the empty prompt)."""
        cache = self.rows
        missing = [p for p in dict.fromkeys(prompts) if (p, guided) not in cache]
        # One encoder pass per prompt: batched, a prompt's pooled embedding changes in its
        # last bits with the batch's size (the projection is one matrix product over all the
        # batch's rows, rounded differently for one row than for several). Which prompts are
        # missing together depends on what this worker ran before, so batching them made an
        # image depend on the worker's history: the same sharded job on one worker or on two
        # gave source pixels one level apart, and so different augmented copies.
        for prompt in missing:
            (cache[(prompt, guided)],) = self._encode([prompt], guided)
        self.stats["encoded"] += len(missing)
        self.stats["cached"] += len(prompts) - len(missing)
        for prompt in prompts:
            cache.move_to_end((prompt, guided))
        found = [cache[(p, guided)] for p in prompts]
        while len(cache) > max(self.size, len(set(prompts))):
            cache.popitem(last=False)
        return {name: torch.stack([row[name] for row in found]) for name in found[0]}

    def _encode(self, prompts: list[str], guided: bool) -> list[Row]:
        """One text-encoder pass over ``prompts``: a dict of embedding rows per prompt."""
        common = {
            "device": self.device,
            "num_images_per_prompt": 1,
            "do_classifier_free_guidance": guided,
        }
        columns: dict[str, torch.Tensor | None]
        if self.family == "sdxl":
            embeds, negative, pooled, negative_pooled = self.pipeline.encode_prompt(
                prompt=prompts, **common
            )
            columns = {
                "prompt_embeds": embeds,
                "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": negative,
                "negative_pooled_prompt_embeds": negative_pooled,
            }
        else:
            embeds, negative = self.pipeline.encode_prompt(prompt=prompts, **common)
            columns = {"prompt_embeds": embeds, "negative_prompt_embeds": negative}
        kept = {
            name: value
            for name, value in columns.items()
            if value is not None and (guided or not name.startswith("negative_"))
        }
        return [{name: value[n] for name, value in kept.items()} for n in range(len(prompts))]
