"""Which unsafe set pays for its labels: the study behind the assignment step's defaults.

    python bench/unsafe_set_study.py CASE [CASE ...] [--runs 5] [--retrain NAME,NAME] [--screen-only]
                                     [--budget-factor F]

CASE: case studies that ran the test, heatmap and cluster steps (a copy of the demo, seed taken from a
trailing _s<N> in the folder name). For each case, label-free ingredients once: the improvement
images' relevance at the selected layer, the RCC members', the model's own uncertainty. Then:

1. screening, no retraining: every candidate of GRID (assignment level, distance, quotas, radius,
   uncertainty weight) chooses its unsafe set exactly as the assignment step would, and the study
   MEASURES its composition: share of rare conditions (metadata scenario other than the ordinary one),
   of images the original model gets wrong, of ordinary images it gets right. Labels and metadata are
   read only for this measurement, after the choice, never to choose.
2. retraining: the candidates named with --retrain and BL1, BL2, BL3 at the same budget, `--runs`
   seeded runs each, as the retraining step runs them; gains pooled over the cases, with the
   Mann-Whitney U p-value and Vargha-Delaney A12 of each candidate against each baseline, and the
   candidate's lead case by case with a t interval over the cases. `--baselines` may add BL1@cost: BL1
   at the budget's labelling cost (the failures among BL2's labelled images).
"""
from __future__ import annotations

import argparse
import itertools
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import Helper  # noqa: E402
import assignModule  # noqa: E402
import evaluation  # noqa: E402
import retrainModule  # noqa: E402
import testModule  # noqa: E402

GRID = {"assign_level": ("sub", "top"), "assign_distance": ("nearest", "knn", "medoid"),
        "assign_quota": ("proportional", "equal"), "assign_radius": (0.0, 1.0),
        "assign_uncertainty": (0.0, 1.0, 4.0, 16.0)}
SHORT = {"assign_level": "", "assign_distance": "", "assign_quota": "", "assign_radius": "r", "assign_uncertainty": "u"}
BASELINES = ("BL1", "BL2", "BL3")
# BL1 at the others' labelling cost (study only): an engineer labels as many random improvement images as
# the budget (BL2's very draw) and trains on those the model gets wrong, the failures a random search of
# that many labels finds, repeated to the common bag size. The product's BL1 labels all the improvement set.
BL1_AT_COST = "BL1@cost"
STUDY_BASELINES = (*BASELINES, BL1_AT_COST)


def candidate_name(values: dict) -> str:
    return "/".join(f"{SHORT[k]}{v:g}" if isinstance(v, float) else f"{SHORT[k]}{v}" for k, v in values.items())


def candidates() -> dict[str, dict]:
    grid = {candidate_name(dict(zip(GRID, combo))): dict(zip(GRID, combo))
            for combo in itertools.product(*GRID.values())}
    contrast = {CONTRAST: {**ORIGINAL, "assign_pick": "contrast"}}   # assign_pick contrast: one candidate
    for weight in CONTRAST_UNCERTAINTY:   # study-only variants, below
        contrast[f"{CONTRAST}+u{weight:g}"] = {**contrast[CONTRAST], "contrast_uncertainty": weight}
    contrast[f"{CONTRAST}/quota"] = {**contrast[CONTRAST], "contrast_quota": True}
    for pool in CONTRAST_POOLS:
        contrast[f"{CONTRAST}/spread{pool:g}"] = {**contrast[CONTRAST], "contrast_pool": pool}
    for cap in CONTRAST_CAPS:
        contrast[f"{CONTRAST}/cap{cap}"] = {**contrast[CONTRAST], "contrast_cap": cap}
    contrast[f"{CONTRAST}+train"] = {**contrast[CONTRAST], "train_lookalikes": True}
    for multiple in BAG_MULTIPLES:
        contrast[f"{CONTRAST}/bag{multiple:g}"] = {**contrast[CONTRAST], "bag_multiple": multiple}
    return {**grid, **contrast}


