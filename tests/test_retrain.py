"""retrainModule: budgets and selections, the training data, fine-tuning, saved models, the step's tables."""
from __future__ import annotations

import copy
import logging

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import Helper
from Helper import HuddError
import assignModule
import clusterModule
import heatmapModule
import retrainModule
import testModule
from architectures import DemoNet
from helpers import CLASSES, context, run_step, run_steps


def random_instance(seed: int, images: int = 80, rccs: int = 5):
    rng = np.random.default_rng(seed)
    distances = rng.gamma(2.0, 1.0, size=(images, rccs))
    sizes = rng.integers(2, 9, size=rccs)
    wrong = rng.random(images) < 0.4
    return distances, sizes, wrong


# --------------------------------------------------------------------------------------------
# Budget and selection
# --------------------------------------------------------------------------------------------

def test_budget_is_the_rcc_sizes_rounded_up_times_the_factor():
    np.testing.assert_array_equal(assignModule.quotas([2, 3, 7], 1.0), [2, 3, 7])
    np.testing.assert_array_equal(assignModule.quotas([2, 3, 7], 0.5), [1, 2, 4])
    np.testing.assert_array_equal(assignModule.quotas([10], 0.3), [3])  # 0.3 x 10 is not 3.0000000000000004


def assigned_instance(seed: int):
    """A random instance with its unsafe set: distances, wrong, quota, assigned, uncertainty."""
    distances, sizes, wrong = random_instance(seed)
    quota = assignModule.quotas(sizes, 1.0)
    assigned, _ = assignModule.closest_u(distances, quota)
    return distances, wrong, quota, assigned, np.random.default_rng(seed + 100).random(len(distances))


@pytest.mark.parametrize("seed", range(5))
def test_every_mode_labels_as_many_distinct_images_and_trains_on_as_many_samples(seed):
    distances, wrong, quota, assigned, uncertainty = assigned_instance(seed)
    selections = {mode: retrainModule.select(mode, assigned, distances, quota, wrong, np.random.default_rng(seed),
                                             uncertainty) for mode in retrainModule.MODES}
    hudd = selections["HUDD"]
    assert len(hudd.chosen) == min(quota.sum(), len(distances))
    for mode, selection in selections.items():
        assert len(np.unique(selection.chosen)) == len(selection.chosen) == len(hudd.chosen), mode
        assert len(selection.bag) == len(hudd.bag), mode
        assert set(selection.bag) == set(selection.chosen), mode  # every labelled image is trained on, no other
    assert wrong[selections["BL1"].chosen].all()


def test_hudd_takes_the_closest_images_per_rcc_and_balances_the_bag():
    distances, sizes, wrong = random_instance(7)
    quota = assignModule.quotas(sizes, 1.0)
    assigned, _ = assignModule.closest_u(distances, quota)
    selection = retrainModule.hudd_selection(assigned, distances, quota, np.random.default_rng(0), bag="balanced")
    np.testing.assert_array_equal(selection.chosen, np.flatnonzero(assigned >= 0))
    bag_rcc = assigned[selection.bag]
    counts = np.bincount(bag_rcc, minlength=len(quota))
    assert (counts[counts > 0] == quota.max()).all()  # every RCC brought up to the largest quota


def test_a_uniform_bag_labels_the_same_images_and_weighs_each_alike_whatever_its_rcc():
    distances, sizes, wrong = random_instance(7)
    quota = assignModule.quotas(sizes, 1.0)
    assigned, _ = assignModule.closest_u(distances, quota)
    balanced, uniform = (retrainModule.hudd_selection(assigned, distances, quota, np.random.default_rng(0), bag=bag)
                         for bag in ("balanced", "uniform"))
    np.testing.assert_array_equal(uniform.chosen, balanced.chosen)
    assert len(uniform.bag) == len(balanced.bag) and set(uniform.bag) == set(uniform.chosen)
    # one RCC of one image beside one of 400: balanced gives the lone image half the bag, uniform its share
    lone = {bag: np.bincount(retrainModule.hudd_selection(np.array([0] + [1] * 400), np.ones((401, 2)),
                                                          np.array([1, 400]), np.random.default_rng(0), bag=bag).bag,
                             minlength=401) for bag in ("balanced", "uniform")}
    assert lone["balanced"].sum() == lone["uniform"].sum() == 800 and lone["balanced"][0] == 400
    assert lone["uniform"].min() >= 1 and lone["uniform"][0] < 8   # about 2 of 800


