"""The descriptors through the pipeline: the test step's image descriptors and object masks, the
cluster step's relevance descriptors and characterisation, against independent computations, on a
case without metadata.csv (and one with it: both characterisations)."""
from __future__ import annotations

import html

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageStat
from scipy import ndimage, stats

import clusterModule
import descriptors
import heatmapModule
import reportModule
import testModule
from helpers import context, run_step
from test_cluster_step import add_scenarios


def analysed(case, **overrides):
    ctx = context(case, **overrides)
    for step in (testModule.STEP, heatmapModule.STEP, clusterModule.STEP):
        summary = run_step(step, ctx)
    return ctx, summary


def test_the_test_step_describes_every_test_image_as_the_model_sees_it(make_case):
    case = make_case(per_class=4)
    ctx = context(case)
    run_step(testModule.STEP, ctx)
    results = testModule.read_results(ctx.paths, "test")
    table = testModule.read_descriptors(ctx.paths)
    assert list(table.index) == list(results["image"])
    assert list(table.columns) == list(descriptors.IMAGE_COLUMNS)
    for image, row in table.iterrows():     # 32x32 images: the model sees them unresized
        grey = ImageStat.Stat(Image.open(case / image).convert("L"))
        assert row["brightness"] == pytest.approx(grey.mean[0] / 255, abs=0.5 / 255)
        assert row["contrast"] == pytest.approx(grey.stddev[0] / 255, abs=0.5 / 255)
    masks, valid = testModule.read_object_masks(ctx.paths, list(results["image"])[::-1])
    pixels = np.stack([np.asarray(Image.open(case / p).convert("RGB"), dtype=np.float64) / 255
                       for p in list(results["image"])[::-1]])
    expected_masks, expected_valid = descriptors.object_masks(pixels)
    assert masks.shape == (len(results), 32, 32)
    np.testing.assert_array_equal(masks, expected_masks)
    np.testing.assert_array_equal(valid, expected_valid)


def test_the_cluster_step_characterises_the_selected_layers_rccs_without_metadata(make_case):
    case = make_case(per_class=8)
    ctx, summary = analysed(case)
    layer = summary["layer"]
    index = heatmapModule.read_index(ctx.paths)
    relevance = clusterModule.read_relevance_descriptors(ctx.paths)
    assert list(relevance.index) == list(index["image"])
    positive = np.maximum(np.load(case / "T" / "Heatmaps" / "Layer0.npy").sum(axis=1), 0)
    for row, heat in zip(relevance.itertuples(), positive):
        y, x = ndimage.center_of_mass(heat)
        assert row.relevance_x == pytest.approx((x + 0.5) / heat.shape[1])
        assert row.relevance_y == pytest.approx((y + 0.5) / heat.shape[0])
    table = clusterModule.read_rcc_descriptors(ctx.paths, layer)
    labels = clusterModule.read_labels(ctx.paths, layer)
    assert set(table["rcc"]) == set(labels["rcc"])
    images = testModule.read_descriptors(ctx.paths)
    results = testModule.read_results(ctx.paths, "test")
    correct = images.loc[results.loc[results["result"] == "Correct", "image"], "brightness"]
    for rcc, group in labels.groupby("rcc"):
        members = images.loc[group["image"], "brightness"]
        row = table[(table["rcc"] == rcc) & (table["descriptor"] == "brightness")].iloc[0]
        u = stats.mannwhitneyu(members, correct).statistic
        assert row["delta"] == pytest.approx(2 * u / (len(members) * len(correct)) - 1)
        assert row["reference"] == "correct images"
        assert sorted(table.loc[table["rcc"] == rcc, "rank"]) == list(range(1, (table["rcc"] == rcc).sum() + 1))
    book = pd.read_excel(case / "T" / "ClusterAnalysis" / layer / "descriptor_characterisation.xlsx",
                         sheet_name=None)
    assert book["RCCs"].set_index("rcc")["size"].to_dict() == labels["rcc"].value_counts().to_dict()
    assert (case / "T" / layer / "descriptor_characterisation.xlsx").is_file()      # published with the RCCs
    others = [p.parent.name for p in (case / "T" / "ClusterAnalysis").glob("*/rcc_descriptors.csv")]
    assert others == [layer]
    assert not (case / "T" / "ClusterAnalysis" / layer / "characterisation.xlsx").exists()   # no metadata


