"""keypoints.py and the keypoint networks: decoding against a hand computation, errors with missing
keypoints, the Wrong rule, components, target maps, and LRP through transposed convolutions (zennit)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import keypoints
import lrp
from architectures import KPNet, KPNetSmall
from helpers import hand_decode
from zennit_oracle import assert_close, zennit_composite, zennit_relevance


def test_decoding_matches_the_hand_computation():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(3, 4, 16, 20))
    maps[0, 1] += 5 * np.exp(-((np.arange(20)[None] - 7.3) ** 2 + (np.arange(16)[:, None] - 4.1) ** 2) / 8)
    maps[1, 2] -= 10.0                                   # every value negative: not found
    decoded = keypoints.decode(torch.from_numpy(maps)).numpy()
    for n in range(3):
        for k in range(4):
            np.testing.assert_allclose(decoded[n, k], hand_decode(maps[n, k]), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(decoded[1, 2], [-1, -1])
    assert abs(decoded[0, 1, 0] - 7.3) < 1.5 and abs(decoded[0, 1, 1] - 4.1) < 1.5  # near the bump (noise: 64 px)


def test_errors_leave_missing_keypoints_out():
    truth = np.array([[[10, 10], [0, 0], [-1, -1], [20, 5]]], dtype=float)
    predicted = np.array([[[13, 14], [50, 50], [3, 3], [20, 6]]], dtype=float)
    errors = keypoints.keypoint_errors(predicted, truth)
    np.testing.assert_allclose(errors[0, [0, 3]], [5.0, 1.0])
    assert np.isnan(errors[0, 1]) and np.isnan(errors[0, 2])
    assert keypoints.mean_errors(errors)[0] == pytest.approx(3.0)   # (5 + 1) / 2 visible keypoints
    assert keypoints.worst_keypoints(errors)[0] == 0
    assert keypoints.is_wrong(errors, 2.9)[0] and not keypoints.is_wrong(errors, 3.0)[0]  # above, not at
    nothing = keypoints.keypoint_errors(predicted, np.zeros_like(truth))
    assert np.isnan(keypoints.mean_errors(nothing)[0]) and keypoints.worst_keypoints(nothing)[0] == -1


def test_components_flag_any_keypoint_above_the_threshold():
    errors = np.zeros((2, 27))
    errors[0, 24] = 6.0          # mouth
    errors[1, 10] = 4.5          # left eye
    errors[1, 0] = np.nan        # missing left-brow keypoint
    flags = keypoints.component_flags(errors, 4.0)
    assert [n for n, f in flags.items() if f[0]] == ["mouth"]
    assert [n for n, f in flags.items() if f[1]] == ["lefteye"]
    assert list(keypoints.component_of(np.array([24, 10, -1]), 27)) == ["mouth", "lefteye", ""]
    assert set(keypoints.components_for(5)) == {"all"}
    assert sorted(sum(keypoints.FLD_COMPONENTS.values(), [])) == list(range(27))


def test_target_maps_are_scaled_gaussians_at_visible_keypoints():
    truth = torch.tensor([[[5.0, 7.0], [0.0, 0.0]]])
    maps = keypoints.target_maps(truth, 16, 12)
    assert maps.shape == (1, 2, 16, 12)
    assert maps[0, 0, 7, 5] == pytest.approx(10.0)
    assert maps[0, 0, 10, 9] == pytest.approx(10 * math.exp(-(4 ** 2 + 3 ** 2) / (2 * 5 ** 2)))
    assert maps[0, 1].abs().max() == 0
    # decoding a target map gives its keypoint back, to within the top-64 cut through a ring of equal pixels
    centred = keypoints.target_maps(torch.tensor([[[6.0, 8.0]]]), 17, 13)
    np.testing.assert_allclose(keypoints.decode(centred)[0, 0].numpy(), [6.0, 8.0], atol=0.25)  # top-64 cuts a ring


def test_worst_keypoint_seed_keeps_one_map_per_image():
    maps = torch.randn(3, 5, 4, 4)
    seed = keypoints.worst_keypoint_seed(maps, torch.tensor([0, 4, 2]))
    for n, k in enumerate([0, 4, 2]):
        torch.testing.assert_close(seed[n, k], maps[n, k])
        assert seed[n].abs().sum() == pytest.approx(maps[n, k].abs().sum().item(), rel=1e-6)


@pytest.mark.parametrize("preset", ["epsilon", "hudd"])
def test_lrp_through_transposed_convolutions_matches_zennit(preset):
    torch.manual_seed(0)
    model = KPNetSmall(num_classes=5).double().eval()
    x = torch.rand(2, 1, 64, 64, dtype=torch.float64)
    out = model(x)
    mask = torch.zeros_like(out)
    mask[0, 3], mask[1, 1] = 1, 1                       # each image's "worst keypoint"
    layers = [p for _, p in lrp.default_layers(model)]
    ours = lrp.relevance(model, x, target=mask, rules=preset, layers=layers)
    composite = zennit_composite(preset, canonizer=None)
    composite.canonizers = []
    reference = zennit_relevance(model, x, composite, layers, lambda y: y.detach() * mask)
    assert "convT1" in layers
    for name in ["input"] + layers:
        assert_close(ours[name], reference[name], 1e-9, f"kpnet/{preset}/{name}")


def test_the_original_keypoint_network_has_its_shape_and_freezes_its_early_layers():
    model = KPNet()
    assert model(torch.zeros(1, 1, 128, 128)).shape == (1, 27, 128, 128)
    model.freeze_early()
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "conv2", "conv3", "conv4"}
    assert [p for _, p in lrp.default_layers(model)][-1] == "convT1"
