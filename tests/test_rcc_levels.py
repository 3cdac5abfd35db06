"""Readable root causes: the cluster step's two levels and files, the feature spaces against
independent computations, HDBSCAN's noise group, and --compare recomputed from the labels file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import assignModule
import clusterModule
import clustering
import features
import heatmapModule
import testModule
from helpers import SETTINGS, context, hudd, run_steps

pytestmark = pytest.mark.xdist_group("test_rcc_levels")  # its module-scoped fixture is built once (conftest.py)


def add_scenarios(case: Path) -> None:
    test_dir = case / "DataSets" / "TestSet"
    images = sorted(Path(os.path.relpath(p, test_dir)).as_posix() for p in test_dir.rglob("*.png"))
    pd.DataFrame({"image": images, "scenario": [("fog", "night", "none")[i % 3] for i in range(len(images))],
                  "brightness": [float(i % 2) for i in range(len(images))],
                  "angle": [90.0 if i < 2 else np.nan for i in range(len(images))]}).to_csv(
        test_dir / "metadata.csv", index=False)


@pytest.fixture(scope="module")
def clustered_case(tmp_path_factory):
    from helpers import build_case
    case = build_case(tmp_path_factory.mktemp("levels") / "case", per_class=10)
    add_scenarios(case)
    ctx = context(case)
    run_steps(ctx, testModule.STEP, heatmapModule.STEP, clusterModule.STEP)
    return case


def test_both_levels_are_written_and_nest(clustered_case):
    ctx = context(clustered_case)
    layer = clusterModule.selected_layer(ctx.paths)
    labels = clusterModule.read_labels(ctx.paths, layer)
    stats = clusterModule.read_rcc_stats(ctx.paths, layer).set_index("rcc")
    subs = clusterModule.read_sub_rcc_stats(ctx.paths, layer).set_index("sub_rcc")
    assert len(stats) <= ctx.settings.max_rccs
    for sub, group in labels.groupby("sub_rcc"):
        assert group["rcc"].nunique() == 1 and sub.startswith(group["rcc"].iloc[0] + ".")   # inside one RCC
        assert subs.loc[sub, "size"] == len(group) and subs.loc[sub, "rcc"] == group["rcc"].iloc[0]
    sizes = labels["rcc"].value_counts()
    assert stats["size"].to_dict() == sizes.to_dict()
    assert list(stats.sort_values("size", ascending=False, kind="stable").index) == list(stats.index)  # RCC01 largest
    assert (stats["sub_rccs"] == labels.groupby("rcc")["sub_rcc"].nunique()).all()
    # published: each RCC's images, each with its overlay, and a folder per sub-cluster inside
    for row in labels.itertuples():
        assert clusterModule.member_copy(ctx.paths, layer, row.rcc, row.image, row.expected).is_file()
        inside = clusterModule.member_copy(ctx.paths, layer, row.rcc, row.image, row.expected, row.sub_rcc)
        assert inside.read_bytes() == (clustered_case / row.image).read_bytes()
        assert clusterModule.overlay_file(ctx.paths, layer, row.rcc, row.image, row.expected, row.sub_rcc).is_file()
    table = clusterModule.read_summary(ctx.paths).set_index("layer")
    assert table.loc[layer, "k"] == len(stats) and table.loc[layer, "sub_k"] == len(subs)


def test_each_images_mean_distance_in_its_sub_cluster_is_that_of_the_distance_matrix(clustered_case):
    ctx = context(clustered_case)
    layer = clusterModule.selected_layer(ctx.paths)
    labels = clusterModule.read_labels(ctx.paths, layer)
    distances = np.load(clusterModule.layer_dir(ctx.paths, layer) / "distances.npy")
    for i, row in enumerate(labels.itertuples()):
        others = [j for j, sub in enumerate(labels["sub_rcc"]) if sub == row.sub_rcc and j != i]
        expected = sum(distances[i, j] for j in others) / len(others) if others else 0.0
        assert row.mean_distance_in_sub_rcc == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_each_groups_icd_is_the_mean_over_its_pairs_of_the_distance_matrix(clustered_case):
    from itertools import combinations
    ctx = context(clustered_case)
    layer = clusterModule.selected_layer(ctx.paths)
    labels = clusterModule.read_labels(ctx.paths, layer)
    distances = np.load(clusterModule.layer_dir(ctx.paths, layer) / "distances.npy")
    for stats, column in ((clusterModule.read_rcc_stats(ctx.paths, layer), "rcc"),
                          (clusterModule.read_sub_rcc_stats(ctx.paths, layer), "sub_rcc")):
        for name, icd in zip(stats[column], stats["icd"]):
            pairs = list(combinations(np.flatnonzero(labels[column].to_numpy() == name), 2))
            expected = sum(distances[i, j] for i, j in pairs) / len(pairs) if pairs else 0.0
            assert icd == pytest.approx(expected, rel=1e-12, abs=1e-15), (column, name)


def test_a_two_stage_clusterings_statistics_cover_the_measured_members_only():
    names = np.array(["RCC01", "RCC01", "RCC02", "RCC01", "RCC02"])
    measured = np.array([0, 2, 3, 4])                          # image 1 is not in the sample
    distances = np.array([[0.0, 1.0, 4.0, 6.0], [1.0, 0.0, 2.0, 3.0], [4.0, 2.0, 0.0, 5.0], [6.0, 3.0, 5.0, 0.0]])
    sums = clusterModule.sums_within_groups(names, distances, measured)
    assert list(clusterModule.mean_distance_in_group(names, sums, measured)) == [4.0, np.inf, 3.0, 4.0, 3.0]
    stats = clusterModule.rcc_statistics(names, distances, None, measured)
    assert list(stats["size"]) == [3, 2] and list(stats["icd"]) == [4.0, 3.0]


def test_a_parameter_few_members_have_does_not_characterise_an_rcc(clustered_case):
    ctx = context(clustered_case)
    params = clusterModule.read_characterising_parameters(ctx.paths, clusterModule.selected_layer(ctx.paths))
    labels = clusterModule.read_labels(ctx.paths, clusterModule.selected_layer(ctx.paths))
    for row in params.itertuples():
        members = (labels["rcc"] == row.rcc).sum()
        assert row.members_with_value * 2 > members    # "angle" is set on 2 images only: never the majority
    assert "angle" not in set(params["parameter"]) or (params["members_with_value"] >= 2).all()


def test_compare_figures_are_those_of_the_labels_file(clustered_case):
    ctx = context(clustered_case)
    table = clusterModule.compare(ctx)
    assert table["default"].iloc[0] and len(table) == len(clusterModule.candidates(ctx))
    assert (clustered_case / "T" / "ClusterAnalysis" / "compare.csv").is_file()
    layer = clusterModule.selected_layer(ctx.paths)
    labels = clusterModule.read_labels(ctx.paths, layer)
    top = labels["rcc"].where(labels["rcc"] != clusterModule.NOISE)
    codes = pd.Categorical(top).codes                  # -1 where noise
    recomputed = clustering.readable_quality(np.asarray(codes), labels["scenario"].to_numpy())
    row = table.iloc[0]
    assert row["layer"] == layer
    for key, value in recomputed.items():
        assert row[key] == pytest.approx(value), key
    assert 0 <= row["pixels_purity"] <= 1


def test_compare_through_the_command_line(clustered_case):
    result = hudd("-o", str(clustered_case), "--compare")
    assert result.returncode == 0, result.stderr
    assert "pixels_purity" in result.stdout and "compare.csv" in result.stdout
    shown = pd.read_csv(clustered_case / "T" / "ClusterAnalysis" / "compare.csv")
    assert {"heatmaps", "activations"} <= set(shown["features"])


def test_compare_without_metadata_says_why_it_shows_no_purity(make_case):
    case = make_case(per_class=6)
    assert hudd("-o", str(case), "--steps", "test,heatmaps,clusters").returncode == 0
    result = hudd("-o", str(case), "--compare")
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header[:7] == ["features", "reduction", "clusterer", "layer", "rccs", "median_size", "noise"]
    assert "purity" not in header and "pixels_purity" not in header and "NaN" not in result.stdout
    assert "no purity or coverage: they need a metadata.csv with a scenario column" in result.stdout


def test_activations_are_the_modules_outputs(clustered_case):
    ctx = context(clustered_case)
    index = heatmapModule.read_index(ctx.paths)
    model, space = ctx.model(), features.ActivationSpace()
    from PIL import Image
    import Helper
    transform = Helper.make_transform(ctx.settings)
    inputs = torch.stack([transform(Image.open(clustered_case / p).convert("RGB")) for p in index["image"]])
    with torch.no_grad():  # DemoNet by hand: features.0 is Layer1, features.2 (a pool) Layer2, ...
        expected = {"Layer0": inputs, "Layer1": model.features[0](inputs),
                    "Layer2": model.features[:3](inputs), "Layer3": model.features[:4](inputs)}
    layers = heatmapModule.read_layers(ctx.paths).set_index("layer")["module"]
    assert (layers["Layer1"], layers["Layer2"], layers["Layer3"]) == ("features.0", "features.2", "features.3")
    for layer, value in expected.items():
        np.testing.assert_allclose(space.error_rows(ctx, layer), value.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("space", ["activations", "pixels"])
def test_the_cluster_step_reads_images_before_it_starts_its_threads(clustered_case, tmp_path, monkeypatch, space):
    """A space that runs the model reads the error images with DataLoader workers, forked processes. Forked
    while a thread of the step imports (matplotlib, ahead; it imports PIL's plugins), a worker inherits a
    module lock nothing releases and hangs in PIL's lazy plugin import: so no loader while a thread runs."""
    import shutil
    import threading
    case = tmp_path / "case"
    shutil.copytree(clustered_case, case)
    loaders, original = [], features.make_loader

    def watched(*args, **kwargs):
        loaders.append([t.name for t in threading.enumerate() if t is not threading.main_thread()])
        return original(*args, **kwargs)

    monkeypatch.setattr(features, "make_loader", watched)
    ctx = context(case, features=space, workers=2)
    ctx.force = True
    run_steps(ctx, clusterModule.STEP)
    step_threads = [[name for name in alive if name.startswith("ThreadPoolExecutor")] for alive in loaders]
    assert loaders and not any(step_threads), loaders
    assert clusterModule.read_summary(ctx.paths)["layer"].tolist() == features.make_space(space).layers(ctx)


def test_pixels_are_the_models_input(clustered_case):
    ctx = context(clustered_case)
    rows = features.PixelSpace().error_rows(ctx, features.PixelSpace.LAYER)
    np.testing.assert_array_equal(rows, features.ActivationSpace().error_rows(ctx, "Layer0"))


def test_backbone_features_are_the_input_of_its_last_linear_layer(clustered_case, tmp_path):
    import torchvision
    torch.manual_seed(0)
    network = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=3)
    optimiser = torch.optim.SGD(network.parameters(), lr=0.1)   # a small network trained in the test
    for _ in range(2):
        optimiser.zero_grad()
        nn.functional.cross_entropy(network(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0])).backward()
        optimiser.step()
    network.eval()
    torch.save(network.state_dict(), tmp_path / "backbone.pth")
    ctx = context(clustered_case, features="backbone", backbone="mobilenet_v3_small",
                  backbone_weights=str(tmp_path / "backbone.pth"))
    rows = features.BackboneSpace().error_rows(ctx, features.BackboneSpace.LAYER)
    index = heatmapModule.read_index(ctx.paths)
    from PIL import Image
    from torchvision import transforms
    plain = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(),
                                transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    inputs = torch.stack([plain(Image.open(clustered_case / p).convert("RGB")) for p in index["image"]])
    network.classifier[-1] = nn.Identity()                       # the plain forward pass, without the last layer
    with torch.no_grad():
        expected = network(inputs).numpy()
    np.testing.assert_allclose(rows, expected, rtol=1e-4, atol=1e-5)


