"""Peak memory of the heatmap step for N and 4N error images (a script, not a test).

    python bench/bench_heatmap_memory.py [--errors 400]

Builds two random case studies (an untrained DemoNet on random 32x32 images, so most test images
are errors), runs the test and heatmap steps of each in its own process, and prints each process's
peak resident memory and the ratio. Streaming to disk means the ratio should stay near 1 while the
heatmap files grow 4x.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build(case: Path, test_images: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import CLASSES, build_case, write_image
    import numpy as np
    build_case(case, per_class=1, settings={"arch": "demonet", "input_size": [32, 32], "workers": 0,
                                            "batch_size": 64, "mean": [0.5] * 3, "std": [0.25] * 3})
    rng = np.random.default_rng(1)
    for i in range(test_images):
        write_image(case / "DataSets" / "TestSet" / CLASSES[i % len(CLASSES)] / f"extra_{i}.png", rng)


def measure(case: Path) -> dict:
    code = f"""
import resource, sys, json, torch
sys.path.insert(0, {str(REPO)!r})
import Helper, testModule, heatmapModule
paths = Helper.CasePaths(__import__('pathlib').Path({str(case)!r}))
ctx = Helper.RunContext(paths=paths, settings=Helper.load_settings(paths), device=torch.device('cpu'),
                        model_path=paths.models / 'OriginalModel.pth')
testModule.run(ctx)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
summary = heatmapModule.run(ctx)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"errors": summary["images"], "megabytes": summary["megabytes"],
                  "peak_mib_before": before / 1024, "peak_mib": after / 1024}}))
"""
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--errors", type=int, default=400, help="about this many error images in the small case")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as work:
        for factor in (1, 4):
            case = Path(work) / f"x{factor}"
            build(case, int(args.errors * factor * 1.5))
            results.append(measure(case))
    for r in results:
        print(f"{r['errors']:6d} error images: heatmap files {r['megabytes']:7.1f} MB, peak memory "
              f"{r['peak_mib']:7.1f} MiB (after the test step: {r['peak_mib_before']:.1f} MiB)")
    print(f"4x the error images: files x{results[1]['megabytes'] / results[0]['megabytes']:.2f}, "
          f"peak memory x{results[1]['peak_mib'] / results[0]['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
