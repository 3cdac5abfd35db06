"""What the demo case studies share: the description a demo gives of itself (`DemoCase`), the planner,
the drawing pool, staging into DataSets/, the one training loop and the quality check of the trained
model.

A demo module (signs.py, faces.py) says only what is its own: how one image's parameters are drawn,
how an image is rendered, its extra tables, its case settings, its network and loss, and the quality
its original model must reach. Everything else is here, once.
"""
from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd

from Helper import SET_FOLDERS, CasePaths, HuddError, atomic_path, staged_datasets, write_settings_if_absent

log = logging.getLogger("hudd")

MODEL_NAME = "OriginalModel.pth"
SET_IDS = {"train": 1, "test": 2, "improve": 3}   # part of every generator's seed: never renumber
POOL_MIN_IMAGES = 300     # smaller builds are drawn in this process (a pool costs more than it saves)
CHUNK = 100               # images per drawing job

Record = dict[str, Any]   # one image's parameters: a row of its set's metadata.csv


@dataclass(frozen=True)
class Recipe:
    """How a demo's original model is trained by `fit`: Adam under a one-cycle learning rate, batches
    in a seeded random order, no augmentation (so the rare conditions stay rare).

    `new_model` builds the untrained network (called right after seeding, so its initialisation is
    seeded too); `batch_loss(model, x, targets)` gets x on the training device and the targets as
    `load_training_set` gives them (on the CPU). Training on, when the quality check finds the
    model under-trained, adds `more_epochs` at a time, `max_more_epochs` at most."""

    epochs: int
    batch: int
    max_lr: float
    pct_start: float
    new_model: Callable[[], Any]
    batch_loss: Callable[[Any, Any, Any], Any]
    more_epochs: int
    max_more_epochs: int


@dataclass(frozen=True)
class QualityBar:
    """What the demo claims of its original model, on its test set: at least `ordinary` percent of
    the ordinary (`none`) images correct, and every rare condition at least `gap` points below that.

    Both demos use 95 and 25. Their intended models (seeds 0-2, trained with 1 and with 2 threads)
    get 99.3-100% of ordinary images right and every rare condition at least 35 points below, so
    the bar leaves room for other machines, while an under-trained model (the keypoint demo's
    broken one: 15%) fails it plainly. 25 points on 64-105 test images per condition is at least
    16 more failures than an ordinary image's rate would give, enough for a cluster of their own,
    and about four standard deviations of a condition's measured accuracy."""

    ordinary: float
    gap: float


@dataclass(frozen=True)
class DemoCase:
    """Everything that makes one demo case study what it is (see signs.py and faces.py)."""

    name: str                                   # in messages: "traffic-sign demo", "keypoint demo"
    rare_scenarios: tuple[str, ...]
    default_sizes: dict[str, int]
    rare_share: dict[str, float]                # share of a set taken by EACH rare condition
    min_set_size: int
    metadata_columns: tuple[str, ...]
    # (generator, index, scenario, drawn class, label) -> the image's record
    image_params: Callable[[np.random.Generator, int, str, str | None, str | None], Record]
    render: Callable[[Record], Any]             # a PIL image; module-level, so a pool can pickle it
    settings: dict[str, Any]                    # the case's hudd.json
    recipe: Recipe
    quality: QualityBar
    classes: tuple[str, ...] | None = None      # class folders, balanced in every set; None: no classes
    extra_tables: Callable[[list[Record]], dict[str, pd.DataFrame]] = field(default=lambda records: {})
    # A shortcut the training set teaches: scenario -> class. Its training images are labelled that
    # class whatever they show; its test and improvement images never show that class.
    tied: dict[str, str] = field(default_factory=dict)

    @property
    def scenarios(self) -> tuple[str, ...]:
        return ("none",) + self.rare_scenarios

    def rare_count(self, set_size: int, set_key: str) -> int:
        """How many images of a set of `set_size` images carry each rare condition."""
        return int(math.floor(self.rare_share[set_key] * set_size + 0.5))


# --------------------------------------------------------------------------------------------
# The plan: every image's parameters, computed without drawing
# --------------------------------------------------------------------------------------------

def check_seed(seed: int, what: str = "demo") -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise HuddError(f"{what} seed {seed!r} must be a whole number >= 0")
    return int(seed)


