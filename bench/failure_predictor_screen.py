"""Can a label-free pick find more of the improvement set's failures than the contrast? A screen.

    python bench/failure_predictor_screen.py CASE [CASE ...]

CASE: classification case studies after the cluster step (a copy of the sign demo, seed from a
trailing _s<N>, as bench/unsafe_set_study.py takes them). The unsafe set's budget is fixed; BL1 fills it
with images the model gets wrong, all of them, by reading every improvement label. HUDD's contrast pick
(assignModule.contrast) takes the images whose relevance lies nearest the test errors relative to the
test images the model gets right. This screen asks whether a better label-free ranking exists among
what HUDD has: the test set's labels (its input), every image's relevance at the selected layer and the
model's own margin. Each predictor is fitted on the TEST images only (whether the model gets each
right; every test image's distances leave itself out) and ranks the improvement images:

- contrast: the product's pick; margin: 1 - softmax margin (BL3's ranking);
- logistic, distances: logistic regression on log contrast, log distance to the 5 nearest test errors and
  log distance to the 5 nearest right test images; + margin: the same with the margin;
- logistic, relevance rows + margin: on the whole relevance row (standardised, C 0.1);
- boosted trees on the distances and the margin (scikit-learn's HistGradientBoostingClassifier).

Printed per case and predictor: the ROC AUC of the ranking for "the model gets it wrong" over every
improvement image, and the share of failures and of rare conditions among the budget's top-ranked
images. The improvement labels and metadata are read only for these measurements, after every ranking.
No retraining: a predictor that picks no more failures than the contrast is not worth a study run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import Helper  # noqa: E402
import assignModule  # noqa: E402
import heatmapModule  # noqa: E402
import testModule  # noqa: E402
import unsafe_set_study as study  # noqa: E402

K = assignModule.CONTRAST_K


def mean_nearest(distances: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """Per row, the mean distance to its K nearest among `columns`."""
    return np.sort(distances[:, columns], axis=1)[:, :K].mean(axis=1)


def distance_features(rows: np.ndarray, references: np.ndarray, side: np.ndarray, leave_self_out: bool) -> np.ndarray:
    """log contrast, log distance to the errors, log distance to the right images (K nearest each)."""
    distances = np.sqrt(assignModule.squared_distances(rows, references))   # as the contrast measures them
    if leave_self_out:
        np.fill_diagonal(distances, np.inf)
    to_errors, to_right = mean_nearest(distances, side == 0), mean_nearest(distances, side == 1)
    return np.log(np.c_[to_errors / to_right, to_errors, to_right])


def test_margins(ctx: Helper.RunContext, side: np.ndarray) -> np.ndarray:
    """The margin uncertainty of the test images in the order of the contrast's references: the errors as
    the cluster step ordered them (heatmap rows), then the right ones in testResult.csv order."""
    results = testModule.read_results(ctx.paths, "test").set_index("image")
    uncertainty = assignModule.uncertainty_table(ctx, results).set_index("image")["uncertainty"]
    errors = heatmapModule.read_index(ctx.paths)["image"]
    right = results.index[results["result"] != assignModule.WRONG]
    margins = np.r_[uncertainty.reindex(errors).to_numpy(), uncertainty.reindex(right).to_numpy()]
    assert len(margins) == len(side)
    return margins


def rankings(ctx: Helper.RunContext, parts: dict) -> dict[str, np.ndarray]:
    """Every predictor's score per improvement image (higher: more likely a failure)."""
    references, side = parts["sides"]
    flat_refs = references.reshape(len(references), -1)
    flat_rows = parts["rows"].reshape(len(parts["rows"]), -1)
    test_x = distance_features(flat_refs, flat_refs, side, leave_self_out=True)
    improve_x = distance_features(flat_rows, flat_refs, side, leave_self_out=False)
    test_m, improve_m = test_margins(ctx, side), parts["uncertainty"]
    wrong_on_test = (side == 0).astype(int)
    fitted = lambda model, train, rank: model.fit(train, wrong_on_test).decision_function(rank)
    return {
        "contrast (the product's)": -parts["contrast"],
        "margin (BL3's ranking)": improve_m,
        "logistic, distances": fitted(LogisticRegression(max_iter=2000), test_x, improve_x),
        "logistic, distances + margin": fitted(LogisticRegression(max_iter=2000), np.c_[test_x, test_m],
                                               np.c_[improve_x, improve_m]),
        "logistic, relevance rows + margin": fitted(
            make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000)),
            np.c_[flat_refs, test_m], np.c_[flat_rows, improve_m]),
        "boosted trees, distances + margin": HistGradientBoostingClassifier(max_iter=200, random_state=0).fit(
            np.c_[test_x, test_m], wrong_on_test).predict_proba(np.c_[improve_x, improve_m])[:, 1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for case in args.cases:
        ctx = study.context(case)
        Helper.seed_everything(ctx.seed)
        parts = study.ingredients(ctx)
        scores = rankings(ctx, parts)
        budget = int(assignModule.rcc_quotas(ctx.settings, parts["levels"]["sub"].sizes).sum())
        known = study.truth(ctx)            # read after every ranking is fixed
        wrong, rare = known["wrong"].to_numpy(), known["rare"].to_numpy()
        for name, score in scores.items():
            top = np.argsort(-score, kind="stable")[:budget]
            rows.append({"case": case.name, "predictor": name, "budget": budget, "auc": roc_auc_score(wrong, score),
                         "wrong %": 100 * wrong[top].mean(), "rare %": 100 * rare[top].mean()})
        print(f"{case.name}: budget {budget}, {100 * wrong.mean():.1f}% of the improvement set wrong", flush=True)
    table = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(table.round(3).to_string(index=False))
    print("\nmean over the cases:")
    print(table.groupby("predictor", sort=False)[["auc", "wrong %", "rare %"]].mean().round(3).to_string())


if __name__ == "__main__":
    main()
