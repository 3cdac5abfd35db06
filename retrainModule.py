"""Step 5: retrain the model with HUDD's unsafe set or a baseline's images, at ONE labelling budget.

The budget is the number of distinct improvement images an engineer labels: the sum over the RCCs of
two or more images of ceil(budget_factor x RCC size) (factor 1: the original's HUDD quota, reference
§9.2). The original gave HUDD about 3.3x the baselines' images (§9.3); here every mode labels the
same number of distinct images and trains on the same number of samples:
- HUDD: the ClosestU greedy with those quotas, so each image is chosen once (the original could draw
  the same image for several RCCs), then a balanced bag: every RCC drawn up to the largest quota,
  with replacement, each image weighted by 1 / its distance to the RCC (closer images more often);
- BL1: random improvement images that the original model misclassifies;
- BL2: random improvement images.
The baselines' images are repeated uniformly to the size of HUDD's bag.

Each run fine-tunes a copy of the original weights on the training set (less a validation split)
plus the bag, with the original's optimiser (SGD, lr 1e-3, momentum 0.9, weight decay 5e-4; §9.1)
and the case's epochs and batch size, keeps one epoch (setting `epoch_choice`) and is measured on
the test set against the original model.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

import evaluation
from Helper import (HuddError, ImageSet, RunContext, atomic_path, fingerprint, image_set_digest, make_loader,
                    stop_on_unreadable, write_csv)

log = logging.getLogger("hudd")

STEP = "retrain"
STEP_VERSION = 1
MODES = ("HUDD", "BL1", "BL2")
VALIDATION_SHARE = 0.1
CACHE_BYTES = 2 * 2 ** 30   # sets whose decoded tensors fit are read from disk once, not every epoch


# --------------------------------------------------------------------------------------------
# Which improvement images each mode labels, and the training bag
# --------------------------------------------------------------------------------------------

@dataclass
class Selection:
    chosen: np.ndarray   # distinct improvement images labelled (indices into the improvement set)
    bag: np.ndarray      # the training samples drawn from them (indices, with repeats)


def budget_quotas(rcc_sizes: np.ndarray, factor: float = 1.0) -> np.ndarray:
    """Per-RCC labelling quotas ceil(factor x size); their sum is the budget of every mode."""
    from assignModule import quotas
    return quotas(rcc_sizes, factor)


def hudd_selection(distances: np.ndarray, quota: np.ndarray, rng: np.random.Generator) -> Selection:
    """ClosestU with the budget quotas (each image at most once), then the balanced bag: every RCC
    that got images holds each of them once and is filled up to the largest quota by draws weighted
    by 1 / distance (closer images more often)."""
    from assignModule import closest_u
    assigned, _rank = closest_u(distances, quota)
    per_rcc = max(int(quota.max()), 1)
    bag = []
    for rcc in range(len(quota)):
        members = np.flatnonzero(assigned == rcc)
        if len(members):
            weights = 1.0 / np.maximum(distances[members, rcc], 1e-12)
            extra = rng.choice(members, size=per_rcc - len(members), replace=True, p=weights / weights.sum())
            bag.append(np.concatenate([members, extra]))
    chosen = np.flatnonzero(assigned >= 0)
    return Selection(chosen, np.concatenate(bag) if bag else chosen)


def baseline_selection(pool: np.ndarray, budget: int, bag_size: int, rng: np.random.Generator) -> Selection:
    """`budget` distinct images drawn at random from `pool`, repeated uniformly up to `bag_size`."""
    chosen = np.sort(rng.choice(pool, size=min(budget, len(pool)), replace=False))
    if not len(chosen):
        return Selection(chosen, chosen)
    extra = rng.choice(chosen, size=max(bag_size - len(chosen), 0), replace=True)
    return Selection(chosen, np.concatenate([chosen, rng.permutation(extra)]))


def select(mode: str, distances: np.ndarray, quota: np.ndarray, wrong: np.ndarray,
           rng: np.random.Generator) -> Selection:
    """The mode's selection at the common budget: HUDD's number of distinct images and bag size.
    HUDD's own draws come from a separate stream so that the baselines' draws do not depend on them."""
    hudd = hudd_selection(distances, quota, np.random.default_rng(rng.integers(2 ** 63)))
    if mode == "HUDD":
        return hudd
    pool = np.flatnonzero(wrong) if mode == "BL1" else np.arange(len(wrong))
    if len(pool) < len(hudd.chosen):
        log.warning("%s: only %d improvement images to draw from for a budget of %d", mode, len(pool), len(hudd.chosen))
    return baseline_selection(pool, len(hudd.chosen), len(hudd.bag), rng)


# --------------------------------------------------------------------------------------------
# Images as tensors: read once where they fit in memory
# --------------------------------------------------------------------------------------------

class ImageSource:
    """An image set's images for training: decoded once and kept as one tensor when that fits in
    CACHE_BYTES, else read from disk in every pass."""

    def __init__(self, image_set: ImageSet, ctx: RunContext):
        self.image_set, self.ctx = image_set, ctx
        self.labels = truth_of(image_set)
        self.tensor = self._decode_all() if self._fits() else None

    def _fits(self) -> bool:
        from Helper import resolve_input_size
        height, width = resolve_input_size(self.ctx.settings)
        return len(self.image_set) * self.ctx.settings.channels * height * width * 4 <= CACHE_BYTES

    def _decode_all(self) -> torch.Tensor:
        loader = make_loader(self.image_set, self.ctx.settings, self.ctx.settings.batch_size, self.ctx.settings.workers)
        parts = [None] * len(loader)
        for number, (inputs, _labels, rows, failures) in enumerate(
                tqdm(loader, desc=f"reading {self.image_set.name}", unit="batch", leave=False, disable=None)):
            stop_on_unreadable(self.image_set, failures)
            parts[number] = inputs
        return torch.cat(parts)

    def batches(self, rows: np.ndarray, batch_size: int):
        """(inputs, labels) of `rows` (positions in the set), in that order."""
        if self.tensor is not None:
            for start in range(0, len(rows), batch_size):
                chunk = torch.as_tensor(rows[start:start + batch_size], dtype=torch.long)
                yield self.tensor[chunk], self.labels[chunk]
            return
        subset = ImageSet(name=self.image_set.name, root=self.image_set.root, classes=self.image_set.classes,
                          paths=[self.image_set.paths[i] for i in rows],
                          labels=[self.image_set.labels[i] for i in rows],
                          targets=None if self.image_set.targets is None else self.image_set.targets[rows])
        yield from combined_batches(subset, batch_size, self.ctx)


def truth_of(image_set: ImageSet) -> torch.Tensor:
    """What training compares the output with: class indices, or (N, K, 2) keypoint coordinates."""
    if image_set.targets is not None:
        return torch.as_tensor(image_set.targets, dtype=torch.float32)
    return torch.as_tensor(image_set.labels, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Fine-tuning
# --------------------------------------------------------------------------------------------

def split_validation(labels: np.ndarray, rng: np.random.Generator, share: float = VALIDATION_SHARE
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of the training set: (training rows, validation rows); every class with two or
    more images gives at least one to validation."""
    validation = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) >= 2:
            validation.append(members[:max(1, int(round(share * len(members))))])
    validation = np.sort(np.concatenate(validation)) if validation else np.empty(0, dtype=np.int64)
    return np.setdiff1d(np.arange(len(labels)), validation), validation


