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


class _FeaturesThenClassifier(nn.Module):
    """`features`, flattened, then `classifier` (torchvision's AlexNet/VGG layout)."""

    features: nn.Sequential
    classifier: nn.Sequential

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class _AlexNetNoAdaptivePool(_FeaturesThenClassifier):
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


class AlexNet256(_AlexNetNoAdaptivePool):
    """AlexNet for 256x256 inputs (the original's GD, OC, OD and TS models): 256*7*7 features."""

    input_size = 256
    flat_spatial = 7


class AlexNet128(_AlexNetNoAdaptivePool):
    """AlexNet for 128x128 inputs (the original's HPD model, `AlexNetIEE`): 256*3*3 features."""

    input_size = 128
    flat_spatial = 3


class DemoNet(_FeaturesThenClassifier):
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


class KPNet(nn.Module):
    """The original tool's facial keypoint network (reference §5): 1 x 128 x 128 grey input, six
    convolutions with two max pools, then two 2x2 stride-2 transposed convolutions (no bias) back to one
    output map per keypoint at the input resolution. `freeze_early()` freezes conv1-conv4, as the
    original's retraining did."""

    input_size = 128
    widths = (96, 96, 192, 192, 224, 224, 128)

    def __init__(self, num_classes: int = 27, in_channels: int = 1):
        super().__init__()
        w = self.widths
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, padding=1)
        self.conv2 = nn.Conv2d(w[0], w[1], 3, padding=1)
        self.pool1 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(w[1], w[2], 3, padding=1)
        self.conv4 = nn.Conv2d(w[2], w[3], 3, padding=1)
        self.pool2 = nn.MaxPool2d(2)
        self.conv5 = nn.Conv2d(w[3], w[4], 3, padding=1)
        self.conv6 = nn.Conv2d(w[4], w[5], 1)
        self.convT1 = nn.ConvTranspose2d(w[5], w[6], 2, stride=2, bias=False)
        self.convT2 = nn.ConvTranspose2d(w[6], num_classes, 2, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = torch.relu  # functional, as in the original (and never in-place)
        x = self.pool1(relu(self.conv2(relu(self.conv1(x)))))
        x = self.pool2(relu(self.conv4(relu(self.conv3(x)))))
        x = relu(self.conv6(relu(self.conv5(x))))
        return self.convT2(relu(self.convT1(x)))

    def freeze_early(self) -> None:
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4):
            layer.requires_grad_(False)


class KPNetSmall(KPNet):
    """KPNet's layout with about 1/6 of its channels, for 64 x 64 inputs: the keypoint demo's network,
    sized to train on a CPU."""

    input_size = 64
    widths = (16, 16, 32, 32, 48, 48, 32)


# Lower-case names as the user types them with --arch or in hudd.json.
BUILTIN_ARCHITECTURES: dict[str, type[nn.Module]] = {
    "alexnet256": AlexNet256,
    "alexnet128": AlexNet128,
    "demonet": DemoNet,
    "kpnet": KPNet,
    "kpnet-small": KPNetSmall,
}
