"""RQ1 raw results and RQ2 accuracies of a (retrained) model, from a case the pipeline has run on.

RQ1 (`python HUDD.py -o CASE -m MODEL -rq True`): the model's test accuracy, the test images it
improves and worsens against the original model (CASE/testResult.csv), the error images of each RCC
it now gets right, accuracy per scenario where metadata.csv exists, and the RCC characterisation
table of the cluster step, in CASE/RQ1/<model>/.
RQ2 (`python RQ2.py -o CASE -m MODEL` or `--all`): test accuracy overall and per class, printed and
saved to CASE/RQ2/accuracy.csv (one row per model and class; class "all" is the whole test set).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pandas as pd

import assignModule
import clusterModule
import evaluation
from Helper import CasePaths, HuddError, RunContext, atomic_path, read_csv, write_csv

log = logging.getLogger("hudd")


def rq1(ctx: RunContext) -> dict:
    """Writes CASE/RQ1/<model stem>/ and returns what print_rq1 shows."""
    clusters = assignModule.selected_clusters(ctx)
    layer, rcc_errors = clusters.layer, clusters.member_errors
    measures = evaluation.measure_on_test(ctx.model(), ctx)
    improved, worsened = evaluation.improved_worsened(measures, ctx)
    original = evaluation.original_correct(ctx, measures.correct.index)
    if improved == 0 and worsened == 0:
        log.warning("%s gets exactly the test images right that CASE/testResult.csv says the original model "
                    "got right: is it the original model?", ctx.model_path.name)
    summary = pd.DataFrame([{"model": ctx.model_path.name, "accuracy": measures.accuracy,
                             "original_accuracy": 100.0 * original.mean(),
                             "gain": measures.accuracy - 100.0 * original.mean(),
                             "improved": improved, "worsened": worsened, "layer": layer,
                             **({} if measures.mean_error is None else {"mean_error": measures.mean_error.mean()})}])
    per_rcc = fixed_table(measures, rcc_errors)
    # every error image, by the top-level RCCs the report shows (the table above is the assignment's
    # level: sub-clusters of two or more images by default, as the retraining tables are)
    per_top = fixed_table(measures, pd.DataFrame({"image": clusters.labels["image"], "rcc": clusters.labels["rcc"]}))
    scenarios = evaluation.per_scenario(measures, ctx)
    tables = {"summary": summary, "errors fixed per RCC": per_rcc, "errors fixed per top-level RCC": per_top,
              "accuracy per class": measures.per_class()}
    if len(scenarios):
        before = evaluation.original_per_scenario(ctx).reindex(scenarios.index)
        tables["accuracy per scenario"] = pd.DataFrame(
            {"original": before, "model": scenarios, "gain": scenarios - before}).rename_axis("scenario").reset_index()
    folder = ctx.paths.root / "RQ1" / ctx.model_path.stem
    write_tables(tables, folder, "RQ1.xlsx")
    characterisation = clusterModule.characterisation_file(ctx.paths, layer)
    if characterisation.is_file():
        shutil.copy2(characterisation, folder / characterisation.name)
    return {"folder": folder, **{k: v for k, v in summary.iloc[0].items()}, "tables": tables,
            "groups": "sub-clusters" if clusters.column == "sub_rcc" else "RCCs"}


def fixed_table(measures, members: pd.DataFrame) -> pd.DataFrame:
    """rcc, errors, fixed: per group of `members` (image, rcc), its error images and those now right."""
    return pd.DataFrame({"errors": members["rcc"].value_counts().sort_index(),
                         "fixed": evaluation.fixed_per_rcc(measures, members)}).rename_axis("rcc").reset_index()


def write_tables(tables: dict[str, pd.DataFrame], folder: Path, workbook: str) -> None:
    """One CSV per table (name with underscores) and one workbook with a sheet per table."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        write_csv(table, folder / f"{name.replace(' ', '_')}.csv")
    with atomic_path(folder / workbook) as temporary:
        with pd.ExcelWriter(temporary, engine="openpyxl") as book:
            for name, table in tables.items():
                table.to_excel(book, sheet_name=name[:31], index=False)


def print_rq1(result: dict) -> None:
    print(f"\nRQ1 raw results for {result['model']} -> {result['folder']}")
    print(f"  test accuracy {result['accuracy']:.2f}% (original {result['original_accuracy']:.2f}%, "
          f"gain {result['gain']:+.2f} points); improved {result['improved']}, worsened {result['worsened']} images")
    top, groups = result["tables"]["errors fixed per top-level RCC"], result["tables"]["errors fixed per RCC"]
    rccs = top[top["rcc"] != clusterModule.NOISE]
    line = (f"  errors fixed in the {len(rccs)} RCCs of {result['layer']}"
            f"{' and its noise group' if len(rccs) < len(top) else ''}: {int(top['fixed'].sum())} of "
            f"{int(top['errors'].sum())} ({(rccs['fixed'] > 0).sum()} of {len(rccs)} RCCs have one or more)")
    if result["groups"] != "RCCs":
        line += (f"; in its {len(groups)} {result['groups']} of 2+ images, which retraining's tables count: "
                 f"{int(groups['fixed'].sum())} of {int(groups['errors'].sum())}")
    print(line)
    scenarios = result["tables"].get("accuracy per scenario")
    if scenarios is not None:
        cells = ", ".join(f"{r.scenario} {r.model:.1f}% ({r.gain:+.1f})" for r in scenarios.itertuples())
        print(f"  per scenario: {cells}")


def rq2(ctx_for, model_paths: list[Path], case_root: Path) -> pd.DataFrame:
    """Test accuracy overall and per class of each model; `ctx_for(path)` gives a RunContext that
    loads that model. Rows for these models replace older ones in CASE/RQ2/accuracy.csv."""
    rows = []
    for path in model_paths:
        ctx = ctx_for(path)
        measures = evaluation.measure_on_test(ctx.model(), ctx)
        per_class = measures.per_class()
        rows.append({"model": path.name, "class": "all", "images": len(measures.correct),
                     "correct": int(measures.correct.sum()), "accuracy": measures.accuracy})
        rows += [{"model": path.name, "class": r["class"], "images": int(r["images"]), "correct": int(r["correct"]),
                  "accuracy": r["accuracy"]} for _, r in per_class.iterrows()]
    table = pd.DataFrame(rows)
    target = case_root / "RQ2" / "accuracy.csv"
    if target.is_file():
        older = read_csv(target)
        table = pd.concat([older[~older["model"].isin(table["model"])], table], ignore_index=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_csv(table, target)
    return table[table["model"].isin([p.name for p in model_paths])]


def models_in(case_root: Path) -> list[Path]:
    folder = CasePaths(case_root).models
    models = sorted(p for p in folder.glob("*") if p.suffix in (".pth", ".pt")) if folder.is_dir() else []
    if not models:
        raise HuddError(f"{folder}: holds no .pth or .pt model files")
    return models


def check_has_run(ctx: RunContext) -> None:
    clusterModule.require_current(ctx, "measure a model on")
