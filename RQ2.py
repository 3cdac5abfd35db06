"""Test accuracy of a model, overall and per class (the original's RQ2 check of retrained models).

    python RQ2.py -o CASE -m MODEL          # one model (a name in CASE/DNNModels/ or a path)
    python RQ2.py -o CASE --all             # every .pth/.pt file in CASE/DNNModels/

Prints the accuracies and saves them to CASE/RQ2/accuracy.csv (one row per model and class; class
"all" is the whole test set). The model is loaded with the case's architecture and weights, as every
other step loads it (the original evaluated a fresh, untrained network for AlexNet cases).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="RQ2.py", description="Test accuracy of a case's model(s), overall and "
                                     "per class; saved to CASE/RQ2/accuracy.csv.")
    parser.add_argument("-o", "--outputPathX", dest="case", metavar="CASE", required=True,
                        help="case-study directory (holds DataSets/ and DNNModels/)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("-m", "--modelName", dest="model", metavar="MODEL", default="OriginalModel.pth",
                       help="model file in CASE/DNNModels/ or a path to one (default: OriginalModel.pth)")
    which.add_argument("--all", action="store_true", help="every .pth/.pt model in CASE/DNNModels/")
    parser.add_argument("--arch", help="architecture of the state_dict(s) (default: the case's hudd.json)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow loading whole pickled models (unpickling runs code from the file)")
    parser.add_argument("--debug", action="store_true", help="tracebacks on errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)   # before torch loads (seconds): --help and bad options answer at once
    import Helper
    Helper.setup_logging(args.debug)
    return Helper.run_guarded(lambda: measure(args), args.debug)


def measure(args: argparse.Namespace) -> int:
    import HUDD
    import Helper
    import rqModule
    case = Path(args.case)
    HUDD.check_case(case)
    paths = Helper.CasePaths(case)
    settings = Helper.load_settings(paths, {"arch": args.arch})
    device = Helper.pick_device(args.device)
    models = rqModule.models_in(case) if args.all else [HUDD.resolve_model_path(case, args.model)]
    sets = Helper.load_case_sets(paths, Helper.make_task(settings), ("train", "test"))

    def context_for(model_path: Path) -> Helper.RunContext:
        ctx = Helper.RunContext(paths=paths, settings=settings, model_path=model_path, device=device,
                                trust_pickle=args.trust_pickle)
        ctx._sets = sets  # one listing of the sets for every model
        return ctx

    table = rqModule.rq2(context_for, models, case)
    print_table(table)
    print(f"saved to {case / 'RQ2' / 'accuracy.csv'}")
    return 0


def print_table(table) -> None:
    for model, rows in table.groupby("model", sort=False):
        overall = rows[rows["class"] == "all"].iloc[0]
        print(f"{model}: test accuracy {overall['accuracy']:.2f}% ({int(overall['correct'])} of {int(overall['images'])})")
        for _, row in rows[rows["class"] != "all"].iterrows():
            print(f"    {row['class']:24s} {row['accuracy']:6.2f}% ({int(row['correct'])} of {int(row['images'])})")


if __name__ == "__main__":
    sys.exit(main())
