"""The seed of the backward pass: ``one_hot(target) * output``, or ``mask * output``."""
from __future__ import annotations

import torch


def _class_indices(y: torch.Tensor, target) -> torch.Tensor:
    """Per-sample class (channel) index of a class target, checked against the output ``y``."""
    batch, classes = y.shape[0], y.shape[1]
    if target is None:
        if y.dim() != 2:
            raise ValueError("LRP: target=None (predicted class) needs a (batch, classes) output; "
                             "pass a class/channel index or a float mask")
        return y.argmax(dim=1)
    if isinstance(target, bool) or not isinstance(target, (int, torch.Tensor, list, tuple)):
        raise ValueError("LRP: target must be None, an int, an index tensor or a float mask")
    if isinstance(target, int):
        if not 0 <= target < classes:
            raise ValueError(f"LRP: target class {target} out of range [0, {classes})")
        return torch.full((batch,), target, dtype=torch.long, device=y.device)
    idx = torch.as_tensor(target, device=y.device)
    if idx.is_floating_point() or idx.dtype == torch.bool:
        raise ValueError("LRP: target must be None, an int, an index tensor or a float mask")
    idx = idx.long().reshape(-1)
    if idx.numel() == 1:
        idx = idx.expand(batch)
    if idx.numel() != batch:
        raise ValueError(f"LRP: target has {idx.numel()} entries for a batch of {batch}")
    if bool(((idx < 0) | (idx >= classes)).any()):
        raise ValueError(f"LRP: target class index out of range [0, {classes})")
    return idx


def make_seed(out: torch.Tensor, target) -> torch.Tensor:
    """``one_hot(target) * output`` (or ``mask * output``), detached. For an N-d output (keypoint
    heatmaps) a class index selects that channel at every position."""
    y = out.detach()
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        if target.shape != y.shape:
            raise ValueError(f"LRP: a float target is a mask and must have the output's shape "
                             f"{tuple(y.shape)}, got {tuple(target.shape)}")
        return target.to(device=y.device, dtype=y.dtype) * y
    if y.dim() < 2:
        raise ValueError("LRP: class targets need an output of shape (batch, classes, ...); "
                         "pass a float mask of the output's shape instead")
    idx = _class_indices(y, target)
    batch = y.shape[0]
    index = idx.reshape(batch, 1, *([1] * (y.dim() - 2))).expand(batch, 1, *y.shape[2:])
    return torch.zeros_like(y).scatter_(1, index, y.gather(1, index))
