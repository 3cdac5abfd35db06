"""Run by tests/test_distributed.py under torchrun: each rank joins the job, writes a line without a
newline, registers a handler for the interpreter's shutdown and leaves through distributed.finish(STATUS).

    torchrun --nproc-per-node 2 leave.py STATUS

finish must end the process itself (os._exit), with the line flushed: a rank that went on into the
interpreter's shutdown could be aborted there by torch's gloo threads (distributed.finish says how).
"""
import atexit
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import distributed  # noqa: E402

distributed.start(torch.device("cpu"))
me = distributed.rank()
atexit.register(lambda: print(f"rank {me}: the interpreter shut down", flush=True))
sys.stdout.write(f"[rank {me}: left]")   # no newline and no flush: finish flushes it
distributed.finish(int(sys.argv[1]))
print(f"rank {me}: finish returned")
