"""The demo case studies: synthetic image sets whose root causes of failure are known, with the
original model trained on them and checked to be what the demo claims.

    signs   traffic signs, a classification case (signs.py)
    fld     faces with 27 facial keypoints, a regression case (faces.py)

`prepare(kind, case, seed, device)` is the one entry the command line needs; common.py holds what
the demos share. Nothing in the pipeline imports this package.
"""
from __future__ import annotations

from pathlib import Path

KINDS = {"signs": "HUDD_demo", "fld": "HUDD_demo_fld"}   # demo kind -> its default case folder


def prepare(kind: str, case: Path, seed: int, device) -> None:
    """Builds the `kind` demo case study in `case` where DataSets/ is missing, trains its original
    model where DNNModels/OriginalModel.pth is missing, and checks that the model reaches the demo's
    stated quality on the test set; HuddError (one line: the case, the figures, what to do) when it
    does not. Logs what it does (logger "hudd")."""
    from demo.common import prepare_case
    from Helper import HuddError

    if kind not in KINDS:
        raise HuddError(f"demo kind {kind!r} is unknown; use {' or '.join(KINDS)}")
    if kind == "fld":
        from demo.faces import FACES as demo_case
    else:
        from demo.signs import SIGNS as demo_case
    prepare_case(demo_case, Path(case), seed, device)
