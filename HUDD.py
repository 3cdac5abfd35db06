"""HUDD command line: finds why an image DNN fails, and retrains it with the images that fix it.

    python HUDD.py -o CASE -m MODEL [-mode HUDD [BL1 BL2 BL3]] [--runs N]
    python HUDD.py -o CASE -m RETRAINED_MODEL -rq True
    python HUDD.py --demo [DIR]
    torchrun --nproc-per-node N HUDD.py -o CASE ...      (several processes or machines: docs/scaling.md)

Runs the pipeline's steps in order over a case-study directory (see README.md). Each step records a
fingerprint of its inputs in CASE/hudd_manifest.json and is skipped on a rerun when nothing changed.
One run per case study at a time (CASE/.hudd.lock).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

# MKL's strict reproducible mode, before torch loads MKL: on Intel CPUs a float32 matrix product then gives the
# same bits whatever the number of threads (by default batches of 5-11 rows differ in the last bit between 1 and 2
# threads), so a torchrun job of N one-thread ranks writes the same bytes as one process with N threads. An AMD
# EPYC ignored it; the cluster and assignment steps' products do not rely on it (clustering.times_transposed).
# No slowdown measured here (bench/README.md); a value the user set wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

log = logging.getLogger("hudd")

# The pipeline's steps in order; "retrain" runs for the modes given with -mode (the demo: all four).
STEP_NAMES = ("test", "heatmaps", "clusters", "assign", "retrain")
MODES = ("HUDD", "BL1", "BL2", "BL3")   # Helper.RETRAIN_MODES, spelled here: the parser runs before Helper loads


def parse_bool(text: str) -> bool:
    """True/False/yes/no/1/0 (any case), so that `-rq False` means False (the original read every
    given flag as true)."""
    value = str(text).strip().lower()
    if value in ("true", "yes", "y", "1", "on"):
        return True
    if value in ("false", "no", "n", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a yes/no value; use True/False, yes/no or 1/0")


def parse_steps(text: str) -> list[str]:
    steps = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEP_NAMES]
    if unknown or not steps:
        raise argparse.ArgumentTypeError(
            f"unknown step(s) {', '.join(unknown) or repr(text)}; the steps are {', '.join(STEP_NAMES)}")
    return steps


def parse_modes(text: str) -> list[str]:
    """'HUDD', 'hudd,BL1', ...: retraining modes in their own spelling."""
    spelled = {mode.lower(): mode for mode in MODES}
    modes = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [mode for mode in modes if mode.lower() not in spelled]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {', '.join(unknown) or repr(text)}; the modes are "
                                         f"{', '.join(MODES)}")
    return [spelled[mode.lower()] for mode in modes]


def modes_to_retrain(args: argparse.Namespace) -> list[str]:
    """The modes of every -mode given (-mode HUDD BL1, -mode HUDD,BL1, -mode HUDD -mode BL1), in order and
    once each; with --demo and none given, all four."""
    given = list(dict.fromkeys(mode for group in args.mode or [] for mode in group))
    return given or (list(MODES) if args.demo is not None else [])


def whole_number(minimum: int):
    """An argparse type: a whole number of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        return value
    return parse