@pytest.mark.parametrize("seed", range(3))
def test_repeating_the_failures_keeps_every_labelled_set_and_repeats_only_labelled_failures(seed):
    distances, wrong, quota, assigned, uncertainty = assigned_instance(seed)
    for mode in retrainModule.MODES:
        plain, focused = (retrainModule.select(mode, assigned, distances, quota, wrong, np.random.default_rng(seed),
                                               uncertainty, repeat_failures=flag) for flag in (False, True))
        np.testing.assert_array_equal(focused.chosen, plain.chosen)   # the same images labelled
        assert len(focused.bag) == len(plain.bag) and set(focused.bag) == set(focused.chosen), mode
        groups = [assigned[focused.chosen] == r for r in range(len(quota))] if mode == "HUDD" else [slice(None)]
        extra = np.bincount(focused.bag, minlength=len(distances)) - np.isin(np.arange(len(distances)), focused.chosen)
        for group in groups:  # per RCC for HUDD: repeats only of its failures, where it has any
            members = focused.chosen[group]
            if wrong[members].any():
                assert extra[members[~wrong[members]]].sum() == 0, mode


def test_closer_images_are_drawn_more_often():
    distances = np.array([[1.0], [3.0]])
    selection = retrainModule.hudd_selection(np.array([0, 0]), distances, np.array([2]), np.random.default_rng(0),
                                             bag="balanced")
    assert sorted(selection.bag) == [0, 1]  # the quota is the largest: nothing to draw
    big = retrainModule.hudd_selection(np.array([0, 0, 1]), np.array([[1.0, 9.0], [3.0, 9.0], [9.0, 0.5]]),
                                       np.array([2, 4000]), np.random.default_rng(0), bag="balanced")
    first_rcc = big.bag[np.isin(big.bag, [0, 1])]
    draws = np.bincount(first_rcc, minlength=2) - 1     # less the one copy of each member
    assert draws.sum() == 4000 - 2
    assert draws[0] / draws[1] == pytest.approx(3.0, rel=0.1)  # weights 1/1 : 1/3


def test_selection_is_deterministic_for_a_seed_and_changes_with_it():
    distances, sizes, wrong = random_instance(3)
    quota = assignModule.quotas(sizes, 1.0)
    assigned, _ = assignModule.closest_u(distances, quota)
    uncertainty = np.random.default_rng(3).random(len(distances))
    for mode in retrainModule.MODES:
        a = retrainModule.select(mode, assigned, distances, quota, wrong, np.random.default_rng([0, 1]), uncertainty)
        b = retrainModule.select(mode, assigned, distances, quota, wrong, np.random.default_rng([0, 1]), uncertainty)
        c = retrainModule.select(mode, assigned, distances, quota, wrong, np.random.default_rng([0, 2]), uncertainty)
        np.testing.assert_array_equal(a.bag, b.bag)
        assert not np.array_equal(a.bag, c.bag), mode


def test_bl1_with_too_few_misclassified_images_takes_them_all_and_warns(caplog):
    distances, sizes, _ = random_instance(4)
    wrong = np.zeros(len(distances), bool)
    wrong[[3, 10, 11]] = True
    quota = assignModule.quotas(sizes, 1.0)
    assigned, _ = assignModule.closest_u(distances, quota)
    with caplog.at_level(logging.WARNING, logger="hudd"):
        selection = retrainModule.select("BL1", assigned, distances, quota, wrong, np.random.default_rng(0))
    np.testing.assert_array_equal(selection.chosen, [3, 10, 11])
    assert "only 3 improvement images" in caplog.text


def test_validation_split_is_stratified_and_disjoint():
    labels = np.repeat([0, 1, 2, 3], [40, 20, 1, 9])
    train, validation = retrainModule.split_validation(labels, np.random.default_rng(0))
    assert not set(train) & set(validation) and len(train) + len(validation) == len(labels)
    np.testing.assert_array_equal(np.bincount(labels[validation], minlength=4), [4, 2, 0, 1])


