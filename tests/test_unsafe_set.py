"""The label-free unsafe set and the fourth mode: candidates' distances, radius and quotas, the model's
uncertainty, BL3's pick against an independent margin, no improvement label read before the choice,
labels needed and the statistics of the comparison."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.distance import cdist
from scipy.stats import mannwhitneyu

import Helper
import assignModule
import clusterModule
import evaluation
import heatmapModule
import retrainModule
import testModule
from helpers import CLASSES, context, run_step, run_steps


# --------------------------------------------------------------------------------------------
# Candidates, on small arrays
# --------------------------------------------------------------------------------------------

def small_space(seed: int = 0):
    rng = np.random.default_rng(seed)
    members = rng.normal(size=(12, 6))
    member_rcc = rng.permutation(np.repeat([0, 1, 2], 4))
    return members, member_rcc, rng.normal(size=(10, 6))


def test_knn_and_medoid_distances_against_cdist():
    members, member_rcc, queries = small_space()
    full = cdist(queries, members)
    knn = assignModule.member_distances(queries, members, member_rcc, 3, "knn", k=2)
    expected = np.stack([np.sort(full[:, member_rcc == c], axis=1)[:, :2].mean(axis=1) for c in range(3)], axis=1)
    np.testing.assert_allclose(knn, expected, rtol=1e-10)
    medoid = assignModule.member_distances(queries, members, member_rcc, 3, "medoid")
    for c in range(3):
        group = members[member_rcc == c]
        centre = group[cdist(group, group).sum(axis=1).argmin()]
        np.testing.assert_allclose(medoid[:, c], cdist(queries, centre[None])[:, 0], rtol=1e-10)


def test_an_image_beyond_the_radius_joins_no_rcc_and_equal_quotas_keep_the_total():
    distances = np.array([[1.0, 5.0], [2.0, 9.0], [8.0, 9.0], [7.0, 1.5]])
    assigned, _ = assignModule.choose(distances, np.array([3, 3]), reach=np.array([2.0, 2.0]), radius=1.0)
    np.testing.assert_array_equal(assigned, [0, 0, -1, 1])          # image 2 is beyond both RCCs' reach
    assert assignModule.equal_quotas(np.array([2, 9, 4]), 1.0).tolist() == [5, 5, 5]
    assert assignModule.equal_quotas(np.array([2, 9, 5]), 1.0).sum() == 16


def test_uncertainty_weight_prefers_the_images_the_model_is_unsure_of():
    distances = np.array([[1.0], [1.1], [1.2]])
    uncertainty = np.array([0.0, 0.5, 0.9])
    plain, _ = assignModule.choose(distances, np.array([1]))
    weighted, _ = assignModule.choose(distances, np.array([1]), uncertainty, weight=1.0)
    assert np.flatnonzero(plain >= 0).tolist() == [0] and np.flatnonzero(weighted >= 0).tolist() == [2]


def test_reach_of_an_rcc_is_its_farthest_member_left_out():
    members, member_rcc, _ = small_space(1)
    reach = assignModule.rcc_reach(members, member_rcc, 3, "nearest")
    for c in range(3):
        inner = cdist(members[member_rcc == c], members[member_rcc == c])
        np.fill_diagonal(inner, np.inf)
        assert reach[c] == pytest.approx(inner.min(axis=1).max())


# --------------------------------------------------------------------------------------------
# Statistics: hand-computed cases and scipy
# --------------------------------------------------------------------------------------------

def test_a12_on_hand_computed_cases():
    assert evaluation.vargha_delaney_a12([4, 5, 6], [1, 2, 3]) == 1.0
    assert evaluation.vargha_delaney_a12([1, 2, 3], [4, 5, 6]) == 0.0
    assert evaluation.vargha_delaney_a12([1, 1], [1, 1]) == 0.5
    assert evaluation.vargha_delaney_a12([1, 3], [2]) == 0.5           # one win, one loss
    assert evaluation.vargha_delaney_a12([2, 3], [2, 1]) == 0.875      # (3 wins + half a tie) / 4


def enumerated_p(x, y) -> float:
    """The two-sided exact p of U by brute force: every way of splitting the pooled runs into groups of
    len(x) and len(y), U counted pair by pair (ties half)."""
    from itertools import combinations
    pooled = list(x) + list(y)

    def u(a, b):
        return sum((p > q) + 0.5 * (p == q) for p in a for q in b)
    observed = u(x, y)
    splits = [u([pooled[i] for i in chosen], [pooled[i] for i in range(len(pooled)) if i not in chosen])
              for chosen in combinations(range(len(pooled)), len(x))]
    low = sum(value <= observed + 1e-9 for value in splits) / len(splits)
    high = sum(value >= observed - 1e-9 for value in splits) / len(splits)
    return min(1.0, 2 * min(low, high))


def test_mann_whitney_is_exact_over_every_split_of_few_runs_ties_included():
    """3 HUDD runs above 3 baseline runs, two of them tied: scipy's default turns to its normal approximation
    at any tie and gave p 0.077, below the 0.1 that no split of 3 and 3 runs can go under."""
    hudd, baseline = [83.87, 84.0, 84.0], [82.47, 83.0, 83.73]
    assert mannwhitneyu(hudd, baseline, alternative="two-sided").pvalue == pytest.approx(0.0765, abs=1e-4)
    assert evaluation.mann_whitney_p(hudd, baseline) == pytest.approx(0.1)
    rng = np.random.default_rng(1)
    for sizes in ((3, 3), (4, 5), (2, 6), (8, 8), (1, 4), (5, 1), (1, 1)):
        x, y = rng.integers(0, 4, sizes[0]).astype(float), rng.integers(1, 5, sizes[1]).astype(float)  # many ties
        assert evaluation.mann_whitney_p(x, y) == pytest.approx(enumerated_p(x, y)), (x, y)


def test_mann_whitney_on_hand_computed_cases_and_against_scipy():
    # U = 0 with 3 and 3 runs: exact two-sided p = 2 x 1 / C(6, 3) = 0.1
    assert evaluation.mann_whitney_p([1, 2, 3], [4, 5, 6]) == pytest.approx(0.1)
    assert evaluation.mann_whitney_p([1.0, 1.0], [1.0, 1.0]) == 1.0
    # one run against three, above all of them: 1 of the 4 splits is as extreme on each side, p = 2 x 1/4
    assert evaluation.mann_whitney_p([5.0], [1.0, 2.0, 3.0]) == pytest.approx(0.5)
    assert evaluation.mann_whitney_p([1.0, 2.0, 3.0], [5.0]) == pytest.approx(0.5)
    assert np.isnan(evaluation.mann_whitney_p([], [1.0]))
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, y = rng.normal(size=5), rng.normal(0.5, size=7)
        assert evaluation.mann_whitney_p(x, y) == pytest.approx(mannwhitneyu(x, y, alternative="two-sided").pvalue)
        u = mannwhitneyu(x, y, alternative="two-sided").statistic
        assert evaluation.vargha_delaney_a12(x, y) == pytest.approx(u / (len(x) * len(y)))   # A12 = U1 / (m n)


# --------------------------------------------------------------------------------------------
# On a tiny case: the model's uncertainty, BL3, no label read before the choice
# --------------------------------------------------------------------------------------------

def test_contrast_against_cdist_and_an_image_on_a_right_one_comes_last():
    rng = np.random.default_rng(3)
    rows, errors, right = rng.normal(size=(7, 5)), rng.normal(size=(9, 5)), rng.normal(size=(12, 5))
    rows[6] = right[4]                      # the same relevance as an image the model gets right...
    right[[0, 1, 2, 3]] = right[4]          # ...and its five nearest of them all at distance 0
    ours = assignModule.contrast(rows, *assignModule.sides_of(errors, right))
    k = assignModule.CONTRAST_K
    to_errors = np.sort(cdist(rows, errors), axis=1)[:, :k].mean(axis=1)
    to_right = np.sort(cdist(rows, right), axis=1)[:, :k].mean(axis=1)
    np.testing.assert_allclose(ours[:6], to_errors[:6] / to_right[:6], rtol=1e-9)
    assert to_right[6] == 0 and ours[6] == np.inf
    few = assignModule.contrast(rows[:2], *assignModule.sides_of(errors[:2], right[5:7]))   # fewer than k: all of them
    np.testing.assert_allclose(few, cdist(rows[:2], errors[:2]).mean(axis=1) / cdist(rows[:2], right[5:7]).mean(axis=1))


def test_contrast_choice_takes_the_budget_of_lowest_contrast_each_in_its_closest_rcc():
    distances = np.array([[3.0, 1.0], [0.5, 2.0], [1.0, 1.0], [9.0, 8.0], [2.0, 4.0]])
    contrast_of = np.array([0.9, 0.2, 0.5, 0.1, 0.5])
    assigned, rank = assignModule.contrast_choice(distances, contrast_of, budget=3)
    # the three lowest: images 3 (0.1), 1 (0.2), then 2 before 4 (a tie, by image order)
    assert assigned.tolist() == [-1, 0, 0, 1, -1] and rank.tolist() == [-1, 0, 0, 0, -1]


@pytest.fixture
def assigned_case(make_case):
    case = make_case(per_class=8)
    run_steps(context(case), testModule.STEP, heatmapModule.STEP, clusterModule.STEP, assignModule.STEP)
    return case


def independent_margins(case) -> pd.Series:
    """1 - (top-1 minus top-2 softmax probability), from the test step's logits (score_ columns)."""
    results = pd.read_csv(case / "improveResult.csv").set_index("image")
    logits = results[[f"score_{c}" for c in CLASSES]].to_numpy(dtype=np.float64)
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    top = np.sort(probabilities, axis=1)[:, ::-1]
    return pd.Series(1.0 - (top[:, 0] - top[:, 1]), index=results.index)