@dataclass
class TrainingData:
    train: ImageSource
    improve: ImageSource
    test: ImageSource            # measured after every run: decoded once too
    train_rows: np.ndarray
    validation_rows: np.ndarray


def cached_test_outputs(model: nn.Module, test: ImageSource, ctx: RunContext) -> np.ndarray:
    """The test step's output rows (testModule.output_rows) for every test image, from the decoded set."""
    from testModule import output_rows
    model.eval()
    with torch.no_grad():
        return np.concatenate([output_rows(model(inputs.to(ctx.device)), ctx)
                               for inputs, _ in test.batches(np.arange(len(test.image_set)), ctx.settings.batch_size)])


def accuracy_on(model: nn.Module, source: ImageSource, rows: np.ndarray, ctx: RunContext) -> float:
    if not len(rows):
        return float("nan")
    model.eval()
    correct = 0
    with torch.no_grad():
        for inputs, labels in source.batches(rows, ctx.settings.batch_size):
            correct += count_correct(model(inputs.to(ctx.device)), labels.to(ctx.device), ctx)
    return correct / len(rows)


def epoch_batches(data: TrainingData, bag: np.ndarray, batch_size: int, ctx: RunContext,
                  generator: torch.Generator):
    """(inputs, labels) batches of one pass over the training rows and the bag, shuffled together."""
    source = np.concatenate([np.zeros(len(data.train_rows), int), np.ones(len(bag), int)])
    rows = np.concatenate([data.train_rows, bag])
    order = torch.randperm(len(rows), generator=generator).numpy()
    source, rows = source[order], rows[order]
    if data.train.tensor is not None and data.improve.tensor is not None:
        for start in range(0, len(rows), batch_size):
            part_source, part_rows = source[start:start + batch_size], rows[start:start + batch_size]
            inputs = torch.empty((len(part_rows), *data.train.tensor.shape[1:]))
            labels = torch.empty((len(part_rows), *data.train.labels.shape[1:]), dtype=data.train.labels.dtype)
            for s, images in ((0, data.train), (1, data.improve)):
                mask = torch.as_tensor(part_source == s)
                picked = torch.as_tensor(part_rows[part_source == s], dtype=torch.long)
                inputs[mask], labels[mask] = images.tensor[picked], images.labels[picked]
            yield inputs, labels
        return
    sets = (data.train.image_set, data.improve.image_set)  # too large to keep: read from disk, in that order
    combined = ImageSet(name="retraining set", root=sets[0].root, classes=sets[0].classes,
                        paths=[sets[s].paths[r] for s, r in zip(source, rows)],
                        labels=[sets[s].labels[r] for s, r in zip(source, rows)],
                        targets=None if sets[0].targets is None else
                        np.stack([sets[s].targets[r] for s, r in zip(source, rows)]))
    yield from combined_batches(combined, batch_size, ctx)