def resolve_sizes(demo: DemoCase, sizes: dict[str, int] | None) -> dict[str, int]:
    """The demo's default set sizes with the caller's overrides, each checked."""
    resolved = dict(demo.default_sizes)
    for key, value in (sizes or {}).items():
        if key not in demo.default_sizes:
            raise HuddError(f"{demo.name} sizes: unknown set {key!r}; use {', '.join(demo.default_sizes)}")
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < demo.min_set_size:
            raise HuddError(f"{demo.name} sizes: {key}={value!r} must be a whole number of at least "
                            f"{demo.min_set_size}")
        resolved[key] = int(value)
    return resolved


def plan_case(demo: DemoCase, seed: int, sizes: dict[str, int] | None) -> dict[str, list[Record]]:
    """The parameters of every image of every set, keyed by set. Per set, a generator seeded by
    (seed, set) deals the classes (a shuffled round robin, when the demo has classes) and then the
    scenarios (exactly `rare_count` images per rare condition, at random positions); each image's own
    parameters come from a generator seeded by (seed, set, index), so an image does not depend on
    the set's size or on any other image."""
    seed = check_seed(seed, demo.name)
    plan = {}
    for set_key, n in resolve_sizes(demo, sizes).items():
        set_rng = np.random.default_rng([seed, SET_IDS[set_key]])
        classes = ([demo.classes[c] for c in set_rng.permutation(np.arange(n) % len(demo.classes))]
                   if demo.classes else [None] * n)
        scenarios = [s for s in demo.rare_scenarios for _ in range(demo.rare_count(n, set_key))]
        if len(scenarios) > n:
            raise HuddError(f"{demo.name} sizes: {set_key}={n} is too small for its rare conditions")
        scenarios += ["none"] * (n - len(scenarios))
        scenarios = [scenarios[i] for i in set_rng.permutation(n)]
        labels = tie_scenarios(demo, set_key, scenarios, classes, set_rng)
        plan[set_key] = [demo.image_params(np.random.default_rng([seed, SET_IDS[set_key], index]), index,
                                           scenarios[index], classes[index], labels[index]) for index in range(n)]
    return plan


def tie_scenarios(demo: DemoCase, set_key: str, scenarios: list[str], classes: list, rng: np.random.Generator
                  ) -> list:
    """Applies the demo's shortcuts (`tied`): in the training set an image with a tied scenario is
    labelled the tied class; elsewhere a tied scenario dealt to an image of the tied class trades
    places with an ordinary image of another class. Returns every image's label (class folder)."""
    labels = list(classes)
    for scenario, target in demo.tied.items():
        for i in [i for i, s in enumerate(scenarios) if s == scenario]:
            if set_key == "train":
                labels[i] = target
            elif classes[i] == target:
                free = [j for j, s in enumerate(scenarios) if s == "none" and classes[j] != target]
                j = free[int(rng.integers(len(free)))]
                scenarios[i], scenarios[j] = scenarios[j], scenarios[i]
    return labels


# --------------------------------------------------------------------------------------------
# Writing the case study
# --------------------------------------------------------------------------------------------

def build_case(demo: DemoCase, case_dir: Path, seed: int, sizes: dict[str, int] | None,
               workers: int | None) -> dict[str, Any]:
    """Writes a demo case study into `case_dir`: every set's folders, metadata.csv and the demo's
    extra tables, then its images, all into a staging folder that becomes DataSets/ when complete;
    then hudd.json (unless the user has one). Refuses a DataSets folder that is not empty. `workers`:
    drawing processes (default: the CPUs this process may use). Returns seed, sizes, images per set
    and scenario, seconds (and the classes, where the demo has them)."""
    paths = CasePaths(Path(case_dir))
    refuse_filled_datasets(paths, demo.name)
    plan = plan_case(demo, seed, sizes)
    workers = default_workers() if workers is None else max(1, int(workers))
    started = time.perf_counter()
    with staged_datasets(paths) as staging:
        jobs = []
        for set_key, records in plan.items():
            set_dir = staging / SET_FOLDERS[set_key]
            write_set_tables(demo, set_dir, records)
            jobs += [(demo.render, str(set_dir), records[i:i + CHUNK]) for i in range(0, len(records), CHUNK)]
        draw_all(jobs, workers)
    write_settings_if_absent(paths, demo.settings)
    seconds = time.perf_counter() - started
    log.info("%s: %d images drawn in %.1f s into %s", demo.name, sum(map(len, plan.values())), seconds,
             paths.datasets)
    summary = {"case_dir": str(paths.root), "seed": int(seed), "sizes": {k: len(v) for k, v in plan.items()},
               "counts": {k: scenario_counts(demo, v) for k, v in plan.items()}, "seconds": round(seconds, 1)}
    if demo.classes:
        summary["classes"] = list(demo.classes)
    return summary