# --------------------------------------------------------------------------------------------
# Training data, fine-tuning, saving
# --------------------------------------------------------------------------------------------

@pytest.fixture
def pipeline_case(make_case):
    case = make_case(per_class=8)
    ctx = context(case)
    run_steps(ctx, testModule.STEP, heatmapModule.STEP, clusterModule.STEP, assignModule.STEP)
    return case


@pytest.mark.parametrize("cached", [True, False])
def test_an_epoch_passes_over_the_training_rows_and_the_bag_once(pipeline_case, monkeypatch, cached):
    if not cached:
        monkeypatch.setattr(retrainModule, "CACHE_BYTES", 0)
    ctx = context(pipeline_case, epoch_choice="validation")
    data = retrainModule.training_data(ctx)
    assert (data.train.tensor is not None) == cached
    bag = np.array([0, 0, 5, 7, 7, 7])
    seen = [(x, y) for x, y, _size, _part in retrainModule.epoch_batches(data, bag, 5, ctx, torch.Generator().manual_seed(0))]
    inputs = torch.cat([x for x, _ in seen])
    labels = torch.cat([y for _, y in seen])
    loader = retrainModule.ImageSource(ctx.sets()["train"], ctx), retrainModule.ImageSource(ctx.sets()["improve"], ctx)
    expected = torch.cat([next(loader[0].batches(data.train_rows, 10 ** 6))[0], next(loader[1].batches(bag, 10 ** 6))[0]])
    # the same multiset of images: compare sorted per-image sums (exact: same decoding path)
    assert len(inputs) == len(data.train_rows) + len(bag)
    torch.testing.assert_close(inputs.flatten(1).sum(1).sort().values, expected.flatten(1).sum(1).sort().values)
    train_labels = np.asarray(ctx.sets()["train"].labels)[data.train_rows]
    improve_labels = np.asarray(ctx.sets()["improve"].labels)[bag]
    assert sorted(labels.tolist()) == sorted(np.concatenate([train_labels, improve_labels]).tolist())


def test_a_last_batch_of_one_sample_joins_the_one_before_so_that_batch_norm_can_train(pipeline_case):
    """A batch norm after a linear layer cannot train on one sample ("Expected more than 1 value per
    channel when training": an internal error once the training rows and the bag left one over); such a
    sample now joins the batch before it. Other last batches stay as they were."""
    ctx = context(pipeline_case)
    data = retrainModule.training_data(ctx)
    batch = ctx.settings.batch_size
    sizes = {}
    for left_over in (1, 2):
        bag = np.arange((left_over - len(data.train_rows)) % batch)
        sizes[left_over] = [len(y) for _x, y, _size, _part in retrainModule.epoch_batches(
            data, bag, batch, ctx, torch.Generator().manual_seed(0))]
        whole, rest = divmod(len(data.train_rows) + len(bag), batch)
        assert rest == left_over and sum(sizes[left_over]) == whole * batch + rest
        assert sizes[left_over] == ([batch] * (whole - 1) + [batch + 1] if left_over == 1 else [batch] * whole + [left_over])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    bag = np.arange((1 - len(data.train_rows)) % batch)
    retrainModule.train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.05), data, bag, ctx,
                              torch.Generator().manual_seed(0))
    assert model[2].num_batches_tracked == len(sizes[1])


