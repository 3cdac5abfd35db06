"""What the descriptors add to the analysis steps (a script, not a test).

    python bench/bench_descriptors.py CASE [--runs 3]

Runs the four analysis steps (test, heatmaps, clusters, assign) on CASE with --force, `--runs` times,
and times inside the same runs the work the descriptors add: the image descriptors and object masks
of the test images (test step), the relevance descriptors and the characterisation workbook of the
selected layer (cluster step). Prints each run's step times and what the descriptors add to the
time the analysis steps take without them (added / (total - added)), measured in the same runs.
CASE is rewritten (use a copy, e.g. the demo case that bench/descriptor_evidence.py builds).
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import HUDD  # noqa: E402
import Helper  # noqa: E402
import clusterModule  # noqa: E402
import testModule  # noqa: E402

SPENT: dict[str, float] = {}
PARTS = ((testModule.ImageDescriber, "__call__", "image descriptors and object masks"),
         (testModule.ImageDescriber, "write", "image descriptors and object masks"),
         (clusterModule, "describe_errors", "relevance descriptors"),
         (clusterModule, "write_descriptor_characterisation", "characterisation (CSV + workbook)"))


def timed(owner, name: str, part: str) -> None:
    """Wraps owner.name so that its time adds up in SPENT[part]."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SPENT[part] = SPENT.get(part, 0.0) + time.perf_counter() - start
    setattr(owner, name, wrapper)


def one_run(case: Path) -> tuple[dict[str, float], dict[str, float]]:
    SPENT.clear()
    args = HUDD.build_parser().parse_args(["-o", str(case), "--force"])
    ctx = HUDD.make_context(args, case)
    steps = {}
    for step in HUDD.analysis_steps():
        start = time.perf_counter()
        HUDD.run_step(step, ctx)
        steps[step.name] = time.perf_counter() - start
    return steps, dict(SPENT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("case", type=Path)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    Helper.setup_logging(False)
    for owner, name, part in PARTS:
        timed(owner, name, part)
    shares = []
    for run in range(1, args.runs + 1):
        steps, parts = one_run(args.case)
        total, added = sum(steps.values()), sum(parts.values())
        shares.append(added / (total - added))
        print(f"run {run}: analysis steps {total:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
              + f"); descriptors {added:.2f} s (" + ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
              + f"): +{100 * shares[-1]:.1f}% over the steps' time without them", flush=True)
    print(f"the descriptors add {100 * min(shares):.1f}-{100 * max(shares):.1f}% to the analysis steps' time "
          f"({args.runs} runs)")


if __name__ == "__main__":
    main()
