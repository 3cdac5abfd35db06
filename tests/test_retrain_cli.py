"""Retraining, RQ1 and RQ2 through the real command line on a tiny case: outputs read back and checked."""
from __future__ import annotations

import pandas as pd
import pytest
from scipy.stats import mannwhitneyu

from helpers import REPO, hudd, run_python


def test_each_mode_runs_the_whole_pipeline_and_prints_the_budget(retrained_case):
    case, results = retrained_case
    budgets = set()
    for mode, result in results.items():
        assert result.returncode == 0, result.stderr
        assert "retraining at one budget" in result.stdout and f"    {mode} " in result.stdout
        runs = pd.read_csv(case / "T" / "Retrain" / f"{mode}_runs.csv")
        assert len(runs) == 2 and all((case / m).is_file() for m in runs["model"])
        budgets.add((int(runs["labelled"].iloc[0]), int(runs["bag"].iloc[0])))
        labelled = runs["labelled"].iloc[0]
        assert f"{labelled} improvement images labelled per mode" in result.stdout
    assert len(budgets) == 1  # one budget for the three modes
    bl1 = pd.read_csv(case / "T" / "Retrain" / "BL1_runs.csv")
    assert (bl1["labelled_misclassified"] == bl1["labelled"]).all()


def test_a_rerun_reuses_the_results_and_more_runs_recompute(retrained_case):
    case, _ = retrained_case
    models = sorted(p.name for p in (case / "DNNModels").iterdir())
    again = hudd("-o", str(case), "-mode", "HUDD", "--runs", "2")
    assert again.returncode == 0 and "retraining HUDD: inputs unchanged" in again.stdout
    assert sorted(p.name for p in (case / "DNNModels").iterdir()) == models


def test_the_hint_to_retrain_is_given_only_where_no_mode_has_run(retrained_case, make_case):
    case, _ = retrained_case
    assert "to retrain the model, add -mode HUDD" not in hudd("-o", str(case)).stdout
    fresh = hudd("-o", str(make_case(per_class=2)))
    assert fresh.returncode == 0 and "to retrain the model, add -mode HUDD" in fresh.stdout


def test_rq1_results_match_the_retraining_tables(retrained_case):
    case, _ = retrained_case
    runs = pd.read_csv(case / "T" / "Retrain" / "HUDD_runs.csv")
    model = runs["model"].iloc[1].split("/")[-1]
    result = hudd("-o", str(case), "-m", model, "-rq", "True")
    assert result.returncode == 0, result.stderr
    folder = case / "RQ1" / model.removesuffix(".pth")
    summary = pd.read_csv(folder / "summary.csv").iloc[0]
    assert summary["accuracy"] == pytest.approx(runs["accuracy"].iloc[1])
    assert (summary["improved"], summary["worsened"]) == (runs["improved"].iloc[1], runs["worsened"].iloc[1])
    fixed = pd.read_csv(folder / "errors_fixed_per_RCC.csv").set_index("rcc")["fixed"]
    from_step = pd.read_csv(case / "T" / "Retrain" / "HUDD_rcc.csv").set_index("rcc")["run2"]
    pd.testing.assert_series_equal(fixed, from_step, check_names=False)
    assert set(pd.ExcelFile(folder / "RQ1.xlsx").sheet_names) >= {"summary", "errors fixed per RCC",
                                                                  "errors fixed per top-level RCC"}
    assert f"{summary['accuracy']:.2f}%" in result.stdout
    # by top-level RCC, every test error counts once: those fixed are the images the model improved
    top = pd.read_csv(folder / "errors_fixed_per_top-level_RCC.csv")
    original = pd.read_csv(case / "testResult.csv")
    assert top["errors"].sum() == (original["result"] == "Wrong").sum() and top["fixed"].sum() == summary["improved"]
    assert not top["rcc"].str.contains(".", regex=False).any()
    assert (f"errors fixed in the {len(top)} RCCs of {summary['layer']}: {top['fixed'].sum()} of {top['errors'].sum()} "
            f"({(top['fixed'] > 0).sum()} of {len(top)} RCCs have one or more)") in result.stdout
    if fixed.index.str.contains(".", regex=False).any():   # assigned to sub-clusters: their count follows
        assert f"in its {len(fixed)} sub-clusters of 2+ images, which retraining's tables count: {fixed.sum()} of" \
            in result.stdout


def test_rq2_gives_every_model_its_accuracy(retrained_case):
    case, _ = retrained_case
    result = run_python(REPO / "RQ2.py", "-o", str(case), "--all")
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(case / "RQ2" / "accuracy.csv")
    overall = table[table["class"] == "all"].set_index("model")["accuracy"]
    original = pd.read_csv(case / "testResult.csv")
    assert overall["OriginalModel.pth"] == pytest.approx(100 * (original["result"] == "Correct").mean())
    for mode in ("HUDD", "BL1", "BL2"):
        for row in pd.read_csv(case / "T" / "Retrain" / f"{mode}_runs.csv").itertuples():
            assert overall[row.model.split("/")[-1]] == pytest.approx(row.accuracy)
    per_class = table[(table["model"] == "OriginalModel.pth") & (table["class"] != "all")].set_index("class")
    by_class = original.groupby("expected")["result"].apply(lambda r: 100 * (r == "Correct").mean())
    pd.testing.assert_series_equal(per_class["accuracy"].sort_index(), by_class.sort_index(), check_names=False)


