"""The sharded margin head (Partial FC) against the replicated head, on W CPU processes (gloo).

Synthetic centres and embeddings (no images): per rank, a local batch of ``--batch`` embeddings
(512-d), the ArcFace loss, its backward down to the embeddings, and the refined branch's share of a
mining step: the top-NP hard negatives (NP = 500) of ``--mined`` rows and their centres.

  * replicated: every rank holds all C centres; DDP would all-reduce their whole gradient each step,
    which the harness does (through the same byte-counting collectives as the sharded head);
  * sharded: rank r holds C/W centres; the embeddings are all-gathered, the softmax reduced across
    ranks, the top-NP candidates merged and the needed centres fetched from their owners.

Reported per number of identities: per-rank head memory (centres + gradient + SGD momentum, from
the tensor sizes), the largest activation (the cosine matrix), bytes a rank puts into collectives
per step, and the step time (median and spread over ``--rounds`` after a warm-up, the two arms
interleaved A B B A ...). Then an estimate, on paper, for 8 GPUs at Glint360K and 2M identities.

    python -m benchmarks.sharded_head                  # 100k and 1M identities, 2 processes
    python -m benchmarks.sharded_head --quick          # 20k identities, 2 rounds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.results import write_result
from cdface.training.heads import ArcFaceMargin, MarginHead
from cdface.training.partial_fc import ProcessGroup, ShardedMarginHead

D, NP, FLOAT = 512, 500, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _arms(classes: int, args, rank: int):
    torch.manual_seed(0)
    replicated = MarginHead(D, classes, ArcFaceMargin(), 64.0, NP)
    torch.manual_seed(0)
    sharded = ShardedMarginHead(D, classes, ArcFaceMargin(), 64.0, NP)
    ddp = ProcessGroup()  # the replicated head's gradient all-reduce, as DDP would do it
    g = torch.Generator().manual_seed(1 + rank)
    embeddings = torch.randn(args.batch, D, generator=g)
    labels = torch.randint(0, classes, (args.batch,), generator=g)
    mined = torch.arange(args.mined)

    def run(head, after, mining: bool = True) -> None:
        x = embeddings.clone().requires_grad_(True)
        out = head(x, labels, negatives_for=mined if mining else None)
        out.loss.backward()
        after(head)
        if mining:
            head.centres(out.hard_negatives)
        head.weight.grad = None

    def reduce(head) -> None:
        ddp.all_reduce(head.weight.grad)

    def nothing(head) -> None:
        pass

    return {
        "replicated": (replicated, ddp, lambda mining=True: run(replicated, reduce, mining)),
        "sharded": (sharded, sharded.comm, lambda mining=True: run(sharded, nothing, mining)),
    }


def _worker(rank: int, world_size: int, port: int, args, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    results = {}
    for classes in args.classes:
        arms = _arms(classes, args, rank)
        record: dict = {"classes": classes}
        for name, (head, comm, step) in arms.items():
            step()  # warm-up
            before = comm.bytes_sent
            step()
            mining_bytes = comm.bytes_sent - before
            step(mining=False)
            plain_bytes = comm.bytes_sent - before - mining_bytes
            record[name] = {"bytes_per_step": mining_bytes, "bytes_per_plain_step": plain_bytes,
                            "times_s": [],
                            "head_rows": head.weight.shape[0],
                            "head_memory_bytes": 3 * head.weight.numel() * FLOAT,  # centres, gradient, momentum
                            "cosine_matrix_bytes": (args.batch * (1 if name == "replicated" else world_size)
                                                    * head.weight.shape[0] * FLOAT)}
        order = ["replicated", "sharded"]
        for round_ in range(args.rounds):
            for name in order if round_ % 2 == 0 else order[::-1]:
                dist.barrier()
                start = time.perf_counter()
                arms[name][2]()
                dist.barrier()
                record[name]["times_s"].append(time.perf_counter() - start)
        results[classes] = record
        del arms
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "rounds": len(times)}


def estimate(classes: int, gpus: int, batch: int = 128, mined: int = 8) -> dict:
    """Per-GPU head memory and bytes into collectives per step, from the formulas the 2-process run checks.

    Replicated: C*D centres + gradient + momentum; the gradient (C*D) all-reduced every step.
    Sharded: C/W of each; per step the all-gathers of embeddings (b*D) and labels, three reductions
    over the global batch (W*b each), the embedding-gradient all-reduce (W*b*D), and on mining steps
    the candidates (W * K * NP values and indices) and the fetched centres (at most W*K*NP rows).
    """
    rows = -(-classes // gpus)
    global_batch = batch * gpus
    sharded = (batch * D + batch * 2 + 3 * global_batch + global_batch * D) * FLOAT
    mining = (2 * gpus * mined * NP * 2 + gpus * mined * NP * D) * FLOAT
    return {
        "classes": classes, "gpus": gpus, "batch_per_gpu": batch, "mined_rows_per_gpu": mined,
        "replicated_head_gb": 3 * classes * D * FLOAT / 1e9,
        "sharded_head_gb": 3 * rows * D * FLOAT / 1e9,
        "replicated_bytes_per_step_mb": classes * D * FLOAT / 1e6,
        "sharded_bytes_per_step_mb": sharded / 1e6,
        "sharded_bytes_per_mining_step_mb": (sharded + mining) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="embeddings per rank")
    parser.add_argument("--mined", type=int, default=32, help="rows per rank whose hard negatives are searched")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--quick", action="store_true", help="20k identities, 2 rounds, nothing written")
    args = parser.parse_args()
    if args.quick:
        args.classes, args.rounds = [20_000], 2

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        mp.spawn(_worker, args=(args.processes, _free_port(), args, str(out)), nprocs=args.processes)
        results = json.loads(out.read_text())

    for classes, record in results.items():
        rep, sh = record["replicated"], record["sharded"]
        details = {
            "processes": args.processes, "batch_per_rank": args.batch, "mined_rows_per_rank": args.mined,
            "embedding_size": D, "num_hard_negatives": NP, "threads_per_process": args.threads,
            "torch": torch.__version__,
            **{f"{arm}_{key}": value for arm, r in (("replicated", rep), ("sharded", sh))
               for key, value in {**{k: v for k, v in r.items() if k != "times_s"}, **_summary(r["times_s"])}.items()},
        }
        details["bytes_ratio"] = sh["bytes_per_step"] / rep["bytes_per_step"]
        details["step_time_ratio"] = _summary(sh["times_s"])["median_s"] / _summary(rep["times_s"])["median_s"]
        details["estimates_8_gpus"] = [estimate(360_232, 8), estimate(2_000_000, 8)]
        label = f"{int(classes) // 1000}k" if int(classes) < 1_000_000 else f"{int(classes) // 1_000_000}m"
        print(f"{classes} identities: head memory {sh['head_memory_bytes'] / 1e9:.2f} vs "
              f"{rep['head_memory_bytes'] / 1e9:.2f} GB per rank; bytes/step {sh['bytes_per_step'] / 1e6:.1f} vs "
              f"{rep['bytes_per_step'] / 1e6:.1f} MB; step {details['sharded_median_s']:.3f} vs "
              f"{details['replicated_median_s']:.3f} s (median of {args.rounds})")
        if not args.quick:
            write_result(f"sharded_head_{label}_{args.processes}ranks_cpu",
                         "per-rank head memory (centres + grad + momentum), sharded / replicated",
                         sh["head_memory_bytes"], rep["head_memory_bytes"], f"<= {1 / args.processes + 0.05:.2f}",
                         details)


if __name__ == "__main__":
    main()
