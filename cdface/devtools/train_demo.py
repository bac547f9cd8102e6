"""The training demo: synthetic identities -> pretrain -> joint stage -> evaluation -> ONNX export.

    python -m cdface.devtools.train_demo --workdir work/train-demo      (what `make train-demo` runs)

The model it trains has only ever seen synthetic faces: it is not served by `make demo` unless you
ask for it (`make demo MODEL=work/train-demo/export`).

Each step prints the command it runs, so a user can re-run or change any of them. Steps whose
output is already there are skipped, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cdface.core.errors import exit_on_error
from cdface.devtools.commands import Command, cdface, run


def step(title: str, command: Command, done: Path | None = None) -> None:
    if done is not None and done.exists():
        print(f"\n== {title}: already done ({done})", flush=True)
        return
    run(title, command)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("work/train-demo"))
    args = parser.parse_args(argv)
    w = args.workdir
    data, pretrain, joint, export = w / "data", w / "pretrain", w / "joint", w / "export"

    step("1. synthetic identities (training set + held-out verification pairs)",
         cdface("data", "synth", "--out", str(data), "--identities", "200", "--per-identity", "16",
                "--val-identities", "100", "--val-pairs", "600", "--format", "recordio"),
         done=data / "synthetic.json")
    common = ["--preset", "demo", "--set", f"data.path={data}", "--set", f"data.val=[{data / 'val.bin'}]"]
    step("2. pretrain stage: plain ArcFace, fills the difficulty score bank",
         cdface("train", *common, "--set", "run.stage=pretrain", "--set", f"run.output={pretrain}"),
         done=pretrain / "model.pt")
    step("3. joint stage: ArcFace + closeness + diversity with soft mining",
         cdface("train", *common, "--set", f"run.output={joint}",
                "--set", f"run.init_from={pretrain / 'checkpoints' / 'last.pt'}"),
         done=joint / "model.pt")
    step("4. evaluation report of the trained model (thresholds per FAR for the manifest)",
         cdface("eval", "bin", str(joint / "model.pt"), str(data / "val.bin"), "--out", str(w / "eval.json"),
                "--plots", str(w / "plots")),
         done=w / "eval.json")
    step("5. export to ONNX (preprocessing folded in, parity-checked against PyTorch)",
         cdface("export", "onnx", str(joint / "model.pt"), "--out", str(export), "--name", "cdface-demo",
                "--version", "1", "--eval-report", str(w / "eval.json")),
         done=export / "manifest.json")
    step("6. the exported model, measured on the held-out identities",
         cdface("eval", "bin", str(export / "model.onnx"), str(data / "val.bin")))


if __name__ == "__main__":
    exit_on_error(main, "cdface demo")
