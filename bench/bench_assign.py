"""Cost of the assignment step per improvement image vs a plain forward pass (a script, not a test).

    python bench/bench_assign.py [--images 10000]

On DemoNet (32x32), with 250 RCC member heatmaps at its pool2 layer (the layer the demo selects) in 78
RCCs: relevance of every improvement image at that layer only, nearest-member distances and the
ClosestU greedy, against a plain batched forward pass over the same images, side by side.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import assignModule  # noqa: E402
from architectures import DemoNet  # noqa: E402
from lrp import LRPExplainer  # noqa: E402

LAYER = "features.5"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=10000)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DemoNet(num_classes=9).eval()
    images = torch.randn(args.images, 3, 32, 32)
    batches = images.split(128)

    start = time.perf_counter()
    with torch.no_grad():
        predicted = torch.cat([model(b).argmax(1) for b in batches])
    forward = time.perf_counter() - start

    rng = np.random.default_rng(0)
    members = rng.gamma(0.5, 1.0, size=(250, 32 * 8 * 8))
    members /= np.linalg.norm(members, axis=1, keepdims=True)
    member_rcc = np.sort(np.r_[np.arange(78), rng.integers(0, 78, size=250 - 78)])
    explainer = LRPExplainer(model, rules="hudd", layers=[LAYER])
    start = time.perf_counter()
    distances = []
    for batch, target in zip(batches, predicted.split(128)):
        relevance = explainer(batch, target=target, input_relevance=False)[LAYER].numpy()
        flat = relevance.reshape(len(relevance), -1).astype(np.float64)
        flat /= np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-300)
        distances.append(assignModule.nearest_member_distances(flat, members, member_rcc, 78))
    relevance_s = time.perf_counter() - start
    distances = np.concatenate(distances)
    start = time.perf_counter()
    assigned, _rank = assignModule.closest_u(distances, assignModule.quotas(np.bincount(member_rcc)))
    greedy = time.perf_counter() - start
    total = relevance_s + greedy
    print(f"{args.images} improvement images, DemoNet 32x32, batch 128, 2 threads:")
    print(f"  plain forward pass      {forward:6.2f} s  ({1e3 * forward / args.images:.3f} ms per image)")
    print(f"  relevance + distances   {relevance_s:6.2f} s  ({1e3 * relevance_s / args.images:.3f} ms per image)")
    print(f"  ClosestU greedy         {greedy:6.2f} s  ({(assigned >= 0).sum()} images assigned)")
    print(f"  assignment / forward    {total / forward:6.2f}x")


if __name__ == "__main__":
    main()
