"""zennit as an oracle for the LRP tests: zennit's relevance at every requested layer and the input,
the composite that spells each of our presets in zennit, and an element-wise comparison. Shared by
test_lrp.py and test_keypoints.py (tests do not import each other)."""
from __future__ import annotations

import pytest
import torch
from torch import nn


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4, what: str = ""):
    """Element-wise: |a - b| <= rel * max|b| + rel * |b|."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    scale = b.abs().max().item()
    assert scale > 0 or a.abs().max().item() == 0, f"{what}: reference is all zero"
    ok = torch.allclose(a, b, rtol=rel, atol=rel * scale)
    err = ((a - b).abs().max() / max(scale, 1e-300)).item()
    assert ok, f"{what}: max error {err:.3g} of max|R| = {scale:.3g}"


def seed_of(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    seed = torch.zeros_like(out)
    rows = torch.arange(len(out))
    seed[rows, target] = out.detach()[rows, target]
    return seed


def zennit_relevance(model, x, composite, layers, target):
    """zennit's all-layer relevance: retain every layer output, one backward, plus the input.
    `target`: class indices, or a callable giving the seed from the output (regression)."""
    caps = {}
    with composite.context(model) as modified:
        handles = [modified.get_submodule(p).register_forward_hook(
            lambda m, i, o, p=p: caps.__setitem__(p, o)) for p in layers]
        try:
            xx = x.clone().requires_grad_(True)
            out = modified(xx)
            seed = target(out) if callable(target) else seed_of(out, target)
            grads = torch.autograd.grad(out, [xx] + [caps[p] for p in layers], seed)
        finally:
            for h in handles:
                h.remove()
    result = dict(zip(layers, grads[1:]))
    result["input"] = grads[0]
    return result


def zennit_composite(preset, canonizer):
    pytest.importorskip("zennit")
    from zennit.composites import EpsilonPlus, LayerMapComposite, layer_map_base
    from zennit.rules import Epsilon, ZPlus
    from zennit.types import Convolution
    if preset == "epsilon":
        return LayerMapComposite(
            layer_map=layer_map_base() + [(Convolution, Epsilon()), (nn.Linear, Epsilon())],
            canonizers=[canonizer])
    if preset == "epsilon-plus":
        return EpsilonPlus(canonizers=[canonizer])
    if preset == "hudd":  # zennit's spelling of the hudd preset
        return LayerMapComposite(
            layer_map=layer_map_base() + [(Convolution, Epsilon()),
                                          (nn.Linear, ZPlus(zero_params=["bias"]))],
            canonizers=[canonizer])
    raise KeyError(preset)