def scenario_counts(demo: DemoCase, records: list[Record]) -> dict[str, int]:
    counted = Counter(p["scenario"] for p in records)
    return {s: counted.get(s, 0) for s in demo.scenarios}


def write_set_tables(demo: DemoCase, set_dir: Path, records: list[Record]) -> None:
    """A set's folders (class folders where images sit in them), metadata.csv and extra tables; the
    images are drawn into them afterwards."""
    set_dir.mkdir(parents=True)
    for folder in sorted({(set_dir / p["image"]).parent for p in records}):
        folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records, columns=list(demo.metadata_columns)).to_csv(set_dir / "metadata.csv", index=False)
    for name, table in demo.extra_tables(records).items():
        table.to_csv(set_dir / name, index=False)


def refuse_filled_datasets(paths: CasePaths, what: str) -> None:
    """A demo is built only into a new or empty DataSets folder: never over a user's images."""
    if paths.datasets.exists() and (not paths.datasets.is_dir() or any(paths.datasets.iterdir())):
        raise HuddError(f"{paths.datasets}: already exists and is not empty; the {what} is built only into a new or "
                        "empty folder (choose another folder or remove this one)")


def default_workers() -> int:
    """The CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def draw_chunk(job: tuple[Callable[[Record], Any], str, list[Record]]) -> int:
    """Draws one job's images: render(record) saved as PNG under the set folder."""
    render, set_dir, records = job
    for p in records:
        render(p).save(Path(set_dir) / p["image"], format="PNG")
    return len(records)


def draw_all(jobs: list, workers: int) -> None:
    """Runs every drawing job: here for small builds or one worker, else in a process pool (fork
    where available, so the drawing module is not imported again per process). An image depends only
    on its record, so the files are the same either way."""
    total = sum(len(records) for _render, _set_dir, records in jobs)
    if workers == 1 or total < POOL_MIN_IMAGES:
        for job in jobs:
            draw_chunk(job)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for _ in pool.map(draw_chunk, jobs):
            pass


# --------------------------------------------------------------------------------------------
# Training the original model
# --------------------------------------------------------------------------------------------

def fit(recipe: Recipe, data: tuple[Any, Any], model, seed: int, device, epochs: int, desc: str) -> list[float]:
    """The one training loop. Trains `model` in place for `epochs` on the in-memory `data`; the batch
    order comes from its own generator seeded with `seed`, so it does not depend on how much of the
    global random stream the model's initialisation used. Returns the mean loss of every epoch."""
    import torch
    from tqdm import tqdm

    inputs, targets = data
    optimiser = torch.optim.Adam(model.parameters(), lr=recipe.max_lr)
    steps_per_epoch = math.ceil(len(inputs) / recipe.batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe.max_lr, epochs=epochs,
                                                    steps_per_epoch=steps_per_epoch, pct_start=recipe.pct_start)
    order_rng = torch.Generator().manual_seed(seed)
    losses = []
    with tqdm(total=epochs * steps_per_epoch, desc=desc, unit="batch", disable=None) as bar:
        for epoch in range(epochs):
            model.train()
            order = torch.randperm(len(inputs), generator=order_rng)
            loss_sum = 0.0
            for start in range(0, len(order), recipe.batch):
                batch = order[start:start + recipe.batch]
                optimiser.zero_grad()
                loss = recipe.batch_loss(model, inputs[batch].to(device), targets[batch])
                loss.backward()
                optimiser.step()
                scheduler.step()
                loss_sum += loss.item() * len(batch)
                bar.update(1)
            losses.append(loss_sum / len(order))
            bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
            log.debug("%s: epoch %d, loss %.4f", desc, epoch + 1, losses[-1])
    model.eval()
    return losses


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Sets torch's CPU threads for a block (yielding the number in use) and restores the caller's
    setting afterwards. None keeps torch's own setting (its default, OMP_NUM_THREADS or the caller's)."""
    import torch
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def run_context(paths: CasePaths, device):
    """The pipeline's view of the case (its settings, image sets and preprocessing), for reading the
    sets and judging the model exactly as the test step does."""
    from Helper import RunContext, load_settings
    return RunContext(paths=paths, settings=load_settings(paths), model_path=paths.models / MODEL_NAME,
                      device=as_device(device))


def load_training_set(paths: CasePaths):
    """(inputs, targets) of the training set in memory: every image as the case's own preprocessing
    gives it to the pipeline (so the model is trained on what it will be tested on), in the set's
    listing order; targets are class indices, or (N, K, 2) keypoints for a keypoint set."""
    import torch
    from PIL import Image

    from Helper import make_transform
    ctx = run_context(paths, "cpu")
    train_set = ctx.sets()["train"]
    transform, mode = make_transform(ctx.settings), "RGB" if ctx.settings.channels == 3 else "L"
    inputs = []
    for path in train_set.paths:
        with Image.open(path) as image:
            inputs.append(transform(image.convert(mode)))
    if train_set.targets is not None:
        return torch.stack(inputs), torch.as_tensor(train_set.targets, dtype=torch.float32)
    return torch.stack(inputs), torch.tensor(train_set.labels, dtype=torch.long)


def new_trained_model(demo: DemoCase, paths: CasePaths, seed: int, device, epochs: int):
    """(model, training data): the demo's network, seeded and trained for `epochs` by its recipe."""
    from Helper import seed_everything

    if epochs < 1:
        raise HuddError(f"{demo.name} training: epochs={epochs} must be at least 1")
    data = load_training_set(paths)
    seed_everything(seed)
    model = demo.recipe.new_model().to(device)
    started = time.perf_counter()
    fit(demo.recipe, data, model, seed, device, epochs, f"training the {demo.name} model")
    log.info("%s model: %d epochs on %d images in %.1f s", demo.name, epochs, len(data[0]),
             time.perf_counter() - started)
    return model, data