positive_int = whole_number(1)
non_negative_int = whole_number(0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="HUDD.py", description="Heatmap-based Unsupervised Debugging of DNNs: finds the root causes of an "
        "image DNN's errors. Yes/no options take True/False, yes/no or 1/0 (alone: yes).")
    flag = dict(nargs="?", const=True, default=False, type=parse_bool)
    case = parser.add_argument_group("case study")
    case.add_argument("-o", "--outputPathX", dest="case", metavar="CASE",
                      help="case-study directory (holds DataSets/ and DNNModels/)")
    case.add_argument("-m", "--modelName", dest="model", metavar="MODEL", default="OriginalModel.pth",
                      help="model file in CASE/DNNModels/ or a path to one (default: OriginalModel.pth)")
    case.add_argument("-mode", "--retrainMode", dest="mode", type=parse_modes, nargs="+", action="extend",
                      metavar="MODE",
                      help="after finding the root causes, retrain with HUDD's unsafe set, BL1 (random misclassified "
                           "improvement images), BL2 (random improvement images) or BL3 (the improvement images the "
                           "model is least sure of), at the same labelling budget; several modes compare in one run "
                           "(-mode HUDD BL1 BL2 BL3, or HUDD,BL1)")
    case.add_argument("--runs", type=positive_int, metavar="N",
                      help="retraining runs per mode, each seeded (default: the case's 'runs' setting, 1)")
    case.add_argument("-rq", "--RQ1A", dest="rq", metavar="BOOL", **flag,
                      help="write the RQ1 raw results of MODEL (a retrained model) against the original's results "
                           "into CASE/RQ1/; runs no pipeline step")
    case.add_argument("--report", metavar="BOOL", **flag,
                      help="only (re)write CASE/T/report.html from the outputs on disk; runs no step")
    case.add_argument("--compare", metavar="BOOL", **flag,
                      help="on a case that has run: cluster with every candidate feature space, reduction and "
                           "clusterer, print one table (purity and coverage where metadata.csv has scenarios) and "
                           "write it to CASE/T/ClusterAnalysis/compare.csv")
    case.add_argument("--demo", nargs="*", metavar="[fld] [DIR]",
                      help="build the demo case study in DIR (default ./HUDD_demo; with 'fld', the facial keypoint "
                           "demo, default ./HUDD_demo_fld) where missing, train its model and run the pipeline on it")
    model = parser.add_argument_group("model and data (override CASE/hudd.json)")
    model.add_argument("--arch", help="architecture of a state_dict: alexnet256, alexnet128, demonet, a torchvision "
                                      "model name, or path/to/file.py:ClassName")
    model.add_argument("--input-size", type=positive_int, metavar="PIXELS", help="square input size the model takes")
    model.add_argument("--trust-pickle", metavar="BOOL", **flag,
                       help="allow loading a whole pickled model, a checkpoint with Python objects beside its weights, "
                            "or the weights of a torch.export archive (.pt2): unpickling runs code from the file")
    model.add_argument("--skip-bad-images", metavar="BOOL", **flag,
                       help="leave unreadable images out with a warning instead of stopping")
    run = parser.add_argument_group("running")
    run.add_argument("--steps", type=parse_steps, default=list(STEP_NAMES), metavar="LIST",
                     help=f"comma-separated steps to run, of: {', '.join(STEP_NAMES)} (default: all)")
    run.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    run.add_argument("--batch-size", type=positive_int, metavar="N", help="images per batch (default 128)")
    run.add_argument("--workers", type=non_negative_int, metavar="N", help="data-loading processes (default 2)")
    run.add_argument("--seed", type=non_negative_int, default=0, help="seed for python, numpy and torch (default 0)")
    run.add_argument("--force", metavar="BOOL", **flag, help="recompute steps even when their inputs are unchanged")
    run.add_argument("--debug", metavar="BOOL", **flag, help="verbose log, tracebacks on errors")
    return parser


