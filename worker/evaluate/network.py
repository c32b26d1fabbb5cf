"""ConvNet, the benchmark network of dataset distillation (Gidaris & Komodakis; Zhao et al.).

Each block is ``Conv2d 3x3 (padding 1) -> GroupNorm(C, C) -> ReLU -> AvgPool2d(2)``; after
``depth`` blocks the feature map is flattened into one linear classifier. GroupNorm with one
group per channel is instance normalisation with a learned affine, the "instancenorm" the
distillation papers use: it does not depend on the batch, so a 10-image class trains the same
in any batch. ConvNet-3 (width 128) is the CIFAR evaluation network; Tiny-ImageNet results are
usually quoted for depth 4.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """``depth`` conv blocks of ``width`` channels and a linear head for ``num_classes``."""

    def __init__(
        self,
        num_classes: int,
        *,
        image_size: int = 32,
        channels: int = 3,
        depth: int = 3,
        width: int = 128,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1 or num_classes < 1:
            raise ValueError("depth, width and num_classes must be positive")
        if image_size % (2**depth):
            # Pooling would silently drop border rows and the head size would not match.
            raise ValueError(f"image size {image_size} is not divisible by 2**depth ({2**depth})")
        layers: list[nn.Module] = []
        in_channels = channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            in_channels = width
        self.features = nn.Sequential(*layers)
        side = image_size // (2**depth)
        self.classifier = nn.Linear(width * side * side, num_classes)
        self.depth = depth
        self.width = width
        self.image_size = image_size

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, width * side * side): what the classifier sees, and what
        coreset selection (herding, k-center) measures distances in."""
        return torch.flatten(self.features(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for images (N, channels, image_size, image_size)."""
        logits: torch.Tensor = self.classifier(self.embed(x))
        return logits