CONTRAST = "contrast"
# Study-only variants of the contrast pick (not settings): the contrast's rank plus this weight times the
# rank of the model's own uncertainty (most uncertain first); the contrast within each RCC's quota; or the
# budget spread over a pool of this many times the budget of lowest contrast (farthest-point order).
CONTRAST_UNCERTAINTY = (0.5, 1.0, 2.0)
CONTRAST_POOLS = (1.25, 1.5, 2.0)
# contrast/capN: the images in contrast order, each test error taking at most N of them (an image counts
# for its nearest test error in the cluster step's distance space; one passed over when its error has N),
# the rest of the budget by contrast: the labels spread over the failure modes as the test errors are
# (docs/method.md: ahead on seeds 0-2, behind on 3, 4, 6, 7; not adopted).
CONTRAST_CAPS = (1, 2, 3)
STUDY_KEYS = ("contrast_uncertainty", "contrast_quota", "contrast_pool", "contrast_cap", "train_lookalikes",
              "bag_multiple")
BAG_MULTIPLES = (2.0,)
# Study-only training extras. `train_lookalikes` (contrast+train): besides its unsafe set, HUDD's
# retraining repeats the training images whose relevance looks most like a failure (lowest contrast, as
# the unsafe set's: no label is needed, the training set's are known): as many as it labels, each shown as
# often as a labelled image, which doubles its extra samples. `bag_multiple` F (contrast/bagF): the bag F
# times as large, from its own labelled images (F 2: the lookalikes' control). With --base naming either,
# the baselines' bags grow alike, so that every mode trains on as many samples.


def rank_share(values: np.ndarray) -> np.ndarray:
    """Each value's rank over all, 0 (lowest) to 1."""
    return np.argsort(np.argsort(values, kind="stable"), kind="stable") / max(len(values) - 1, 1)


def contrast_variant(parts: dict, distances: np.ndarray, quota: np.ndarray, study: dict) -> np.ndarray:
    """A study variant's choice (per image its RCC or -1)."""
    score = parts["contrast"]
    if study.get("contrast_uncertainty"):
        score = rank_share(score) + study["contrast_uncertainty"] * rank_share(-parts["uncertainty"])
    if study.get("contrast_cap"):
        assigned = np.full(len(score), -1, dtype=np.int64)
        chosen = capped_order(score, nearest_errors(parts), study["contrast_cap"])[:int(quota.sum())]
        assigned[chosen] = np.argmin(distances[chosen], axis=1)
        return assigned
    if study.get("contrast_pool"):
        budget = int(quota.sum())
        pool = np.argsort(score, kind="stable")[:int(round(study["contrast_pool"] * budget))]
        chosen = pool[farthest_points(parts["rows"][pool], budget)]
        assigned = np.full(len(score), -1, dtype=np.int64)
        assigned[chosen] = np.argmin(distances[chosen], axis=1)
        return assigned
    if not study.get("contrast_quota"):
        return assignModule.contrast_choice(distances, score, int(quota.sum()))[0]
    closest, assigned = np.argmin(distances, axis=1), np.full(len(score), -1, dtype=np.int64)
    for rcc, wanted in enumerate(quota):   # each RCC's lowest contrast among the images closest to it
        mine = np.flatnonzero(closest == rcc)
        assigned[mine[np.argsort(score[mine], kind="stable")[:wanted]]] = rcc
    left = int(quota.sum()) - int((assigned >= 0).sum())   # RCCs with too few images: the rest by contrast
    rest = np.flatnonzero(assigned < 0)
    extra = rest[np.argsort(score[rest], kind="stable")[:left]]
    assigned[extra] = closest[extra]
    return assigned


def nearest_errors(parts: dict) -> np.ndarray:
    """Per improvement image, its nearest test error (a row of the contrast's error side); memoised."""
    if "nearest_error" not in parts:
        references, side = parts["sides"]
        parts["nearest_error"] = np.argmin(assignModule.squared_distances(parts["rows"], references[side == 0]), axis=1)
    return parts["nearest_error"]