def combined_batches(image_set: ImageSet, batch_size: int, ctx: RunContext):
    truth = truth_of(image_set)
    for inputs, _labels, rows, failures in make_loader(image_set, ctx.settings, batch_size, ctx.settings.workers):
        stop_on_unreadable(image_set, failures)
        yield inputs, truth[rows]


def loss(outputs: torch.Tensor, truth: torch.Tensor, ctx: RunContext) -> torch.Tensor:
    """Cross-entropy for classes; for keypoints the MSE against Gaussian target maps (sigma 5, x10;
    reference §9.4)."""
    if ctx.settings.task == "keypoints":
        import keypoints
        return nn.functional.mse_loss(outputs, keypoints.target_maps(truth, *outputs.shape[2:]).to(outputs.device))
    return nn.functional.cross_entropy(outputs, truth)


def count_correct(outputs: torch.Tensor, truth: torch.Tensor, ctx: RunContext) -> int:
    """Images right: the class, or for keypoints a mean error within the threshold."""
    if ctx.settings.task == "keypoints":
        import keypoints
        errors = keypoints.keypoint_errors(keypoints.decode(outputs).cpu().numpy(), truth.cpu().numpy())
        return int((~keypoints.is_wrong(errors, ctx.settings.error_threshold)).sum())
    return int((outputs.argmax(1) == truth).sum())