def test_bl3_takes_the_lowest_margin_images_at_the_common_budget(assigned_case):
    case = assigned_case
    ctx = context(case)
    unsafe = retrainModule.unsafe_inputs(ctx)
    expected = independent_margins(case).reindex([ctx.paths.relative(p) for p in ctx.sets()["improve"].paths])
    np.testing.assert_allclose(unsafe.uncertainty, expected.to_numpy(), atol=1e-5)
    budget = (unsafe.assigned >= 0).sum()
    selections = {mode: retrainModule.select(mode, unsafe.assigned, unsafe.distances, unsafe.quota, unsafe.wrong,
                                             np.random.default_rng(0), unsafe.uncertainty) for mode in retrainModule.MODES}
    for mode, selection in selections.items():    # one budget, one bag size, for the four modes
        assert len(np.unique(selection.chosen)) == budget and len(selection.bag) == len(selections["HUDD"].bag), mode
    chosen = set(expected.index[selections["BL3"].chosen])
    threshold = np.sort(expected.to_numpy())[::-1][budget - 1]
    assert all(expected[i] >= threshold - 1e-6 for i in chosen)
    assert all(expected[i] <= threshold + 1e-6 for i in set(expected.index) - chosen)


def test_the_uncertainty_comes_from_the_test_steps_logits_and_a_missing_row_is_named(assigned_case, monkeypatch):
    case = assigned_case
    ctx = context(case)
    monkeypatch.setattr(assignModule, "model_uncertainty", lambda ctx: pytest.fail("the model was run again"))
    results = assignModule.improvement_results(ctx)
    table = assignModule.uncertainty_table(ctx, results)
    np.testing.assert_allclose(table["uncertainty"], independent_margins(case).reindex(table["image"]), atol=1e-6)
    frame = pd.read_csv(case / "improveResult.csv")
    frame.iloc[1:].to_csv(case / "improveResult.csv", index=False)
    with pytest.raises(testModule.HuddError, match=f"no row for 1 improvement image.*{frame['image'][0]}"):
        assignModule.improvement_results(ctx)


