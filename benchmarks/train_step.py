"""Training step cost: ERB only vs ERB + RRB (interval 5), and training images/s.

Two trainers with the same backbone, batch and initial weights take turns: five plain steps
(pretrain stage: ArcFace only), then five joint steps (the fifth runs the refined branch: the mined
images' pass, the closeness and diversity losses). As in ``Trainer.fit``, each step is told the next
batch's labels, so the fifth step's soft mining and the decoding of its images run in the background
during the fourth; what they still cost the steps (CPU time, the GIL) is in the figure. The ratio of
the two blocks' median times (over ``--rounds``, 6 by default) is the method's overhead; target <= 1.25.
The mined images get their own forward pass (``method.separate_pass``, the default); ``--shared-pass``
puts them into the batch's. Batches are decoded once up front, so the figure measures the step, not the
loader's JPEG decoding.

The reference setting has K*(NE+NH) = 64*8 = 512 mined images every 5 steps for a batch of 512;
this harness keeps that proportion (K = batch/8).

    python -m benchmarks.train_step                    # IR-18 and IR-50, full width, CPU
    python -m benchmarks.train_step --quick            # width 0.25: a smoke run
    python -m benchmarks.train_step --device cuda --amp bf16 --backbones ir50 ir100 --batch 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.results import write_result
from cdface.training.config import DataConfig, MethodConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from cdface.training.data.synthetic import SyntheticSpec, write_recordio
from cdface.training.distributed import DistEnv
from cdface.training.trainer import Trainer

INTERVAL = 5


def make_trainer(stage: str, backbone: str, width: float, batch: int, data: Path, out: Path, args) -> Trainer:
    cfg = TrainConfig(
        model=ModelConfig(backbone=backbone, width=width),
        method=MethodConfig(interval=INTERVAL, identities=max(batch // 8, 1), separate_pass=not args.shared_pass),
        data=DataConfig(path=str(data), workers=0),
        optim=OptimConfig(batch_size=batch, epochs=1),
        run=RunConfig(stage=stage, output=str(out / stage), progress=False, tensorboard=False,
                      amp=args.amp, device=args.device, threads=args.threads),
    )
    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    return Trainer(cfg, DistEnv(rank=0, world_size=1, local_rank=0, device=device))


def timed_block(trainer: Trainer, batches: list) -> float:
    """The batches as consecutive steps, each told the next batch's labels as ``fit`` tells it: a step
    before a mining one starts that mining (and the decoding of its images) in the background."""
    sync = torch.cuda.synchronize if trainer.env.device.type == "cuda" else (lambda: None)
    following = [labels for _, labels, _ in batches[1:]] + [None]
    sync()
    start = time.perf_counter()
    for (images, labels, indices), next_labels in zip(batches, following):
        trainer.train_step(images, labels, indices, next_labels=next_labels)
    sync()
    return time.perf_counter() - start


def bench_backbone(backbone: str, args, data: Path, work: Path) -> dict:
    width = 0.25 if args.quick else 1.0
    erb = make_trainer("pretrain", backbone, width, args.batch, data, work, args)
    joint = make_trainer("joint", backbone, width, args.batch, data, work, args)
    loader = iter(erb.loader())
    batches = [next(loader) for _ in range(INTERVAL)]
    erb.model.train()
    joint.model.train()
    timed_block(erb, batches[:1])  # warm-up (allocator, kernels)
    joint.step = INTERVAL - 1
    timed_block(joint, batches[-2:])  # a mining step among them
    erb_times, joint_times = [], []
    for _ in range(args.rounds):
        # Steps 1..5: the last one runs the refined branch, exactly one RRB per 5 steps, its samples mined
        # during step 4 as in training.
        joint.step = 1
        erb_times.append(timed_block(erb, batches))
        joint_times.append(timed_block(joint, batches))
    erb_s, joint_s = statistics.median(erb_times), statistics.median(joint_times)
    return {"erb_block_s": erb_s, "joint_block_s": joint_s, "ratio": joint_s / erb_s,
            "erb_images_per_s": INTERVAL * args.batch / erb_s, "joint_images_per_s": INTERVAL * args.batch / joint_s,
            "width": width}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="width 0.25, fewer rounds")
    parser.add_argument("--backbones", nargs="+", default=["ir18", "ir50"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--shared-pass", action="store_true", help="mined images in the batch's forward pass")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 2)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        identities = max(args.batch // 8, 1) * 4
        write_recordio(data, SyntheticSpec(identities=identities, per_identity=max(2 * args.batch // identities, 10)))
        for backbone in args.backbones:
            r = bench_backbone(backbone, args, data, Path(tmp))
            tag = f"{backbone}{'_w025' if args.quick else ''}_{args.device}{'' if args.amp == 'none' else '_' + args.amp}"
            tag += "_shared_pass" if args.shared_pass else ""
            details = {**r, "batch": args.batch, "interval": INTERVAL, "identities": max(args.batch // 8, 1),
                       "separate_pass": not args.shared_pass,
                       "rounds": args.rounds, "amp": args.amp, "threads": args.threads, "torch": torch.__version__}
            write_result(f"train_rrb_overhead_{tag}", "step time ERB+RRB / ERB only (5-step blocks)",
                         r["joint_block_s"], r["erb_block_s"], "<= 1.25", details)
            write_result(f"train_throughput_{tag}", "training images/s (ERB steps)", r["erb_images_per_s"], None,
                         "reported", details)
            print(f"{backbone}: ERB {r['erb_images_per_s']:.1f} img/s, ERB+RRB {r['joint_images_per_s']:.1f} img/s, "
                  f"overhead ratio {r['ratio']:.3f} (target <= 1.25)", flush=True)


if __name__ == "__main__":
    main()
