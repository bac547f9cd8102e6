"""The training demo's verification accuracy on held-out synthetic identities (the figure the README quotes).

Runs `make train-demo`'s steps (synthetic identities -> pretrain -> joint stage -> evaluation ->
ONNX export) and records the 10-fold accuracy of the joint-stage model, with the pretrain model's
as the baseline. Chance is 0.5.

    python -m benchmarks.demo_accuracy [--workdir work/train-demo]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.results import write_result
from cdface.devtools import train_demo as demo
from cdface.training.checkpoint import load_checkpoint


def accuracy(model_pt: Path) -> dict:
    report = load_checkpoint(model_pt)["evaluation"]
    return next(r for r in report["results"] if r["metric"] == "accuracy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("work/train-demo"))
    args = parser.parse_args()
    started = time.monotonic()
    demo.main(["--workdir", str(args.workdir)])
    joint, pretrain = accuracy(args.workdir / "joint" / "model.pt"), accuracy(args.workdir / "pretrain" / "model.pt")
    exported = json.loads((args.workdir / "eval.json").read_text())
    write_result("train_demo_accuracy", "10-fold verification accuracy, held-out synthetic identities (joint stage; "
                 "baseline: pretrain stage)", joint["value"], pretrain["value"], "value >= 0.75 (chance 0.5)",
                 {"joint": joint, "pretrain": pretrain, "pairs": joint.get("pairs"), "eval_report": exported,
                  "wall_s": round(time.monotonic() - started, 1)})
    print(f"demo accuracy: pretrain {pretrain['value']:.4f}, joint {joint['value']:.4f}")


if __name__ == "__main__":
    main()