def capped_order(score: np.ndarray, nearest: np.ndarray, cap: int) -> np.ndarray:
    """Every image in ascending `score`, those beyond the `cap`-th of their nearest test error after all
    the others (each part in score order)."""
    order = np.argsort(score, kind="stable")
    rank_at_error = np.empty(len(order), dtype=np.int64)   # 0 for an error's lowest-score image, 1, ...
    taken: dict[int, int] = {}
    for position, image in enumerate(order):
        rank_at_error[position] = taken.get(int(nearest[image]), 0)
        taken[int(nearest[image])] = rank_at_error[position] + 1
    return np.concatenate([order[rank_at_error < cap], order[rank_at_error >= cap]])


def farthest_points(rows: np.ndarray, count: int) -> np.ndarray:
    """`count` of the rows (positions), from the first (the lowest contrast) on, each next the one farthest
    from those taken (the k-center greedy): the pool's images spread over its failure modes."""
    flat = rows.reshape(len(rows), -1)
    squared = np.einsum("ij,ij->i", flat, flat)
    taken, nearest = [0], np.full(len(flat), np.inf)
    for _ in range(min(count, len(flat)) - 1):
        last = flat[taken[-1]]
        nearest = np.minimum(nearest, squared - 2 * flat @ last + last @ last)
        nearest[taken[-1]] = -np.inf
        taken.append(int(np.argmax(nearest)))
    return np.array(taken)


def context(case: Path) -> Helper.RunContext:
    paths = Helper.CasePaths(case)
    found = re.search(r"_s(\d+)$", case.name)
    return Helper.RunContext(paths=paths, settings=Helper.load_settings(paths), device=torch.device("cpu"),
                             model_path=paths.models / "OriginalModel.pth", seed=int(found.group(1)) if found else 0)


# --------------------------------------------------------------------------------------------
# Label-free ingredients, then each candidate's choice
# --------------------------------------------------------------------------------------------

def ingredients(ctx: Helper.RunContext) -> dict:
    """Per level the clusters; the improvement rows (one relevance pass) and the uncertainty."""
    results = assignModule.improvement_results(ctx)
    uncertainty = assignModule.uncertainty_table(ctx, results)
    channels = assignModule.label_free_channels(ctx, results, uncertainty)
    levels = {level: assignModule.selected_clusters(replace_settings(ctx, assign_level=level))
              for level in GRID["assign_level"]}
    rows = in_order(assignModule.improvement_rows(ctx, levels["sub"], channels), len(ctx.sets()["improve"]))
    errors, row_shape = assignModule.error_rows(ctx, levels["sub"].layer)
    sides = assignModule.contrast_sides(ctx, levels["sub"], errors, row_shape)
    contrast = assignModule.contrast(rows, *sides)
    return {"levels": levels, "rows": rows, "uncertainty": uncertainty["uncertainty"].to_numpy(), "contrast": contrast,
            "errors": errors, "sides": sides}


def training_contrast(ctx: Helper.RunContext, parts: dict) -> np.ndarray:
    """Every training image's contrast (as the improvement images'), its relevance explaining the
    class the model predicts (trainResult.csv); one relevance pass over the training set."""
    train = ctx.sets()["train"]
    images = [ctx.paths.relative(p) for p in train.paths]
    results = testModule.read_results(ctx.paths, "train").set_index("image").reindex(images)
    channels = assignModule.label_free_channels(ctx, results, assignModule.uncertainty_table(ctx, results, train))
    rows = in_order(assignModule.improvement_rows(ctx, parts["levels"]["sub"], channels, images=train), len(train))
    return assignModule.contrast(rows, *parts["sides"])


def in_order(batches, count: int) -> np.ndarray:
    """The rows of (positions, block) batches, stacked in position order."""
    rows = np.empty((count,), dtype=object)
    for positions, block in batches:
        for position, row in zip(positions, block):
            rows[position] = row
    return np.stack(rows)


def training_rare(ctx: Helper.RunContext) -> np.ndarray:
    """FOR MEASURING ONLY: per training image, whether its metadata names a rare condition."""
    images = [ctx.paths.relative(p) for p in ctx.sets()["train"].paths]
    meta = Helper.read_metadata(ctx.sets()["train"].root, ctx.paths.root)
    if meta is None:
        return np.zeros(len(images), bool)
    return (meta["scenario"].reindex(images) != ctx.settings.ordinary_scenario).to_numpy()


