"""Benchmark of the LRP engine (the lrp package): all-layer relevance vs a plain gradient pass, vs zennit,
and batched vs a batch-1 loop.

Run: ``python bench/bench_lrp.py`` (under a minute on 2 idle CPU cores; several minutes when other
processes compete for the cores, as 2 OpenMP threads then wait on each other at every op; try
``--threads 1`` there). Models have random weights (timing does not depend on them), eval mode,
float32. Every time is the median of several rounds after a warm-up round; within a round the
candidates run one after another in rotating order, so a change of machine load hits them alike
(the ratios are more trustworthy than the absolute times).

* plain grad  : forward + backward of the seed to the input, weights frozen (requires_grad off)
* ours <rule> : lrp.LRPExplainer (prepared once) -> relevance at every default layer + input
* zennit <r>  : zennit composite registered once, forward, retain every default layer's output,
                one backward for all of them + input (its usual way of getting layer relevance)
* loop        : the same 16 images explained one by one (batch 1) with ours
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lrp  # noqa: E402
from architectures import AlexNet256, DemoNet  # noqa: E402


def frozen(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def measure(candidates: dict, rounds: int, warmups: dict | None = None) -> dict:
    """Median and minimum wall time of each candidate. The candidates run interleaved, round after
    round in rotating order, so that a change of machine load affects all of them alike. One
    warm-up round first (``warmups[name]`` replaces a candidate there)."""
    warmups = warmups or {}
    for name, fn in candidates.items():
        warmups.get(name, fn)()
    times: dict = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def seed_of(out: torch.Tensor) -> torch.Tensor:
    idx = out.detach().argmax(1)
    seed = torch.zeros_like(out)
    seed[torch.arange(len(out)), idx] = out.detach()[torch.arange(len(out)), idx]
    return seed


def plain_grad(model, x):
    xx = x.detach().requires_grad_(True)
    out = model(xx)
    return torch.autograd.grad(out, xx, seed_of(out))[0]


def zennit_runner(model, composite, layers):
    """Forward + one backward through zennit's hooks, capturing every layer's output relevance."""
    ctx = composite.context(model)
    mod = ctx.__enter__()
    caps: dict[str, torch.Tensor] = {}
    handles = [mod.get_submodule(p).register_forward_hook(
        lambda m, i, o, p=p: caps.__setitem__(p, o)) for p in layers]

    def run(x):
        xx = x.detach().requires_grad_(True)
        out = mod(xx)
        tensors = [xx] + [caps[p] for p in layers]
        return torch.autograd.grad(out, tensors, seed_of(out))

    def close():
        for h in handles:
            h.remove()
        ctx.__exit__(None, None, None)
    return run, close


def bench_model(name, model, shape, batch, rounds, rows, use_zennit=True):
    torch.manual_seed(0)
    x = torch.randn(batch, *shape)
    model = frozen(model)
    layers = [p for _, p in lrp.default_layers(model)]
    cands = {"plain": lambda: plain_grad(model, x)}
    for preset in ("hudd", "epsilon", "epsilon-plus"):
        ex = lrp.LRPExplainer(model, rules=preset)
        cands[preset] = (lambda ex=ex: ex(x))
    closers = []
    if use_zennit:
        try:
            from zennit.canonizers import SequentialMergeBatchNorm
            from zennit.composites import EpsilonPlus, LayerMapComposite, layer_map_base
            from zennit.rules import Epsilon
            from zennit.types import Convolution
        except ImportError:
            use_zennit = False
        else:
            comps = {
                "epsilon": LayerMapComposite(
                    layer_map=layer_map_base() + [(Convolution, Epsilon()), (nn.Linear, Epsilon())],
                    canonizers=[SequentialMergeBatchNorm()]),
                "epsilon-plus": EpsilonPlus(canonizers=[SequentialMergeBatchNorm()]),
            }
            for preset, comp in comps.items():
                run, close = zennit_runner(frozen(model), comp, layers)
                cands["zennit " + preset] = (lambda run=run: run(x))
                closers.append(close)
    loop_ex = lrp.LRPExplainer(model, rules="hudd")
    cands["loop"] = lambda: [loop_ex(x[i:i + 1]) for i in range(batch)]
    warm = {"loop": lambda: [loop_ex(x[i:i + 1]) for i in range(2)]}
    try:
        t = measure(cands, rounds, warm)
    finally:
        for close in closers:
            close()
    plain_med, plain_min = t["plain"]

    def row(what, key, note=""):
        med, mn = t[key]
        rows.append((name, what, med, med / plain_med, mn / plain_min, note))

    row("plain grad to input", "plain")
    for preset in ("hudd", "epsilon", "epsilon-plus"):
        row(f"ours {preset} (all {len(layers)} layers)", preset, "target <= 1.5x plain")
    if use_zennit:
        for preset in ("epsilon", "epsilon-plus"):
            z_med, z_min = t["zennit " + preset]
            row(f"zennit {preset} (all {len(layers)} layers)", "zennit " + preset,
                f"ours/zennit = {t[preset][0] / z_med:.2f} (min: {t[preset][1] / z_min:.2f}),"
                " target < 1")
    loop_med, loop_min = t["loop"]
    row(f"ours hudd, batch-1 loop x{batch}", "loop",
        f"batched is {loop_med / t['hudd'][0]:.2f}x faster (min: {loop_min / t['hudd'][1]:.2f}x)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=0, help="rounds; 0 = per-model default")
    ap.add_argument("--no-zennit", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"float32, CPU; times are medians")
    rows: list = []
    bench_model("DemoNet 32x32", DemoNet(num_classes=8), (3, 32, 32), args.batch,
                args.repeats or 30, rows, not args.no_zennit)
    bench_model("AlexNet256 256x256", AlexNet256(num_classes=10), (3, 256, 256), args.batch,
                args.repeats or 4, rows, not args.no_zennit)
    w = max(len(r[1]) for r in rows)
    print(f"{'model':<19} {'measurement':<{w}} {'median ms':>10} {'x plain':>8} {'(min)':>6}  note")
    for model, what, t, ratio, ratio_min, note in rows:
        print(f"{model:<19} {what:<{w}} {t * 1e3:>10.1f} {ratio:>8.2f} {ratio_min:>6.2f}  {note}")
    print("x plain: ratio of medians to the plain gradient pass; (min): ratio of the fastest "
          "rounds (less sensitive to other load on the machine)")


if __name__ == "__main__":
    main()