def test_the_gain_per_scenario_lists_every_mode_of_the_comparison(tmp_path, capsys):
    import HUDD
    import Helper
    import retrainModule
    paths = Helper.CasePaths(tmp_path)
    retrainModule.retrain_dir(paths).mkdir(parents=True)
    for mode, gains in (("HUDD", [2.5, -0.5]), ("BL1", [1.0, 0.25])):
        pd.DataFrame({"run": [1]}).to_csv(retrainModule.table_path(paths, mode, "runs"), index=False)
        pd.DataFrame({"scenario": ["fog", "none"], "gain": gains}).to_csv(
            retrainModule.table_path(paths, mode, "scenarios"), index=False)
    HUDD.print_scenario_gains(paths, ["HUDD", "BL1"])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[2:]}
    assert rows == {"HUDD": ["+2.5", "-0.5"], "BL1": ["+1.0", "+0.2"]}


def test_one_run_per_mode_prints_no_p_value_or_a12(tmp_path, capsys):
    """One run each: Mann-Whitney's p is 1 and A12 is 0 or 1 whatever the accuracies, a comparison of two
    numbers; the table leaves them out and says why, and gives them from two runs each."""
    import HUDD
    import Helper
    import retrainModule
    import testModule
    paths = Helper.CasePaths(tmp_path)
    retrainModule.retrain_dir(paths).mkdir(parents=True)
    results = pd.DataFrame({"image": ["a.png", "b.png"], "result": ["Correct", "Wrong"], "expected": ["x", "x"],
                            "predicted": ["x", "y"]})
    for set_key in ("test", "improve"):
        results.to_csv(testModule.result_path(paths, set_key), index=False)

    def runs_table(mode: str, accuracies: list[float]) -> None:
        pd.DataFrame({"run": range(1, len(accuracies) + 1), "labelled": 1, "labels_needed": 1, "bag": 4,
                      "accuracy": accuracies, "improved": 1, "worsened": 0}).to_csv(
            retrainModule.table_path(paths, mode, "runs"), index=False)
    summary = {"labelled": 1, "bag": 4, "runs": 1, "original": 50.0, "folder": retrainModule.retrain_dir(paths)}
    runs_table("HUDD", [60.0])
    runs_table("BL1", [55.0])
    table = retrainModule.comparison(paths).set_index("mode")
    assert table[["p_value_vs_HUDD", "a12_HUDD"]].isna().all().all()
    HUDD.print_retraining([summary], paths)
    out = capsys.readouterr().out
    bl1 = next(line for line in out.splitlines() if line.startswith("    BL1 "))
    assert bl1.split()[-2:] == ["n/a", "n/a"] and "1.000" not in bl1
    assert "p and A12 need 2 or more runs of HUDD and of the mode" in out and "; 1 run per mode;" in out
    import reportModule
    rows = {row.mode: reportModule.retrain_row(row, 50.0, hudd_ran=True) for row in table.reset_index().itertuples()}
    assert "<td class=p-value>n/a</td><td class=a12>n/a</td>" in rows["BL1"] and "n/a" not in rows["HUDD"]

    runs_table("HUDD", [60.0, 62.0])
    runs_table("BL1", [55.0, 54.0])
    table = retrainModule.comparison(paths).set_index("mode")
    assert table.loc["BL1", "a12_HUDD"] == 1.0
    assert table.loc["BL1", "p_value_vs_HUDD"] == pytest.approx(mannwhitneyu([60.0, 62.0], [55.0, 54.0]).pvalue)
    HUDD.print_retraining([{**summary, "runs": 2}], paths)
    out = capsys.readouterr().out
    bl1 = next(line for line in out.splitlines() if line.startswith("    BL1 "))
    assert bl1.split()[-2:] == ["0.333", "1.00"] and "need 2 or more runs" not in out and "; 2 runs per mode;" in out
    # 2 runs against 2: the smallest p there is 2 / C(4, 2), what BL1's runs, all behind, give; with 4 each, 0.029
    assert "no p can fall below 0.333, whatever the accuracies" in out
    runs_table("HUDD", [60.0, 62.0, 61.0, 63.0])
    runs_table("BL1", [55.0, 54.0, 53.0, 52.0])
    HUDD.print_retraining([{**summary, "runs": 4}], paths)
    out = capsys.readouterr().out
    assert "no p can fall below" not in out
    assert next(line for line in out.splitlines() if line.startswith("    BL1 ")).split()[-2:] == ["0.029", "1.00"]
    runs_table("HUDD", [60.0, 62.0])
    runs_table("BL1", [55.0, 54.0])

    runs_table("BL1", [55.0])   # the modes on disk ran with other --runs: each one's count, the statistics n/a
    HUDD.print_retraining([{**summary, "runs": 1}], paths)
    out = capsys.readouterr().out
    assert "; runs per mode: HUDD 2, BL1 1;" in out and "need 2 or more runs" in out
