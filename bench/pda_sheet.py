"""Picture of the paper's augmentation policy on real photographs: docs/pda-cifar10.png.

    python bench/pda_sheet.py [--data ../shared/data/cifar10-test] [--out docs/pda-cifar10.png]

Eight CIFAR-10 test images (one per class, classes 0-7), each followed by four copies made by
the service's own `paper` policy. A copy is cut from the image resized to crop_scale x 32
(1.25 -> 40 px), as the worker cuts copies from the larger generated image. Scaled 4x with
nearest-neighbour so pixels stay visible.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from core.augmentation import AugmentSpec
from core.spec import derive_seed
from worker.augment import augment, build_transform, source_size

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse"]
SIZE, ZOOM, PAD, LABEL_W = 32, 4, 6, 110


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/cifar10-test")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/pda-cifar10.png")
    args = parser.parse_args()

    spec = AugmentSpec(policy="paper", copies=4)
    transform = build_transform(spec, image_size=SIZE)
    assert transform is not None
    src = source_size(spec, image_size=SIZE)
    cell = SIZE * ZOOM
    columns = 1 + spec.n_copies
    sheet = Image.new(
        "RGB",
        (LABEL_W + columns * (cell + PAD) + PAD, 24 + len(CLASSES) * (cell + PAD) + PAD),
        "white",
    )
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(["original", "copy 1", "copy 2", "copy 3", "copy 4"]):
        draw.text((LABEL_W + PAD + col * (cell + PAD), 6), title, fill="black")
    for row, name in enumerate(CLASSES):
        first = sorted((args.data / f"{row:05d}").iterdir())[0]
        photo = Image.open(first).convert("RGB")
        source = np.asarray(photo.resize((src, src), Image.BICUBIC))
        tiles = [np.asarray(photo)] + [
            augment(transform, source, seed=derive_seed(0, name, 0, "copy", k))
            for k in range(1, columns)
        ]
        y = 24 + PAD + row * (cell + PAD)
        draw.text((PAD, y + cell // 2 - 6), f"{row} {name}", fill="black")
        for col, tile in enumerate(tiles):
            big = Image.fromarray(tile).resize((cell, cell), Image.NEAREST)
            sheet.paste(big, (LABEL_W + PAD + col * (cell + PAD), y))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
