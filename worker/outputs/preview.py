"""Contact sheet of a finished job: what its images look like, at a glance. No torch here.

One row per class for up to the first ``MAX_ROWS`` classes: the class name, then up to
``SAMPLES`` generated images, each followed by up to ``COPIES`` of its augmented copies.
Small images are scaled up with nearest-neighbour so 32 px pixels stay visible. It is built
from images already in memory while the archive is written.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

MAX_ROWS = 20
SAMPLES = 2
COPIES = 4
TARGET_TILE = 64
LABEL_WIDTH = 150
GAP = 4
GROUP_GAP = 12


def tile_scale(size: int) -> int:
    """Integer upscale so a tile is about ``TARGET_TILE`` px (never shrinks)."""
    return max(1, TARGET_TILE // size)


@dataclass
class PreviewCollector:
    """Keeps the few images the sheet shows, as they pass by."""

    rows: dict[int, tuple[str, dict[int, list[np.ndarray]]]] = field(default_factory=dict)

    def wants(self, *, class_index: int, sample: int, copy: int) -> bool:
        """Whether the sheet shows this image."""
        return class_index < MAX_ROWS and sample < SAMPLES and copy <= COPIES

    def offer(
        self, *, class_index: int, label: str, sample: int, copy: int, image: np.ndarray
    ) -> None:
        if not self.wants(class_index=class_index, sample=sample, copy=copy):
            return
        _, samples = self.rows.setdefault(class_index, (label, {}))
        group = samples.setdefault(sample, [])
        if len(group) == copy:  # images arrive in order: the generated one, then copies 1..n
            group.append(image)

    def geometry(self, size: int) -> tuple[int, int, int]:
        """(rows, columns, tile side) of the sheet."""
        columns = max(
            (sum(len(g) for g in samples.values()) for _, samples in self.rows.values()), default=0
        )
        return len(self.rows), columns, size * tile_scale(size)

    def render(self, size: int) -> bytes:
        """The sheet as PNG bytes."""
        rows, columns, tile = self.geometry(size)
        samples_per_row = max((len(s) for _, s in self.rows.values()), default=1)
        width = LABEL_WIDTH + columns * (tile + GAP) + samples_per_row * GROUP_GAP + GAP
        height = GAP + max(rows, 1) * (tile + GAP)
        sheet = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(sheet)
        for row, class_index in enumerate(sorted(self.rows)):
            label, samples = self.rows[class_index]
            y = GAP + row * (tile + GAP)
            draw.text((GAP, y + tile // 2 - 6), f"{class_index} {label}"[:24], fill="black")
            x = LABEL_WIDTH
            for sample in sorted(samples):
                for image in samples[sample]:
                    big = Image.fromarray(image).resize((tile, tile), Image.Resampling.NEAREST)
                    sheet.paste(big, (x, y))
                    x += tile + GAP
                x += GROUP_GAP
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG", optimize=False)
        return buffer.getvalue()