def test_the_contrast_pick_recomputed_from_scratch(make_case):
    """assign_pick contrast: the unsafe set is the budget of lowest contrast (contrast.csv), each image in its
    closest RCC; one image's contrast recomputed from the LRP engine, the stored error heatmaps and the test
    images the model gets right, each explained by its predicted class."""
    from PIL import Image
    case = make_case(per_class=8)
    ctx = context(case, assign_pick="contrast")
    run_steps(ctx, testModule.STEP, heatmapModule.STEP, clusterModule.STEP, assignModule.STEP)
    folder = case / "T" / "UnsafeSet"
    table = pd.read_csv(folder / "assignments.csv")
    contrast_of = pd.read_csv(folder / "contrast.csv").set_index("image")["contrast"]
    distances = pd.read_csv(folder / "rcc_distances.csv").set_index("image")
    clusters = assignModule.selected_clusters(ctx)
    budget = assignModule.quotas(clusters.sizes, ctx.settings.budget_factor).sum()
    assert len(table) == budget
    lowest = contrast_of.sort_values(kind="stable").index[:budget]
    assert sorted(table["image"]) == sorted(lowest)
    assert (table.set_index("image")["rcc"] == distances.loc[table["image"]].idxmin(axis=1)).all()

    layer, module = clusters.layer, heatmapModule.module_of(ctx.paths, clusters.layer)
    unit = lambda a: (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float64)

    def relevance(image: str, explained: str) -> np.ndarray:
        pixels = Helper.make_transform(ctx.settings)(Image.open(case / image).convert("RGB"))[None]
        return heatmapModule.relevance(ctx.model(), pixels, target=ctx.classes.index(explained),
                                       layers=[module])[module].numpy().reshape(-1)

    tests = pd.read_csv(case / "testResult.csv")
    right = tests[tests["result"] == "Correct"]
    right_rows = unit(np.stack([relevance(i, p) for i, p in zip(right["image"], right["predicted"])]))
    errors = np.load(case / "T" / "Heatmaps" / f"{layer}.npy")
    error_rows = unit(errors.reshape(len(errors), -1))
    image = table["image"].iloc[0]
    predicted = pd.read_csv(case / "improveResult.csv").set_index("image").loc[image, "predicted"]
    row = unit(relevance(image, predicted)[None])
    k = assignModule.CONTRAST_K
    expected = (np.sort(cdist(row, error_rows)[0])[:k].mean() / np.sort(cdist(row, right_rows)[0])[:k].mean())
    assert contrast_of[image] == pytest.approx(expected, rel=1e-5)


