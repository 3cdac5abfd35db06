"""The keypoint (regression) task: decoding output maps into coordinates, errors, the Wrong rule,
face components, and the Gaussian target maps used for training (reference §4, §9.4).

A keypoint model outputs one map per keypoint at the input resolution. A keypoint's predicted (x, y)
is the value-weighted mean position of the map's 64 highest pixels, or (-1, -1) where the mean of
those values is not positive (the original's decoding). A ground-truth keypoint with a coordinate at
or below 1e-5 (the original marks invisible keypoints 0 or -1) is missing: it has no error, does not
count in the image's mean error, and cannot be the worst keypoint. (The original counted missing
keypoints as zero errors in the mean, which made images with hidden keypoints look better, and gave a
keypoint labelled -1 an error of 1.41 px.)
"""
from __future__ import annotations

import numpy as np
import torch

TOP_PIXELS = 64
MISSING_AT_OR_BELOW = 1e-5
TARGET_SIGMA = 5.0
TARGET_SCALE = 10.0

# The 27 keypoints of the original FLD case study, by face component (reference §4). A case with
# another number of keypoints has one component, "all".
FLD_COMPONENTS: dict[str, list[int]] = {
    "leftbrow": [0, 1], "rightbrow": [2, 3], "noseridge": [4, 5], "nose": [6, 7, 8],
    "lefteye": list(range(9, 16)), "righteye": list(range(16, 23)), "mouth": list(range(23, 27)),
}


def components_for(keypoints: int) -> dict[str, list[int]]:
    return FLD_COMPONENTS if keypoints == 27 else {"all": list(range(keypoints))}


def decode(maps: torch.Tensor, top: int = TOP_PIXELS) -> torch.Tensor:
    """(N, K, H, W) output maps -> (N, K, 2) predicted (x, y) = (column, row)."""
    n, k, height, width = maps.shape
    values, positions = maps.reshape(n, k, height * width).float().topk(min(top, height * width), dim=2)
    rows = torch.div(positions, width, rounding_mode="floor").float()
    cols = (positions % width).float()
    total = values.sum(dim=2)
    safe = torch.where(total == 0, torch.ones_like(total), total)
    coords = torch.stack([(values * cols).sum(dim=2) / safe, (values * rows).sum(dim=2) / safe], dim=2)
    invalid = values.mean(dim=2) <= 0
    coords[invalid] = -1.0
    return coords


def visible(truth: np.ndarray) -> np.ndarray:
    """(N, K) True where both ground-truth coordinates are above the missing mark."""
    return (np.asarray(truth) > MISSING_AT_OR_BELOW).all(axis=-1)


def keypoint_errors(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N, K) Euclidean pixel error per keypoint; NaN where the ground truth is missing."""
    errors = np.linalg.norm(np.asarray(predicted, float) - np.asarray(truth, float), axis=-1)
    return np.where(visible(truth), errors, np.nan)


def mean_errors(errors: np.ndarray) -> np.ndarray:
    """Per image, the mean error over its visible keypoints (NaN when none is visible)."""
    counts = np.isfinite(errors).sum(axis=1)
    sums = np.nansum(errors, axis=1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def worst_keypoints(errors: np.ndarray) -> np.ndarray:
    """Per image, the index of its largest-error visible keypoint (-1 when none is visible)."""
    filled = np.where(np.isfinite(errors), errors, -np.inf)
    worst = filled.argmax(axis=1)
    return np.where(np.isfinite(errors).any(axis=1), worst, -1)


def is_wrong(errors: np.ndarray, threshold: float) -> np.ndarray:
    """An image is Wrong when its mean keypoint error exceeds the threshold (4 px by default)."""
    return mean_errors(errors) > threshold


def component_flags(errors: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Per component, True where any of its visible keypoints has an error above the threshold."""
    above = np.where(np.isfinite(errors), errors, 0.0) > threshold
    return {name: above[:, indices].any(axis=1) for name, indices in components_for(errors.shape[1]).items()}


def component_of(keypoint: np.ndarray, keypoints: int) -> np.ndarray:
    names = np.full(keypoints, "", dtype=object)
    for name, indices in components_for(keypoints).items():
        names[indices] = name
    keypoint = np.asarray(keypoint)
    return np.where(keypoint >= 0, names[np.maximum(keypoint, 0)], "")


def target_maps(truth: torch.Tensor, height: int, width: int, sigma: float = TARGET_SIGMA,
                scale: float = TARGET_SCALE) -> torch.Tensor:
    """(N, K, 2) keypoints -> (N, K, H, W) training targets: scale x a Gaussian of width sigma at each
    visible keypoint, zeros for a missing one."""
    truth = torch.as_tensor(truth, dtype=torch.float32)
    ys = torch.arange(height, dtype=torch.float32).view(1, 1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, 1, width)
    x0 = truth[..., 0, None, None]
    y0 = truth[..., 1, None, None]
    maps = scale * torch.exp(-((xs - x0) ** 2 + (ys - y0) ** 2) / (2 * sigma ** 2))
    shown = (truth > MISSING_AT_OR_BELOW).all(dim=-1)[..., None, None]
    return torch.where(shown, maps, torch.zeros_like(maps))


def worst_keypoint_seed(maps: torch.Tensor, worst: torch.Tensor) -> torch.Tensor:
    """The LRP seed of a keypoint model: the output with every map but each image's worst keypoint's
    zeroed (the original's choice). `worst` holds one keypoint index per image."""
    seed = torch.zeros_like(maps)
    rows = torch.arange(len(maps))
    seed[rows, worst] = maps.detach()[rows, worst]
    return seed
