"""Step 5: retrain the model with HUDD's unsafe set or a baseline's images, at ONE labelling budget.

The budget is the number of distinct improvement images an engineer labels: the sum over the RCCs of
two or more images of ceil(budget_factor x RCC size) (factor 1: the original's HUDD quota, reference
§9.2). The original gave HUDD about 3.3x the baselines' images (§9.3); here every mode labels the
same number of distinct images and trains on the same number of samples:
- HUDD: the assignment step's unsafe set (at that budget, by contrast or by the ClosestU greedy with
  those quotas, each image chosen once; the original could draw the same image for several RCCs),
  repeated uniformly to the bag size as the baselines' images are (setting `hudd_bag`; "balanced", the
  original's: every RCC drawn up to the largest quota, with replacement, each image weighted by 1 / its
  distance to the RCC; the bag's size is that balanced bag's in both cases);
- BL1: random improvement images that the original model misclassifies;
- BL2: random improvement images;
- BL3: the improvement images the model is least sure of (lowest softmax margin; keypoints: the
  assignment step's shift-disagreement proxy), the first thing an ML engineer tries; no label needed.
The baselines' images are repeated uniformly to the size of HUDD's bag. Each mode's runs record the
labels it needs (BL1: the whole improvement set, to find the misclassified images); comparison.csv sets
the modes side by side with the Mann-Whitney U p-value and Vargha-Delaney A12 of HUDD against each.

An unlabelled improvement set takes its labels from DataSets/ImprovementLabels.csv (Helper.with_partial_labels):
a mode that would train on an image without one stops and lists them in T/Retrain/<mode>_to_label.csv
(each later retraining brings the other modes' lists up to date, and removes them once complete); BL1,
which must find the misclassified images, needs every label.

Each run fine-tunes a copy of the original weights on the training set (less a validation split)
plus the bag, with the original's optimiser (SGD, lr 1e-3, momentum 0.9, weight decay 5e-4; §9.1), at a
constant rate unless `lr_schedule` says cosine (each epoch's rate is in <mode>_epochs.csv), and the case's
epochs and batch size, keeps one epoch (setting `epoch_choice`) and is measured on
the test set against the original model.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

import assignModule
import distributed
import evaluation
import testModule
from Helper import (RETRAIN_MODES, SAME_ON_EVERY_RANK, CasePaths, HuddError, ImageSet, RunContext, Step, atomic_path,
                    image_set_digest, make_loader, read_csv, resolve_input_size, stop_on_unreadable, with_partial_labels,
                    write_csv, write_label_template)

log = logging.getLogger("hudd")

MODES = RETRAIN_MODES
VALIDATION_SHARE = 0.1
CACHE_BYTES = 2 * 2 ** 30   # sets whose decoded tensors fit are read from disk once, not every epoch
AUXILIARY_WEIGHT = 0.3   # an auxiliary head's share of the loss, GoogLeNet's (Szegedy et al., 2015)
CHANNELS_LAST = torch.channels_last
CONTIGUOUS = torch.contiguous_format


# --------------------------------------------------------------------------------------------
# Which improvement images each mode labels, and the training bag
# --------------------------------------------------------------------------------------------

@dataclass
class Selection:
    chosen: np.ndarray   # distinct improvement images labelled (indices into the improvement set)
    bag: np.ndarray      # the training samples drawn from them (indices, with repeats)


def hudd_selection(assigned: np.ndarray, distances: np.ndarray, quota: np.ndarray,
                   rng: np.random.Generator, wrong: np.ndarray | None = None, bag: str = "uniform") -> Selection:
    """The unsafe set (`assigned`: per improvement image its RCC, -1 for none; each image at most
    once) and its training bag. `bag` "balanced" (the original's): every RCC that got images holds
    each of them once and is filled up to the largest quota by draws weighted by 1 / distance (closer
    images more often). "uniform" (the default, docs/method.md): as many samples, the chosen images
    repeated uniformly as the baselines' are, so no small RCC's few images fill a large share. With
    `wrong` (known once the images are labelled), the draws come from the images the model gets
    wrong (per RCC when balanced), where there are any."""
    per_rcc = max(int(quota.max()), 1)
    chosen = np.flatnonzero(assigned >= 0)
    counts = np.bincount(assigned[chosen], minlength=len(quota))
    rccs = np.flatnonzero(counts)
    if not len(rccs):
        return Selection(chosen, chosen)
    if bag == "uniform":
        # As many samples as the balanced bag would hold: each RCC that got images, filled to the largest quota.
        bag_size = int(np.maximum(counts[rccs], per_rcc).sum())
        return baseline_selection(chosen, len(chosen), bag_size, rng, wrong)
    balanced = []
    for rcc in rccs:
        members = np.flatnonzero(assigned == rcc)
        drawn = _failures_first(members, wrong)
        weights = 1.0 / np.maximum(distances[drawn, rcc], 1e-12)
        extra = rng.choice(drawn, size=max(per_rcc - len(members), 0), replace=True, p=weights / weights.sum())
        balanced.append(np.concatenate([members, extra]))
    return Selection(chosen, np.concatenate(balanced))


def _failures_first(images: np.ndarray, wrong: np.ndarray | None) -> np.ndarray:
    """The images the model gets wrong among `images` (all of them without `wrong` or without any)."""
    failures = images[wrong[images]] if wrong is not None else images
    return failures if len(failures) else images


def baseline_selection(pool: np.ndarray, budget: int, bag_size: int, rng: np.random.Generator,
                       wrong: np.ndarray | None = None) -> Selection:
    """`budget` distinct images drawn at random from `pool`, repeated uniformly up to `bag_size` (with
    `wrong`: the repeats drawn from those the model gets wrong, where there are any)."""
    chosen = np.sort(rng.choice(pool, size=min(budget, len(pool)), replace=False))
    if not len(chosen):
        return Selection(chosen, chosen)
    extra = rng.choice(_failures_first(chosen, wrong), size=max(bag_size - len(chosen), 0), replace=True)
    return Selection(chosen, np.concatenate([chosen, rng.permutation(extra)]))


def lowest_margin(uncertainty: np.ndarray, budget: int) -> np.ndarray:
    """BL3's images: the `budget` the model is least sure of (highest uncertainty; ties by position)."""
    return np.sort(np.argsort(-np.asarray(uncertainty, dtype=float), kind="stable")[:budget])


def select(mode: str, assigned: np.ndarray, distances: np.ndarray, quota: np.ndarray, wrong: np.ndarray,
           rng: np.random.Generator, uncertainty: np.ndarray | None = None, repeat_failures: bool = False,
           hudd_bag: str = "uniform") -> Selection:
    """The mode's selection at the common budget: HUDD's number of distinct images and bag size.
    HUDD's own draws come from a separate stream so that the baselines' draws do not depend on them.
    BL3 takes the images of highest `uncertainty` (lowest margin), repeated uniformly to the bag size.
    With `repeat_failures`, every mode's repeats come from its labelled images that the model gets
    wrong (`wrong` read only for the images the mode labelled)."""
    failures = wrong if repeat_failures else None
    hudd = hudd_selection(assigned, distances, quota, np.random.default_rng(rng.integers(2 ** 63)), failures, hudd_bag)
    if mode == "HUDD":
        return hudd
    if mode == "BL3":
        if uncertainty is None:
            raise ValueError("BL3 needs the improvement images' uncertainty (assignModule.read_uncertainty)")
        return baseline_selection(lowest_margin(uncertainty, len(hudd.chosen)), len(hudd.chosen), len(hudd.bag), rng,
                                  failures)
    pool = np.flatnonzero(wrong) if mode == "BL1" else np.arange(len(wrong))
    if len(pool) < len(hudd.chosen):
        log.warning("%s: only %d improvement images to draw from for a budget of %d", mode, len(pool), len(hudd.chosen))
    return baseline_selection(pool, len(hudd.chosen), len(hudd.bag), rng, failures)


# --------------------------------------------------------------------------------------------
# Images as tensors: read once where they fit in memory
# --------------------------------------------------------------------------------------------

class ImageSource:
    """An image set's images for training: decoded once and kept as one tensor when that fits in
    CACHE_BYTES, else read from disk in every pass."""

    def __init__(self, image_set: ImageSet, ctx: RunContext):
        self.image_set, self.ctx = image_set, ctx
        self.labels = ctx.task.truth(image_set.labels, image_set.targets)
        self.tensor = self._decode_all() if self._fits() else None

    def _fits(self) -> bool:
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
        yield from combined_batches(self.image_set.subset(rows), batch_size, self.ctx)


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
    """The test step's output rows (the task's output_rows) for every test image, from the decoded set."""
    model.eval()
    with torch.no_grad():
        return np.concatenate([ctx.task.output_rows(model(inputs.to(ctx.device)))
                               for inputs, _ in test.batches(np.arange(len(test.image_set)), ctx.settings.batch_size)])


def accuracy_on(model: nn.Module, source: ImageSource, rows: np.ndarray, ctx: RunContext) -> float:
    if not len(rows):
        return float("nan")
    model.eval()
    correct = 0
    with torch.no_grad():
        for inputs, labels in source.batches(rows, ctx.settings.batch_size):
            correct += ctx.task.count_correct(model(inputs.to(ctx.device)), labels.to(ctx.device))
    return correct / len(rows)


def epoch_batches(data: TrainingData, bag: np.ndarray, batch_size: int, ctx: RunContext,
                  generator: torch.Generator):
    """One pass over the training rows and the bag, shuffled together, in global batches of
    `batch_size`: yields (inputs, labels, global batch size, slice) for this rank's contiguous slice of
    each batch (under torchrun; the whole batch in one process); a last batch of one sample is joined to
    the one before. Every rank draws the same order, so the ranks together see exactly the samples of
    the single-process epoch. A short last batch can leave a rank no sample (more ranks than samples): it
    gets the batch's first sample with an empty slice, to weigh 0 (every rank must take part in every DDP
    step, so that every rank's optimiser steps alike)."""
    source = np.concatenate([np.zeros(len(data.train_rows), int), np.ones(len(bag), int)])
    rows = np.concatenate([data.train_rows, bag])
    order = torch.randperm(len(rows), generator=generator).numpy()
    source, rows = source[order], rows[order]
    spans = [(start, min(start + batch_size, len(rows))) for start in range(0, len(rows), batch_size)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] == 1:
        # a last batch of one sample joins the one before: batch norm cannot train on a batch of one
        # ("Expected more than 1 value per channel"), and every sample is still seen once
        spans[-2:] = [(spans[-2][0], spans[-1][1])]
    mine = [(stop - start, part, np.arange(start, stop)[part] if part.stop > part.start else np.array([start]))
            for start, stop in spans for part in [distributed.local_slice(stop - start)]]
    if data.train.tensor is not None and data.improve.tensor is not None:
        for size, part, positions in mine:
            part_source, part_rows = source[positions], rows[positions]
            inputs = torch.empty((len(part_rows), *data.train.tensor.shape[1:]))
            labels = torch.empty((len(part_rows), *data.train.labels.shape[1:]), dtype=data.train.labels.dtype)
            for s, images in ((0, data.train), (1, data.improve)):
                mask = torch.as_tensor(part_source == s)
                picked = torch.as_tensor(part_rows[part_source == s], dtype=torch.long)
                inputs[mask], labels[mask] = images.tensor[picked], images.labels[picked]
            yield inputs, labels, size, part
        return
    sets = (data.train.image_set, data.improve.image_set)  # too large to keep: read from disk, in that order
    picked = np.concatenate([positions for _size, _part, positions in mine]) if mine else np.empty(0, int)
    combined = ImageSet(name="retraining set", root=sets[0].root, classes=sets[0].classes,
                        paths=[sets[source[i]].paths[rows[i]] for i in picked],
                        labels=[sets[source[i]].labels[rows[i]] for i in picked],
                        targets=None if sets[0].targets is None else
                        np.stack([sets[source[i]].targets[rows[i]] for i in picked]))
    ends = np.cumsum([len(positions) for _size, _part, positions in mine])
    batches = [list(range(end - len(positions), end)) for end, (_s, _p, positions) in zip(ends, mine)]
    for (inputs, labels), (size, part, _positions) in zip(combined_batches(combined, batch_size, ctx, batches), mine):
        yield inputs, labels, size, part


def combined_batches(image_set: ImageSet, batch_size: int, ctx: RunContext, batches: list[list[int]] | None = None):
    truth = ctx.task.truth(image_set.labels, image_set.targets)
    for inputs, _labels, rows, failures in make_loader(image_set, ctx.settings, batch_size, ctx.settings.workers,
                                                       batches=batches):
        stop_on_unreadable(image_set, failures)
        yield inputs, truth[rows]


def train_epoch(model, optimiser, data: TrainingData, bag: np.ndarray, ctx: RunContext,
                generator: torch.Generator, dropouts: list = (), mask_seed: tuple = (0,), norms: list = (),
                layout: torch.memory_format = CONTIGUOUS) -> float:
    """One pass over the training rows and the bag; returns the training accuracy (of every rank's
    samples). Under torchrun `model` is DDP-wrapped: DDP averages the ranks' gradients, so each rank's
    mean loss is scaled by its share of the global batch times the number of ranks, which makes that
    average the global batch's mean gradient, as in one process. `dropouts` (distributed.batch_dropout)
    get each global batch's mask seed, drawn from `mask_seed` and the batch number; `norms`
    (distributed.norms_over_ranks) take the global batch's statistics, without a stand-in sample."""
    model.train()
    correct = seen = 0
    for number, (inputs, labels, size, part) in enumerate(epoch_batches(data, bag, ctx.settings.batch_size, ctx,
                                                                        generator)):
        mine = part.stop - part.start  # 0: a stand-in sample that weighs nothing
        distributed.set_batch(dropouts, size, part if mine else slice(0, 1),
                              int(np.random.SeedSequence([*mask_seed, number]).generate_state(1)[0]), norms, mine > 0)
        inputs, labels = inputs.to(ctx.device, memory_format=layout), labels.to(ctx.device)
        optimiser.zero_grad()
        outputs, auxiliary = main_and_auxiliary(model(inputs))
        if layout == CHANNELS_LAST:   # a keypoint model's output maps: its loss and decoding run slowly in NHWC
            outputs, auxiliary = outputs.contiguous(), [extra.contiguous() for extra in auxiliary]
        loss = ctx.task.loss(outputs, labels) + sum(AUXILIARY_WEIGHT * ctx.task.loss(extra, labels) for extra in auxiliary)
        (loss * (mine * distributed.world() / size)).backward()
        optimiser.step()
        if mine:
            correct += ctx.task.count_correct(outputs.detach(), labels)
            seen += len(labels)
    correct, seen = distributed.sum_over_ranks(correct, seen)
    return correct / max(seen, 1)


def main_and_auxiliary(outputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the main output, the auxiliary outputs) of a forward pass in training mode. torchvision's GoogLeNet
    and Inception v3 return (logits, auxiliary logits...) there, and their output tensor in eval mode. Only
    extra outputs of the main output's shape are auxiliary outputs: others (a model's features, returned
    beside its logits for a loss of its own) are no outputs to learn the labels from."""
    if isinstance(outputs, torch.Tensor):
        return outputs, []
    if isinstance(outputs, tuple) and outputs and isinstance(outputs[0], torch.Tensor):
        main = outputs[0]
        return main, [extra for extra in outputs[1:] if isinstance(extra, torch.Tensor) and extra.shape == main.shape]
    raise HuddError(f"the model returns a {type(outputs).__name__} in training mode; HUDD retrains a model that "
                    "returns its output tensor, or a tuple (output, auxiliary outputs...) as torchvision's GoogLeNet")


def epoch_learning_rate(base: float, epoch: int, epochs: int, schedule: str) -> float:
    """The learning rate of epoch 1..epochs: `base` throughout ("constant", the original's), or a cosine
    decay from `base` at the first epoch to about 2.5% of it at the tenth of ten ("cosine"): the last
    epochs' small steps keep the kept (last) epoch off a swing of the test accuracy, at the price of less
    learning (docs/method.md, "Retraining")."""
    if schedule == "constant":
        return base
    return base * 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / epochs))


def set_learning_rate(optimiser: torch.optim.Optimizer, rate: float) -> None:
    for group in optimiser.param_groups:
        group["lr"] = rate


def training_layout(model: nn.Module, ctx: RunContext) -> torch.memory_format:
    """The memory layout copies of the model train in: channels_last on the CPU, where oneDNN's
    convolutions and pooling run faster in it (a run of the sign demo 1.26x, bench/bench_retrain.py), if
    the model has 2-D convolutions and passes the probe; else the usual contiguous layout. The probe (on a
    throwaway copy, the random state left as it was) passes two random images in eval mode through both
    layouts and compares the outputs, then once in training mode in channels_last: a model whose forward
    needs contiguous memory (`x.view(n, -1)` after a convolution raises in channels_last; an operator that
    reads the memory as if contiguous gives other outputs), also on a path only training takes, trains
    contiguous, as every model did before. GPUs keep the contiguous layout: not measured there."""
    if ctx.device.type != "cpu" or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return CONTIGUOUS
    height, width = resolve_input_size(ctx.settings)
    probe = torch.randn((2, ctx.settings.channels, height, width), generator=torch.Generator().manual_seed(0))
    laid_out = probe.contiguous(memory_format=CHANNELS_LAST)
    trial = copy.deepcopy(model).eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            reference = main_and_auxiliary(trial(probe))[0]
            trial.to(memory_format=CHANNELS_LAST)
            output = main_and_auxiliary(trial(laid_out))[0]
            main_and_auxiliary(trial.train()(laid_out))
        same = output.shape == reference.shape and torch.allclose(
            output.float(), reference.float(), rtol=1e-3, atol=1e-4 * float(reference.abs().max().clamp(min=1)))
    except Exception:  # noqa: BLE001 - any failure in the probe only means: train as before
        same = False
    return CHANNELS_LAST if same else CONTIGUOUS


def fine_tune(ctx: RunContext, data: TrainingData, bag: np.ndarray, seed: int, desc: str,
              each_epoch: Callable[[nn.Module, int, float], None] | None = None,
              layout: torch.memory_format | None = None) -> tuple[nn.Module, int, list[dict]]:
    """Fine-tunes a copy of the original model; returns it at the chosen epoch, that epoch, and the
    per-epoch history (learning rate, training and validation accuracy). `each_epoch(model, epoch, training accuracy)`
    is called after every epoch (bench/retrain_epochs_study.py measures each on the way). The copy trains
    in `layout` (None: training_layout's choice) and is returned in the contiguous layout. Under
    torchrun the copy trains with DistributedDataParallel (every rank ends each epoch with the same
    weights, so each makes the same choice of epoch). Dropout draws its masks per global batch (distributed.BatchDropout), the same for
    one process or N ranks, and BatchNorm takes the global batch's statistics (distributed.BatchNormOverRanks)."""
    s = ctx.settings
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(ctx.model()).to(ctx.device)
    layout = ctx.memo("training layout", lambda: training_layout(model, ctx)) if layout is None else layout
    model.to(memory_format=layout)
    dropouts, norms = distributed.batch_dropout(model), distributed.norms_over_ranks(model)
    optimiser = ctx.task.optimiser(model, s)  # before DDP: a keypoint model freezes layers here
    trained = distributed.data_parallel(model, ctx.device)
    history, best_state, best_score = [], None, -np.inf
    for epoch in tqdm(range(1, s.epochs + 1), desc=desc, unit="epoch", leave=False, disable=distributed.progress_off()):
        rate = epoch_learning_rate(s.learning_rate, epoch, s.epochs, s.lr_schedule)
        set_learning_rate(optimiser, rate)
        train_accuracy = train_epoch(trained, optimiser, data, bag, ctx, generator, dropouts, (seed, epoch), norms,
                                     layout)
        validation = (accuracy_on(model, data.train, data.validation_rows, ctx)
                      if s.epoch_choice == "validation" else float("nan"))
        history.append({"epoch": epoch, "learning_rate": rate, "train_accuracy": 100 * train_accuracy,
                        "validation_accuracy": 100 * validation})
        if each_epoch is not None:
            each_epoch(model, epoch, train_accuracy)
        score = {"validation": validation, "training": train_accuracy, "last": epoch}[s.epoch_choice]
        if score >= best_score:  # ties go to the later epoch: it has trained on the new images longer
            best_score, best_epoch = score, epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.to(memory_format=CONTIGUOUS).eval(), best_epoch, history


def save_model(model: nn.Module, ctx: RunContext, mode: str, run: int, accuracy: float) -> Path:
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
# The files, and their one reader
# --------------------------------------------------------------------------------------------

FOLDER = "Retrain"
TABLES = ("runs", "rcc", "scenarios", "epochs")


def retrain_dir(paths: CasePaths) -> Path:
    return paths.t_dir / FOLDER


def table_path(paths: CasePaths, mode: str, table: str) -> Path:
    return retrain_dir(paths) / f"{mode}_{table}.csv"


def read_tables(paths: CasePaths, mode: str) -> dict[str, pd.DataFrame]:
    """A mode's tables (runs, rcc, scenarios, epochs) as far as they exist; {} when it has not run."""
    return {name: read_csv(table_path(paths, mode, name)) for name in TABLES
            if table_path(paths, mode, name).is_file()}


def modes_run(paths: CasePaths) -> list[str]:
    return [mode for mode in MODES if table_path(paths, mode, "runs").is_file()]


# --------------------------------------------------------------------------------------------
# The step, once per mode
# --------------------------------------------------------------------------------------------

@dataclass
class UnsafeInputs:
    layer: str
    rcc_errors: pd.DataFrame     # error images of the RCCs with two or more images (image, rcc)
    rccs: list[str]
    assigned: np.ndarray         # per improvement image: index of its RCC in the unsafe set, -1 for none
    distances: np.ndarray        # (improvement images, rccs) nearest-member distances
    quota: np.ndarray            # per RCC labelling quota
    wrong: np.ndarray            # improvement images the original model misclassifies (False where unlabelled)
    uncertainty: np.ndarray      # per improvement image: 1 - softmax margin, or the keypoint proxy (BL3)
    labelled: np.ndarray         # per improvement image: has a label (all of them, unless labels come from a file)


def improvement_for_training(ctx: RunContext) -> tuple[ImageSet, np.ndarray]:
    """The improvement set with its labels, and which images have one: every image of a labelled set;
    for an unlabelled set, those DataSets/ImprovementLabels.csv labels (none without the file)."""
    def load() -> tuple[ImageSet, np.ndarray]:
        improve = ctx.sets()["improve"]
        if improve.labelled:
            if ctx.paths.improvement_labels.is_file():
                log.warning("%s: not read, the improvement set is labelled by its class folders",
                            ctx.paths.improvement_labels, extra=SAME_ON_EVERY_RANK)
            return improve, np.ones(len(improve), dtype=bool)
        refuse_labels_as_workbook(ctx.paths.improvement_labels)
        if ctx.paths.improvement_labels.is_file():
            labelled_part = with_partial_labels(improve, ctx.paths.improvement_labels, ctx.task, ctx.paths.root,
                                                ctx.left_out.get("improve", []))
            problem = ctx.task.check_targets(labelled_part[0], resolve_input_size(ctx.settings),
                                             ctx.paths.improvement_labels)
            if problem:
                raise HuddError(problem)
            return labelled_part
        return improve, np.zeros(len(improve), dtype=bool)
    return ctx.memo("improvement labels", load)


def misclassified(ctx: RunContext, results: pd.DataFrame, improve: ImageSet, labelled: np.ndarray) -> np.ndarray:
    """Which improvement images the original model gets wrong: the test step's `result` for a labelled
    set; for labels from a file, the stored outputs against them (False where there is no label)."""
    if "result" in results.columns:
        return results["result"].eq("Wrong").to_numpy()
    rows = np.flatnonzero(labelled)
    wrong = np.zeros(len(improve), dtype=bool)
    if len(rows):
        outputs = ctx.task.rows_of_results(results.iloc[rows], ctx.classes)
        targets = None if improve.targets is None else improve.targets[rows]
        measures = ctx.task.measures(outputs, [improve.labels[i] for i in rows], targets,
                                     list(results["image"].iloc[rows]), ctx.classes)
        wrong[rows] = ~measures.correct.to_numpy()
    return wrong


def unsafe_inputs(ctx: RunContext) -> UnsafeInputs:
    """What the assignment step left: the unsafe set, the distances of the improvement images to the
    RCCs, the RCC sizes, and which improvement images the original model gets wrong."""
    improve, labelled = improvement_for_training(ctx)
    clusters = assignModule.selected_clusters(ctx)
    distances = assignModule.read_rcc_distances(ctx.paths)
    expected = [ctx.paths.relative(p) for p in improve.paths]
    if list(distances["image"]) != expected or list(distances.columns[1:]) != list(clusters.eligible):
        raise HuddError(f"{assignModule.unsafe_dir(ctx.paths)}: does not match the improvement set and RCCs; "
                        "rerun with --force")
    unsafe = assignModule.read_assignments(ctx.paths).set_index("image")["rcc"].reindex(expected)
    assigned = np.array([clusters.eligible.index(r) if isinstance(r, str) else -1 for r in unsafe])
    results = testModule.read_results(ctx.paths, "improve").set_index("image").reindex(expected)
    return UnsafeInputs(layer=clusters.layer, rccs=list(clusters.eligible), assigned=assigned,
                        rcc_errors=clusters.member_errors,
                        distances=distances[clusters.eligible].to_numpy(),
                        quota=assignModule.rcc_quotas(ctx.settings, clusters.sizes),
                        wrong=misclassified(ctx, results.reset_index(), improve, labelled), labelled=labelled,
                        uncertainty=assignModule.read_uncertainty(ctx.paths).set_index("image")["uncertainty"]
                        .reindex(expected).to_numpy())


def label_list_path(paths: CasePaths, mode: str) -> Path:
    return retrain_dir(paths) / f"{mode}_to_label.csv"


def update_label_list(ctx: RunContext, mode: str, selections: list[Selection],
                      unsafe: UnsafeInputs) -> tuple[int, int]:
    """(images the mode's runs train on, how many of them have no label). Where some have none, their list is
    written to T/Retrain/<mode>_to_label.csv (the rows to fill and add to DataSets/ImprovementLabels.csv);
    once they all have one, that list is removed."""
    template = label_list_path(ctx.paths, mode)
    chosen = np.unique(np.concatenate([s.chosen for s in selections]))
    missing = chosen[~unsafe.labelled[chosen]]
    if not distributed.is_main():  # every rank of a torchrun job decides alike; one writes the list
        return len(chosen), len(missing)
    if not len(missing):
        template.unlink(missing_ok=True)
    else:
        images = np.asarray(testModule.read_results(ctx.paths, "improve")["image"], dtype=object)
        rccs = [unsafe.rccs[a] if a >= 0 else "" for a in unsafe.assigned[missing]]
        write_label_template(template, list(images[missing]), rccs, ctx.task, ctx.classes)
    return len(chosen), len(missing)


def refuse_labels_as_workbook(label_file: Path) -> None:
    """A spreadsheet's "Save As" offers its own format first: labels saved as ImprovementLabels.xlsx
    beside a missing ImprovementLabels.csv would otherwise read as no labels at all."""
    if label_file.is_file():
        return
    workbooks = sorted(p for p in label_file.parent.glob(f"{label_file.stem}.*")
                       if p.suffix.lower() in (".xlsx", ".xls", ".ods", ".numbers"))
    if workbooks:
        raise HuddError(f"{workbooks[0]}: HUDD reads the improvement labels from {label_file.name}; in the "
                        f"spreadsheet, save them as CSV (UTF-8) under that name")


def check_labels_of_modes(ctx: RunContext, modes: list[str]) -> None:
    """Before the first mode retrains: every image that each mode asked for would train on has a label.
    A run that cannot finish then stops before its first model, not after the modes before the one
    that lacks labels have trained; and every mode's list is written at once, so that one round of
    labelling serves them all (each mode's step checks its own again as it computes). Where some have none,
    their lists are written (update_label_list) and the run stops with what to do."""
    if ctx.sets()["improve"].labelled:
        return
    unsafe = step_unsafe_inputs(ctx)
    if "BL1" in modes:
        refuse_bl1_without_labels(ctx, unsafe)
    short = []
    for mode in modes:
        selections = mode_selections(ctx, mode)
        chosen, missing = update_label_list(ctx, mode, selections, unsafe)
        if missing:
            short.append((mode, len(selections), chosen, missing))
    if short:
        ready = [mode for mode in modes if mode not in {entry[0] for entry in short}]
        raise labels_missing(ctx, short, ready)


def labels_missing(ctx: RunContext, short: list[tuple[str, int, int, int]], ready: list[str] = ()) -> HuddError:
    """The error for modes whose images lack labels, `short`: (mode, runs, images it trains on, how many
    of them have no label) each; `ready`: the modes asked for whose images all have one."""
    label_file = ctx.paths.improvement_labels
    where = ("add the filled rows to" if label_file.is_file() else "save it as" if len(short) == 1
             else "save their filled rows as")
    if len(short) == 1:
        mode, runs, chosen, missing = short[0]
        who = f"{mode}'s {runs} runs train" if runs > 1 else f"{mode} trains"
        what = f"{who} on {chosen} improvement images and {missing} of them have no label"
    else:
        what = (f"{in_words([entry[0] for entry in short])} train on improvement images without a label ("
                + ", ".join(f"{mode}: {missing} of {chosen}" for mode, _runs, chosen, missing in short) + ")")
    lists = in_words([ctx.paths.relative(label_list_path(ctx.paths, entry[0])) for entry in short])
    alone = (f"; nothing was retrained (the images of {in_words(ready)} have their labels: -mode "
             f"{' '.join(ready)} runs now)" if ready else "")
    return HuddError(f"{what}: in {ctx.paths.root}, fill the label columns of {lists} and {where} "
                     f"{ctx.paths.relative(label_file)}, then run again (or label the whole improvement set: "
                     f"{ctx.task.labelling_hint}){alone}")


def in_words(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 2 else items)


def refresh_label_lists(ctx: RunContext, but: str) -> None:
    """The other modes' lists of images to label, left by a run that stopped, brought up to date with the
    current labels and unsafe set (as the current settings would train): removed once every image they
    would train on has a label, so that no list asks for labels that are already given. Reads the unsafe
    set only where such a list exists (every retraining run, reused or not, comes here)."""
    stale = [mode for mode in MODES if mode != but and label_list_path(ctx.paths, mode).is_file()]
    if not stale:
        return
    unsafe = step_unsafe_inputs(ctx)
    for mode in stale:
        update_label_list(ctx, mode, mode_selections(ctx, mode), unsafe)


def step_unsafe_inputs(ctx: RunContext) -> UnsafeInputs:
    """unsafe_inputs, read once per run for the assignment step's recorded outputs (the retraining
    fingerprint of an unlabelled set and each mode's computation share it)."""
    return ctx.memo(f"unsafe inputs {assignModule.STEP.recorded_fingerprint(ctx)}", lambda: unsafe_inputs(ctx))


def training_labels_digest(ctx: RunContext, mode: str) -> str:
    """Fingerprint of the labels from DataSets/ImprovementLabels.csv that the mode's runs train on: a
    change of the file's format, or of rows for other images, retrains nothing."""
    improve, labelled = improvement_for_training(ctx)
    if mode == "BL1" and not labelled.all():   # refused by its compute; its pool would be the few labelled failures
        return "incomplete"
    digest = hashlib.sha256()
    for selection in mode_selections(ctx, mode):
        for image in selection.chosen:
            digest.update(f"{image}|{improve.labels[image] if labelled[image] else ''}|".encode())
            if improve.targets is not None and labelled[image]:
                digest.update(np.ascontiguousarray(improve.targets[image]).tobytes())
    return digest.hexdigest()


def refuse_bl1_without_labels(ctx: RunContext, unsafe: UnsafeInputs) -> None:
    """BL1 draws from the improvement images the model gets wrong: finding them takes every label."""
    if not unsafe.labelled.all():
        raise HuddError(f"BL1 draws from the improvement images the model gets wrong, so it needs every improvement "
                        f"image labelled ({int(unsafe.labelled.sum())} of {len(unsafe.labelled)} have a label): add "
                        f"the rest to {ctx.paths.relative(ctx.paths.improvement_labels)} or label the whole set "
                        f"({ctx.task.labelling_hint}); or run -mode HUDD, BL2 or BL3, which need labels only for the "
                        "images they choose")


def training_data(ctx: RunContext) -> TrainingData:
    sets = ctx.sets()
    if ctx.settings.epoch_choice == "validation":
        train_rows, validation_rows = split_validation(np.asarray(sets["train"].labels), np.random.default_rng(ctx.seed))
    else:  # no split needed: train on the whole training set
        train_rows, validation_rows = np.arange(len(sets["train"])), np.empty(0, dtype=np.int64)
    improve = improvement_for_training(ctx)[0]
    return TrainingData(train=ImageSource(sets["train"], ctx), improve=ImageSource(improve, ctx),
                        test=ImageSource(sets["test"], ctx), train_rows=train_rows, validation_rows=validation_rows)


def labels_needed(mode: str, labelled: int, improvement_images: int) -> int:
    """Improvement images an engineer must label to run the mode: BL1 must find the misclassified ones
    among all of them; HUDD (its unsafe set), BL2 and BL3 label only the images they choose."""
    return improvement_images if mode == "BL1" else labelled


def mode_selections(ctx: RunContext, mode: str) -> list[Selection]:
    """run_selection of runs 1..runs, drawn once per HUDD run for the recorded unsafe set: the retraining
    fingerprint, the label checks (the preflight's and the step's own) and the training share them."""
    unsafe = step_unsafe_inputs(ctx)
    return ctx.memo(f"selections {mode} {assignModule.STEP.recorded_fingerprint(ctx)}",
                    lambda: [run_selection(ctx, mode, run, unsafe) for run in range(1, ctx.settings.runs + 1)])


def run_selection(ctx: RunContext, mode: str, run: int, unsafe: UnsafeInputs) -> Selection:
    """The images one seeded run labels and trains on (label-free: `wrong` is read by BL1 alone)."""
    return select(mode, unsafe.assigned, unsafe.distances, unsafe.quota, unsafe.wrong,
                  np.random.default_rng([ctx.seed, run]), unsafe.uncertainty, hudd_bag=ctx.settings.hudd_bag)


def retrain_once(ctx: RunContext, mode: str, run: int, unsafe: UnsafeInputs, data: TrainingData,
                 selection: Selection) -> dict | None:
    """One seeded run: fine-tune on the selection, measure on the test set, save the model. Returns the
    run's row and its per-RCC, per-scenario and per-epoch figures (None on the other ranks of a torchrun job)."""
    runs = ctx.settings.runs
    model, epoch, history = fine_tune(ctx, data, selection.bag, seed=ctx.seed * 1000 + run,
                                      desc=f"retraining {mode} run {run}/{runs}")
    # Under torchrun every rank trained (DDP, the same weights after each step); rank 0 alone measures
    # and saves the model, the others wait.
    return distributed.on_main(lambda: measured_run(ctx, mode, run, model, selection, epoch, history, unsafe, data))


def measured_run(ctx: RunContext, mode: str, run: int, model: nn.Module, selection: Selection, epoch: int,
                 history: list[dict], unsafe: UnsafeInputs, data: TrainingData) -> dict:
    """A retrained model measured on the test set and saved: its row of <mode>_runs.csv, its errors
    fixed per RCC, its accuracy per scenario and its epochs."""
    measures = evaluation.measures_from_outputs(cached_test_outputs(model, data.test, ctx), ctx)
    improved, worsened = evaluation.improved_worsened(measures, ctx)
    path = save_model(model, ctx, mode, run, measures.accuracy)
    row = {"run": run, "accuracy": measures.accuracy, "improved": improved, "worsened": worsened,
           "epoch": epoch, "labelled": len(selection.chosen),
           "labels_needed": labels_needed(mode, len(selection.chosen), len(unsafe.wrong)), "bag": len(selection.bag),
           "labelled_misclassified": int(unsafe.wrong[selection.chosen].sum()), "model": ctx.paths.relative(path),
           **({} if measures.mean_error is None else {"mean_error": float(measures.mean_error.mean())})}
    return {"row": row, "fixed": evaluation.fixed_per_rcc(measures, unsafe.rcc_errors),
            "scenarios": evaluation.per_scenario(measures, ctx), "history": [{"run": run, **h} for h in history]}


class RetrainStep(Step):
    """Retrains `runs` models with one mode's images (the steps of several modes share the images
    decoded for training)."""

    title = "retraining"
    every_rank = True   # DistributedDataParallel under torchrun

    def __init__(self, mode: str):
        if mode not in MODES:
            raise HuddError(f"-mode {mode!r}: use one of {', '.join(MODES)}")
        self.mode, self.name, self.title = mode, f"retrain-{mode}", f"retraining {mode}"

    def inputs(self, ctx: RunContext) -> dict:
        s = ctx.settings
        own = {"hudd_bag": s.hudd_bag} if self.mode == "HUDD" else {}   # the baselines' bags do not depend on it
        if not ctx.sets()["improve"].labelled:  # labels from a file are read by this step alone
            own["improvement_labels"] = training_labels_digest(ctx, self.mode)
        return {"mode": self.mode, "runs": s.runs, "seed": ctx.seed, **own, **self.basis(ctx),
                "train": image_set_digest(ctx.sets()["train"], ctx.paths.root),
                **{k: getattr(s, k) for k in ("epochs", "batch_size", "learning_rate", "momentum",
                                              "weight_decay", "epoch_choice", "budget_factor")},
                # recorded only when not the original's: runs retrained before the setting existed stay current
                **({"lr_schedule": s.lr_schedule} if s.lr_schedule != "constant" else {})}

    def basis(self, ctx: RunContext) -> dict:
        return retraining_basis(ctx)

    def after(self, ctx: RunContext) -> None:
        refresh_label_lists(ctx, but=self.mode)

    def outputs(self, ctx: RunContext) -> list[Path]:
        return [table_path(ctx.paths, self.mode, "runs")]

    def compute(self, ctx: RunContext) -> None:
        check_labels_of_modes(ctx, [self.mode])
        unsafe = step_unsafe_inputs(ctx)
        selections = dict(enumerate(mode_selections(ctx, self.mode), start=1))
        data = ctx.memo("retraining data", lambda: training_data(ctx))
        done = [retrain_once(ctx, self.mode, run, unsafe, data, selection) for run, selection in selections.items()]
        if distributed.is_main():  # under torchrun every rank trained; rank 0 writes
            write_tables(ctx, self.mode, done, unsafe)

    def summary(self, ctx: RunContext) -> dict:
        tables = read_tables(ctx.paths, self.mode)
        runs = tables["runs"]
        return {"mode": self.mode, "runs": len(runs), "labelled": int(runs["labelled"].iloc[0]),
                "bag": int(runs["bag"].iloc[0]), "accuracy": runs["accuracy"].agg(["mean", "min", "max"]).to_dict(),
                "original": testModule.original_test_accuracy(ctx.paths), "improved": runs["improved"].mean(),
                "worsened": runs["worsened"].mean(), "scenarios": tables.get("scenarios"),
                "folder": retrain_dir(ctx.paths)}


def write_tables(ctx: RunContext, mode: str, done: list[dict], unsafe: UnsafeInputs) -> None:
    """<mode>_runs.csv, _rcc.csv, _scenarios.csv (where metadata exists), _epochs.csv, _results.xlsx."""
    runs = pd.DataFrame([d["row"] for d in done])
    per_rcc = pd.DataFrame({f"run{d['row']['run']}": d["fixed"] for d in done}).reindex(unsafe.rccs).fillna(0).astype(int)
    per_rcc.insert(0, "errors", unsafe.rcc_errors["rcc"].value_counts().reindex(unsafe.rccs).to_numpy())
    per_rcc["mean_fixed"] = per_rcc.filter(like="run").mean(axis=1)
    tables = {"runs": runs, "rcc": per_rcc.rename_axis("rcc").reset_index(),
              "epochs": pd.DataFrame([h for d in done for h in d["history"]])}
    per_scenario = pd.DataFrame({f"run{d['row']['run']}": d["scenarios"] for d in done})
    if len(per_scenario):
        per_scenario.insert(0, "original", evaluation.original_per_scenario(ctx).reindex(per_scenario.index))
        per_scenario["mean"] = per_scenario.filter(like="run").mean(axis=1)
        per_scenario["gain"] = per_scenario["mean"] - per_scenario["original"]
        tables["scenarios"] = per_scenario.rename_axis("scenario").reset_index()
    retrain_dir(ctx.paths).mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        write_csv(table, table_path(ctx.paths, mode, name))
    if "scenarios" not in tables and table_path(ctx.paths, mode, "scenarios").exists():
        table_path(ctx.paths, mode, "scenarios").unlink()
    write_workbook(retrain_dir(ctx.paths) / f"{mode}_results.xlsx", tables)
    write_comparison(ctx.paths, current_modes(ctx, computing=mode))


def write_workbook(path: Path, tables: dict[str, pd.DataFrame]) -> None:
    """The tables for people, plus mean/min/max over the runs."""
    stats = tables["runs"][["accuracy", "improved", "worsened", "labels_needed"]].agg(["mean", "min", "max"])
    with atomic_path(path) as temporary:
        with pd.ExcelWriter(temporary, engine="openpyxl") as book:
            tables["runs"].to_excel(book, sheet_name="runs", index=False)
            stats.to_excel(book, sheet_name="summary")
            tables["rcc"].to_excel(book, sheet_name="errors fixed per RCC", index=False)
            if "scenarios" in tables:
                tables["scenarios"].to_excel(book, sheet_name="accuracy per scenario", index=False)
            tables["epochs"].to_excel(book, sheet_name="epochs", index=False)


# --------------------------------------------------------------------------------------------
# The modes side by side: labelling cost and statistics
# --------------------------------------------------------------------------------------------

COMPARISON = "comparison"
# Below two runs on either side, Mann-Whitney's p is 1 whatever the accuracies and A12 is 0, 0.5 or 1:
# one comparison of two numbers, printed as if it were a statistic. The table leaves them empty then.
STATISTICS_MIN_RUNS = 2


def retraining_basis(ctx: RunContext) -> dict:
    """What every mode's tables rest on: the unsafe set it chose from and the test set it was measured on."""
    return {"assign": assignModule.STEP.recorded_fingerprint(ctx),
            "test": image_set_digest(ctx.sets()["test"], ctx.paths.root)}


def current_modes(ctx: RunContext, computing: str | None = None) -> list[str]:
    """The modes whose tables on disk rest on the current unsafe set and test set (their recorded basis;
    a pipeline that stopped early forgot them), and the mode `computing` now. Tables of an earlier unsafe
    set or test set are an earlier run's: left out until the mode runs again."""
    basis = retraining_basis(ctx)   # every mode's: stats every test image once, not once per mode
    entries = {mode: ctx.manifest.entries.get(RetrainStep(mode).name) for mode in modes_run(ctx.paths)}
    return [mode for mode, entry in entries.items()
            if mode == computing or (entry is not None and entry.get("basis", {}) in ({}, basis))]


def comparison(paths: CasePaths, modes: list[str] | None = None) -> pd.DataFrame | None:
    """One row per mode that has run (of `modes`, default every mode on disk): runs, labelled (the
    budget), labels_needed, training samples, accuracy mean/min/max, gain over the original model, gain
    per 100 labels needed, improved and worsened, and against HUDD's runs the two-sided Mann-Whitney U p-value and Vargha-Delaney A12
    (the probability that a HUDD run beats a run of that mode; NaN unless both have STATISTICS_MIN_RUNS runs).
    None before any mode ran."""
    modes = modes_run(paths) if modes is None else modes
    if not modes:
        return None
    original = testModule.original_test_accuracy(paths)
    runs = {mode: read_csv(table_path(paths, mode, "runs")) for mode in modes}
    improvement_images = len(testModule.read_results(paths, "improve"))
    rows = []
    for mode, table in runs.items():
        labelled = int(table["labelled"].iloc[0])
        needed = int(table["labels_needed"].iloc[0]) if "labels_needed" in table else \
            labels_needed(mode, labelled, improvement_images)   # tables written before the column existed
        gain = table["accuracy"].mean() - original
        row = {"mode": mode, "runs": len(table), "labelled": labelled, "labels_needed": needed,
               "bag": int(table["bag"].iloc[0]), "accuracy": table["accuracy"].mean(),
               "accuracy_min": table["accuracy"].min(), "accuracy_max": table["accuracy"].max(), "gain": gain,
               "gain_per_100_labels": 100.0 * gain / max(needed, 1), "improved": table["improved"].mean(),
               "worsened": table["worsened"].mean(), "p_value_vs_HUDD": float("nan"), "a12_HUDD": float("nan")}
        if mode != "HUDD" and "HUDD" in runs and min(len(runs["HUDD"]), len(table)) >= STATISTICS_MIN_RUNS:
            row["p_value_vs_HUDD"] = evaluation.mann_whitney_p(runs["HUDD"]["accuracy"], table["accuracy"])
            row["a12_HUDD"] = evaluation.vargha_delaney_a12(runs["HUDD"]["accuracy"], table["accuracy"])
        rows.append(row)
    return pd.DataFrame(rows)


def few_runs_note(table: pd.DataFrame) -> str:
    """Where HUDD and every other mode have enough runs for p and A12 but too few for any p below 5% (3 runs
    against 3: 0.1 at best), the sentence that says so; "" otherwise. The printed comparison and the report
    both show it."""
    others = table[table["mode"] != "HUDD"]
    if "HUDD" not in set(table["mode"]) or not len(others) or others["a12_HUDD"].isna().any():
        return ""
    hudd = int(table.loc[table["mode"] == "HUDD", "runs"].iloc[0])
    smallest = min(evaluation.smallest_mann_whitney_p(hudd, int(runs)) for runs in others["runs"])
    return (f"with these runs no p can fall below {smallest:.3f}, whatever the accuracies: give --runs 5 or more "
            "for a test at 5%") if smallest > 0.05 else ""


def read_comparison(paths: CasePaths) -> pd.DataFrame | None:
    """comparison.csv as the step wrote it after its last mode (computed from the runs tables of a case
    retrained before the file existed); None before any mode ran."""
    path = retrain_dir(paths) / f"{COMPARISON}.csv"
    return read_csv(path) if path.is_file() else comparison(paths)


def write_comparison(paths: CasePaths, modes: list[str]) -> None:
    """T/Retrain/comparison.csv and comparison.xlsx, from the runs tables of `modes`."""
    table = comparison(paths, modes)
    if table is None:
        return
    write_csv(table, retrain_dir(paths) / f"{COMPARISON}.csv")
    with atomic_path(retrain_dir(paths) / f"{COMPARISON}.xlsx") as temporary:
        with pd.ExcelWriter(temporary, engine="openpyxl") as book:
            table.to_excel(book, sheet_name="comparison", index=False)