def make_optimiser(model: nn.Module, ctx: RunContext) -> torch.optim.Optimizer:
    """The original's: SGD for classifiers; RMSprop with the early layers frozen for keypoint models
    (reference §9.1, §9.4)."""
    s = ctx.settings
    if s.task == "keypoints":
        if hasattr(model, "freeze_early"):
            model.freeze_early()
        return torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=s.learning_rate)
    return torch.optim.SGD(model.parameters(), lr=s.learning_rate, momentum=s.momentum, weight_decay=s.weight_decay)


def train_epoch(model, optimiser, data: TrainingData, bag: np.ndarray, ctx: RunContext,
                generator: torch.Generator) -> float:
    """One pass over the training rows and the bag; returns the training accuracy."""
    model.train()
    correct = seen = 0
    for inputs, labels in epoch_batches(data, bag, ctx.settings.batch_size, ctx, generator):
        inputs, labels = inputs.to(ctx.device), labels.to(ctx.device)
        optimiser.zero_grad()
        outputs = model(inputs)
        loss(outputs, labels, ctx).backward()
        optimiser.step()
        correct += count_correct(outputs.detach(), labels, ctx)
        seen += len(labels)
    return correct / max(seen, 1)


def fine_tune(ctx: RunContext, data: TrainingData, bag: np.ndarray, seed: int, desc: str
              ) -> tuple[nn.Module, int, list[dict]]:
    """Fine-tunes a copy of the original model; returns it at the chosen epoch, that epoch, and the
    per-epoch history (training and validation accuracy)."""
    s = ctx.settings
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(ctx.model()).to(ctx.device)
    optimiser = make_optimiser(model, ctx)
    history, best_state, best_score = [], None, -np.inf
    for epoch in tqdm(range(1, s.epochs + 1), desc=desc, unit="epoch", leave=False, disable=None):
        train_accuracy = train_epoch(model, optimiser, data, bag, ctx, generator)
        validation = (accuracy_on(model, data.train, data.validation_rows, ctx)
                      if s.epoch_choice == "validation" else float("nan"))
        history.append({"epoch": epoch, "train_accuracy": 100 * train_accuracy, "validation_accuracy": 100 * validation})
        score = {"validation": validation, "training": train_accuracy, "last": epoch}[s.epoch_choice]
        if score >= best_score:  # ties go to the later epoch: it has trained on the new images longer
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval(), best_epoch, history


def save_model(model: nn.Module, ctx: RunContext, mode: str, run: int, accuracy: float):
    """DNNModels/<mode>_<run>_<accuracy>.pth; never overwrites: a taken name gets a _2, _3... suffix."""
    stem = f"{mode}_{run}_{accuracy:.2f}"
    path = ctx.paths.models / f"{stem}.pth"
    suffix = 2
    while path.exists():
        path = ctx.paths.models / f"{stem}_{suffix}.pth"
        suffix += 1
    with atomic_path(path) as temporary:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, temporary)
    return path


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------

@dataclass
class UnsafeInputs:
    layer: str
    rcc_errors: pd.DataFrame     # error images of the RCCs with two or more images (image, rcc)
    rccs: list[str]
    distances: np.ndarray        # (improvement images, rccs) nearest-member distances
    quota: np.ndarray            # per RCC labelling quota
    wrong: np.ndarray            # improvement images the original model misclassifies


def unsafe_inputs(ctx: RunContext) -> UnsafeInputs:
    """What the assignment step left: the distances of the improvement images to the RCCs, the RCC
    sizes, and which improvement images the original model gets wrong."""
    from assignModule import selected_clusters
    improve = ctx.sets()["improve"]
    if not improve.labelled:
        how = ("add a labels.csv with their keypoints" if ctx.settings.task == "keypoints"
               else "put them in one folder per class")
        raise HuddError(f"{improve.root}: retraining needs the improvement images labelled (BL1 needs to know which "
                        f"ones the model gets wrong, and every mode trains on labels); {how}")
    layer, _module, labels, eligible = selected_clusters(ctx)
    distance_path = ctx.paths.t_dir / "UnsafeSet" / "rcc_distances.csv"
    if not distance_path.is_file():
        raise HuddError(f"{distance_path}: not found; run the assignment step first (--steps assign)")
    distances = pd.read_csv(distance_path)
    expected = [ctx.paths.relative(p) for p in improve.paths]
    if list(distances["image"]) != expected or list(distances.columns[1:]) != list(eligible):
        raise HuddError(f"{distance_path}: does not match the improvement set and RCCs; rerun with --force")
    results = pd.read_csv(ctx.paths.result_csv("improve")).set_index("image").reindex(expected)
    sizes = labels["rcc"].value_counts().reindex(eligible).to_numpy()
    return UnsafeInputs(layer=layer, rcc_errors=labels[labels["rcc"].isin(eligible)][["image", "rcc"]],
                        rccs=list(eligible), distances=distances[eligible].to_numpy(),
                        quota=budget_quotas(sizes, ctx.settings.budget_factor),
                        wrong=results["result"].eq("Wrong").to_numpy())


