"""Which retraining epoch to keep: every epoch measured, for every mode, on demo case studies.

    python bench/retrain_epochs_study.py CASE [CASE ...] [--runs 2] [--epochs 20]

Each CASE is a demo case on which the pipeline has run up to the assignment step (for example
`python HUDD.py --demo DIR --seed N --steps test,heatmaps,clusters,assign`). For every mode and run it
fine-tunes as the retraining step does (same selection, optimiser and batches, the training set less a
10% stratified validation split) and records, after every epoch, the validation accuracy, the training
accuracy and the test accuracy. It then prints the mean test-accuracy gain of each way of choosing the
epoch: best validation including the original weights (epoch 0), best validation among the retrained
epochs, best training accuracy (the original's), and the last epoch (at 10 and at --epochs).
The test accuracy is measured for this study only; the tool never looks at it to choose.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import Helper  # noqa: E402
import retrainModule as R  # noqa: E402


def study_case(case: Path, runs: int, epochs: int) -> list[dict]:
    paths = Helper.CasePaths(case)
    settings = Helper.load_settings(paths, {"epoch_choice": "validation", "epochs": epochs})
    ctx = Helper.RunContext(paths=paths, settings=settings, model_path=paths.models / "OriginalModel.pth",
                            device=torch.device("cpu"), seed=0)
    unsafe = R.unsafe_inputs(ctx)
    data = R.training_data(ctx)
    test = R.ImageSource(ctx.sets()["test"], ctx)
    test_rows = np.arange(len(ctx.sets()["test"]))
    rows = []
    for mode in R.MODES:
        for run in range(1, runs + 1):
            selection = R.select(mode, unsafe.assigned, unsafe.distances, unsafe.quota, unsafe.wrong,
                                 np.random.default_rng([0, run]), unsafe.uncertainty, hudd_bag=settings.hudd_bag)

            def measure(model: torch.nn.Module, epoch: int, train_accuracy: float) -> None:
                rows.append({"case": case.name, "mode": mode, "run": run, "epoch": epoch, "train": train_accuracy,
                             "validation": R.accuracy_on(model, data.train, data.validation_rows, ctx),
                             "test": R.accuracy_on(model, test, test_rows, ctx)})

            measure(ctx.model(), 0, float("nan"))  # epoch 0: the original weights
            R.fine_tune(ctx, data, selection.bag, run, f"{mode} run {run}", each_epoch=measure)
            print(f"{case.name} {mode} run {run}: last-epoch test accuracy {100 * rows[-1]['test']:.2f}%", flush=True)
    return rows


def pick(history: pd.DataFrame, rule: str) -> pd.Series:
    """The epoch a rule keeps; ties go to the later epoch, as in the retraining step."""
    retrained = history[history["epoch"] > 0]
    if rule == "validation incl. original":
        return history.loc[history[::-1]["validation"].idxmax()]
    if rule == "validation":
        return retrained.loc[retrained[::-1]["validation"].idxmax()]
    if rule == "training":
        return retrained.loc[retrained[::-1]["train"].idxmax()]
    if rule == "last of 10":
        return history[history["epoch"] == min(10, history["epoch"].max())].iloc[0]
    return history[history["epoch"] == history["epoch"].max()].iloc[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()
    table = pd.DataFrame([row for case in args.cases for row in study_case(case, args.runs, args.epochs)])
    original = table[table["epoch"] == 0].groupby("case")["test"].first()
    rules = ["validation incl. original", "validation", "training", "last of 10", f"last of {args.epochs}"]
    results = []
    for (case, mode, run), history in table.groupby(["case", "mode", "run"]):
        for rule in rules:
            chosen = pick(history, rule)
            results.append({"rule": rule, "mode": mode, "epoch": chosen["epoch"],
                            "gain": 100 * (chosen["test"] - original[case])})
    summary = pd.DataFrame(results).pivot_table(index="rule", columns="mode", values="gain").reindex(rules)
    print("\nmean test-accuracy gain (points) over cases and runs, by the rule that keeps the epoch:")
    print(summary[list(R.MODES)].round(2).to_string())


if __name__ == "__main__":
    main()