def grown(selection: retrainModule.Selection, multiple: float, rng: np.random.Generator) -> retrainModule.Selection:
    """The selection with `multiple` times its bag's samples, the new ones drawn uniformly from its labelled
    images."""
    extra = int(round((multiple - 1) * len(selection.bag)))
    if not len(selection.chosen) or extra <= 0:
        return selection
    return retrainModule.Selection(selection.chosen, np.concatenate(
        [selection.bag, rng.choice(selection.chosen, size=extra, replace=True)]))


def failures_of(selection: retrainModule.Selection, wrong: np.ndarray,
                rng: np.random.Generator) -> retrainModule.Selection:
    """BL1 at the budget's labelling cost: of the labelled images, those the model gets wrong, repeated
    uniformly to the same bag size."""
    failures = selection.chosen[wrong[selection.chosen].astype(bool)]
    return retrainModule.baseline_selection(failures, len(failures), len(selection.bag), rng)


def lookalike_samples(order: np.ndarray, train_rows: np.ndarray, count: int, samples: int,
                      rng: np.random.Generator) -> np.ndarray:
    """`samples` extra training samples: the `count` training rows of lowest contrast (`order`: all
    training images by ascending contrast) once each, the rest drawn uniformly among them."""
    pool = order[np.isin(order, train_rows)][:count]
    return np.concatenate([pool, rng.choice(pool, size=max(samples - len(pool), 0), replace=True)])


def replace_settings(ctx: Helper.RunContext, **values) -> Helper.RunContext:
    return replace(ctx, settings=replace(ctx.settings, **values))


def choice(ctx: Helper.RunContext, parts: dict, values: dict, memo: dict) -> dict:
    """The candidate's unsafe set: assigned (per image its RCC or -1), distances, quota."""
    study = {key: values[key] for key in STUDY_KEYS if key in values}
    extras = {key: study.pop(key) for key in ("train_lookalikes", "bag_multiple") if key in study}
    s = replace(ctx.settings, **{k: v for k, v in values.items() if k not in STUDY_KEYS})
    clusters = parts["levels"][s.assign_level]
    members = memo.setdefault(("members", s.assign_level), None)
    if members is None:
        members = memo[("members", s.assign_level)] = parts["errors"][clusters.member_rows]
    key = ("distances", s.assign_level, s.assign_distance)
    if key not in memo:
        memo[key] = assignModule.member_distances(parts["rows"], members, clusters.member_rcc, len(clusters.eligible),
                                                  s.assign_distance, s.assign_k)
    reach = (assignModule.rcc_reach(members, clusters.member_rcc, len(clusters.eligible), s.assign_distance, s.assign_k)
             if s.assign_radius else None)
    quota = assignModule.rcc_quotas(s, clusters.sizes)
    if s.assign_pick == "contrast":   # the budget over the whole set; geometry and weights of the grid unused
        assigned = contrast_variant(parts, memo[key], quota, study)
        return {"assigned": assigned, "distances": memo[key], "quota": quota, **extras}
    assigned, _ = assignModule.choose(memo[key], quota, parts["uncertainty"], s.assign_uncertainty, reach,
                                      s.assign_radius)
    return {"assigned": assigned, "distances": memo[key], "quota": quota}


def truth(ctx: Helper.RunContext) -> pd.DataFrame:
    """FOR MEASURING ONLY, after the choice: per improvement image, rare condition and wrong."""
    images = [ctx.paths.relative(p) for p in ctx.sets()["improve"].paths]
    wrong = testModule.read_results(ctx.paths, "improve").set_index("image").reindex(images)["result"].eq("Wrong")
    meta = Helper.read_metadata(ctx.sets()["improve"].root, ctx.paths.root)
    scenario = meta["scenario"].reindex(images) if meta is not None else pd.Series("", index=images)
    return pd.DataFrame({"wrong": wrong.to_numpy(), "scenario": scenario.to_numpy(),
                         "rare": (scenario != ctx.settings.ordinary_scenario).to_numpy()})