def test_backbone_without_weights_is_a_clear_error(clustered_case):
    settings = dict(SETTINGS, features="backbone")
    (clustered_case / "hudd.json").write_text(json.dumps(settings))
    try:
        result = hudd("-o", str(clustered_case), "--steps", "clusters")
    finally:
        (clustered_case / "hudd.json").write_text(json.dumps(SETTINGS))
    assert result.returncode == 2 and "backbone_weights" in result.stderr and "Traceback" not in result.stderr


def test_hdbscan_noise_is_its_own_group_and_never_assigned(make_case):
    case = make_case(per_class=12)
    ctx = context(case, clusterer="hdbscan", min_cluster_size=3)
    run_steps(ctx, testModule.STEP, heatmapModule.STEP, clusterModule.STEP)
    layer = clusterModule.selected_layer(ctx.paths)
    labels = clusterModule.read_labels(ctx.paths, layer)
    stats = clusterModule.read_rcc_stats(ctx.paths, layer).set_index("rcc")
    assert stats["size"].sum() == len(labels)                    # nobody dropped: noise is a row of its own
    noise = labels["rcc"] == clusterModule.NOISE
    if noise.any():
        assert stats.loc[clusterModule.NOISE, "size"] == noise.sum()
        assert labels.loc[noise, "sub_rcc"].str.startswith(clusterModule.NOISE + ".").all()
    summary = clusterModule.read_summary(ctx.paths).set_index("layer")
    assert summary.loc[layer, "noise"] == noise.sum()
    clusters = assignModule.selected_clusters(ctx)
    assert not any(name.startswith(clusterModule.NOISE) for name in clusters.eligible)