def read_options(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line's options; exits with argparse's usage line and status 2 where they cannot be
    read or name no case study."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo is None and args.case is None:
        parser.error("give a case study with -o CASE, or --demo")
    return args


def missing_case(case: Path) -> str | None:
    """What is wrong with the case-study folder given, before anything else is read; None if it is one."""
    if not case.is_dir():
        return f"{case}: case-study directory not found; pass the folder holding DataSets/ and DNNModels/"
    return None


if __name__ == "__main__":
    # The options, and that the case given exists, are read before torch loads (4 s on a 2-core machine):
    # --help, a mistyped option or path answer at once. main() reads them again, after the imports below.
    _early = read_options()
    _missing = missing_case(Path(_early.case)) if _early.demo is None and not _early.debug else None
    if _missing:   # as Helper.run_guarded says a HuddError (--debug: with its traceback, from check_case)
        print(f"error: {_missing}", file=sys.stderr)
        sys.exit(2)

import numpy as np  # noqa: E402

import distributed  # noqa: E402
import Helper  # noqa: E402
from Helper import HuddError, PipelineStop, RunContext  # noqa: E402


def resolve_model_path(case: Path, model: str) -> Path:
    given = Path(model)
    if given.is_file():
        return given
    models = Helper.CasePaths(case).models
    in_case = models / model
    if in_case.is_file():
        return in_case
    available = sorted(p.name for p in models.glob("*")) if models.is_dir() else []
    hint = f" (DNNModels holds: {', '.join(available[:8])})" if available else ""
    if len(given.parts) > 1:   # a path, as given: not joined to DNNModels (CASE/DNNModels/CASE/DNNModels/...)
        raise HuddError(f"{given}: model file not found{hint}; pass the path of a model file, or a name in "
                        f"{models}, with -m")
    raise HuddError(f"{in_case}: model file not found{hint}; pass its name with -m")


def check_case(case: Path) -> None:
    problem = missing_case(case)
    if problem:
        raise HuddError(problem)


def import_fld_package(args: argparse.Namespace, case: Path) -> None:
    """The original FLD package, once, when DataSets/ is missing (rank 0 writes DataSets/)."""
    import fldPackage
    check_case(case)
    fldPackage.import_package(case, args.trust_pickle)


def make_context(args: argparse.Namespace, case: Path, device) -> RunContext:
    check_case(case)
    paths = Helper.CasePaths(case)
    settings = Helper.load_settings(paths, {
        "arch": args.arch, "batch_size": args.batch_size, "workers": args.workers, "runs": args.runs,
        "input_size": [args.input_size, args.input_size] if args.input_size else None})
    return RunContext(paths=paths, settings=settings, model_path=resolve_model_path(case, args.model),
                      device=device, seed=args.seed, force=args.force,
                      trust_pickle=args.trust_pickle, skip_bad_images=args.skip_bad_images)


def analysis_steps() -> list:
    """The four analysis steps in order; retraining follows, once per mode."""
    import assignModule
    import clusterModule
    import heatmapModule
    import testModule
    return [testModule.STEP, heatmapModule.STEP, clusterModule.STEP, assignModule.STEP]


def run_step(step, ctx: RunContext) -> dict:
    """The step protocol: reuse a step whose recorded fingerprint matches and whose outputs exist,
    else compute it and record its fingerprint and outputs. Returns its summary, and whether it was
    reused ("skipped"). Under torchrun rank 0 decides and records; compute() runs on every rank for a
    step that splits its work (every_rank), else on rank 0 while the others wait; the summary is rank
    0's ({} elsewhere)."""
    step_print = step.fingerprint(ctx)
    skipped = distributed.broadcast(not ctx.force and ctx.manifest.is_current(step.name, step_print))
    if skipped:
        log.info("%s: inputs unchanged, reusing its outputs", step.title)
    else:
        # Forgotten before its outputs are touched: a run killed mid-step (even by SIGKILL) must not
        # leave the old entry vouching for half-rewritten outputs.
        distributed.on_main(lambda: ctx.manifest.forget(step.name))
        started = time.perf_counter()
        distributed.together(lambda: step.compute(ctx) if step.every_rank or distributed.is_main() else None)
        log.debug("%s: %.1f s", step.title, time.perf_counter() - started)
        distributed.on_main(lambda: ctx.manifest.record(step.name, step_print, [
            ctx.paths.relative(p) for p in step.outputs(ctx)], step.basis(ctx)))
        if not distributed.is_main():
            ctx.manifest.reload()  # what rank 0 recorded: the later steps' fingerprints include it
    step.after(ctx)
    return {**step.summary(ctx), "skipped": skipped} if distributed.is_main() else {}


def run_pipeline(ctx: RunContext, steps: list[str], modes: list[str]) -> dict:
    """Runs the chosen steps in order; a step with nothing to pass on ends the run with a note."""
    import retrainModule
    results = {"notes": []}
    retraining = [retrainModule.RetrainStep(mode) for mode in modes] if "retrain" in steps else []
    chosen = [step for step in analysis_steps() if step.name in steps] + retraining
    for step in chosen:
        if retraining and step is retraining[0]:   # once the unsafe set is known, every mode's labels at once
            distributed.together(lambda: retrainModule.check_labels_of_modes(ctx, modes))
        try:
            summary = run_step(step, ctx)
        except PipelineStop as stop:
            results["notes"].append(str(stop))
            distributed.on_main(lambda: ctx.manifest.forget(*downstream_steps(step.name)))
            return results
        if step.name.startswith("retrain-"):
            results.setdefault("retrain", []).append(summary)
        else:
            results[step.name] = summary
    if "retrain" in steps and not modes and not retrainModule.modes_run(ctx.paths):
        results["notes"].append("to retrain the model, add -mode HUDD (-mode HUDD BL1 BL2 BL3 compares it with the "
                                "baselines)")
    return results


def downstream_steps(name: str) -> list[str]:
    """The step and every step that builds on its outputs: the analysis steps after it and each mode's
    retraining (a retraining mode has none after it). When it stops the pipeline, their outputs on disk
    are an earlier run's."""
    import retrainModule
    names = [step.name for step in analysis_steps()]
    if name not in names:
        return [name]
    return names[names.index(name):] + [retrainModule.RetrainStep(mode).name for mode in retrainModule.MODES]


def demo_kind_and_folder(values: list[str]) -> tuple[str, Path]:
    """`--demo`, `--demo DIR`, `--demo fld`, `--demo fld DIR` (or `signs`)."""
    from demo import KINDS
    kind = values[0] if values and values[0] in KINDS else "signs"
    rest = values[1:] if values and values[0] in KINDS else values
    if len(rest) > 1:
        raise HuddError(f"--demo {' '.join(values)}: give at most a kind (signs or fld) and one folder")
    return kind, Path(rest[0] if rest else KINDS[kind])


def prepare_demo(args: argparse.Namespace, case: Path, device) -> None:
    """Builds the demo case study in `case`, trains its model and checks it, where they are missing."""
    import demo
    demo.prepare(demo_kind_and_folder(args.demo)[0], case, seed=args.seed, device=device)


def near_chance_note(sets: dict, chance: float | None) -> str:
    """A note where the model recognises its training images (the test images, without a labelled
    training set) about as often as a guess would: every later step then explains a broken model."""
    named = next(((name, sets[name]) for name in ("TrainingSet", "TestSet") if "accuracy" in sets.get(name, {})), None)
    if chance is None or named is None or named[1]["accuracy"] > chance + 0.1 * (100 - chance):
        return ""
    name, entry = named
    return (f"  note: {name} accuracy {entry['accuracy']:.2f}% is near chance ({chance:.2f}% for {round(100 / chance)} "
            "classes): the model, as HUDD loads it, does not recognise these images. Check input_size, mean, std and "
            "resize in hudd.json against the model's training, and that the weights are of its arch; a model whose "
            "BatchNorm statistics never settled is near chance in eval mode too")


def class_order_note(test: dict) -> str:
    """A note where the class folders are numbers and the model scores far better with its outputs read
    in numeric order than in the folders' name order, which HUDD uses: a silent mislabelling otherwise."""
    order = test.get("numeric_order")
    named = next(((name, entry) for name, entry in test["sets"].items() if "numeric_order_accuracy" in entry), None)
    if not order or named is None or named[1]["numeric_order_accuracy"] < named[1]["accuracy"] + 10:
        return ""
    name, entry = named
    return (f"  note: the class folders are numbers, which HUDD takes in name order as torchvision's ImageFolder "
            f"does ({few(test['classes'])}); read in numeric order ({few(order)}) the model's outputs give {name} "
            f"accuracy {entry['numeric_order_accuracy']:.2f}% against {entry['accuracy']:.2f}%. If the model was "
            "trained with the numbers as labels, set in hudd.json "
            + classes_setting(order, "the folder names in numeric order"))


def best_order_note(test: dict) -> str:
    """A note where the model gets far more of its training images right with its outputs read in another
    class order (the one that fits its predictions best, testModule.best_order): a model trained with a
    label list of its own, whose order HUDD cannot know. Only where that order makes it a working model
    (half-way from chance to 100%) and at least 20 points better: a weak model fits some order by chance."""
    best, chance = test.get("best_order"), test.get("chance")
    if not best or chance is None or best["order"] == test["classes"]:
        return ""
    accuracy = test["sets"][best["set"]]["accuracy"]
    if best["accuracy"] < accuracy + 20 or best["accuracy"] < chance + 0.5 * (100 - chance):
        return ""
    moved = [name for name, output in zip(test["classes"], best["order"]) if name != output]
    return (f"  note: the model's outputs fit another class order far better: read with output i as the i-th of "
            f"{few(best['order'])} ({len(moved)} of {len(test['classes'])} classes moved), they give {best['set']} "
            f"accuracy {best['accuracy']:.2f}% against {accuracy:.2f}%. HUDD reads output i as the i-th class folder "
            "in sorted order (as torchvision's ImageFolder), or as the setting classes lists them; if the model was "
            "trained with its classes in the other order, set in hudd.json "
            + classes_setting(best["order"], "its class names in the order of its outputs"))


def classes_setting(order: list[str], described: str) -> str:
    """The `classes` setting to copy into hudd.json, or, for more than 60 names, what to set it to."""
    return f'"classes": {json.dumps(order)}' if len(order) <= 60 else f'"classes" to {described}'


def few(names: list[str], shown: int = 4) -> str:
    """The first names of a list, and its last: "0, 1, 10, 11, ..., 9"."""
    return ", ".join(names if len(names) <= shown + 1 else [*names[:shown], "...", names[-1]])


def counted(number: int, noun: str) -> str:
    """"1 RCC", "20 RCCs"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def cluster_quality(clusters: dict) -> str:
    """"; purity .., coverage ..; the 10 largest: purity .., coverage .." of the cluster step's summary; n/a
    where a measure is undefined (with very few error images), and why."""
    keys = ("purity", "coverage", "purity_10", "coverage_10")
    shown = {key: "n/a" if np.isnan(clusters[key]) else f"{clusters[key]:.2f}" for key in keys}
    why = (" (n/a: purity needs an RCC of two or more images, coverage a rare condition with five or more error "
           "images)" if "n/a" in shown.values() else "")
    return (f"; purity {shown['purity']}, coverage {shown['coverage']}; the 10 largest: purity {shown['purity_10']}, "
            f"coverage {shown['coverage_10']} (from metadata.csv){why}")


def rcc_sizes(clusters: dict) -> str:
    """"20 RCCs (median 14.5 images)"; where two or more RCCs hold one image each (a small or weakly structured
    case), those apart: "19 RCCs: 8 of 2+ images (median 6) and 11 single images"."""
    singles = clusters.get("single_images", 0)   # 0 or 2+: clusterModule.single_image_rccs
    if not singles:
        median = f"{clusters['median_size']:g}"  # 14.5 where the middle two sizes differ
        return f"{counted(clusters['k'], 'RCC')} (median {median} image{'' if median == '1' else 's'})"
    groups = clusters["k"] - singles   # k counts no noise group
    if not groups:
        return f"{counted(clusters['k'], 'RCC')}, each a single image"
    return (f"{counted(clusters['k'], 'RCC')}: {groups} of 2+ images (median {clusters['group_median_size']:g}) "
            f"and {singles} single images")


def print_summary(ctx: RunContext, results: dict, seconds: float) -> None:
    print(f"\nHUDD on {ctx.paths.root} with {ctx.model_path.name} ({seconds:.0f} s)")
    test = results.get("test")
    if test:
        for set_name, entry in test["sets"].items():
            accuracy = f"accuracy {entry['accuracy']:6.2f}%  wrong {entry['wrong']:5d}" if "accuracy" in entry \
                else "unlabelled"
            print(f"  {set_name:15s} {entry['images']:6d} images  {accuracy}  -> {entry['file']}")
        # a class order that explains the low accuracy is the note to read; the near-chance one's settings are not it
        note = class_order_note(test) or best_order_note(test) or near_chance_note(test["sets"], test.get("chance"))
        if note:
            print(note)
        scenarios = test["scenarios"]
        if scenarios is not None:
            print("  accuracy per scenario (from metadata.csv):")
            for set_name, table in scenarios.groupby("set", sort=False):
                cells = ", ".join(f"{r.scenario} {r.accuracy:.1f}% ({r.images})" for r in table.itertuples())
                print(f"    {set_name}: {cells}")
    heatmaps = results.get("heatmaps")
    if heatmaps:
        print(f"  heatmaps: {counted(heatmaps['images'], 'error image')} x {counted(heatmaps['layers'], 'layer')} "
              f"({heatmaps['megabytes']:.1f} MB) -> {heatmaps['folder']}")
    clusters = results.get("clusters")
    if clusters:
        noise = f" and {clusters['noise']} unclustered" if clusters["noise"] else ""
        quality = cluster_quality(clusters) if "purity" in clusters else ""
        print(f"  root-cause clusters: {rcc_sizes(clusters)}"
              f"{noise}, {counted(clusters['sub_k'], 'sub-cluster')}, in {clusters['layer']} of the "
              f"{clusters['features']}{quality} -> {clusters['folder']}")
    unsafe = results.get("assign")
    if unsafe:
        subs = f"{counted(unsafe['groups'], 'sub-cluster')} of " if unsafe["groups"] != unsafe["rccs"] else ""
        print(f"  unsafe set: {counted(unsafe['images'], 'improvement image')} assigned to {subs}"
              f"{counted(unsafe['rccs'], 'RCC')} -> {unsafe['folder']}")
        if unsafe.get("to_label") and not ctx.paths.improvement_labels.is_file():
            print("    the improvement set has no labels: to retrain, fill the label column(s) of "
                  f"{unsafe['to_label']} and save it as {ctx.paths.improvement_labels}")
    if results.get("retrain"):
        print_retraining(results["retrain"], ctx.paths)
    for note in results.get("notes", []):
        print(f"  note: {note}")
    if results.get("report"):
        print(f"\nreport: {results['report']}  (open it in a browser)")


def print_retraining(summaries: list[dict], paths: Helper.CasePaths) -> None:
    """The modes side by side (every mode on disk, not only this run's): accuracy, gain, the labels each
    mode needs and the gain per 100 of them, and HUDD against each baseline over the runs."""
    import retrainModule
    first, table = summaries[0], retrainModule.read_comparison(paths)
    print(f"  retraining at one budget: {first['labelled']} improvement images labelled per mode, "
          f"{first['bag']} training samples drawn from them; {runs_per_mode(table)}; "
          f"original test accuracy {first['original']:.2f}%")
    print(f"    {'mode':5s} {'test accuracy: mean (min-max)':>30s} {'gain':>7s} {'improved':>9s} {'worsened':>9s} "
          f"{'labels needed':>13s} {'gain/100 labels':>15s} {'p (MWU)':>8s} {'A12':>5s}")
    hudd_ran = "HUDD" in set(table["mode"])
    too_few_runs = hudd_ran and bool(table.loc[table["mode"] != "HUDD", "a12_HUDD"].isna().any())
    for row in table.itertuples():
        if row.mode == "HUDD" or not hudd_ran:
            stats = ""
        elif np.isnan(row.a12_HUDD):  # too few runs for a test (retrainModule.STATISTICS_MIN_RUNS)
            stats = f"{'n/a':>8s} {'n/a':>5s}"
        else:
            stats = f"{row.p_value_vs_HUDD:8.3f} {row.a12_HUDD:5.2f}"
        print(f"    {row.mode:5s} {row.accuracy:13.2f}% ({row.accuracy_min:.2f}-{row.accuracy_max:.2f}) "
              f"{row.gain:+7.2f} {row.improved:9.1f} {row.worsened:9.1f} {row.labels_needed:13d} "
              f"{row.gain_per_100_labels:+15.2f} {stats}")
    print("    labels needed: HUDD its unsafe set, BL1 every improvement image (to find the misclassified ones), BL2 "
          "and BL3 their budget; p, A12: HUDD's runs against the mode's (two-sided Mann-Whitney U; A12 > 0.5: HUDD "
          "ahead)")
    if too_few_runs:
        print(f"    p and A12 need {retrainModule.STATISTICS_MIN_RUNS} or more runs of HUDD and of the mode (one run each "
              "is one comparison of two accuracies, not a test): give --runs 5, say")
    elif few_runs := retrainModule.few_runs_note(table):
        print(f"    {few_runs}")
    print_scenario_gains(paths, list(table["mode"]))
    print(f"    models -> {paths.models}; tables -> {first['folder']}")


def runs_per_mode(table) -> str:
    """'3 runs per mode', or each mode's count where they differ (the table holds every mode on disk,
    some perhaps run with another --runs than this run's)."""
    counts = dict(zip(table["mode"], table["runs"]))
    if len(set(counts.values())) == 1:
        runs = next(iter(counts.values()))
        return f"{runs} run{'s' if runs > 1 else ''} per mode"
    return "runs per mode: " + ", ".join(f"{mode} {runs}" for mode, runs in counts.items())


def print_scenario_gains(paths: Helper.CasePaths, modes: list[str]) -> None:
    """The modes of the comparison above (every current one on disk), not only this run's."""
    import retrainModule
    tables = {}
    for mode in modes:
        scenarios = retrainModule.read_tables(paths, mode).get("scenarios")
        if scenarios is not None:
            tables[mode] = scenarios.set_index("scenario")["gain"]
    if tables:
        names = list(next(iter(tables.values())).index)
        widths = [max(len(n), 6) for n in names]
        print("    gain per scenario (accuracy points, mean of the runs):")
        print(f"    {'mode':5s} " + " ".join(f"{n:>{w}s}" for n, w in zip(names, widths)))
        for mode, gains in tables.items():
            print(f"    {mode:5s} " + " ".join(f"{g:>+{w}.1f}" for g, w in zip(gains.reindex(names), widths)))


def write_report(ctx: RunContext, required: bool = False) -> Path | None:
    import reportModule
    path = reportModule.write_report(ctx)
    if path is None and required:
        raise HuddError(f"{ctx.paths.root}: has no clustering results to report; run the pipeline first")
    return path


def run_compare(ctx: RunContext) -> None:
    import clusterModule
    clusterModule.require_current(ctx, "compare with")
    table = clusterModule.compare(ctx)
    columns = [c for c in ("features", "reduction", "clusterer", "layer", "rccs", "median_size", "noise", "purity",
                           "coverage", "purity_10", "coverage_10", "purity_20", "coverage_20", "pixels_purity")
               if c in table.columns and table[c].notna().any()]   # without metadata: no measure against causes
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if "purity" in columns:
        print("first line: this case's settings; pixels_purity: Ward on the raw pixels at the same number of RCCs")
    else:
        print("first line: this case's settings; no purity or coverage: they need a metadata.csv with a scenario "
              "column in the test set (docs/case-study.md), to measure the RCCs against known causes")
    print(f"saved to {clusterModule.analysis_dir(ctx.paths) / clusterModule.COMPARE_FILE}")


def run_rq1(args: argparse.Namespace, case: Path, device) -> None:
    import rqModule
    ctx = make_context(args, case, device)
    rqModule.check_has_run(ctx)
    rqModule.print_rq1(rqModule.rq1(ctx))


def main(argv: list[str] | None = None) -> int:
    args = read_options(argv)
    Helper.setup_logging(args.debug)
    try:
        status = Helper.run_guarded(lambda: run(args), args.debug)
    except BaseException:   # --debug re-raises with the trace
        if not distributed.active():
            raise
        traceback.print_exc()   # under torchrun the trace, then finish: never the interpreter's shutdown
        status = 1
    distributed.finish(status)   # under torchrun: ends the process here
    return status


def run(args: argparse.Namespace) -> int:
    if args.rq and (args.demo is not None or args.case is None):
        raise HuddError("-rq True needs -o CASE and -m MODEL (a retrained model), not --demo")
    actions = [name for name, on in (("--report", args.report), ("--compare", args.compare), ("-rq True", args.rq)) if on]
    if len(actions) > 1:
        raise HuddError(f"{' and '.join(actions)}: give one of them per run")
    modes = modes_to_retrain(args)
    if args.steps == ["retrain"] and not modes:
        raise HuddError("--steps retrain needs -mode HUDD, BL1, BL2 or BL3")
    Helper.seed_everything(args.seed)
    start = time.perf_counter()
    device = distributed.device_for(args.device)
    distributed.start(device)
    case = demo_kind_and_folder(args.demo)[1] if args.demo is not None else Path(args.case)
    lock = Helper.CaseLock(Helper.CasePaths(case))
    distributed.on_main(lambda: take_lock(lock, case, args.demo is not None))
    try:
        return run_locked(args, case, modes, device, start)
    finally:
        lock.release()


def take_lock(lock: Helper.CaseLock, case: Path, demo: bool) -> None:
    """The case's lock, for the whole run (a demo's folder is created first, to hold it)."""
    if demo:
        case.mkdir(parents=True, exist_ok=True)
    if case.is_dir():
        lock.acquire(Helper.run_description())


def run_locked(args: argparse.Namespace, case: Path, modes: list[str], device, start: float) -> int:
    if args.rq:
        distributed.on_main(lambda: run_rq1(args, case, device))
        return 0
    distributed.on_main(lambda: prepare_demo(args, case, device) if args.demo is not None
                        else import_fld_package(args, case))
    ctx = distributed.together(lambda: make_context(args, case, device))
    if args.report:
        distributed.on_main(lambda: print(f"report: {write_report(ctx, required=True)}"))
        return 0
    if args.compare:
        distributed.on_main(lambda: run_compare(ctx))
        return 0
    results = run_pipeline(ctx, args.steps, modes)
    if distributed.is_main():
        results["report"] = write_report(ctx)
        print_summary(ctx, results, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