def test_a_model_with_auxiliary_outputs_in_training_learns_from_its_main_and_auxiliary_losses(pipeline_case):
    """torchvision's GoogLeNet and Inception v3 return (logits, auxiliary logits...) in training mode: the
    epoch takes the main output's loss plus 0.3 of each auxiliary one, as a hand-written epoch does."""
    from collections import namedtuple
    Outputs = namedtuple("Outputs", ["logits", "aux_logits"])

    class WithAuxiliary(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.aux = net, nn.Linear(3 * 32 * 32, 3)

        def forward(self, x):
            main = self.net(x)
            return Outputs(main, self.aux(x.flatten(1))) if self.training else main

    ctx = context(pipeline_case)
    data, bag = retrainModule.training_data(ctx), np.array([0, 3, 3, 5])
    torch.manual_seed(3)
    ours = WithAuxiliary(copy.deepcopy(ctx.model()))
    by_hand, initial = copy.deepcopy(ours), ours.aux.weight.detach().clone()
    torch.manual_seed(4)   # the same dropout masks on both sides
    retrainModule.train_epoch(ours, torch.optim.SGD(ours.parameters(), lr=0.05), data, bag, ctx,
                              torch.Generator().manual_seed(0))
    torch.manual_seed(4)
    optimiser = torch.optim.SGD(by_hand.parameters(), lr=0.05)
    by_hand.train()
    for inputs, labels, _size, _part in retrainModule.epoch_batches(data, bag, ctx.settings.batch_size, ctx,
                                                                  torch.Generator().manual_seed(0)):
        optimiser.zero_grad()
        main, aux = by_hand(inputs)
        (F.cross_entropy(main, labels) + 0.3 * F.cross_entropy(aux, labels)).backward()
        optimiser.step()
    for (name, mine), theirs in zip(ours.state_dict().items(), by_hand.state_dict().values()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(ours.aux.weight, initial)   # the auxiliary head learned


def test_features_returned_beside_the_logits_are_no_auxiliary_output():
    """(logits, features) in training mode, for a loss of the user's own: the features (16 wide, more than the
    3 classes, so cross-entropy would accept them) are left alone."""
    logits, features, aux = torch.zeros(4, 3), torch.zeros(4, 16), torch.ones(4, 3)
    main, auxiliary = retrainModule.main_and_auxiliary((logits, features, aux))
    assert main is logits and len(auxiliary) == 1 and auxiliary[0] is aux


def test_a_model_returning_a_dict_in_training_is_refused_with_one_line():
    with pytest.raises(HuddError, match="returns a dict in training mode"):
        retrainModule.main_and_auxiliary({"out": torch.zeros(1)})


@pytest.mark.parametrize("bag", ["uniform", "balanced"])
def test_the_hudd_bag_setting_decides_what_hudd_trains_on_and_only_hudd(pipeline_case, monkeypatch, bag):
    ctx = context(pipeline_case, hudd_bag=bag)
    unsafe, data = retrainModule.unsafe_inputs(ctx), retrainModule.training_data(ctx)
    trained = {}

    def stop_here(ctx, data, bag_rows, seed, desc=""):
        trained["bag"] = bag_rows
        raise KeyboardInterrupt  # the bag is all this test needs

    monkeypatch.setattr(retrainModule, "fine_tune", stop_here)
    for mode in ("HUDD", "BL2"):
        with pytest.raises(KeyboardInterrupt):
            retrainModule.retrain_once(ctx, mode, 1, unsafe, data, retrainModule.run_selection(ctx, mode, 1, unsafe))
        expected = retrainModule.select(mode, unsafe.assigned, unsafe.distances, unsafe.quota, unsafe.wrong,
                                        np.random.default_rng([ctx.seed, 1]), unsafe.uncertainty, hudd_bag=bag)
        np.testing.assert_array_equal(trained["bag"], expected.bag)
    fingerprints = {b: {m: retrainModule.RetrainStep(m).inputs(context(pipeline_case, hudd_bag=b))
                        for m in ("HUDD", "BL1")} for b in ("uniform", "balanced")}
    assert fingerprints["uniform"]["HUDD"] != fingerprints["balanced"]["HUDD"]   # HUDD retrains again
    assert fingerprints["uniform"]["BL1"] == fingerprints["balanced"]["BL1"]     # a baseline does not


def test_hudd_retrains_with_the_assignment_steps_unsafe_set(pipeline_case):
    ctx = context(pipeline_case)
    unsafe = retrainModule.unsafe_inputs(ctx)
    table = pd.read_csv(pipeline_case / "T" / "UnsafeSet" / "assignments.csv")
    images = [ctx.paths.relative(p) for p in ctx.sets()["improve"].paths]
    from_file = {image: rcc for image, rcc in zip(table["image"], table["rcc"])}
    assert {images[i]: unsafe.rccs[r] for i, r in enumerate(unsafe.assigned) if r >= 0} == from_file
    selection = retrainModule.select("HUDD", unsafe.assigned, unsafe.distances, unsafe.quota, unsafe.wrong,
                                     np.random.default_rng(0))
    assert sorted(images[i] for i in selection.chosen) == sorted(table["image"])
    # The file is what counts: an image removed from the unsafe set is not labelled by retraining.
    table.iloc[1:].to_csv(pipeline_case / "T" / "UnsafeSet" / "assignments.csv", index=False)
    assert (retrainModule.unsafe_inputs(ctx).assigned >= 0).sum() == len(table) - 1


def test_validation_choice_keeps_the_best_validation_epoch(pipeline_case):
    ctx = context(pipeline_case, epoch_choice="validation", epochs=4, learning_rate=0.05)
    data = retrainModule.training_data(ctx)
    model, epoch, history = retrainModule.fine_tune(ctx, data, np.arange(6), seed=0, desc="test")
    scores = [h["validation_accuracy"] for h in history]
    assert epoch == max(e for e, s in zip(range(1, 5), scores) if s == max(scores))  # ties: the later epoch
    # the returned weights are that epoch's: their validation accuracy is the recorded one
    assert 100 * retrainModule.accuracy_on(model, data.train, data.validation_rows, ctx) == pytest.approx(
        history[epoch - 1]["validation_accuracy"])


def test_last_choice_trains_on_the_whole_training_set_and_changes_the_weights(pipeline_case):
    ctx = context(pipeline_case, epochs=2, learning_rate=0.05)
    data = retrainModule.training_data(ctx)
    assert len(data.validation_rows) == 0 and len(data.train_rows) == len(ctx.sets()["train"])
    model, epoch, _ = retrainModule.fine_tune(ctx, data, np.arange(4), seed=0, desc="test")
    assert epoch == 2
    original = ctx.model().state_dict()
    assert any(not torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_saving_never_overwrites_a_model(pipeline_case):
    ctx = context(pipeline_case)
    taken = ctx.paths.models / "HUDD_1_50.00.pth"
    taken.write_bytes(b"keep me")
    model = DemoNet(num_classes=len(CLASSES))
    first = retrainModule.save_model(model, ctx, "HUDD", 1, 50.0)
    second = retrainModule.save_model(model, ctx, "HUDD", 1, 50.0)
    assert taken.read_bytes() == b"keep me"
    assert (first.name, second.name) == ("HUDD_1_50.00_2.pth", "HUDD_1_50.00_3.pth")
    loaded = DemoNet(num_classes=len(CLASSES))
    loaded.load_state_dict(torch.load(second, weights_only=True))


# --------------------------------------------------------------------------------------------
# The step's tables, checked against the saved models
# --------------------------------------------------------------------------------------------

def test_the_step_tables_agree_with_the_saved_models(pipeline_case):
    ctx = context(pipeline_case, epochs=1, learning_rate=0.05, runs=2)
    summary = run_step(retrainModule.RetrainStep("BL2"), ctx)
    folder = pipeline_case / "T" / "Retrain"
    runs = pd.read_csv(folder / "BL2_runs.csv")
    assert list(runs["run"]) == [1, 2] and summary["runs"] == 2
    original = pd.read_csv(pipeline_case / "testResult.csv").set_index("image")
    labels = pd.read_csv(pipeline_case / "T" / "ClusterAnalysis" / summary_layer(pipeline_case) / "rcc_labels.csv")
    per_rcc = pd.read_csv(folder / "BL2_rcc.csv").set_index("rcc")
    test = ctx.sets()["test"]
    for row in runs.itertuples():
        model = DemoNet(num_classes=len(CLASSES)).eval()
        model.load_state_dict(torch.load(pipeline_case / row.model, weights_only=True))
        correct = recomputed_correct(model, ctx, test)
        assert row.accuracy == pytest.approx(100 * np.mean(list(correct.values())))
        before = {image: original.loc[image, "result"] == "Correct" for image in correct}
        assert row.improved == sum(correct[i] and not before[i] for i in correct)
        assert row.worsened == sum(before[i] and not correct[i] for i in correct)
        for rcc, group in labels[labels["rcc"].isin(per_rcc.index)].groupby("rcc"):
            assert per_rcc.loc[rcc, f"run{row.run}"] == sum(correct[i] for i in group["image"])
    xlsx = pd.read_excel(folder / "BL2_results.xlsx", sheet_name="runs")
    assert list(xlsx["accuracy"]) == pytest.approx(list(runs["accuracy"]))
    epochs = pd.read_csv(folder / "BL2_epochs.csv")   # one epoch per run, at the constant rate asked
    assert list(epochs["run"]) == [1, 2] and list(epochs["learning_rate"]) == [0.05, 0.05]


def summary_layer(case) -> str:
    summary = pd.read_csv(case / "T" / "ClusterAnalysis" / "summary.csv")
    return summary.loc[summary["selected"], "layer"].iloc[0]


def recomputed_correct(model, ctx, test) -> dict[str, bool]:
    """Per test image, whether `model` gets it right, read with PIL and numpy (not Helper's loader)."""
    from PIL import Image
    s = ctx.settings
    result = {}
    for path, label in zip(test.paths, test.labels):
        pixels = np.asarray(Image.open(path).convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255
        pixels = (pixels - np.array(s.mean, np.float32)) / np.array(s.std, np.float32)
        with torch.no_grad():
            predicted = model(torch.from_numpy(pixels.transpose(2, 0, 1))[None]).argmax(1).item()
        result[ctx.paths.relative(path)] = predicted == label
    return result


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_each_epoch_trains_at_its_scheduled_learning_rate(pipeline_case, monkeypatch, schedule):
    ctx = context(pipeline_case, epochs=5, learning_rate=0.05, lr_schedule=schedule)
    seen, plain = [], retrainModule.train_epoch

    def recording(model, optimiser, *args, **kwargs):
        seen.append([group["lr"] for group in optimiser.param_groups])
        return plain(model, optimiser, *args, **kwargs)

    monkeypatch.setattr(retrainModule, "train_epoch", recording)
    _model, _epoch, history = retrainModule.fine_tune(ctx, retrainModule.training_data(ctx), np.arange(4), seed=0,
                                                      desc="test")
    assert [h["learning_rate"] for h in history] == [rates[0] for rates in seen]   # what <mode>_epochs.csv records
    # the oracle: torch's own cosine annealing to 0 over the epochs, stepped once per epoch
    oracle = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
    annealing = torch.optim.lr_scheduler.CosineAnnealingLR(oracle, T_max=5, eta_min=0.0)
    expected = []
    for _ in range(5):
        expected.append(oracle.param_groups[0]["lr"] if schedule == "cosine" else 0.05)
        oracle.step()
        annealing.step()
    assert [rates[0] for rates in seen] == pytest.approx(expected, rel=1e-12)
    assert all(len(set(rates)) == 1 for rates in seen)   # every parameter group alike


def test_the_learning_rate_schedule_is_part_of_what_a_retraining_reuses(pipeline_case):
    inputs = {s: retrainModule.RetrainStep("BL2").inputs(context(pipeline_case, lr_schedule=s))
              for s in ("constant", "cosine")}
    assert inputs["constant"] != inputs["cosine"]
    assert Helper.Settings().lr_schedule == "constant"   # the original's, unless asked


def test_a_model_that_ends_in_softmax_trains_on_the_log_likelihood_and_log_softmax_outputs_are_unchanged():
    """Cross-entropy takes a softmax of what it is given: probabilities (a model ending in softmax) get
    their negative log-likelihood instead, the cross-entropy of the logits behind them; logits and
    log-probabilities keep plain cross-entropy, which is already right for both. BL3's margin alike."""
    import tasks
    task = tasks.ClassificationTask()
    torch.manual_seed(3)
    logits = torch.randn(16, 5) * 3
    truth = torch.randint(0, 5, (16,))
    expected = F.cross_entropy(logits, truth)   # what the logits model trains on
    for outputs in (logits, F.log_softmax(logits, dim=1), F.softmax(logits, dim=1)):
        assert torch.allclose(task.loss(outputs, truth), expected, atol=1e-5)
    assert task.loss(logits, truth) == expected   # the same computation, bit for bit, for logits
    probabilities = F.softmax(logits, dim=1)
    top = probabilities.topk(2, dim=1).values
    for outputs in (logits, F.log_softmax(logits, dim=1), probabilities):
        assert torch.allclose(tasks.softmax_margin(outputs), top[:, 0] - top[:, 1], atol=1e-6)
    assert not tasks.probability_rows(torch.rand(16, 5))   # non-negative rows that do not sum to 1


# --------------------------------------------------------------------------------------------
# The memory layout a copy trains in
# --------------------------------------------------------------------------------------------

class FlattensWithView(nn.Module):
    """A user's network that flattens with x.view(n, -1), which needs contiguous memory."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 32 * 32, len(CLASSES))

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


class ReadsMemoryAsContiguous(FlattensWithView):
    """A custom operator that reads its input's memory as if it were contiguous: it runs in channels_last
    too, and silently gives other outputs there."""

    def forward(self, x):
        x = torch.relu(self.conv(x))
        per_image = x[0].numel()
        return self.fc(x.as_strided((x.size(0), per_image), (per_image, 1)))


class ViewInTrainingOnly(FlattensWithView):
    """A network whose auxiliary head, run in training only, flattens with view."""

    def forward(self, x):
        x = torch.relu(self.conv(x))
        main = self.fc(x.flatten(1))
        return (main, self.fc(x.view(x.size(0), -1))) if self.training else main


def layouts_seen(model: nn.Module) -> list[bool]:
    """Records, for every training forward of a copy of `model` (with gradients: not the layout's probe),
    whether its input was channels_last."""
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(
        args[0].is_contiguous(memory_format=torch.channels_last) and not args[0].is_contiguous())
        if module.training and torch.is_grad_enabled() else None)
    return seen


def test_on_the_cpu_a_convolutional_model_trains_in_channels_last_and_comes_back_contiguous(pipeline_case):
    ctx = context(pipeline_case, epochs=2, learning_rate=0.05)
    data = retrainModule.training_data(ctx)
    original = ctx.model()
    assert retrainModule.training_layout(copy.deepcopy(original), ctx) == torch.channels_last
    seen = layouts_seen(original)   # hooks travel with fine_tune's deep copy
    model, _epoch, _history = retrainModule.fine_tune(ctx, data, np.arange(4), seed=0, desc="test")
    assert seen and all(seen)
    assert all(p.is_contiguous() for p in model.state_dict().values())   # saved as before
    assert all(p.is_contiguous() for p in original.parameters())         # the original is left as it was


def test_both_layouts_train_to_the_same_weights_up_to_float_order(pipeline_case):
    ctx = context(pipeline_case, epochs=2, learning_rate=0.05)
    data = retrainModule.training_data(ctx)
    models = [retrainModule.fine_tune(ctx, data, np.array([0, 3, 3, 5]), seed=1, desc="test", layout=layout)[0]
              for layout in (torch.contiguous_format, torch.channels_last)]
    moved = [(v - ctx.model().state_dict()[k]).abs().max() for k, v in models[0].state_dict().items()]
    assert max(moved) > 1e-3   # they trained
    for (name, plain), last in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        torch.testing.assert_close(plain, last, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("network", [FlattensWithView, ReadsMemoryAsContiguous, ViewInTrainingOnly])
def test_a_model_that_needs_contiguous_memory_trains_contiguous(pipeline_case, network):
    ctx = context(pipeline_case, epochs=1, learning_rate=0.05)
    torch.manual_seed(0)
    ctx._model = network()
    probe = torch.randn(2, 3, 32, 32)
    last = copy.deepcopy(ctx._model).to(memory_format=torch.channels_last)
    laid_out = probe.contiguous(memory_format=torch.channels_last)
    try:   # the network does fail in channels_last: raises (in eval or training mode), or differs
        outputs = last.eval()(laid_out), last.train()(laid_out)
        assert not torch.allclose(outputs[0], ctx._model.eval()(probe))
    except RuntimeError as error:
        assert "view size is not compatible" in str(error)
    assert retrainModule.training_layout(copy.deepcopy(ctx._model), ctx) == torch.contiguous_format
    seen = layouts_seen(ctx._model)
    model, epoch, _history = retrainModule.fine_tune(ctx, retrainModule.training_data(ctx), np.arange(4), seed=0,
                                                     desc="test")
    assert epoch == 1 and seen and not any(seen)


def test_a_gpu_keeps_the_contiguous_layout(pipeline_case):
    ctx = context(pipeline_case)
    ctx.device = torch.device("meta")   # any device but the CPU; no model runs on it
    assert retrainModule.training_layout(ctx.model(), ctx) == torch.contiguous_format