def composition(chosen: np.ndarray, known: pd.DataFrame) -> dict:
    picked = known.iloc[chosen]
    return {"labelled": len(chosen), "rare": 100 * picked["rare"].mean(), "wrong": 100 * picked["wrong"].mean(),
            "ordinary_right": 100 * (~picked["rare"] & ~picked["wrong"]).mean()}


def screen(ctx: Helper.RunContext, parts: dict, known: pd.DataFrame) -> tuple[list[dict], dict]:
    memo, rows, choices = {}, [], {}
    for name, values in candidates().items():
        chosen = choices[name] = choice(ctx, parts, values, memo)
        rows.append({"case": ctx.paths.root.name, "candidate": name,
                     **composition(np.flatnonzero(chosen["assigned"] >= 0), known)})
    budget = len(np.flatnonzero(choices[candidate_name(ORIGINAL)]["assigned"] >= 0))
    for mode in BASELINES:
        chosen = retrainModule.select(mode, choices[candidate_name(ORIGINAL)]["assigned"],
                                      choices[candidate_name(ORIGINAL)]["distances"],
                                      choices[candidate_name(ORIGINAL)]["quota"], known["wrong"].to_numpy(),
                                      np.random.default_rng([ctx.seed, 1]), parts["uncertainty"]).chosen
        rows.append({"case": ctx.paths.root.name, "candidate": mode, **composition(chosen, known)})
    assert all(r["labelled"] <= budget for r in rows[-3:])
    return rows, choices


# The original's choice (nearest member, proportional quotas, no radius, no uncertainty): its budget is the
# baselines' (every candidate without a radius has the same budget).
ORIGINAL = {"assign_level": "sub", "assign_distance": "nearest", "assign_quota": "proportional", "assign_radius": 0.0,
           "assign_uncertainty": 0.0}


# --------------------------------------------------------------------------------------------
# Retraining the chosen candidates against the baselines
# --------------------------------------------------------------------------------------------

def retrain(ctx: Helper.RunContext, choices: dict, names: list[str], known: pd.DataFrame, parts: dict,
            runs: int, out: Path | None = None, baselines: tuple[str, ...] = BASELINES,
            repeat_failures: bool = False, hudd_bag: str = "uniform", base_name: str | None = None) -> list[dict]:
    """Gain (points) of every run of every named candidate and of the `baselines`, at the budget and bag
    size of candidate `base_name` (default: the original's choice) for the baselines (BL1's pool: the
    images the model gets wrong, as the product does)."""
    data = retrainModule.training_data(ctx)
    original = testModule.original_test_accuracy(ctx.paths)
    base = choices[base_name or candidate_name(ORIGINAL)]
    multiple = 2.0 if base.get("train_lookalikes") else base.get("bag_multiple", 1.0)   # the baselines' bags too
    rows, wrong = [], known["wrong"].to_numpy()
    for mode in [*names[:1], *baselines, *names[1:]]:
        chosen = choices.get(mode, base)
        drawn_as = "HUDD" if mode in choices else {BL1_AT_COST: "BL2"}.get(mode, mode)   # retrainModule.select's mode
        for run in range(1, runs + 1):
            rng = np.random.default_rng([ctx.seed, run])
            selection = retrainModule.select(drawn_as, chosen["assigned"], chosen["distances"], chosen["quota"], wrong,
                                             rng, parts["uncertainty"], repeat_failures, hudd_bag)
            labels_needed = retrainModule.labels_needed(mode, len(selection.chosen), len(known))
            if mode == BL1_AT_COST:
                selection = failures_of(selection, wrong, np.random.default_rng([ctx.seed, run, 11]))
            extra_rng, trained = np.random.default_rng([ctx.seed, run, 7]), data   # draws of their own
            if chosen.get("train_lookalikes") and mode in choices:
                extra = lookalike_samples(parts["train_order"], data.train_rows, len(selection.chosen),
                                          len(selection.bag), extra_rng)
                trained = replace(data, train_rows=np.concatenate([data.train_rows, extra]))
                print(f"  {mode}: {len(extra)} extra training samples of {len(np.unique(extra))} images, "
                      f"{100 * parts['train_rare'][np.unique(extra)].mean():.1f}% rare conditions (measured only)")
            elif mode in choices and chosen.get("bag_multiple"):
                selection = grown(selection, chosen["bag_multiple"], extra_rng)
            elif mode not in choices:
                selection = grown(selection, multiple, extra_rng)
            start = time.perf_counter()
            model, _, _ = retrainModule.fine_tune(ctx, trained, selection.bag, seed=ctx.seed * 1000 + run, desc=mode)
            outputs = retrainModule.cached_test_outputs(model, data.test, ctx)
            accuracy = evaluation.measures_from_outputs(outputs, ctx).accuracy
            rows.append({"case": ctx.paths.root.name, "mode": mode, "run": run, "gain": accuracy - original,
                         "labelled": len(selection.chosen), "seconds": time.perf_counter() - start,
                         "labels_needed": labels_needed})
            if out:   # every run as it ends: a cut-short study still has its figures
                out.mkdir(parents=True, exist_ok=True)
                pd.DataFrame(rows).to_csv(out / f"gains_{ctx.paths.root.name}.csv", index=False)
            print(f"  {ctx.paths.root.name} {mode} run {run}: {accuracy - original:+.2f} "
                  f"({rows[-1]['seconds']:.0f} s)", flush=True)
    return rows


