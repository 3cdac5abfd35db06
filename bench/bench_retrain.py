"""Benchmark of the retraining step's memory layout: training steps in the contiguous layout against
channels_last (what retrainModule.training_layout picks on the CPU when the model passes its probe).

Run: ``python bench/bench_retrain.py [--rounds 5] [--threads N] [--case CASE]`` (under a minute on 2 idle
CPU cores; with --case, about a minute more per run and layout).
Each model trains from the same weights on the same random batches (SGD with momentum, the retraining
step's optimiser), so both layouts do the same arithmetic up to the order of float additions. A round
times a fixed number of steps in each layout, one after the other in an order that alternates between
rounds, so a change of machine load hits both alike; every figure is the median over the rounds after a
warm-up round. The ratio contiguous / channels_last is the speed-up of the layout the step picks.

* demonet     : the traffic-sign demo's network, 32x32 RGB, batch 64 (the demo's retraining)
* kpnet-small : the keypoint demo's network, 64x64 grey, batch 32, early layers frozen as in retraining
* resnet18    : torchvision's ResNet-18 (BatchNorm), 64x64 RGB, batch 32

With ``--case CASE`` (a case whose pipeline has run up to the assignment step, such as the demo's
HUDD_demo), it then runs the retraining step's own fine-tuning (retrainModule.fine_tune: the case's epochs,
batches and validation) for the first run of HUDD's selection in each layout, alternating, and prints
each run's wall time and its test accuracy: the two layouts reach the same accuracy up to float order.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import numpy as np
import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from architectures import DemoNet, KPNetSmall  # noqa: E402


def cases() -> list[tuple[str, nn.Module, tuple[int, ...], int, int]]:
    """(name, model, batch shape, steps per round, outputs): the steps make a round last about 1-3 s."""
    keypoints = KPNetSmall(27)
    keypoints.freeze_early()
    return [("demonet", DemoNet(9), (64, 3, 32, 32), 40, 9),
            ("kpnet-small", keypoints, (32, 1, 64, 64), 6, 0),
            ("resnet18", torchvision.models.resnet18(num_classes=10), (32, 3, 64, 64), 6, 10)]


def trainer(model: nn.Module, shape: tuple[int, ...], outputs: int, layout: torch.memory_format):
    """A closure that runs `steps` SGD steps of a copy of the model in `layout` on fixed batches."""
    model = copy.deepcopy(model).to(memory_format=layout).train()
    optimiser = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(shape, generator=generator).contiguous(memory_format=layout)
    targets = torch.randint(0, outputs, (shape[0],), generator=generator) if outputs else None

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            optimiser.zero_grad()
            out = model(inputs)
            loss = nn.functional.cross_entropy(out, targets) if targets is not None else out.float().square().mean()
            loss.backward()
            optimiser.step()
        return time.perf_counter() - start
    return run


def whole_runs(case: str, rounds: int) -> None:
    import Helper
    import retrainModule as R
    from pathlib import Path
    paths = Helper.CasePaths(Path(case))
    ctx = Helper.RunContext(paths=paths, settings=Helper.load_settings(paths, {}),
                            model_path=paths.models / "OriginalModel.pth", device=torch.device("cpu"), seed=0)
    selection = R.run_selection(ctx, "HUDD", 1, R.unsafe_inputs(ctx))
    data = R.training_data(ctx)
    print(f"\n{case}: fine_tune of HUDD run 1 ({ctx.settings.epochs} epochs, {len(data.train_rows)} training "
          f"images + a bag of {len(selection.bag)}), {rounds} run(s) per layout")
    for number in range(rounds):
        layouts = [R.CONTIGUOUS, R.CHANNELS_LAST] if number % 2 == 0 else [R.CHANNELS_LAST, R.CONTIGUOUS]
        for layout in layouts:
            start = time.perf_counter()
            model, epoch, _history = R.fine_tune(ctx, data, selection.bag, seed=1, desc="bench", layout=layout)
            seconds = time.perf_counter() - start
            accuracy = R.accuracy_on(model, data.test, np.arange(len(data.test.image_set)), ctx)
            print(f"  {str(layout).removeprefix('torch.'):<18} {seconds:6.1f} s   test accuracy {100 * accuracy:.2f}%"
                  f" (epoch {epoch})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--case", default=None, help="a case after its assignment step: whole fine-tuning runs")
    parser.add_argument("--case-rounds", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds} rounds")
    print(f"{'model':<12} {'batch':<16} {'contiguous':>12} {'channels_last':>14} {'ratio':>6}")
    for name, model, shape, steps, outputs in cases():
        runs = {layout: trainer(model, shape, outputs, layout) for layout in (torch.contiguous_format,
                                                                              torch.channels_last)}
        for run in runs.values():
            run(1)  # warm-up: oneDNN builds its kernels
        times = {layout: [] for layout in runs}
        for number in range(args.rounds):
            order = list(runs) if number % 2 == 0 else list(runs)[::-1]
            for layout in order:
                times[layout].append(runs[layout](steps) / steps)
        plain, last = (statistics.median(times[layout]) for layout in runs)
        print(f"{name:<12} {'x'.join(map(str, shape)):<16} {1000 * plain:>9.1f} ms {1000 * last:>11.1f} ms "
              f"{plain / last:>5.2f}x", flush=True)
    if args.case:
        whole_runs(args.case, args.case_rounds)


if __name__ == "__main__":
    main()
