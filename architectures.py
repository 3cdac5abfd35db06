"""Built-in network architectures.

Parameter names follow torchvision's AlexNet (`features.<i>`, `classifier.<i>`) so that the
state_dicts of the original HUDD case studies load unchanged. Every ReLU is out-of-place: an
in-place ReLU overwrites the pre-activation that relevance propagation needs (the original tool's
heatmaps silently used post-ReLU values because of this).
"""
from __future__ import annotations

import torch
from torch import nn


def _alexnet_features() -> nn.Sequential:
    """torchvision AlexNet's feature extractor (module indices 0-12)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


class _AlexNetNoAdaptivePool(nn.Module):
    """The original tool's AlexNet: torchvision's layout without the adaptive pool, so the
    flattened size is fixed by the input size."""

    input_size = 256
    flat_spatial = 7

    def __init__(self, num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        if in_channels != 3:
            raise ValueError("the AlexNet variants take 3-channel images")
        self.features = _alexnet_features()
        flat = 256 * self.flat_spatial * self.flat_spatial
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(flat, 4096),
            nn.ReLU(),
            nn.Dropout(),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class AlexNet256(_AlexNetNoAdaptivePool):
    """AlexNet for 256x256 inputs (the original's GD, OC, OD and TS models): 256*7*7 features."""

    input_size = 256
    flat_spatial = 7


class AlexNet128(_AlexNetNoAdaptivePool):
    """AlexNet for 128x128 inputs (the original's HPD model, `AlexNetIEE`): 256*3*3 features."""

    input_size = 128
    flat_spatial = 3


class DemoNet(nn.Module):
    """A small VGG-style classifier for the demo case study's 32x32 images; trains in about a
    minute on two CPU cores."""

    input_size = 32

    def __init__(self, num_classes: int = 8, in_channels: int = 3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.3),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# Lower-case names as the user types them with --arch or in hudd.json.
BUILTIN_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "alexnet256": AlexNet256,
    "alexnet128": AlexNet128,
    "demonet": DemoNet,
}
