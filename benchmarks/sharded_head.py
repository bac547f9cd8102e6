"""The sharded margin head (Partial FC) against the replicated head, on W CPU processes (gloo).

Synthetic centres and embeddings (no images): per rank, a local batch of ``--batch`` embeddings
(512-d), the ArcFace loss, its backward down to the embeddings, and the refined branch's share of a
mining step: the top-NP hard negatives (NP = 500) of ``--mined`` rows and their centres.

  * replicated: every rank holds all C centres; DDP would all-reduce their whole gradient each step,
    which the harness does (through the same byte-counting collectives as the sharded head);
  * sharded: rank r holds C/W centres; the embeddings are all-gathered, the softmax reduced across
    ranks, the top-NP candidates merged and the needed centres fetched from their owners.

Reported per number of identities: per-rank head memory (centres + gradient + SGD momentum, from
the tensor sizes), the peak resident memory a rank grows by, bytes a rank puts into collectives per
step (mining and plain steps), and the step time (median and spread; each arm runs in its own
process groups, ``--rounds`` of them interleaved A B B A ..., each timing ``--steps`` steps after a
warm-up). Then an estimate, on paper, for 8 GPUs at Glint360K and 2M identities.

    python -m benchmarks.sharded_head                                           # 100k identities, 512-d
    python -m benchmarks.sharded_head --classes 1000000 --embedding-size 256    # 1M identities, 256-d
    python -m benchmarks.sharded_head --quick                                   # 20k: a smoke run

At 1M identities and 512-d the replicated arm does not fit two ranks on a 24 GB machine (each rank
grew past 12 GB before the kernel's OOM killer stopped it): the 1M point runs at 256-d.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def _build(arm: str, classes: int, dim: int):
    torch.manual_seed(0)
    if arm == "replicated":
        return MarginHead(dim, classes, ArcFaceMargin(), 64.0, NP), ProcessGroup()  # the group: DDP's all-reduce
    head = ShardedMarginHead(dim, classes, ArcFaceMargin(), 64.0, NP)
    return head, head.comm


def _worker(rank: int, world_size: int, port: int, arm: str, classes: int, args, out: str) -> None:
    """One arm in its own process group: its peak memory is then its own."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    head, comm = _build(arm, classes, args.embedding_size)
    g = torch.Generator().manual_seed(1 + rank)
    embeddings = torch.randn(args.batch, args.embedding_size, generator=g)
    labels = torch.randint(0, classes, (args.batch,), generator=g)
    mined = torch.arange(args.mined)

    def step(mining: bool = True) -> None:
        x = embeddings.clone().requires_grad_(True)
        out = head(x, labels, negatives_for=mined if mining else None)
        out.loss.backward()
        if arm == "replicated":
            comm.all_reduce(head.weight.grad)
        if mining:
            head.centres(out.hard_negatives)
        head.weight.grad = None

    step()  # warm-up
    before = comm.bytes_sent
    step()
    mining_bytes = comm.bytes_sent - before
    step(mining=False)
    plain_bytes = comm.bytes_sent - before - mining_bytes
    times = []
    for _ in range(args.steps):
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if rank == 0:
        Path(out).write_text(json.dumps({
            "times_s": times, "bytes_per_step": mining_bytes,
            "bytes_per_plain_step": plain_bytes,
            "head_rows": head.weight.shape[0],
            "head_memory_bytes": 3 * head.weight.numel() * FLOAT,  # centres, gradient, momentum
            "peak_rss_growth_bytes": peak - rss_before,
        }))
    dist.destroy_process_group()


def measure(classes: int, args) -> dict:
    """Both arms, ``args.rounds`` process groups each, interleaved A B B A ...; rank 0's figures."""
    record: dict = {}
    order = ["replicated", "sharded"]
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for arm in order if round_ % 2 == 0 else order[::-1]:
                out = Path(tmp) / f"{arm}-{round_}.json"
                mp.spawn(_worker, args=(args.processes, _free_port(), arm, classes, args, str(out)),
                         nprocs=args.processes)
                got = json.loads(out.read_text())
                mine = record.setdefault(arm, {**got, "times_s": [], "peak_rss_growth_bytes": 0})
                mine["times_s"] += got["times_s"]
                mine["peak_rss_growth_bytes"] = max(mine["peak_rss_growth_bytes"], got["peak_rss_growth_bytes"])
    return record


def _summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "rounds": len(times)}