def refuse_existing_model(target: Path) -> None:
    if target.exists():
        raise HuddError(f"{target}: already exists; a demo never overwrites a model (remove it or use another "
                        "case folder)")


def save_model(model, target: Path) -> Path:
    """Saves the state_dict (on the CPU) under `target`, atomically and byte-reproducibly; never over an
    existing file."""
    import torch

    refuse_existing_model(target)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(target) as temporary, open(temporary, "wb") as handle:
        # Saved through a file object, torch names the archive's folder "archive" rather than after the
        # temporary file (which holds the process id), so the same weights give the same bytes.
        torch.save(state, handle)
    return target


def train_original_model(demo: DemoCase, case_dir: Path, seed: int, device, epochs: int | None,
                         threads: int | None) -> Path:
    """Trains the demo's original model for `epochs` (default: its recipe's) and saves it as
    DNNModels/OriginalModel.pth, unchecked (prepare() checks). Never overwrites: HuddError if the
    file exists. `threads`: torch CPU threads while training (None: torch's own setting)."""
    paths = CasePaths(Path(case_dir))
    target = paths.models / MODEL_NAME
    refuse_existing_model(target)   # before any training
    epochs = demo.recipe.epochs if epochs is None else int(epochs)
    with torch_threads(threads):
        model, _data = new_trained_model(demo, paths, seed, as_device(device), epochs)
    return save_model(model, target)


def as_device(device):
    import torch

    from Helper import pick_device
    return pick_device(device) if isinstance(device, str) else torch.device(device)


# --------------------------------------------------------------------------------------------
# Is the original model what the demo claims?
# --------------------------------------------------------------------------------------------

@dataclass
class Quality:
    """The original model's test accuracy per scenario (percent of images correct, as the test step
    judges them) against the demo's bar."""

    bar: QualityBar
    accuracy: dict[str, float]          # scenario -> percent correct, "none" first
    images: dict[str, int]

    @property
    def ordinary(self) -> float:
        return self.accuracy.get("none", 0.0)

    @property
    def under_trained(self) -> bool:
        return self.ordinary < self.bar.ordinary

    def too_close(self) -> list[str]:
        """The rare conditions that are not at least `gap` points below the ordinary images."""
        return [s for s, a in self.accuracy.items() if s != "none" and a > self.ordinary - self.bar.gap]

    @property
    def passes(self) -> bool:
        return not self.under_trained and not self.too_close()

    def figures(self) -> str:
        return ", ".join(f"{s} {a:.1f}%" for s, a in self.accuracy.items())


