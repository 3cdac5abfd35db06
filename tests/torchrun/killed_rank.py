"""Run by tests/test_distributed.py under torchrun: HUDD.py, except that rank 1 kills itself (SIGKILL,
as the out-of-memory killer or a lost machine would) right after its first heatmap batch is on disk.

    torchrun --nproc-per-node 2 killed_rank.py -o CASE
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import heatmapModule  # noqa: E402
import HUDD  # noqa: E402

saved = heatmapModule.Progress.save


def save_then_die(self, start, stop):
    saved(self, start, stop)
    if os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGKILL)


heatmapModule.Progress.save = save_then_die
sys.exit(HUDD.main())