def test_auto_picks_by_task(make_case):
    ctx = context(make_case(per_class=1))
    assert ctx.settings.assign_pick == "auto" and assignModule.pick_of(ctx) == "contrast"
    ctx.task.unsafe_pick = "closest"   # the instance's, as KeypointTask's class attribute
    assert assignModule.pick_of(ctx) == "closest"
    assert Helper.task_class("keypoints").unsafe_pick == "closest"


def test_contrast_falls_back_to_closest_where_no_test_image_is_right(assigned_case, caplog):
    case = assigned_case
    results = pd.read_csv(case / "testResult.csv")
    results.assign(result="Wrong").to_csv(case / "testResult.csv", index=False)
    picked = {}
    for pick in ("contrast", "closest"):   # the whole step, each time: its files read back
        run_step(assignModule.STEP, context(case, assign_pick=pick))
        picked[pick] = unsafe_set_by_file(case)
        assert not (case / "T" / "UnsafeSet" / "contrast.csv").exists()   # no contrast was computed
        if pick == "contrast":
            assert "no test image right" in caplog.text
    assert picked["contrast"] == picked["closest"] and picked["closest"]


def unsafe_set_by_file(case) -> list[tuple[str, str]]:
    table = pd.read_csv(case / "T" / "UnsafeSet" / "assignments.csv")
    return sorted(zip(table["image"].str.rsplit("/", n=1).str[-1], table["rcc"]))


@pytest.mark.parametrize("settings", [{}, {"assign_pick": "closest"},
                                      {"assign_pick": "closest", "assign_uncertainty": 2.0, "assign_radius": 1.5,
                                       "assign_quota": "equal"},
                                      {"assign_pick": "closest", "assign_distance": "medoid", "assign_level": "top"}])