def measure_quality(demo: DemoCase, paths: CasePaths, device, model=None) -> Quality:
    """Test accuracy per scenario of `model` (default: the case's saved original model), computed by
    the test step's own inference and Correct/Wrong rule; the scenarios are the test set's metadata."""
    import testModule
    from Helper import read_metadata

    ctx = run_context(paths, device)
    rows = testModule.set_results(ctx, "test", model=None if model is None else model.eval())
    metadata = read_metadata(paths.set_dir("test"), paths.root)
    if metadata is None or "scenario" not in metadata.columns:
        raise HuddError(f"{paths.set_dir('test')}: the {demo.name}'s metadata.csv with a scenario per image is "
                        "missing; build the demo into a new folder")
    correct = pd.Series(rows["result"].eq("Correct").to_numpy(), index=metadata["scenario"].reindex(rows["image"]))
    grouped = correct.groupby(level=0)
    present = [s for s in demo.scenarios if s in grouped.groups]
    return Quality(demo.quality, {s: 100.0 * float(grouped.mean()[s]) for s in present},
                   {s: int(grouped.size()[s]) for s in present})


def order_seed(seed: int, round_: int) -> int:
    """The batch-order seed of a round of training on: its own stream, apart from the first run's."""
    return int(np.random.SeedSequence([seed, round_]).generate_state(1)[0])


def train_until_good(demo: DemoCase, paths: CasePaths, seed: int, device, threads: int | None) -> Path:
    """Trains the original model by the demo's recipe and checks it on the test set. While the
    ordinary images miss the bar (the model is under-trained), trains on, `more_epochs` at a time
    (a fresh one-cycle schedule each round), up to `max_more_epochs`. Saves the model only when it
    is what the demo claims; otherwise stops with one HuddError line and saves nothing."""
    recipe, target = demo.recipe, paths.models / MODEL_NAME
    refuse_existing_model(target)
    device = as_device(device)
    with torch_threads(threads) as used:
        model, data = new_trained_model(demo, paths, seed, device, recipe.epochs)
        quality = measure_quality(demo, paths, device, model)
        more = 0
        while quality.under_trained and more < recipe.max_more_epochs:
            step = min(recipe.more_epochs, recipe.max_more_epochs - more)
            log.warning("%s: the original model gets %.1f%% of the ordinary test images right, below the %g%% "
                        "the demo needs; training on for %d more epochs", demo.name, quality.ordinary,
                        demo.quality.ordinary, step)
            more += step
            fit(recipe, data, model, order_seed(seed, more), device, step, f"training the {demo.name} model on")
            quality = measure_quality(demo, paths, device, model)
    trained = f"{recipe.epochs}" + (f"+{more}" if more else "") + f" epochs, {used} thread{'s' * (used != 1)}"
    if not quality.passes:
        raise HuddError(refusal(demo, paths, quality, f"trained {trained}; nothing was saved",
                                "rerun with another --seed (in a new folder to draw new images too), or report "
                                "these figures"))
    log.info("%s: original model trained (%s); test accuracy %s", demo.name, trained, quality.figures())
    return save_model(model, target)


def refusal(demo: DemoCase, paths: CasePaths, quality: Quality, what: str, todo: str) -> str:
    """One line: which case, what the demo needs, what the model got, what to do."""
    if quality.under_trained:
        why = f"{quality.ordinary:.1f}% of the ordinary test images right, below the {quality.bar.ordinary:g}% it needs"
    else:
        why = (f"{', '.join(quality.too_close())} not {quality.bar.gap:g} points below the ordinary images, so they "
               "are no root cause of failure")
    return (f"{paths.root}: the {demo.name}'s original model is not the model the demo claims ({why}; test "
            f"accuracy {quality.figures()}; {what}); {todo}")


def prepare_case(demo: DemoCase, case: Path, seed: int, device, threads: int | None = None) -> None:
    """Makes `case` a ready demo case study: builds it where DataSets/ is missing, trains and checks
    its original model where DNNModels/OriginalModel.pth is missing, and otherwise checks the model
    that is there. Never analyses a model that is not what the demo claims: HuddError instead."""
    paths = CasePaths(Path(case))
    if not paths.datasets.is_dir():
        log.info("building the %s case study in %s (seed %d)", demo.name, paths.root, seed)
        build_case(demo, paths.root, seed, None, None)
    target = paths.models / MODEL_NAME
    if not target.is_file():
        log.info("training the %s's original model", demo.name)
        train_until_good(demo, paths, seed, device, threads)
        return
    quality = measure_quality(demo, paths, device)
    if not quality.passes:
        raise HuddError(refusal(demo, paths, quality, f"{target} was made before",
                                f"remove {target} (and the results made with it) and rerun to train it again, or "
                                "build the demo in a new folder (a case made by an older HUDD keeps its old hudd.json)"))
    log.info("%s: %s checked; test accuracy %s", demo.name, target, quality.figures())