def statistics(gains: pd.DataFrame) -> pd.DataFrame:
    """Per candidate: mean gain, and against each baseline the mean difference, MWU p and A12, pooled."""
    rows = []
    for mode, group in gains.groupby("mode", sort=False):
        row = {"mode": mode, "runs": len(group), "gain": group["gain"].mean(), "labelled": group["labelled"].mean()}
        if "labels_needed" in group:
            row["gain per 100 labels"] = 100 * row["gain"] / group["labels_needed"].mean()
        if mode not in STUDY_BASELINES:
            for baseline in (b for b in STUDY_BASELINES if b in set(gains["mode"])):
                other = gains[gains["mode"] == baseline]["gain"]
                row[f"vs {baseline}"] = row["gain"] - other.mean()
                row[f"p {baseline}"] = evaluation.mann_whitney_p(group["gain"], other)
                row[f"A12 {baseline}"] = evaluation.vargha_delaney_a12(group["gain"], other)
        rows.append(row)
    return pd.DataFrame(rows)


def case_differences(means: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per candidate and baseline: the candidate's lead over the baseline case by case (`means`: each
    case's mean gain per mode), their mean and a Student t interval over the cases. The pooled U test treats
    every run as independent, but the runs of one case share its original model and unsafe set, and the
    lead moves more from case to case than from run to run: this interval says what another case may see."""
    from scipy.stats import t as student_t
    rows = []
    for mode in (m for m in means.columns if m not in STUDY_BASELINES):
        for baseline in (b for b in STUDY_BASELINES if b in means.columns):
            lead = (means[mode] - means[baseline]).dropna()
            row = {"mode": mode, "vs": baseline, "cases": len(lead), "mean lead": lead.mean(),
                   "sd": lead.std(ddof=1), "cases ahead": int((lead > 0).sum())}
            half = (student_t.ppf(0.5 + confidence / 2, len(lead) - 1) * row["sd"] / np.sqrt(len(lead))
                    if len(lead) > 1 else np.nan)
            row["low"], row["high"] = row["mean lead"] - half, row["mean lead"] + half
            rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--retrain", default="sub/nearest/proportional/r0/u4,sub/nearest/proportional/r0/u0",
                        help="comma-separated candidate names; the first runs before the baselines, the others "
                             "after ('' for none: the baselines alone)")
    parser.add_argument("--from-gains", type=Path, nargs="*", help="only print the tables of gains_*.csv files")
    parser.add_argument("--screen-only", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="folder for the CSVs (default: none)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeat-failures", action="store_true",
                        help="every mode's bag repeats its labelled images that the model gets wrong "
                             "(retrainModule.select)")
    parser.add_argument("--hudd-bag", choices=("uniform", "balanced"), default="uniform",
                        help="the candidates' training bag: their images repeated uniformly as the baselines' (the "
                             "product's default) or balanced over the RCCs (the original's; retrainModule.hudd_selection)")
    parser.add_argument("--budget-factor", type=float, default=None,
                        help="the labelling budget's factor (setting budget_factor; default: the case's): every "
                             "candidate's RCC quotas and so the baselines' budget")
    parser.add_argument("--base", default=None,
                        help="the candidate whose budget and bag size the baselines take, as the product's -mode "
                             "runs take the unsafe set's (default: the original's choice)")
    parser.add_argument("--baselines", default=",".join(BASELINES),
                        help="baselines to retrain beside the candidates, of " + ", ".join(STUDY_BASELINES) +
                             " ('' for none: their runs of an earlier study, merged with --from-gains; the same "
                             "seeds give the same selections)")
    parser.add_argument("--lr-schedule", choices=("constant", "cosine"), default=None,
                        help="the retraining's learning-rate schedule (setting lr_schedule; default: the case's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.from_gains is not None:   # tables from files of earlier runs (e.g. one process per case)
        read = lambda files: pd.concat([pd.read_csv(f) for f in files]) if files else pd.DataFrame()
        show(read([f for f in args.from_gains if "screen" in f.name]), read([f for f in args.from_gains if "gains" in f.name]),
             None)
        return
    screened, gains = [], []
    for case in args.cases:
        ctx = context(case)
        if args.budget_factor is not None:
            ctx = replace_settings(ctx, budget_factor=args.budget_factor)
        if args.lr_schedule is not None:
            ctx = replace_settings(ctx, lr_schedule=args.lr_schedule)
        Helper.seed_everything(ctx.seed)
        parts = ingredients(ctx)
        if any(candidates().get(name, {}).get("train_lookalikes") for name in args.retrain.split(",")):
            parts["train_order"] = np.argsort(training_contrast(ctx, parts), kind="stable")
            parts["train_rare"] = training_rare(ctx)     # measured only, printed with the runs
        known = truth(ctx)                        # read after every choice below is fixed by label-free inputs
        rows, choices = screen(ctx, parts, known)
        screened += rows
        if not args.screen_only:
            named = [name for name in args.retrain.split(",") if name]
            gains += retrain(ctx, choices, named, known, parts, args.runs, args.out,
                             tuple(filter(None, args.baselines.split(","))), args.repeat_failures, args.hudd_bag,
                             args.base)
    show(pd.DataFrame(screened), pd.DataFrame(gains), args.out)


def case_order(name: str) -> tuple[str, int]:
    """demo_s2 before demo_s10: the name without its trailing seed, then the seed as a number."""
    found = re.search(r"(\d+)$", name)
    return (name[:found.start()], int(found.group(1))) if found else (name, -1)


def show(screened: pd.DataFrame, gains: pd.DataFrame, out: Path | None) -> None:
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 200)
    if not len(screened):
        screened = pd.DataFrame(columns=["candidate", "labelled", "rare", "wrong", "ordinary_right"])
    mean = screened.groupby("candidate", sort=False)[["labelled", "rare", "wrong", "ordinary_right"]].mean()
    print("\ncomposition of the labelled set, mean over the cases (%; sorted by share wrong):")
    print(mean.sort_values("wrong", ascending=False).round(1).to_string())
    if len(gains):
        print("\nper case, mean gain (points):")
        per_case = gains.pivot_table(index="case", columns="mode", values="gain", sort=False)
        per_case = per_case.sort_index(key=lambda names: names.map(case_order))
        print(per_case.round(2).to_string())
        print("\npooled over the cases (gain in points; p: two-sided Mann-Whitney U; A12: candidate ahead above 0.5):")
        print(statistics(gains).round(3).to_string(index=False))
        print("\ncase by case (lead: the candidate's mean gain minus the baseline's on each case; low-high: 95% "
              "Student t interval of the mean over the cases):")
        print(case_differences(per_case).round(2).to_string(index=False))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        for case, table in screened.groupby("case"):
            table.to_csv(out / f"screen_{case}.csv", index=False)


if __name__ == "__main__":
    main()