def step_fingerprint(ctx: RunContext, mode: str, runs: int) -> str:
    s = ctx.settings
    return fingerprint({"step": STEP, "version": STEP_VERSION, "mode": mode, "runs": runs, "seed": ctx.seed,
                        "assign": ctx.manifest.entries.get("assign", {}).get("fingerprint"),
                        "train": image_set_digest(ctx.sets()["train"], ctx.paths.root),
                        **{k: getattr(s, k) for k in ("epochs", "batch_size", "learning_rate", "momentum",
                                                      "weight_decay", "epoch_choice", "budget_factor")}})


def is_current(ctx: RunContext, mode: str, runs: int) -> bool:
    """Whether the mode's results on disk come from the same inputs and settings."""
    return (ctx.manifest.is_current(f"{STEP}-{mode}", step_fingerprint(ctx, mode, runs))
            and (ctx.paths.t_dir / "Retrain" / f"{mode}_runs.csv").is_file())


def run(ctx: RunContext, mode: str, runs: int = 1, data: TrainingData | None = None) -> dict:
    """Retrains `runs` models with `mode`'s images (or reuses the results when nothing changed).
    `data` lets several modes share the decoded images."""
    if mode not in MODES:
        raise HuddError(f"-mode {mode!r}: use one of {', '.join(MODES)}")
    folder = ctx.paths.t_dir / "Retrain"
    step_name, step_print = f"{STEP}-{mode}", step_fingerprint(ctx, mode, runs)
    if not ctx.force and is_current(ctx, mode, runs):
        log.info("retraining %s: inputs unchanged, reusing %s", mode, ctx.paths.relative(folder))
        return summarise(ctx, mode)
    unsafe = unsafe_inputs(ctx)
    data = data or training_data(ctx)
    rows, fixed, scenarios, histories = [], {}, {}, []
    for run_index in range(1, runs + 1):
        selection = select(mode, unsafe.distances, unsafe.quota, unsafe.wrong,
                           np.random.default_rng([ctx.seed, run_index]))
        model, epoch, history = fine_tune(ctx, data, selection.bag, seed=ctx.seed * 1000 + run_index,
                                          desc=f"retraining {mode} run {run_index}/{runs}")
        measures = evaluation.measures_from_outputs(cached_test_outputs(model, data.test, ctx), ctx)
        improved, worsened = evaluation.improved_worsened(measures, ctx)
        path = save_model(model, ctx, mode, run_index, measures.accuracy)
        rows.append({"run": run_index, "accuracy": measures.accuracy, "improved": improved, "worsened": worsened,
                     "epoch": epoch, "labelled": len(selection.chosen), "bag": len(selection.bag),
                     "labelled_misclassified": int(unsafe.wrong[selection.chosen].sum()),
                     "model": ctx.paths.relative(path),
                     **({} if measures.mean_error is None else {"mean_error": float(measures.mean_error.mean())})})
        fixed[f"run{run_index}"] = evaluation.fixed_per_rcc(measures, unsafe.rcc_errors)
        scenarios[f"run{run_index}"] = evaluation.per_scenario(measures, ctx)
        histories += [{"run": run_index, **h} for h in history]
    write_tables(ctx, folder, mode, rows, fixed, scenarios, histories, unsafe)
    ctx.manifest.record(step_name, step_print, [ctx.paths.relative(folder / f"{mode}_runs.csv")])
    return summarise(ctx, mode)


