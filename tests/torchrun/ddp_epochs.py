"""Run by tests/test_distributed.py, under torchrun or as one process: fine-tunes the tiny case's model
for `epochs` epochs on its training set plus a bag of improvement images, and (rank 0) saves the weights
and the per-epoch history.

    [torchrun --nproc-per-node 2] ddp_epochs.py CASE OUT.pt EPOCHS
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # as HUDD.py sets it
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import context  # noqa: E402  (puts the repository on the path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import distributed  # noqa: E402
import retrainModule  # noqa: E402

case, out, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
ctx = context(case, epochs=epochs, learning_rate=0.05, batch_size=4)
distributed.start(ctx.device)
data = retrainModule.training_data(ctx)
bag = np.array([0, 3, 3, 7, 11])  # 12 training images + 5: the last batch of 4 holds one sample
model, _epoch, history = retrainModule.fine_tune(ctx, data, bag, seed=7, desc="test")
if distributed.is_main():
    torch.save({"state": model.state_dict(), "history": history}, out)
distributed.finish()