def test_with_metadata_both_characterisations_are_written_and_shown(make_case):
    case = make_case(per_class=8)
    add_scenarios(case)
    ctx, summary = analysed(case)
    folder = case / "T" / "ClusterAnalysis" / summary["layer"]
    assert (folder / "characterisation.xlsx").is_file() and (folder / "descriptor_characterisation.xlsx").is_file()
    page = reportModule.write_report(ctx).read_text(encoding="utf-8")
    table = clusterModule.read_rcc_descriptors(ctx.paths, summary["layer"])
    stats = clusterModule.read_rcc_stats(ctx.paths, summary["layer"])
    start = page.index("id=rcc-summary")
    glance = page[start:page.index("</table>", start)]
    assert "<th class=l>what they share</th>" in glance
    for rcc in stats.itertuples():
        row = glance[glance.index(f"data-top-rcc='{rcc.rcc}'"):]
        row = row[:row.index("</tr>")]
        assert f"<b class=scenario>{rcc.majority_scenario}</b>" in row                  # from the metadata
        headline = html.escape(descriptors.headline(table, rcc.rcc) or reportModule.NOTHING_STANDS_OUT, quote=True)
        assert f"data-headline='{rcc.rcc}'>{headline}</td>" in row                      # from the descriptors
        card = page.split(f"<div class=card id='{rcc.rcc}'")[1].split("<div class=card id=")[0]
        assert f"<b class=scenario>{rcc.majority_scenario}</b>" in card
        assert "what sets it apart" in card


def test_hdbscans_noise_group_is_never_characterised_as_an_rcc(make_case, tmp_path):
    """The noise group gets no rows, its images count among the other error images, and the
    workbook lists the RCCs alone."""
    case = make_case(per_class=4)
    ctx, summary = analysed(case)
    index = heatmapModule.read_index(ctx.paths)
    described = clusterModule.describe_errors(ctx, index)
    rccs = np.where(np.arange(len(index)) % 3 == 0, clusterModule.NOISE,
                    np.where(np.arange(len(index)) % 3 == 1, "RCC01", "RCC02"))
    clusterModule.write_descriptor_characterisation(rccs, described, tmp_path)
    table = pd.read_csv(tmp_path / clusterModule.RCC_DESCRIPTORS_FILE)
    assert set(table["rcc"]) == {"RCC01", "RCC02"}
    row = table[(table["rcc"] == "RCC01") & (table["descriptor"] == "relevance_x")].iloc[0]
    assert row["reference_median"] == pytest.approx(np.median(described.relevance["relevance_x"][rccs != "RCC01"]))
    book = pd.read_excel(tmp_path / clusterModule.DESCRIPTOR_WORKBOOK, sheet_name="RCCs")
    assert list(book["rcc"]) == ["RCC01", "RCC02"] and list(book["size"]) == [(rccs == "RCC01").sum(),
                                                                            (rccs == "RCC02").sum()]


def test_the_cluster_step_follows_the_test_steps_descriptors(make_case):
    """A rerun reuses the characterisation; a new test step (here: a changed training image, which
    leaves the errors and their heatmaps as they were) makes the cluster step characterise again."""
    case = make_case(per_class=4)
    analysed(case)
    ctx = context(case)
    assert [run_step(s, ctx)["skipped"] for s in (testModule.STEP, heatmapModule.STEP, clusterModule.STEP)] == \
        [True, True, True]
    training_image = sorted((case / "DataSets" / "TrainingSet").rglob("*.png"))[0]
    Image.new("RGB", (32, 32), (1, 2, 3)).save(training_image)
    ctx = context(case)
    assert [run_step(s, ctx)["skipped"] for s in (testModule.STEP, heatmapModule.STEP, clusterModule.STEP)] == \
        [False, True, False]