def training_data(ctx: RunContext) -> TrainingData:
    train_rows, validation_rows = split_validation(np.asarray(ctx.sets()["train"].labels),
                                                   np.random.default_rng(ctx.seed))
    if ctx.settings.epoch_choice != "validation":  # no split needed: train on the whole training set
        train_rows, validation_rows = np.arange(len(ctx.sets()["train"])), np.empty(0, dtype=np.int64)
    sets = ctx.sets()
    return TrainingData(train=ImageSource(sets["train"], ctx), improve=ImageSource(sets["improve"], ctx),
                        test=ImageSource(sets["test"], ctx), train_rows=train_rows, validation_rows=validation_rows)


def write_tables(ctx, folder, mode, rows, fixed, scenarios, histories, unsafe: UnsafeInputs) -> None:
    """<mode>_runs.csv, _rcc.csv, _scenarios.csv (where metadata exists), _epochs.csv, _results.xlsx."""
    runs = pd.DataFrame(rows)
    stats = runs[["accuracy", "improved", "worsened"]].agg(["mean", "min", "max"])
    per_rcc = pd.DataFrame(fixed).reindex(unsafe.rccs).fillna(0).astype(int)
    per_rcc.insert(0, "errors", unsafe.rcc_errors["rcc"].value_counts().reindex(unsafe.rccs).to_numpy())
    per_rcc["mean_fixed"] = per_rcc.filter(like="run").mean(axis=1)
    per_rcc = per_rcc.rename_axis("rcc").reset_index()
    per_scenario = pd.DataFrame(scenarios)
    tables = {"runs": runs, "rcc": per_rcc, "epochs": pd.DataFrame(histories)}
    if len(per_scenario):
        per_scenario.insert(0, "original", evaluation.original_per_scenario(ctx).reindex(per_scenario.index))
        per_scenario["mean"] = per_scenario.filter(like="run").mean(axis=1)
        per_scenario["gain"] = per_scenario["mean"] - per_scenario["original"]
        tables["scenarios"] = per_scenario.rename_axis("scenario").reset_index()
    folder.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        write_csv(table, folder / f"{mode}_{name}.csv")
    stale = folder / f"{mode}_scenarios.csv"
    if "scenarios" not in tables and stale.exists():
        stale.unlink()
    with atomic_path(folder / f"{mode}_results.xlsx") as temporary:
        with pd.ExcelWriter(temporary, engine="openpyxl") as book:
            runs.to_excel(book, sheet_name="runs", index=False)
            stats.to_excel(book, sheet_name="summary")
            per_rcc.to_excel(book, sheet_name="errors fixed per RCC", index=False)
            if "scenarios" in tables:
                tables["scenarios"].to_excel(book, sheet_name="accuracy per scenario", index=False)
            tables["epochs"].to_excel(book, sheet_name="epochs", index=False)


def summarise(ctx: RunContext, mode: str) -> dict:
    folder = ctx.paths.t_dir / "Retrain"
    runs = pd.read_csv(folder / f"{mode}_runs.csv")
    original = pd.read_csv(ctx.paths.result_csv("test"))
    scenario_file = folder / f"{mode}_scenarios.csv"
    return {"mode": mode, "runs": len(runs), "labelled": int(runs["labelled"].iloc[0]),
            "bag": int(runs["bag"].iloc[0]), "accuracy": runs["accuracy"].agg(["mean", "min", "max"]).to_dict(),
            "original": 100.0 * original["result"].eq("Correct").mean(), "improved": runs["improved"].mean(),
            "worsened": runs["worsened"].mean(),
            "scenarios": pd.read_csv(scenario_file) if scenario_file.is_file() else None, "folder": folder}