def test_no_improvement_label_is_read_to_choose_the_unsafe_set(make_case, settings):
    """Scramble the improvement labels after the choice (the images moved between class folders, the
    test step rerun): the unsafe set and the uncertainty stay the same."""
    case = make_case(per_class=8)
    ctx = context(case, **settings)
    run_steps(ctx, testModule.STEP, heatmapModule.STEP, clusterModule.STEP, assignModule.STEP)
    before = unsafe_set_by_file(case)
    uncertainty = pd.read_csv(case / "T" / "UnsafeSet" / "uncertainty.csv")["uncertainty"].to_numpy()
    improve = case / "DataSets" / "ImprovementSet"
    images = sorted(improve.glob("*/*.png"))
    for number, image in enumerate(images):         # every image to another class folder
        target = improve / CLASSES[(CLASSES.index(image.parent.name) + 1 + number % 2) % len(CLASSES)]
        shutil.move(str(image), str(target / image.name))
    scrambled = context(case, **settings)
    scrambled.force = True
    run_steps(scrambled, testModule.STEP, assignModule.STEP)
    assert pd.read_csv(case / "improveResult.csv")["expected"].tolist() != []
    assert unsafe_set_by_file(case) == before
    after = pd.read_csv(case / "T" / "UnsafeSet" / "uncertainty.csv")
    by_file = dict(zip(after["image"].str.rsplit("/", n=1).str[-1], after["uncertainty"]))
    original_names = [p.name for p in sorted(images)]
    np.testing.assert_allclose(sorted(uncertainty), sorted(by_file[n] for n in original_names), atol=1e-6)


# --------------------------------------------------------------------------------------------
# Labels needed, recomputed from the files
# --------------------------------------------------------------------------------------------

def test_labels_needed_and_the_statistics_recomputed_from_the_files(retrained_case):
    case, results = retrained_case
    folder = case / "T" / "Retrain"
    unsafe = pd.read_csv(case / "T" / "UnsafeSet" / "assignments.csv")
    improvement = len(pd.read_csv(case / "improveResult.csv"))
    runs = {mode: pd.read_csv(folder / f"{mode}_runs.csv") for mode in ("HUDD", "BL1", "BL2")}
    assert (runs["HUDD"]["labels_needed"] == unsafe["image"].nunique()).all()
    assert (runs["BL1"]["labels_needed"] == improvement).all()
    assert (runs["BL2"]["labels_needed"] == runs["BL2"]["labelled"]).all()
    test = pd.read_csv(case / "testResult.csv")
    original = 100 * (test["result"] == "Correct").mean()
    table = pd.read_csv(folder / "comparison.csv").set_index("mode")
    for mode, table_runs in runs.items():
        gain = table_runs["accuracy"].mean() - original
        assert table.loc[mode, "labels_needed"] == table_runs["labels_needed"].iloc[0]
        assert table.loc[mode, "gain"] == pytest.approx(gain)
        assert table.loc[mode, "gain_per_100_labels"] == pytest.approx(100 * gain / table_runs["labels_needed"].iloc[0])
        if mode != "HUDD":
            hudd, other = runs["HUDD"]["accuracy"], table_runs["accuracy"]
            assert table.loc[mode, "a12_HUDD"] == pytest.approx(evaluation.vargha_delaney_a12(hudd, other))
            assert table.loc[mode, "p_value_vs_HUDD"] == pytest.approx(evaluation.mann_whitney_p(hudd, other))
    assert set(pd.ExcelFile(folder / "comparison.xlsx").sheet_names) == {"comparison"}
    assert "labels needed" in results["BL2"].stdout and "gain/100 labels" in results["BL2"].stdout
    bl1_line = next(line for line in results["BL2"].stdout.splitlines() if line.startswith("    BL1 "))
    assert f" {improvement} " in bl1_line


def test_bl3_runs_as_a_mode_with_its_budget(assigned_case):
    case = assigned_case
    ctx = context(case, epochs=1, runs=1)
    summary = run_step(retrainModule.RetrainStep("BL3"), ctx)
    runs = pd.read_csv(case / "T" / "Retrain" / "BL3_runs.csv")
    unsafe = pd.read_csv(case / "T" / "UnsafeSet" / "assignments.csv")
    assert summary["labelled"] == runs["labels_needed"].iloc[0] == unsafe["image"].nunique()
    assert pd.read_csv(case / "T" / "Retrain" / "comparison.csv")["mode"].tolist() == ["BL3"]
