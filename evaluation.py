"""Measuring a (retrained) model on the test set against the original model's results.

Shared by the retraining step, `-rq True` (RQ1 raw results) and `RQ2.py`: test accuracy overall, per
class and per scenario, the test images improved (Wrong -> Correct) and worsened (Correct -> Wrong)
against the original model's `testResult.csv`, and the error images of each RCC that are now right.
For keypoint models "correct" means a mean keypoint error within `error_threshold`, "per class" is per
face component (share of images whose component has no keypoint above the threshold), and the mean
keypoint error is measured too.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from torch import nn

import testModule
from descriptors import cliffs_delta
from Helper import HuddError, RunContext, read_metadata
from tasks import TestMeasures


def test_outputs(model: nn.Module, ctx: RunContext) -> np.ndarray:
    """The model's output rows for every test image, in set order: the test step's own inference
    (testModule.predict_set: logits, or decoded keypoints x0, y0, x1, ...)."""
    test = ctx.sets()["test"]
    model.eval()
    predictions = testModule.predict_set(model, test, ctx)
    if predictions.failures:  # left out under --skip-bad-images; a measure needs every test image
        index, error = predictions.failures[0]
        raise HuddError(f"{test.paths[index]}: cannot read image ({error}); measuring a model needs every test image")
    outputs = np.empty_like(predictions.logits)
    outputs[predictions.indices] = predictions.logits
    return outputs


def measures_from_outputs(outputs: np.ndarray, ctx: RunContext) -> TestMeasures:
    """TestMeasures from output rows in test-set order (see test_outputs)."""
    test = ctx.sets()["test"]
    images = [ctx.paths.relative(p) for p in test.paths]
    return ctx.task.measures(outputs, test.labels, test.targets, images, ctx.classes)


def measure_on_test(model: nn.Module, ctx: RunContext) -> TestMeasures:
    return measures_from_outputs(test_outputs(model, ctx), ctx)


def original_correct(ctx: RunContext, images: pd.Index) -> pd.Series:
    """Whether the ORIGINAL model got each test image right, from the test step's testResult.csv."""
    try:
        original = testModule.read_results(ctx.paths, "test").set_index("image")
    except HuddError:
        raise HuddError(f"{testModule.result_path(ctx.paths, 'test')}: not found; run the pipeline with the original "
                        "model first (python HUDD.py -o CASE -m OriginalModel.pth)") from None
    missing = images.difference(original.index)
    if len(missing):
        raise HuddError(f"{testModule.result_path(ctx.paths, 'test')}: has no row for test image {missing[0]!r}; "
                        "rerun the pipeline with the original model so that it covers the current test set")
    return original.loc[images, "result"].eq("Correct")


def improved_worsened(measures: TestMeasures, ctx: RunContext) -> tuple[int, int]:
    """(test images the original got wrong and this model gets right, the reverse)."""
    before = original_correct(ctx, measures.correct.index).to_numpy()
    now = measures.correct.to_numpy()
    return int((now & ~before).sum()), int((~now & before).sum())


def fixed_per_rcc(measures: TestMeasures, rcc_labels: pd.DataFrame) -> pd.Series:
    """Per RCC, how many of its error images the model now classifies correctly."""
    now = measures.correct.reindex(rcc_labels["image"]).fillna(False).to_numpy()
    return pd.Series(now, index=rcc_labels["rcc"].to_numpy()).groupby(level=0, sort=True).sum().astype(int)


def per_scenario(measures: TestMeasures, ctx: RunContext) -> pd.Series:
    """Test accuracy (%) per `scenario` of the test set's metadata.csv; empty where there is none."""
    metadata = read_metadata(ctx.sets()["test"].root, ctx.paths.root)
    if metadata is None or "scenario" not in metadata.columns:
        return pd.Series(dtype=float)
    scenarios = metadata["scenario"].reindex(measures.correct.index).to_numpy()
    return measures.correct.groupby(scenarios, sort=True).mean().mul(100.0)


def original_per_scenario(ctx: RunContext) -> pd.Series:
    """The original model's test accuracy (%) per scenario, as the test step wrote it; empty where the
    test set has no scenarios."""
    table = testModule.read_scenario_accuracy(ctx.paths)
    if table is None:
        return pd.Series(dtype=float)
    return table[table["set"] == "TestSet"].set_index("scenario")["accuracy"]


# --------------------------------------------------------------------------------------------
# Comparing two modes over their runs (the HUDD paper's statistics)
# --------------------------------------------------------------------------------------------

def vargha_delaney_a12(first, second) -> float:
    """A12: the probability that a run of `first` scores higher than a run of `second`, ties counted
    half (0.5: no difference; the HUDD paper's effect size). NaN when either is empty."""
    return (cliffs_delta(first, second) + 1.0) / 2.0   # A12 = (Cliff's delta + 1) / 2


EXACT_RUNS = 16   # runs of both modes together up to which every split is enumerated (at most 12,870)


def mann_whitney_p(first, second) -> float:
    """Two-sided Mann-Whitney U p-value; 1.0 when every value is the same, NaN when either is empty. Up to
    EXACT_RUNS runs in all, the exact p over every split of the runs into the two groups, ties included
    (exact_mann_whitney_p); beyond, scipy's normal approximation. scipy's own choice takes the
    approximation as soon as two runs tie: 3 HUDD runs all above 3 of a baseline, two of them equal,
    printed p 0.077, where no split of 3 and 3 runs can give less than 0.1."""
    from scipy.stats import mannwhitneyu
    x, y = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if not len(x) or not len(y):
        return float("nan")
    if np.unique(np.concatenate([x, y])).size == 1:
        return 1.0
    if len(x) + len(y) <= EXACT_RUNS:
        return exact_mann_whitney_p(x, y)
    return float(mannwhitneyu(x, y, alternative="two-sided").pvalue)


def exact_mann_whitney_p(first: np.ndarray, second: np.ndarray) -> float:
    """The exact two-sided p of U: twice the smaller tail of U over every way of splitting the pooled runs
    into groups of the two sizes (at most 1). Enumerated here, not by scipy's permutation_test, which
    refuses a group of a single run."""
    pooled = np.concatenate([first, second])
    firsts = np.array(list(itertools.combinations(range(len(pooled)), len(first))))   # each split's first group
    in_first = np.zeros((len(firsts), len(pooled)), dtype=bool)
    np.put_along_axis(in_first, firsts, True, axis=1)
    seconds = np.argsort(in_first, axis=1, kind="stable")[:, :len(second)]              # and the rest
    u = mann_whitney_u(pooled[firsts], pooled[seconds])
    observed = u[0]   # the first split is the runs as given: `first`, then `second`
    tail = min(np.mean(u <= observed + 1e-9), np.mean(u >= observed - 1e-9))
    return float(min(1.0, 2.0 * tail))


def smallest_mann_whitney_p(runs: int, other_runs: int) -> float:
    """The smallest two-sided exact p of U with these numbers of runs: every run of one group ahead of every
    run of the other, 2 over the number of ways to split the runs (3 against 3: 0.1)."""
    return min(1.0, 2 / math.comb(runs + other_runs, runs))


def mann_whitney_u(first: np.ndarray, second: np.ndarray, axis: int = -1) -> np.ndarray:
    """U of `first`: its pairs with `second` that it wins, ties counted half (batched along `axis`)."""
    a, b = np.moveaxis(first, axis, -1)[..., :, None], np.moveaxis(second, axis, -1)[..., None, :]
    return (a > b).sum(axis=(-2, -1)) + 0.5 * (a == b).sum(axis=(-2, -1))
