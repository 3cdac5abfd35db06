"""The tests' command-line runs, started from one process that has already imported what HUDD imports.

Most tests run `python HUDD.py ...` as a user does, and each such process used to spend 4-6 s of its CPU
importing torch, scipy and pandas before HUDD read its first option: over a hundred runs, a third of the
suite's time. This server (one per pytest worker, started by tests/helpers.py on its first run) imports
them once, then forks a child per run. The child is still a process of its own with the run's arguments,
working directory and environment: it points its stdout and stderr to files, takes torch's thread
count from the run's OMP_NUM_THREADS as a fresh interpreter would, runs HUDD.py as `__main__`, and exits
through Python's normal shutdown, so its exit status, its tracebacks and everything it writes are what
`python HUDD.py` gives. What differs is only that the modules are already loaded, which is why the tests
of what HUDD does before torch loads start a fresh interpreter themselves.

Protocol: one JSON request per line on stdin ({"script", "args", "cwd", "env", "stdout", "stderr",
"timeout"}), one JSON reply per line on stdout ({"returncode"}, negative for a signal as subprocess
gives it, or {"timeout": true} once the child was killed). EOF on stdin ends the server.
"""
import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[0] = str(REPO)                       # as `python HUDD.py` has it: the script's folder first
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")   # as HUDD.py sets it, before torch loads MKL

import runpy  # noqa: E402

import matplotlib.figure  # noqa: E402,F401  (the report's plots; the backend is left to HUDD)
import numpy  # noqa: E402,F401
import openpyxl  # noqa: E402,F401
import torch  # noqa: E402
import torchvision  # noqa: E402,F401  (2-3 s: the architectures and the image transforms load it)

import HUDD  # noqa: E402,F401  (and with it Helper, distributed, pandas)
import assignModule, clusterModule, heatmapModule, reportModule, retrainModule, testModule  # noqa: E402,F401,E401

POLL_SECONDS = 0.02
# torch's thread count where OMP_NUM_THREADS is not set (the server is started without it, so this is a
# fresh interpreter's default)
DEFAULT_THREADS = torch.get_num_threads()


def start_child(request: dict, channels: list) -> None:
    """In the forked child: the run's own process group, files, folder, environment and threads; then
    the script as `__main__`. Returns only by raising SystemExit (or the script's uncaught exception),
    which ends this process as it ends `python SCRIPT`."""
    os.setpgid(0, 0)
    for channel in channels:   # the server's pipes are not the child's
        channel.close()
    for target, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY),
                                (2, request["stderr"], os.O_WRONLY)):
        fd = os.open(path, flags)
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else DEFAULT_THREADS)
    sys.argv = [request["script"], *request["args"]]
    runpy.run_path(request["script"], run_name="__main__")
    sys.exit(0)


def wait(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"returncode": os.waitstatus_to_exitcode(status)}
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)   # the run and any process it started
            os.waitpid(pid, 0)
            return {"timeout": True}
        time.sleep(POLL_SECONDS)


def serve() -> None:
    requests = os.fdopen(os.dup(0), "r")
    replies = os.fdopen(os.dup(1), "w")
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            start_child(request, [requests, replies])
        replies.write(json.dumps(wait(pid, request["timeout"])) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()
