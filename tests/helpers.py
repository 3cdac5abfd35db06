"""What the tests share: tiny case studies built on the fly (32x32 images, a random DemoNet), the
command line run as a user runs it, and a run context for calling the steps directly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import Helper  # noqa: E402
from architectures import DemoNet  # noqa: E402
from HUDD import run_step  # noqa: E402,F401  (the step protocol, as HUDD.py applies it)

# Names the original tool broke on: underscores, dots and spaces in classes and files; and what a URL
# or an HTML attribute must escape ('#', '%', an apostrophe) in the files' names.
CLASSES = ["class_a", "class.b", "class c"]
IMAGE_NAME = "img_{c}.{i} v2 #1 50% o'k.png"
SETTINGS = {"arch": "demonet", "input_size": [32, 32], "workers": 0, "batch_size": 4,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


# --------------------------------------------------------------------------------------------
# Tiny case studies
# --------------------------------------------------------------------------------------------

def write_image(path: Path, rng: np.random.Generator, size: int = 32) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_set(folder: Path, rng: np.random.Generator, per_class: int, labelled: bool = True,
              size: int = 32) -> list[Path]:
    written = []
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            file_name = IMAGE_NAME.format(c=c, i=i)
            path = folder / name / file_name if labelled else folder / f"{c}_{file_name}"
            write_image(path, rng, size)
            written.append(path)
    return written


def save_model(path: Path, seed: int = 0, num_classes: int = len(CLASSES)) -> DemoNet:
    torch.manual_seed(seed)
    model = DemoNet(num_classes=num_classes).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def build_case(root: Path, improvement: str = "plain", per_class: int = 4, settings: dict | None = None,
               seed: int = 0) -> Path:
    """A case study under `root`. improvement: "plain" (ImprovementSet/<class>/), "doubled"
    (ImprovementSet/ImprovementSet/<class>/, as the original's packages) or "unlabelled"."""
    rng = np.random.default_rng(seed)
    data = root / "DataSets"
    write_set(data / "TrainingSet", rng, per_class)
    write_set(data / "TestSet", rng, per_class)
    improve = data / "ImprovementSet"
    if improvement == "doubled":
        improve = improve / "ImprovementSet"
    write_set(improve, rng, per_class, labelled=improvement != "unlabelled")
    save_model(root / "DNNModels" / "OriginalModel.pth", seed)
    (root / "hudd.json").write_text(json.dumps(SETTINGS if settings is None else settings))
    return root


# --------------------------------------------------------------------------------------------
# Running HUDD
# --------------------------------------------------------------------------------------------

def hudd(*args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None
         ) -> subprocess.CompletedProcess:
    """HUDD.py through the real command line (`env`: variables set beside this process's)."""
    return run_python(REPO / "HUDD.py", *args, cwd=cwd, timeout=timeout, env=env)


def run_python(script: Path, *args: str, cwd: Path | None = None, timeout: int = 300, env: dict | None = None,
               fresh: bool = False) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGS` as a process of its own, forked from tests/command_server.py, which has the
    libraries loaded already; a fresh interpreter with `fresh`, off Linux (macOS's system libraries are
    not safe to fork once loaded), or for every run with HUDD_TESTS_FRESH_PROCESSES=1. `env`: variables
    set beside this process's (None: unset)."""
    command = [sys.executable, str(script), *args]
    environment = {name: value for name, value in {**os.environ, **(env or {})}.items() if value is not None}
    if fresh or not sys.platform.startswith("linux") or os.environ.get("HUDD_TESTS_FRESH_PROCESSES") == "1":
        return subprocess.run(command, capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout,
                              env=environment)
    return CommandServer.shared().run(command, Path(cwd or REPO), timeout, environment)


class CommandServer:
    """This test process's tests/command_server.py, started on its first run and ended with it."""

    _shared: "CommandServer | None" = None

    @classmethod
    def shared(cls) -> "CommandServer":
        if cls._shared is None or cls._shared.process.poll() is not None:
            cls._shared = cls()
        return cls._shared

    def __init__(self):
        environment = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # its default threads
        self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "command_server.py")],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        cwd=REPO, env=environment)
        self.lock = threading.Lock()

    def run(self, command: list[str], cwd: Path, timeout: float, env: dict) -> subprocess.CompletedProcess:
        with self.lock, tempfile.TemporaryDirectory(prefix="hudd-run-") as folder:
            out, err = Path(folder) / "stdout", Path(folder) / "stderr"
            out.touch()
            err.touch()
            request = {"script": command[1], "args": command[2:], "cwd": str(cwd), "env": env,
                       "stdout": str(out), "stderr": str(err), "timeout": timeout}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            reply = self.process.stdout.readline()
            if not reply:
                raise RuntimeError(f"tests/command_server.py ended (exit status {self.process.wait()})")
            reply = json.loads(reply)
            stdout, stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
        if reply.get("timeout"):
            raise subprocess.TimeoutExpired(command, timeout, output=stdout, stderr=stderr)
        return subprocess.CompletedProcess(command, reply["returncode"], stdout, stderr)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2, one `error:` line holding every fragment, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def context(case: Path, **settings_overrides) -> Helper.RunContext:
    """The run context HUDD.py would build for the case's original model, on the CPU."""
    paths = Helper.CasePaths(case)
    return Helper.RunContext(paths=paths, settings=Helper.load_settings(paths, settings_overrides),
                             model_path=case / "DNNModels" / "OriginalModel.pth", device=torch.device("cpu"))


def run_steps(ctx: Helper.RunContext, *steps) -> dict:
    """Runs the given step objects in order through the step protocol; the last one's summary."""
    summary = None
    for step in steps:
        summary = run_step(step, ctx)
    return summary


# --------------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------------

def hand_decode(single_map: np.ndarray, top: int = 64) -> tuple[float, float]:
    """The original's decoding, written out: the `top` largest pixels, their value-weighted mean
    (column, row), or (-1, -1) when the mean of those values is not positive."""
    height, width = single_map.shape
    pixels = sorted(((single_map[r, c], r, c) for r in range(height) for c in range(width)), reverse=True)[:top]
    values = [v for v, _, _ in pixels]
    if sum(values) / len(values) <= 0:
        return -1.0, -1.0
    total = sum(values)
    return (sum(v * c for v, _, c in pixels) / total, sum(v * r for v, r, _ in pixels) / total)