def estimate(classes: int, gpus: int, batch: int = 128, mined: int = 8, dim: int = D) -> dict:
    """Per-GPU head memory and bytes put into collectives per step, from the collectives the head issues.

    Replicated: C*D centres + gradient + momentum; the gradient (C*D) all-reduced every step.
    Sharded (N = W*b): the all-gathers of the local embeddings (b*D) and labels (b int64), four
    reductions over the global batch (row max, sum of exponentials, target logit, target cosine:
    N each) and the embedding-gradient all-reduce (N*D). A mining step adds the requested rows
    (K int64), the top-NP candidates of all W*K requested rows (cosine + int64 index each), the
    requested class ids (at most K*NP) and the owned share of their centres (at most min(C, W*K*NP)/W
    rows of D): upper bounds, as hard negatives overlap.
    """
    rows = -(-classes // gpus)
    n = batch * gpus
    plain = batch * dim * FLOAT + batch * 8 + 4 * n * FLOAT + n * dim * FLOAT
    union = min(classes, gpus * mined * NP)
    mining = 8 + mined * 8 + gpus * mined * NP * (FLOAT + 8) + 8 + mined * NP * 8 + 8 + -(-union // gpus) * dim * FLOAT
    return {
        "classes": classes, "gpus": gpus, "batch_per_gpu": batch, "mined_rows_per_gpu": mined,
        "replicated_head_gb": 3 * classes * dim * FLOAT / 1e9,
        "sharded_head_gb": 3 * rows * dim * FLOAT / 1e9,
        "replicated_bytes_per_step_mb": classes * dim * FLOAT / 1e6,
        "sharded_bytes_per_plain_step_mb": plain / 1e6,
        "sharded_bytes_per_mining_step_mb": (plain + mining) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--embedding-size", type=int, default=D)
    parser.add_argument("--batch", type=int, default=64, help="embeddings per rank")
    parser.add_argument("--mined", type=int, default=32, help="rows per rank whose hard negatives are searched")
    parser.add_argument("--rounds", type=int, default=4, help="process groups per arm, interleaved")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process group, after a warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--quick", action="store_true", help="20k identities, 2 rounds, nothing written")
    args = parser.parse_args()
    if args.quick:
        args.classes, args.rounds = [20_000], 2

    for classes in args.classes:
        record = measure(classes, args)
        rep, sh = record["replicated"], record["sharded"]
        details = {
            "processes": args.processes, "batch_per_rank": args.batch, "mined_rows_per_rank": args.mined,
            "embedding_size": args.embedding_size, "num_hard_negatives": NP, "threads_per_process": args.threads,
            "torch": torch.__version__,
            **{f"{arm}_{key}": value for arm, r in (("replicated", rep), ("sharded", sh))
               for key, value in {**{k: v for k, v in r.items() if k != "times_s"}, **_summary(r["times_s"])}.items()},
        }
        details["bytes_ratio"] = sh["bytes_per_step"] / rep["bytes_per_step"]
        details["step_time_ratio"] = _summary(sh["times_s"])["median_s"] / _summary(rep["times_s"])["median_s"]
        # The formula, checked here on the measured configuration, then applied to 8 GPUs.
        here = estimate(int(classes), args.processes, args.batch, args.mined, args.embedding_size)
        details["formula_check"] = {"plain_step_mb": [here["sharded_bytes_per_plain_step_mb"],
                                                      sh["bytes_per_plain_step"] / 1e6],
                                    "mining_step_mb_upper_bound": [here["sharded_bytes_per_mining_step_mb"],
                                                                   sh["bytes_per_step"] / 1e6]}
        details["estimates_8_gpus"] = [estimate(360_232, 8), estimate(2_000_000, 8)]
        label = f"{int(classes) // 1000}k" if int(classes) < 1_000_000 else f"{int(classes) // 1_000_000}m"
        print(f"{classes} identities: head memory {sh['head_memory_bytes'] / 1e9:.2f} vs "
              f"{rep['head_memory_bytes'] / 1e9:.2f} GB per rank; bytes/step {sh['bytes_per_step'] / 1e6:.1f} vs "
              f"{rep['bytes_per_step'] / 1e6:.1f} MB; step {details['sharded_median_s']:.3f} vs "
              f"{details['replicated_median_s']:.3f} s (median of {len(sh['times_s'])}); peak RSS growth "
              f"{sh['peak_rss_growth_bytes'] / 1e9:.2f} vs {rep['peak_rss_growth_bytes'] / 1e9:.2f} GB")
        if not args.quick:
            suffix = "" if args.embedding_size == D else f"_d{args.embedding_size}"
            write_result(f"sharded_head_{label}{suffix}_{args.processes}ranks_cpu",
                         "per-rank head memory (centres + grad + momentum), sharded / replicated",
                         sh["head_memory_bytes"], rep["head_memory_bytes"], f"<= {1 / args.processes + 0.05:.2f}",
                         details)


if __name__ == "__main__":
    main()
