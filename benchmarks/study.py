"""The study: does ArcFace + closeness + diversity beat ArcFace alone, on data we can make here?

A miniature, honest reproduction of the claim of Zhao et al. (ACCV 2022) on synthetic identities,
with the `paper` preset's faithful settings (no clipping, diversity at the head's s, hard samples
in (0, threshold), the shared prototype set, a separate forward pass for the mined images):

1. Data, made once per size and reused: a training set with a known share of hard samples, and a
   held-out set of *other* identities (several images each). Every pair of held-out images is
   scored: all impostor pairs give TAR@FAR (the lowest measurable FAR is about 1 / impostor pairs),
   and a fixed balanced list (every genuine pair plus as many sampled impostor pairs) gives the
   10-fold verification accuracy of the LFW protocol.
2. The ablation, per seed: one plain-ArcFace pretrain, then from its checkpoint the arms of
   ``ARMS``, with the same backbone, steps and seed: ArcFace alone with the refined branch's forward
   run at zero weights (the reference every other arm is paired with), the method at the
   supplement's lambdas (0.5 / 2) and at the authors' code's (0.5 / 1), and ArcFace alone without
   the refined branch's forward at all (what that forward costs by itself). Every joint run is
   scored on the held-out set at each epoch end (the curves), and every ``probe_every``-th
   refined-branch step logs each loss term's gradient norm over the backbone (which term dominates).
3. Optionally (``Size.sweep``), a lambda1/lambda2 sweep on the grid of the supplement's Table A1,
   from the seed-0 pretrain.
4. A generated report (``docs/study.md``: never edit it by hand), figures, and
   ``benchmarks/results/study_ablation.json`` (headline: the paired difference at TAR@FAR=1e-3).

    python -m benchmarks.study --size smoke    # < 60 s on 2 cores: tests the harness, proves nothing
    python -m benchmarks.study --size cpu2h    # ~35 min on the 2-core machine: docs/study.md
    python -m benchmarks.study --size cpu2h --doses --variants --sweep    # + 21 one-seed runs: ~80 min
    python -m benchmarks.study --size gpu      # IR-50, thousands of identities, bf16: one GPU

Every run has its own directory; a run whose ``model.pt`` exists is not trained again, and an
interrupted run resumes from its last checkpoint (each epoch end), so an interrupted study picks up
where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from benchmarks.results import RESULTS_DIR, git_commit, machine, write_result
from cdface.core.atomic import atomic_write_text

REPO = Path(__file__).resolve().parent.parent
log = logging.getLogger("cdface.study")


@dataclass(frozen=True)
class Arm:
    key: str
    label: str
    lambdas: tuple[float, float]  # (lambda_closeness, lambda_diversity)
    refined: bool = True          # False: no refined-branch forward at all (plain ArcFace steps)
    curve: bool = False           # scored on the held-out set at every epoch end (each scoring costs ~20 CPU s)


BASELINE = (0.0, 0.0)
METHOD = (0.5, 2.0)   # the supplement's lambdas, the `paper` preset's
AUTHORS = (0.5, 1.0)  # the authors' code's default lambda2
ARMS = (
    Arm("baseline", "ArcFace alone (refined-branch forward at zero weight)", BASELINE, curve=True),
    Arm("method", "ArcFace + closeness + diversity (supplement)", METHOD, curve=True),
    Arm("authors", "ArcFace + closeness + diversity (authors' code)", AUTHORS),
    Arm("plain", "ArcFace alone, no refined-branch forward", BASELINE, refined=False),
)
REFERENCE = "baseline"  # every other arm is paired with this one, seed by seed
# The supplement's Table A1: lambda1 varies with lambda2 = 2, then lambda2 varies with lambda1 = 0.5.
SWEEP = [(l1, 2.0) for l1 in (0.1, 0.5, 2.0, 5.0)] + [(0.5, l2) for l2 in (1.0, 2.0, 5.0, 10.0)]
TERM_NAMES = {"erb": "ArcFace", "closeness": "closeness", "diversity": "diversity"}
# Each faithful setting undone on its own (seed 0, the method's lambdas): does it matter here?
VARIANTS = (
    ("shared_pass", "mined images in the batch's forward pass", ("method.separate_pass=false",)),
    ("per_sample", "per-sample prototypes", ("method.prototypes=per_sample",)),
    ("no_lower_bound", "no lower bound on hard scores", ("method.hard_lower_bound=null",)),
    ("clip5", "gradient clipping at 5", ("optim.grad_clip=5",)),
    ("diversity_2s", "diversity at twice the head's s", ("method.diversity_scale=DOUBLE_HEAD_SCALE",)),
)


def doses(size: "Size") -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """Dose-response of the method's other knobs around the size's own (seed 0, the method's lambdas;
    lambda2's is the sweep's): NP prototypes, K mined identities (K x 8 mined images), the interval."""
    nps = (max(1, size.hard_negatives // 5), min(3 * size.hard_negatives, size.identities - 1))
    ks = (max(1, size.mined_identities // 2), 2 * size.mined_identities)
    intervals = (max(1, size.interval * 2 // 5), size.interval * 2)
    return (
        *((f"np{v}", f"NP = {v} hard-negative prototypes", (f"head.num_hard_negatives={v}",)) for v in nps),
        *((f"k{v}", f"K = {v} mined identities ({8 * v} mined images)", (f"method.identities={v}",)) for v in ks),
        *((f"interval{v}", f"the refined branch every {v} steps", (f"method.interval={v}",)) for v in intervals),
        # Below the sweep's grid (lambda2 >= 1): where a too-strong diversity term stops hurting, if it does.
        *((f"lambda2_{v:g}", f"lambda2 = {v:g}", (f"method.lambda_diversity={v:g}",)) for v in (0.25, 0.5)),
    )

REPORTED_FARS = (1e-2, 1e-3, 1e-4)
HEADLINE_FAR = 1e-3
ALL_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass(frozen=True)
class Size:
    """Everything that differs between the smoke, cpu2h and gpu studies."""

    name: str
    backbone: str
    width: float
    identities: int
    per_identity: int
    heldout_identities: int
    heldout_per_identity: int
    seeds: int
    batch_size: int
    mined_identities: int           # K: the method's proportion is K x (NE + NH) = batch
    pretrain_epochs: int
    joint_epochs: int
    milestones: tuple[float, ...]   # lr x0.1 at these epochs, in each stage (each stage counts from 0)
    hard_share: float = 0.1
    # The held-out set's own hard share. Hard images of different people score alike (their identity is
    # mostly gone), so impostor pairs of two hard images take every slot a strict FAR allows once there
    # are more of them than FAR x impostor pairs, about share^2 of all pairs: at 10% TAR@FAR=1e-3 sits at
    # the hard samples' floor (~2%) whatever the model. None: the training set's share.
    heldout_hard_share: Optional[float] = None
    interval: int = 5
    head_scale: float = 32.0
    head_margin: float = 0.3
    hard_negatives: int = 50        # NP
    pretrain_max_steps: Optional[int] = None
    joint_max_steps: Optional[int] = None
    sweep: bool = False             # the Table A1 grid, one seed
    variants: bool = False          # VARIANTS, one seed
    doses: bool = False             # DOSES, one seed
    probe_every: int = 10           # refined-branch steps between gradient probes
    workers: int = 1
    threads: Optional[int] = 2
    device: str = "cpu"
    amp: str = "none"
    data_seed: int = 0
    note: str = ""

    @property
    def heldout_hard(self) -> float:
        return self.hard_share if self.heldout_hard_share is None else self.heldout_hard_share

    @property
    def heldout_images(self) -> int:
        return self.heldout_identities * self.heldout_per_identity

    @property
    def genuine_pairs(self) -> int:
        return self.heldout_identities * math.comb(self.heldout_per_identity, 2)

    @property
    def impostor_pairs(self) -> int:
        return math.comb(self.heldout_images, 2) - self.genuine_pairs

    @property
    def steps_per_epoch(self) -> int:
        return self.identities * self.per_identity // self.batch_size

    @property
    def joint_steps(self) -> int:
        steps = self.steps_per_epoch * self.joint_epochs
        return min(steps, self.joint_max_steps) if self.joint_max_steps else steps

    @property
    def refined_steps(self) -> int:
        return -(-self.joint_steps // self.interval)


SIZES = {
    # Tests the harness in CI: every code path (every arm, the sweep, the probe, the report) in well
    # under a minute. The RRB runs on every step so its losses show up in two steps; the numbers mean nothing.
    "smoke": Size(name="smoke", backbone="ir18", width=0.0625, identities=20, per_identity=12,
                  heldout_identities=6, heldout_per_identity=4, seeds=1, batch_size=16, mined_identities=2,
                  pretrain_epochs=1, joint_epochs=1, milestones=(), interval=1, hard_negatives=8,
                  pretrain_max_steps=2, joint_max_steps=2, sweep=True, variants=True, doses=True, probe_every=1, workers=0,
                  threads=1,
                  note="harness test only: a few steps, numbers are meaningless"),
    # Measured on the quiet 2-core machine on 2026-12-03 (docs/study.md): the ablation (3 seeds x a
    # pretrain and four joint runs) takes 34 min: a 600-step pretrain ~64 s, a 750-step joint run 80 s
    # (no refined branch) to ~150 s (the method, with its 5 epoch-end scorings and gradient probes).
    # Each of --doses / --variants / --sweep adds one joint run per entry (~2 min each), so all of them
    # together still fit the 2-hour budget the size is named for. (An earlier estimate of ~2 h came from
    # runs timed at load 6-8.) The 112 px input is the serving contract's and IR-18 at
    # 1/16 width is overhead-bound (1/8 width costs ~2x a step), so the batch and the epoch count are
    # the levers: 300 identities, a 5-epoch joint stage of 750 steps, 150 of them refined-branch steps.
    # Those earlier runs (seed 0's pretrain and plain arm, held-out hard share 10%) ended at 84.7% / 88.3% accuracy and TAR@FAR=1e-3 of 2.1% / 2.3%;
    # without the pairs holding a hard image, 75.8% at 1e-3, and every impostor pair above that
    # threshold paired two hard images. Rescored with the held-out hard share at 2% (12 hard images of
    # 600), the same two models reach 27.7% / 70.2% at 1e-3 and 7.4% / 13.2% at 1e-4: the held-out set
    # keeps that share, and the report still scores the hard images' genuine pairs on their own.
    "cpu2h": Size(name="cpu2h", backbone="ir18", width=0.0625, identities=300, per_identity=8,
                  heldout_identities=100, heldout_per_identity=6, seeds=3, batch_size=16, mined_identities=2,
                  pretrain_epochs=4, joint_epochs=5, milestones=(4.0,), probe_every=10, heldout_hard_share=0.02,
                  note="IR-18 at 1/16 width, 300 identities, batch 16, 4 + 5 epochs, 150 refined-branch steps "
                       "per joint run, 2% hard held-out images"),
    # The configuration for a GPU machine: IR-50 at full width, the paper's head (s = 64, m = 0.5,
    # NP = 500), batch 512 with K = 64, bf16, 4 pretrain epochs as in the reference setting and a
    # shortened joint schedule.
    "gpu": Size(name="gpu", backbone="ir50", width=1.0, identities=5000, per_identity=32,
                heldout_identities=1000, heldout_per_identity=10, seeds=3, batch_size=512, mined_identities=64,
                pretrain_epochs=4, joint_epochs=12, milestones=(6.0, 9.0, 11.0), head_scale=64.0, head_margin=0.5,
                hard_negatives=500, sweep=True, variants=True, doses=True, probe_every=20, workers=8, threads=None, device="cuda",
                amp="bf16", heldout_hard_share=0.01, note="IR-50 full width, paper head, 4 + 12 epochs, bf16 on one GPU"),
}


# -- data -----------------------------------------------------------------------------------------


def make_data(size: Size, work: Path) -> tuple[Path, Path]:
    """The training RecordIO and the held-out ``heldout.npz``, each made once (their presence marks them done)."""
    from cdface.training.data.synthetic import VAL_ROLE, SyntheticSpec, hard_sample_mask, render_sample, write_recordio

    data, heldout = work / "data", work / "heldout.npz"
    manifest = data / "synthetic.json"
    if manifest.is_file():
        made = json.loads(manifest.read_text())
        if (made["identities"], made["per_identity"], made["seed"]) != (size.identities, size.per_identity,
                                                                          size.data_seed):
            raise SystemExit(f"{data} holds another size's training set; delete {work} to start this study afresh")
    else:
        started = time.perf_counter()
        write_recordio(data, SyntheticSpec(size.identities, size.per_identity, size.hard_share, size.data_seed))
        log.info("training set: %d x %d images in %.0f s", size.identities, size.per_identity,
                 time.perf_counter() - started)
    if heldout.is_file():
        with np.load(heldout) as f:
            if f["labels"].size != size.heldout_images or int(f["hard"].sum()) != round(size.heldout_hard
                                                                                        * size.heldout_images):
                raise SystemExit(f"{heldout} holds another size's held-out set; delete {work} to start afresh")
    else:
        started = time.perf_counter()
        n = size.heldout_images
        # VAL_ROLE draws identities from a generator stream of their own: none is a training identity.
        hard = hard_sample_mask(size.data_seed, n, size.heldout_hard, role=VAL_ROLE)
        labels = np.repeat(np.arange(size.heldout_identities), size.heldout_per_identity)
        images = np.stack([
            render_sample(size.data_seed, int(labels[i]), i % size.heldout_per_identity, bool(hard[i]), role=VAL_ROLE)
            for i in range(n)
        ])
        tmp = heldout.with_suffix(".tmp.npz")
        np.savez(tmp, images=images, labels=labels, hard=hard)
        os.replace(tmp, heldout)
        log.info("held-out set: %d identities x %d images in %.0f s", size.heldout_identities,
                 size.heldout_per_identity, time.perf_counter() - started)
    return data, heldout


# -- training -------------------------------------------------------------------------------------


def run_overrides(size: Size, data: Path, out: Path, seed: int) -> list[str]:
    milestones = "[" + ", ".join(f"{m:g}" for m in size.milestones) + "]"
    return [
        f"model.backbone={size.backbone}", f"model.width={size.width}",
        f"head.scale={size.head_scale}", f"head.margin={size.head_margin}",
        f"head.num_hard_negatives={size.hard_negatives}",
        f"method.interval={size.interval}", f"method.identities={size.mined_identities}",
        # The `paper` preset's faithful settings, spelt out: the demo preset this starts from differs.
        "method.diversity_scale=null", "method.hard_lower_bound=0.0", "method.prototypes=shared",
        "method.separate_pass=true", f"method.probe_gradients_every={size.probe_every}", "optim.grad_clip=0",
        f"data.path={data}", "data.val=[]", f"data.workers={size.workers}",
        f"optim.batch_size={size.batch_size}", f"optim.epochs={size.joint_epochs}", f"optim.milestones={milestones}",
        f"run.output={out}", f"run.seed={seed}", f"run.device={size.device}", f"run.amp={size.amp}",
        "run.progress=false", "run.tensorboard=false", "run.log_every=5", "run.checkpoint_every=100000",
    ] + ([f"run.threads={size.threads}"] if size.threads else [])


def arm_dir(runs: Path, seed: int, arm: Arm) -> Path:
    lambdas = f"c{arm.lambdas[0]:g}_d{arm.lambdas[1]:g}"
    return runs / f"seed{seed}" / (f"joint_{lambdas}" if arm.refined else "plain")


def train_once(size: Size, data: Path, out: Path, seed: int, stage: str, lambdas: tuple[float, float] = METHOD,
               init_from: Optional[Path] = None, refined: bool = True,
               evaluate: Optional[Callable[[Any], dict]] = None, extra: tuple[str, ...] = ()) -> dict:
    """One training run in this process, unless its ``model.pt`` exists; returns its ``run.json``.

    ``refined=False`` continues from ``init_from`` for the joint stage's epochs without any refined
    branch: a pretrain-stage run (the trainer mines only in the joint stage) with the joint schedule.
    """
    from cdface.training.config import load_config
    from cdface.training.trainer import train

    record_path = out / "run.json"
    if (out / "model.pt").is_file() and record_path.is_file():
        log.info("%s: done before, reusing it", out)
        return json.loads(record_path.read_text())
    overrides = run_overrides(size, data, out, seed)
    if stage == "pretrain":
        overrides += ["run.stage=pretrain", f"run.pretrain_epochs={size.pretrain_epochs}"]
        max_steps = size.pretrain_max_steps
    else:
        overrides += [f"run.init_from={init_from}", f"method.lambda_closeness={lambdas[0]}",
                      f"method.lambda_diversity={lambdas[1]}"]
        no_branch = ["run.stage=pretrain", f"run.pretrain_epochs={size.joint_epochs}"]
        overrides += ["run.stage=joint"] if refined else no_branch
        max_steps = size.joint_max_steps
    if max_steps:
        overrides.append(f"run.max_steps={max_steps}")
    overrides += [o.replace("DOUBLE_HEAD_SCALE", f"{2 * size.head_scale:g}") for o in extra]
    config = load_config("demo", overrides)
    # The lambdas the run trains with: an extra override (a lambda2 dose) wins over ``lambdas``.
    used = (config.method.lambda_closeness, config.method.lambda_diversity)
    log.info("%s: training (%s, seed %d%s)", out, stage, seed,
             f", lambdas {used[0]:g}/{used[1]:g}{'' if refined else ', no refined branch'}"
             if stage == "joint" else "")
    started = time.perf_counter()
    result = train(config, evaluate)
    record = {"stage": stage, "seed": seed, "lambdas": list(used) if stage == "joint" else None,
              "refined": refined if stage == "joint" else None, "steps": result.steps,
              "wall_s": time.perf_counter() - started, "overrides": overrides}
    atomic_write_text(record_path, json.dumps(record, indent=1) + "\n")
    log.info("%s: %d steps in %.0f s", out, result.steps, record["wall_s"])
    return record


# -- evaluation -----------------------------------------------------------------------------------


@dataclass
class Heldout:
    """The held-out images and the fixed pair lists every model is scored on."""

    images: np.ndarray
    labels: np.ndarray
    first: np.ndarray       # all pairs i < j
    second: np.ndarray
    same: np.ndarray
    balanced: np.ndarray    # indices into the all-pairs list: genuine and impostor alternating
    hard: np.ndarray        # per image: rendered as a hard sample

    @classmethod
    def load(cls, path: Path, seed: int) -> "Heldout":
        with np.load(path) as f:
            images, labels = f["images"], f["labels"]
            hard = f["hard"] if "hard" in f.files else np.zeros(len(labels), dtype=bool)
        first, second = np.triu_indices(len(labels), k=1)
        same = labels[first] == labels[second]
        rng = np.random.default_rng([seed, 7])
        genuine = rng.permutation(np.flatnonzero(same))
        impostor = rng.choice(np.flatnonzero(~same), size=genuine.size, replace=False)
        # Alternating same/different, as in the .bin files: every contiguous fold is balanced.
        balanced = np.stack([genuine, impostor], axis=1).reshape(-1)
        return cls(images, labels, first, second, same, balanced, hard.astype(bool))


def embed_model(model_path: Path, heldout: Heldout, device: str) -> np.ndarray:
    """Flip-augmented, L2-normalised held-out embeddings of a trained model, cached beside it."""
    cache = model_path.parent / "heldout_embeddings.npy"
    if cache.is_file() and cache.stat().st_mtime >= model_path.stat().st_mtime:  # else the model was retrained
        embeddings = np.load(cache)
        if embeddings.shape[0] == heldout.images.shape[0]:
            return embeddings
    from cdface.training.evaluation.embedders import TorchEmbedder, embed_images

    started = time.perf_counter()
    embedder = TorchEmbedder.from_checkpoint(model_path, device=device, batch_size=64)
    embeddings = embed_images(embedder, heldout.images, flip=True, batch_size=64).astype(np.float32)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, embeddings)
    os.replace(tmp, cache)
    # Kept beside the cache, so a re-invocation that reuses it still reports what the study cost.
    atomic_write_text(cache.with_suffix(".json"), json.dumps({"wall_s": time.perf_counter() - started}) + "\n")
    return embeddings


def evaluation_wall_s(runs: Path) -> float:
    return float(sum(json.loads(p.read_text())["wall_s"] for p in runs.rglob("heldout_embeddings.json")))


def pair_scores(embeddings: np.ndarray, heldout: Heldout) -> np.ndarray:
    return np.sum(embeddings[heldout.first] * embeddings[heldout.second], axis=1, dtype=np.float64)


def score_model(embeddings: np.ndarray, heldout: Heldout) -> dict:
    from cdface.training.evaluation.roc import far_key, tar_at_far
    from cdface.training.evaluation.verification import verification_accuracy

    scores = pair_scores(embeddings, heldout)
    verification = verification_accuracy(scores[heldout.balanced], heldout.same[heldout.balanced])
    genuine, impostor = scores[heldout.same], scores[~heldout.same]
    points = tar_at_far(genuine, impostor, ALL_FARS)
    # Where the strict-FAR floor comes from: the same figures over the pairs without a hard image, and
    # the share of the highest-scoring impostor pairs (as many as FAR=1e-3 allows) that pair two hard images.
    any_hard = heldout.hard[heldout.first] | heldout.hard[heldout.second]
    both_hard = (heldout.hard[heldout.first] & heldout.hard[heldout.second])[~heldout.same]
    no_hard = tar_at_far(scores[heldout.same & ~any_hard], scores[~heldout.same & ~any_hard], REPORTED_FARS)
    top = np.argsort(-impostor)[: max(1, int(HEADLINE_FAR * impostor.size))]
    # What the method is for: genuine pairs holding a hard image, accepted at the FAR=1e-3 threshold of all pairs.
    headline = points[HEADLINE_FAR]
    hard_genuine = scores[heldout.same & any_hard]
    hard_tar = (float(np.mean(hard_genuine > headline.threshold))
                if headline is not None and hard_genuine.size else None)
    return {
        "accuracy": verification.accuracy,
        "accuracy_fold_std": verification.accuracy_std,
        "tar_at_far": {far_key(far): (p.tar if p is not None else None) for far, p in points.items()},
        "genuine_mean": float(genuine.mean()),
        "impostor_mean": float(impostor.mean()),
        "tar_at_far_no_hard": {far_key(far): (p.tar if p is not None else None) for far, p in no_hard.items()},
        "top_impostors_both_hard": float(both_hard[top].mean()),
        "hard_genuine_tar": hard_tar,
    }


def epoch_evaluator(heldout: Heldout, device: str) -> Callable[[Any], dict]:
    """What the trainer calls at each epoch end with the live backbone: held-out accuracy and TAR@FAR."""
    from cdface.training.evaluation.embedders import TorchEmbedder, embed_images
    from cdface.training.evaluation.roc import far_key

    def evaluate(backbone: Any) -> dict:
        embeddings = embed_images(TorchEmbedder(backbone, device=device, batch_size=64), heldout.images, flip=True,
                                  batch_size=64).astype(np.float32)
        scores = score_model(embeddings, heldout)
        results = [{"dataset": "heldout", "metric": "accuracy", "value": scores["accuracy"]}]
        results += [{"dataset": "heldout", "metric": f"tar@far={far_key(far)}",
                     "value": scores["tar_at_far"][far_key(far)]} for far in REPORTED_FARS]
        return {"results": results}

    return evaluate


def read_metrics(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [row for row in map(json.loads, path.read_text().splitlines()) if row.get("kind") == kind]


def epoch_curve(run_dir: Path, steps_per_epoch: int) -> list[dict]:
    """The held-out figures logged at each epoch end (the last of each step, should a resumed run repeat one)."""
    from cdface.training.evaluation.roc import far_key

    by_step = {row["step"]: row for row in read_metrics(run_dir, "eval")}
    return [{"epoch": step / steps_per_epoch, "step": step, "accuracy": row.get("heldout/accuracy"),
             "tar_at_far": {far_key(f): row.get(f"heldout/tar@far={far_key(f)}") for f in REPORTED_FARS}}
            for step, row in sorted(by_step.items())]


def gradient_terms(run_dir: Path, lambdas: tuple[float, float]) -> Optional[dict]:
    """Mean gradient norm over the backbone of each term on the probed refined-branch steps, unweighted and
    weighted by the arm's lambdas (ArcFace's weight is 1), with the cosines between the terms."""
    rows = [row for row in read_metrics(run_dir, "train") if "grad_norm_erb" in row]
    if not rows:
        return None
    mean = {key: float(np.mean([row[key] for row in rows])) for key in rows[0] if key.startswith("grad_")}
    weights = {"erb": 1.0, "closeness": lambdas[0], "diversity": lambdas[1]}
    weighted = {term: weights[term] * mean[f"grad_norm_{term}"] for term in weights}
    dominant = max(weighted, key=lambda term: weighted[term])
    return {"windows": len(rows), "norm": {term: mean[f"grad_norm_{term}"] for term in weights},
            "weighted": weighted, "dominant": dominant,
            "cos": {key[len("grad_cos_"):]: value for key, value in mean.items() if key.startswith("grad_cos_")}}


def rrb_losses(run_dir: Path) -> dict:
    """What the refined branch logged: proof that a joint run computed (and, with lambdas > 0, applied) its losses."""
    windows = [row for row in read_metrics(run_dir, "train") if "loss_closeness" in row]
    if not windows:
        return {"windows": 0, "closeness_first": None, "closeness_last": None,
                "diversity_first": None, "diversity_last": None}
    tail = windows[-max(1, len(windows) // 5):]  # the last fifth of the run, for a steadier figure
    return {
        "windows": len(windows),
        "closeness_first": windows[0]["loss_closeness"],
        "closeness_last": float(np.mean([w["loss_closeness"] for w in tail])),
        "diversity_first": windows[0]["loss_diversity"],
        "diversity_last": float(np.mean([w["loss_diversity"] for w in tail])),
    }


def mining_recall(pretrain_dir: Path, data: Path, quantile: float = 0.2) -> Optional[dict]:
    """How many ground-truth hard samples the pretrain's difficulty score puts below the mining threshold."""
    from cdface.training.checkpoint import load_checkpoint

    manifest = json.loads((data / "synthetic.json").read_text())
    hard = np.asarray(manifest["hard_samples"], dtype=np.int64)
    if hard.size == 0:
        return None
    state = load_checkpoint(pretrain_dir / "model.pt", "cpu")
    scores = state["bank"]["scores"].numpy()
    below = scores < np.quantile(scores, quantile)
    return {"hard_samples": int(hard.size), "quantile": quantile, "recall": float(below[hard].mean()),
            "chance": quantile}


# -- statistics and the statement -------------------------------------------------------------------


def spread(values: list[Optional[float]]) -> dict:
    """mean, sample std, min, max of the available values; None where a value is unavailable."""
    if not values or any(v is None for v in values):
        return {"n": len(values), "mean": None, "std": None, "min": None, "max": None, "values": values}
    a = np.asarray(values, dtype=np.float64)
    return {"n": a.size, "mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else None,
            "min": float(a.min()), "max": float(a.max()), "values": [float(v) for v in a]}


# Two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1); beyond the table, the normal's.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def compare(baseline: list[Optional[float]], method: list[Optional[float]], label: str, unit: float = 100.0,
            unit_name: str = "points", subject: str = "the method", reference: str = "ArcFace") -> dict:
    """The verdict for one metric: helps / hurts only when every seed agrees and the paired difference's
    95% confidence interval excludes zero.

    The runs are paired (same pretrain checkpoint, same seed), so what decides is the spread of the
    per-seed differences, not each arm's own seed spread: most of a seed's luck (its pretrain, its
    batches) is shared by both arms of that seed and cancels in the difference. The arms' own seed std
    is reported beside it for context.
    """
    b, m = spread(baseline), spread(method)
    if b["mean"] is None or m["mean"] is None:
        return {"metric": label, "verdict": "unavailable", "text": f"{label}: unavailable on this held-out set."}
    diffs = [mv - bv for bv, mv in zip(baseline, method)]
    diff = float(np.mean(diffs))
    diff_std = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else None
    seed_std = max(s for s in (b["std"], m["std"], 0.0) if s is not None)
    shown = f"{diff * unit:+.2f} {unit_name}"
    per_seed = ", ".join(f"{d * unit:+.2f}" for d in diffs)
    out = {"metric": label, "difference": diff, "difference_std": diff_std, "seed_std": seed_std,
           "per_seed_differences": diffs, "ci95": None}
    if diff_std is None:
        return {**out, "verdict": "one seed",
                "text": f"{label}: {shown} with one seed, so no spread to judge it against: not distinguishable "
                        f"from noise by this study."}
    half = T95.get(len(diffs) - 1, 1.96) * diff_std / math.sqrt(len(diffs))
    out["ci95"] = [diff - half, diff + half]
    interval = (f"paired differences {per_seed}, 95% CI [{(diff - half) * unit:+.2f}, {(diff + half) * unit:+.2f}]; "
                f"the arms' own seed std up to {seed_std * unit:.2f}")
    agree = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    if agree and abs(diff) > half:
        verdict = "helps" if diff > 0 else "hurts"
        text = f"{label}: {subject} {verdict} by {abs(diff) * unit:.2f} {unit_name} ({shown}; {interval})."
    else:
        verdict = "not distinguishable"
        text = (f"{label}: {shown} ({subject} minus {reference}), not distinguishable from noise ({interval}"
                f"{'' if agree else '; the seeds disagree in sign'}).")
    return {**out, "verdict": verdict, "text": text}


# -- figures --------------------------------------------------------------------------------------


def plot_arm_histograms(arms: dict[str, np.ndarray], heldout: Heldout, path: Path) -> Path:
    """Positive/negative similarity histograms of each arm side by side (the supplement's Fig. A1 shape)."""
    # The evaluation package's Agg setup and atomic PNG writer, so every figure of the project is saved alike.
    from cdface.training.evaluation.plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(arms), figsize=(5 * len(arms), 3.6), sharey=True)
    scores_by_arm = {label: pair_scores(embeddings, heldout) for label, embeddings in arms.items()}
    low = max(-1.0, min(float(s.min()) for s in scores_by_arm.values()) - 0.02)
    edges = np.linspace(low, 1.0, 76)  # one binning for both panels, so their shapes compare
    for ax, (label, scores) in zip(np.atleast_1d(axes), scores_by_arm.items()):
        genuine, impostor = scores[heldout.same], scores[~heldout.same]
        ax.hist(genuine, bins=edges, alpha=0.6, density=True, label=f"positive ({genuine.size})")
        ax.hist(impostor, bins=edges, alpha=0.6, density=True, label=f"negative ({impostor.size})")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("cosine similarity")
        ax.legend(fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("density")
    fig.tight_layout()
    return _save(fig, path)


def plot_arm_rocs(curves: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """ROC of every (arm, seed): one colour per arm, one line style per seed, so arms read as groups."""
    from cdface.training.evaluation.plots import _pyplot, _save, format_roc_axes
    from cdface.training.evaluation.roc import roc_curve

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colours = {}
    styles = ["-", "--", ":", "-."]
    smallest_far = 1.0
    for (arm, seed), (genuine, impostor) in curves.items():
        colour = colours.setdefault(arm, f"C{len(colours)}")
        far, tar, _ = roc_curve(genuine, impostor)
        visible = far > 0  # FAR = 0 has no place on a log axis
        ax.plot(far[visible], tar[visible], styles[seed % len(styles)], color=colour, linewidth=1.3,
                label=f"{arm}, seed {seed}")
        smallest_far = min(smallest_far, 1.0 / len(impostor))
    format_roc_axes(ax, smallest_far, title, legend_size=8)
    return _save(fig, path)


def plot_epoch_curves(curves: dict[str, dict[int, list[dict]]], path: Path) -> Path:
    """Held-out accuracy and TAR@FAR=1e-3 at each epoch end of the joint stage: one colour per arm, one
    line style per seed (epoch 0 is the shared pretrain checkpoint)."""
    from cdface.training.evaluation.plots import _pyplot, _save
    from cdface.training.evaluation.roc import far_key

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    styles = ["-", "--", ":", "-."]
    metrics = (("accuracy", "verification accuracy (%)"),
               (far_key(HEADLINE_FAR), f"TAR@FAR={far_key(HEADLINE_FAR)} (%)"))
    for colour, (arm, by_seed) in enumerate(curves.items()):
        for seed, points in by_seed.items():
            for ax, (metric, _) in zip(axes, metrics):
                values = [(p["epoch"], p["accuracy"] if metric == "accuracy" else p["tar_at_far"].get(metric))
                          for p in points]
                values = [(e, v * 100) for e, v in values if v is not None]
                if values:
                    ax.plot(*zip(*values), styles[seed % len(styles)], color=f"C{colour}", marker="o",
                            markersize=3, linewidth=1.2, label=f"{arm}, seed {seed}")
    for ax, (_, ylabel) in zip(axes, metrics):
        ax.set_xlabel("joint-stage epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
            break
    fig.tight_layout()
    return _save(fig, path)


# -- the report -----------------------------------------------------------------------------------


def fmt(value: Optional[float], unit: float = 100.0, digits: int = 2) -> str:
    return "unavailable" if value is None else f"{value * unit:.{digits}f}"


def fmt_spread(s: dict) -> str:
    if s["mean"] is None:
        return "unavailable"
    if s["n"] < 2:
        return f"{s['mean'] * 100:.2f}"
    return f"{s['mean'] * 100:.2f} ± {s['std'] * 100:.2f} [{s['min'] * 100:.2f}–{s['max'] * 100:.2f}]"


def fmt_difference(value: Optional[float], reference: Optional[float]) -> str:
    return "unavailable" if value is None or reference is None else f"{(value - reference) * 100:+.2f}"


def backbone_label(name: str) -> str:
    """``ir18`` -> ``IR-18``, as the papers write it."""
    head = name.rstrip("0123456789")
    return f"{head.upper()}-{name[len(head):]}" if head != name else name.upper()


def lambda_label(lambdas: tuple[float, float]) -> str:
    return f"{lambdas[0]:g} / {lambdas[1]:g}"


# Each deviation from the paper and the authors' code that issue 13 lists: what the study (and the
# `paper` preset) does now, and why.
FAITHFULNESS = [
    ("Gradient clipping", "off", "neither the paper nor the authors' code clips (the demo preset keeps 5: it trains "
     "from scratch, and its published figure was measured so)"),
    ("Diversity scale s", "the head's s (`method.diversity_scale` unset)", "the authors' code uses the head's s; the "
     "earlier study ran diversity at 64 with a head at 32, doubling diversity's weight. An explicit different value "
     "stays possible and is logged as a warning"),
    ("Hard-sample window", "scores in (0, threshold); both ends widen by 0.05 when short",
     "the authors' code; before, there was no lower bound and 15-17 of 64 hard picks scored <= 0"),
    ("Prototype set", "shared: the union of the mined identities' top-NP, every mined identity removed",
     "the authors' code; `method.prototypes=per_sample` (each identity's own top-NP) remains; both are tested "
     "against a brute-force search with the replicated and the sharded head"),
    ("lambda2", f"{METHOD[1]:g} (the supplement's)", f"the authors' code uses {AUTHORS[1]:g}: the study runs both"),
    ("Mined images' forward pass", "separate (their own BatchNorm statistics)",
     "the authors' code; `method.separate_pass=false` shares the batch's pass. On a model without batch-dependent "
     "layers the two give the same losses and step (tested); with BN, the variants below measure it (`--variants`)"),
    ("Warm-up", "capped at lr", "the ramp overshot to 1.11 x lr on the last warm-up step of a fractional warm-up; "
     "fixed, and tested against the formula"),
]


def render_markdown(r: dict, doc: Path) -> str:
    size = r["size"]
    rel = lambda p: os.path.relpath(p, doc.parent)  # noqa: E731 - figure links relative to the page
    fars = [f"{far:.0e}".replace("e-0", "e-") for far in REPORTED_FARS]
    tar_header = " | ".join(f"TAR@FAR={far}" for far in fars)
    tar_rule = "---|" * len(fars)
    labels = {arm.key: arm.label for arm in ARMS}
    reference = labels[REFERENCE]
    lines = [
        f"# The study: ArcFace alone vs ArcFace + closeness + diversity ({size['name']} size)",
        "",
        "<!-- Generated by benchmarks/study.py. Do not edit by hand: re-run the command below. -->",
        "",
        f"- **Command:** `{r['command']}`",
        f"- **Date:** {r['date']}  **Git commit:** `{r['git']}`",
        f"- **Machine:** {r['machine']['cores']} cores, {r['machine']['cpu']}, GPU: {r['machine']['gpu'] or 'none'}, "
        f"Python {r['machine']['python']}; load average at start {r['load_start']}, at end {r['load_end']} "
        f"(the machine is shared)",
        f"- **Wall time:** {(r['train_wall_s'] + r['eval_wall_s']) / 60:.1f} min for the whole study "
        f"({r['train_wall_s'] / 60:.1f} min training {len(r['runs'])} runs, per-epoch evaluation included; "
        f"{r['eval_wall_s'] / 60:.1f} min embedding the held-out set with the final models, as first measured; data "
        f"generation not included); this invocation {r['wall_s'] / 60:.1f} min (an invocation reuses the runs an "
        f"earlier one finished)",
        f"- **Size `{size['name']}`:** {size['note']}",
        "",
        "## Verdict",
        "",
        f"Every arm is paired with {reference} (same pretrain checkpoint, seed and steps).",
        "",
    ]
    for key, comparisons in r["comparisons"].items():
        lines += [f"**{labels[key]}**", "", *[f"- {c['text']}" for c in comparisons], ""]
    lines += [f"**In short: {r['headline']}**", ""]
    lines += [
        "## Faithfulness: the settings this study and the `paper` preset use",
        "",
        "| setting | now | why |",
        "|---|---|---|",
        *[f"| {name} | {now} | {why} |" for name, now, why in FAITHFULNESS],
        "",
        "## Setup",
        "",
        f"- Training data: {size['identities']} synthetic identities x {size['per_identity']} images "
        f"({size['identities'] * size['per_identity']} images), {size['hard_share']:.0%} of them hard (large pose plus "
        f"at least two of occlusion, blur, low light), seed {size['data_seed']}.",
        f"- Held-out set: {size['heldout_identities']} other identities x {size['heldout_per_identity']} images, "
        f"{size.get('heldout_hard_share') if size.get('heldout_hard_share') is not None else size['hard_share']:.0%} "
        f"of them hard. All {r['pairs']['all']} image pairs are scored: {r['pairs']['genuine']} genuine, "
        f"{r['pairs']['impostor']} impostor. Accuracy: 10-fold protocol (threshold chosen on 9 folds) on "
        f"{r['pairs']['balanced']} balanced pairs (every genuine pair + as many sampled impostor pairs). TAR@FAR uses "
        f"every impostor pair; measurable FAR levels: {', '.join(r['pairs']['measurable_fars']) or 'none'} "
        f"(a level needs at least one allowed false accept, FAR >= 1/{r['pairs']['impostor']}; "
        f"pairs share images, so they are not independent and the lowest levels are the noisiest).",
        f"- Model: {backbone_label(size['backbone'])} at width {size['width']:g}, 512-d; ArcFace "
        f"s = {size['head_scale']:g}, m = {size['head_margin']:g} (diversity at the same s); batch "
        f"{size['batch_size']}, SGD lr 0.1 (warm-up 0.3 epoch, x0.1 at epochs "
        f"{', '.join(f'{m:g}' for m in size['milestones']) or 'none'} of each stage), no "
        f"clipping; the refined branch every {size['interval']} step(s), K = {size['mined_identities']} identities x "
        f"(7 easy + 1 hard), NP = {size['hard_negatives']}, shared prototypes, a separate forward pass.",
        f"- Per seed ({size['seeds']} seeds): pretrain {size['pretrain_epochs']} epoch(s) of plain ArcFace, then "
        f"{len(ARMS)} runs of {size['joint_epochs']} epoch(s) from its checkpoint: "
        + "; ".join(f"{arm.label} ({lambda_label(arm.lambdas) if arm.refined else 'no refined branch'})"
                    for arm in ARMS)
        + f". Steps per joint run: {r['joint_steps']}, of which {r['refined_steps']} run the refined branch.",
        "",
        "## Results (held-out identities, percent)",
        "",
        f"Mean ± std [min–max] over {size['seeds']} seed(s).",
        "",
        f"| arm | lambda1 / lambda2 | accuracy | {tar_header} |",
        f"|---|---|---|{tar_rule}",
    ]
    for arm in r["arms"]:
        lines.append(f"| {arm['label']} | {arm['lambdas']} | {fmt_spread(arm['accuracy'])} | "
                     + " | ".join(fmt_spread(arm["tar"][far]) for far in fars) + " |")
    reference_arm = next(a for a in r["arms"] if a["key"] == REFERENCE)
    for far in fars:
        mean = reference_arm["tar"][far]["mean"]
        if mean is not None and mean < 0.05:
            lines += ["", f"At FAR={far} {reference} accepts under 5% of genuine pairs: that level is at the floor "
                          f"for this model, and a difference there says little."]
    lines += [
        "",
        f"Paired differences (arm minus {reference}, or what the zero-weight forward changes), mean ± std of the "
        f"per-seed differences, points:",
        "",
        f"| comparison | accuracy | {tar_header} |",
        f"|---|---|{tar_rule}",
    ]
    for key, comparisons in r["comparisons"].items():
        lines.append(f"| {labels[key]} | " + " | ".join(_paired_cell(c) for c in comparisons) + " |")
    lines += [
        "",
        "Per seed: accuracy of each arm (percent).",
        "",
        "| seed | pretrain | " + " | ".join(labels[arm.key] for arm in ARMS) + " |",
        "|---|---|" + "---|" * len(ARMS),
    ]
    for row in r["per_seed"]:
        lines.append(f"| {row['seed']} | {fmt(row['pretrain']['accuracy'])} | "
                     + " | ".join(fmt(row[arm.key]["accuracy"]) for arm in ARMS) + " |")
    lines += [
        "",
        "## Where the strict-FAR floor comes from",
        "",
        "TAR over the pairs in which neither image is a hard sample (mean ± std over seeds), and the share of the "
        f"impostor pairs above each model's FAR={fars[1]} threshold that pair two hard images, and the TAR of the "
        f"genuine pairs that hold a hard image at that same threshold (what the method is meant to lift):",
        "",
        f"| arm | {' | '.join(f'TAR@FAR={far}, no hard image' for far in fars)} | top impostors both hard "
        f"| hard genuine pairs accepted |",
        f"|---|{tar_rule}---|---|",
    ]
    for f in r["floor"].values():
        share = f["top_impostors_both_hard"]["mean"]
        share_text = "unavailable" if share is None else f"{share:.0%}"
        lines.append(f"| {f['label']} | " + " | ".join(fmt_spread(f["tar_no_hard"][far]) for far in fars)
                     + f" | {share_text} | {fmt_spread(f['hard_genuine_tar'])} |")
    lines += [
        "",
        "## Per epoch",
        "",
        f"![epoch curves]({rel(r['figures']['epochs'])})",
        "",
        f"Held-out accuracy / TAR@FAR={fars[1]} at each epoch end of the joint stage, mean over seeds (epoch 0: the "
        f"pretrain checkpoint every arm starts from); the other arms are scored at the end only.",
        "",
        "| epoch | " + " | ".join(labels[arm.key] for arm in ARMS if arm.curve) + " |",
        "|---|" + "---|" * sum(arm.curve for arm in ARMS),
    ]
    for epoch, cells_ in _curve_rows(r["curves"], fars[1]):
        lines.append(f"| {epoch:g} | " + " | ".join(cells_) + " |")
    lines += [
        "",
        "## Which term dominates the gradient on refined-branch steps",
        "",
        "Every probed refined-branch step measures each term's gradient over the backbone's parameters separately "
        "(`method.probe_gradients_every`); weighted = lambda x norm (ArcFace's weight is 1). Means over probes and "
        "seeds.",
        "",
        "| arm | log windows with probes | ArcFace | lambda1 x closeness | lambda2 x diversity | dominant "
        "| cos(ArcFace, diversity) | cos(ArcFace, closeness) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in r["gradients"].values():
        w = g["weighted"]
        lines.append(f"| {g['label']} ({g['lambdas']}) | {g['probes']} | {w['erb']:.3g} | {w['closeness']:.3g} | "
                     f"{w['diversity']:.3g} | {TERM_NAMES[g['dominant']]} | "
                     f"{g['cos'].get('erb_diversity', float('nan')):+.2f} | "
                     f"{g['cos'].get('erb_closeness', float('nan')):+.2f} |")
    if not r["gradients"]:
        lines.append("| (no probes logged) | | | | | | | |")
    lines += [
        "",
        "## Do the joint runs apply the losses?",
        "",
        "From each joint run's `metrics.jsonl` (every refined arm computes the losses; only the method arms weigh "
        "them). 'first' is the first logged window, 'last' the mean of the last fifth of the run.",
        "",
        "| run | lambdas | windows with RRB losses | closeness first → last | diversity first → last |",
        "|---|---|---|---|---|",
    ]
    for row in r["loss_check"]:
        losses = row["losses"]
        if losses["windows"] == 0:
            lines.append(f"| {row['run']} | {row['lambdas']} | 0 | missing | missing |")
            continue
        lines.append(f"| {row['run']} | {row['lambdas']} | {losses['windows']} | {losses['closeness_first']:.4f} → "
                     f"{losses['closeness_last']:.4f} | {losses['diversity_first']:.3f} → "
                     f"{losses['diversity_last']:.3f} |")
    if r["mining"]:
        m = r["mining"]
        lines += ["", f"Difficulty score check (seed-0 pretrain): {m['recall']:.0%} of the {m['hard_samples']} "
                      f"ground-truth hard training samples score below the bank's {m['quantile']:.0%} quantile, the "
                      f"mining threshold (chance: {m['chance']:.0%})."]
    if r["sweep"]:
        lines += [
            "",
            "## Lambda sweep (the grid of the supplement's Table A1, seed 0)",
            "",
            "All from the seed-0 pretrain, same steps; points that are arms reuse the arm's seed-0 run.",
            "",
            f"| varies | lambda1 / lambda2 | accuracy | {tar_header} | final closeness | final diversity |",
            f"|---|---|---|{tar_rule}---|---|",
        ]
        base0 = r["per_seed"][0][REFERENCE]
        lines.append(f"| (reference) | {lambda_label(BASELINE)} ({reference}) | {fmt(base0['accuracy'])} | "
                     + " | ".join(fmt(base0["tar_at_far"][far]) for far in fars) + " | | |")
        for row in r["sweep"]:
            losses = row["losses"]
            closeness = "missing" if losses["closeness_last"] is None else f"{losses['closeness_last']:.4f}"
            diversity = "missing" if losses["diversity_last"] is None else f"{losses['diversity_last']:.3f}"
            lines.append(f"| {row['varies']} | {row['lambdas']} | {fmt(row['scores']['accuracy'])} | "
                         + " | ".join(fmt(row["scores"]["tar_at_far"][far]) for far in fars)
                         + f" | {closeness} | {diversity} |")
        lines += ["", "With one seed per point, a sweep difference smaller than the seed spread of the ablation "
                      "above means nothing."]
    for group, title in (("variants", "Each faithful setting undone"),
                         ("doses", "Dose-response: NP, K, interval, lambda2")):
        if not r.get(group):
            continue
        method0, reference0 = r["per_seed"][0]["method"], r["per_seed"][0][REFERENCE]
        lines += [
            "",
            f"## {title} (seed 0, lambdas {lambda_label(METHOD)})",
            "",
            "From the seed-0 pretrain, the method arm's run with one setting changed; the differences are against "
            "that run, and the last column against ArcFace alone's seed-0 run (one seed: a difference inside the "
            "spread of the ablation's paired differences means nothing).",
            "",
            f"| change | accuracy | {tar_header} | accuracy difference | TAR@FAR={fars[1]} difference "
            f"| TAR@FAR={fars[1]} vs ArcFace alone |",
            f"|---|---|{tar_rule}---|---|---|",
            f"| (method arm, seed 0) | {fmt(method0['accuracy'])} | "
            + " | ".join(fmt(method0["tar_at_far"][far]) for far in fars) + " | | | "
            + f"{fmt_difference(method0['tar_at_far'][fars[1]], reference0['tar_at_far'][fars[1]])} |",
        ]
        for v in r[group]:
            sc = v["scores"]
            lines.append(f"| {v['label']} | {fmt(sc['accuracy'])} | "
                         + " | ".join(fmt(sc["tar_at_far"][far]) for far in fars)
                         + f" | {fmt_difference(sc['accuracy'], method0['accuracy'])} | "
                         + f"{fmt_difference(sc['tar_at_far'][fars[1]], method0['tar_at_far'][fars[1]])} | "
                         + f"{fmt_difference(sc['tar_at_far'][fars[1]], reference0['tar_at_far'][fars[1]])} |")
    if r.get("leads"):
        lines += [
            "",
            "## Seed-0 leads, rerun with every seed",
            "",
            f"Each one-seed run above that beats ArcFace alone's seed-0 TAR@FAR={fars[1]} is rerun from every "
            "seed's pretrain and paired with ArcFace alone seed by seed, under the ablation's verdict rule.",
            "",
        ]
        for lead in r["leads"]:
            lines += [f"**{lead['label']}** ({lead['group']}, {len(lead['per_seed'])} seeds)", "",
                      *[f"- {c['text']}" for c in lead["comparisons"]], ""]
    lines += [
        "",
        "## Figures",
        "",
        f"![similarity histograms]({rel(r['figures']['histograms'])})",
        "",
        "Positive (same identity) and negative pair similarities on the held-out set, seed 0.",
        "",
        f"![ROC]({rel(r['figures']['roc'])})",
        "",
        "ROC of every arm and seed, over all held-out pairs.",
        "",
        f"![similarity gradients]({rel(r['figures']['gradients'])})",
        "",
        "The supplement's Fig. A2: gradient magnitude of each similarity term against the angle between x "
        "and a prototype w. The truncated squared cosine of the diversity loss pushes hardest on prototypes "
        "closest to the sample and not at all beyond 90 degrees.",
        "",
        "## Sizes",
        "",
        "| size | backbone | identities x images | held-out | seeds | batch / K | pretrain + joint epochs | "
        "refined-branch steps per joint run | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in SIZES.values():
        lines.append(f"| {s.name} | {backbone_label(s.backbone)} w{s.width:g} | {s.identities} x {s.per_identity} | "
                     f"{s.heldout_identities} x {s.heldout_per_identity} ({s.impostor_pairs} impostor pairs) | "
                     f"{s.seeds} | {s.batch_size} / {s.mined_identities} | {s.pretrain_epochs} + {s.joint_epochs} | "
                     f"{s.refined_steps} | {s.note} |")
    g = SIZES["gpu"]
    gpu_images = g.identities * g.per_identity
    gpu_runs = g.seeds * len(ARMS) + (len(set(SWEEP) - {a.lambdas for a in ARMS}) if g.sweep else 0)
    gpu_epochs = g.seeds * g.pretrain_epochs + gpu_runs * g.joint_epochs
    lines += [
        "",
        f"The `gpu` size (`python -m benchmarks.study --size gpu` on a CUDA machine; it writes `docs/study_gpu.md` "
        f"and `benchmarks/results/study_ablation_gpu.json`) is "
        f"{'this page' if size['name'] == 'gpu' else 'documented here, not run for this page'}. It trains "
        f"{backbone_label(g.backbone)} at full width with the paper's head (s = {g.head_scale:g}, "
        f"m = {g.head_margin:g}, NP = {g.hard_negatives}), batch {g.batch_size} with K = {g.mined_identities}, "
        f"{g.amp}, on {g.identities} identities x {g.per_identity} images, and scores {g.heldout_images} held-out "
        f"images ({g.impostor_pairs:.1e} "
        f"impostor pairs: FAR down to 1e-6 is measurable). Its {g.seeds} pretrains and {gpu_runs} joint runs come to "
        f"{gpu_epochs} epochs of {gpu_images} images ({gpu_epochs * gpu_images / 1e6:.0f} M images, plus the refined "
        f"branch's extra forward); at a few thousand images per second on one GPU (an estimate, not a measurement) "
        f"that is hours.",
        "",
        "## What this study does not show",
        "",
        "- Synthetic identities are not faces: a method tuned for MS1MV2-scale data may behave differently here, "
        "in either direction.",
        "- The schedules are short and the backbone is small. The paper reports gains of fractions of a point to a "
        "few points at low FAR on IJB-B/C; this study can only resolve differences larger than the spread of its paired differences.",
        *([] if r.get("variants") else [
            "- Whether each faithful setting matters on its own (the separate pass with BatchNorm, the prototype "
            "set, the lower bound, clipping, the diversity scale) is not measured at this size: `--variants` runs "
            "each one undone, from the seed-0 pretrain."]),
        "",
    ]
    return "\n".join(lines)


def _paired_cell(c: dict) -> str:
    if c["verdict"] == "unavailable":
        return "unavailable"
    spread_ = "" if c.get("difference_std") is None else f" ± {c['difference_std'] * 100:.2f}"
    return f"{c['difference'] * 100:+.2f}{spread_} ({c['verdict']})"


def _curve_rows(curves: dict, far: str) -> list[tuple[float, list[str]]]:
    """(epoch, one 'accuracy / TAR' cell per arm): means over the seeds that logged that epoch."""
    epochs = sorted({round(p["epoch"], 3) for by_seed in curves.values() for pts in by_seed.values() for p in pts})
    rows = []
    for epoch in epochs:
        cells_ = []
        for arm in (a for a in ARMS if a.curve):
            points = [p for pts in curves.get(arm.key, {}).values() for p in pts if round(p["epoch"], 3) == epoch]
            acc = [p["accuracy"] for p in points if p["accuracy"] is not None]
            tar = [p["tar_at_far"].get(far) for p in points if p["tar_at_far"].get(far) is not None]
            cells_.append(f"{fmt(float(np.mean(acc))) if acc else '—'} / {fmt(float(np.mean(tar))) if tar else '—'}")
        rows.append((epoch, cells_))
    return rows


# -- the study ------------------------------------------------------------------------------------


def default_paths(size: Size, work: Optional[Path] = None) -> dict[str, Path]:
    work = work or REPO / "work" / "study" / size.name
    if size.name == "smoke":  # the CI size never touches the repository's documents
        return {"work": work, "doc": work / "study.md", "figures": work / "figures", "results": work}
    doc = REPO / "docs" / ("study.md" if size.name == "cpu2h" else f"study_{size.name}.md")
    return {"work": work, "doc": doc, "figures": REPO / "docs" / "figures", "results": RESULTS_DIR}


def result_name(size: Size) -> str:
    """The committed headline is the 2-hour CPU study's; other sizes write beside it, never over it."""
    return "study_ablation" if size.name == "cpu2h" else f"study_ablation_{size.name}"


def train_arms(size: Size, data: Path, heldout: Heldout, runs: Path, device: str) -> dict:
    """Every run of the study (each skipped when done before) and what each one measured."""
    evaluate_epochs = epoch_evaluator(heldout, device)

    def final(run_dir: Path) -> tuple[dict, np.ndarray]:
        embeddings = embed_model(run_dir / "model.pt", heldout, device)
        return score_model(embeddings, heldout), embeddings

    out: dict[str, Any] = {"records": [], "per_seed": [], "loss_check": [], "gradients": [], "curves": {},
                           "embeddings": {}}
    for seed in range(size.seeds):
        pretrain = runs / f"seed{seed}" / "pretrain"
        out["records"].append(train_once(size, data, pretrain, seed, "pretrain"))
        start = pretrain / "checkpoints" / "last.pt"
        row: dict[str, Any] = {"seed": seed, "pretrain": final(pretrain)[0]}
        start_point = {"epoch": 0.0, "step": 0, "accuracy": row["pretrain"]["accuracy"],
                       "tar_at_far": row["pretrain"]["tar_at_far"]}
        for arm in ARMS:
            run_dir = arm_dir(runs, seed, arm)
            out["records"].append(train_once(size, data, run_dir, seed, "joint", arm.lambdas, start, arm.refined,
                                             evaluate_epochs if arm.curve else None))
            row[arm.key], out["embeddings"][(seed, arm.key)] = final(run_dir)
            if arm.curve:
                out["curves"].setdefault(arm.key, {})[seed] = [start_point] + epoch_curve(run_dir,
                                                                                          size.steps_per_epoch)
            if arm.refined:
                out["loss_check"].append({"run": f"seed {seed}, {arm.label}", "arm": arm.key,
                                          "lambdas": lambda_label(arm.lambdas), "losses": rrb_losses(run_dir)})
                out["gradients"].append({"seed": seed, "arm": arm.key, "lambdas": list(arm.lambdas),
                                         "terms": gradient_terms(run_dir, arm.lambdas)})
        out["per_seed"].append(row)

    out["sweep"] = []
    if size.sweep:
        arm_lambdas = {arm.lambdas for arm in ARMS if arm.refined}
        start0 = runs / "seed0" / "pretrain" / "checkpoints" / "last.pt"
        for index, lambdas in enumerate(SWEEP):
            run_dir = arm_dir(runs, 0, Arm("sweep", "", lambdas))  # the arms' points reuse the arms' runs
            record = train_once(size, data, run_dir, 0, "joint", lambdas, start0)
            if lambdas not in arm_lambdas:
                out["records"].append(record)
            out["sweep"].append({"varies": "lambda1" if index < 4 else "lambda2", "lambdas": lambda_label(lambdas),
                                 "lambda_closeness": lambdas[0], "lambda_diversity": lambdas[1],
                                 "label": f"lambdas {lambda_label(lambdas)}", "run": run_dir.name,
                                 "train_lambdas": list(lambdas), "overrides": [], "is_arm": lambdas in arm_lambdas,
                                 "scores": final(run_dir)[0], "losses": rrb_losses(run_dir)})

    start0 = runs / "seed0" / "pretrain" / "checkpoints" / "last.pt"
    for group, wanted, changes in (("variants", size.variants, VARIANTS), ("doses", size.doses, doses(size))):
        out[group] = []
        for key, label, extra in changes if wanted else ():
            run_dir = runs / "seed0" / f"variant_{key}"
            out["records"].append(train_once(size, data, run_dir, 0, "joint", METHOD, start0, extra=extra))
            out[group].append({"key": key, "label": label, "overrides": list(extra), "run": run_dir.name,
                               "train_lambdas": list(METHOD), "is_arm": False,
                               "scores": final(run_dir)[0], "losses": rrb_losses(run_dir)})

    # A one-seed run that beats ArcFace alone is a lead, not a result: each is rerun from every other
    # seed's pretrain, so it is judged paired with ArcFace alone like the arms are.
    out["leads"] = []
    for group in ("sweep", "variants", "doses"):
        for entry in out[group]:
            if entry["is_arm"] or not beats_reference(entry["scores"], out["per_seed"][0][REFERENCE]):
                continue
            scores = [entry["scores"]]
            for seed in range(1, size.seeds):
                run_dir = runs / f"seed{seed}" / entry["run"]
                start = runs / f"seed{seed}" / "pretrain" / "checkpoints" / "last.pt"
                out["records"].append(train_once(size, data, run_dir, seed, "joint", tuple(entry["train_lambdas"]),
                                                 start, extra=tuple(entry["overrides"])))
                scores.append(final(run_dir)[0])
            out["leads"].append({"group": group, "label": entry["label"], "per_seed": scores})
    return out


def beats_reference(scores: dict, reference: dict) -> bool:
    from cdface.training.evaluation.roc import far_key

    key = far_key(HEADLINE_FAR)
    return reference["tar_at_far"][key] is not None and (scores["tar_at_far"][key] or 0.0) > reference["tar_at_far"][key]


def summarise(trained: dict) -> dict:
    """The arms' spreads, every arm paired with ArcFace alone, the gradient terms, and the verdict."""
    from cdface.training.evaluation.roc import far_key

    per_seed = trained["per_seed"]
    labels = {arm.key: arm.label for arm in ARMS}

    def values(key: str, metric: str) -> list[Optional[float]]:
        return [row[key]["accuracy"] if metric == "accuracy" else row[key]["tar_at_far"][metric] for row in per_seed]

    metrics = ["accuracy"] + [far_key(f) for f in REPORTED_FARS]
    metric_label = {m: "Verification accuracy" if m == "accuracy" else f"TAR@FAR={m}" for m in metrics}
    arms = [{"key": "pretrain", "label": "pretrain only (start of every arm)", "lambdas": "—",
             "accuracy": spread(values("pretrain", "accuracy")),
             "tar": {m: spread(values("pretrain", m)) for m in metrics[1:]}}]
    arms += [{"key": arm.key, "label": arm.label, "lambdas": lambda_label(arm.lambdas) if arm.refined else "—",
              "accuracy": spread(values(arm.key, "accuracy")),
              "tar": {m: spread(values(arm.key, m)) for m in metrics[1:]}}
             for arm in ARMS]
    comparisons: dict[str, list[dict]] = {}
    for arm in ARMS:
        if arm.key == REFERENCE:
            continue
        if arm.refined:
            comparisons[arm.key] = [compare(values(REFERENCE, m), values(arm.key, m), metric_label[m],
                                            subject=arm.label, reference=labels[REFERENCE]) for m in metrics]
        else:  # what the zero-weight refined forward does by itself: the reference minus this arm
            comparisons[arm.key] = [compare(values(arm.key, m), values(REFERENCE, m), metric_label[m],
                                            subject="the zero-weight refined-branch forward",
                                            reference="no refined branch") for m in metrics]

    gradients: dict[str, Any] = {}
    for arm in ARMS:
        rows = [g["terms"] for g in trained["gradients"] if g["arm"] == arm.key and g["terms"]]
        if rows:
            weighted = {t: float(np.mean([r["weighted"][t] for r in rows])) for t in rows[0]["weighted"]}
            gradients[arm.key] = {
                "label": arm.label, "lambdas": lambda_label(arm.lambdas), "seeds": len(rows),
                "probes": int(sum(r["windows"] for r in rows)),
                "norm": {t: float(np.mean([r["norm"][t] for r in rows])) for t in rows[0]["norm"]},
                "weighted": weighted, "dominant": max(weighted, key=lambda t: weighted[t]),
                "cos": {k: float(np.mean([r["cos"][k] for r in rows])) for k in rows[0]["cos"]}}

    headline_key = far_key(HEADLINE_FAR)
    statements = []
    for arm in ARMS:
        if not arm.refined or arm.key == REFERENCE:
            continue
        by_metric = {c["metric"]: c for c in comparisons[arm.key]}
        acc, tar = by_metric["Verification accuracy"], by_metric[f"TAR@FAR={headline_key}"]
        statements.append(f"{arm.label}, lambdas {lambda_label(arm.lambdas)}: "
                          f"{_verdict_phrase(acc)} at verification accuracy, {_verdict_phrase(tar)} at "
                          f"TAR@FAR={headline_key}.")
    reference_tar = spread(values(REFERENCE, headline_key))["mean"]
    floor_cleared = reference_tar is not None and reference_tar >= 0.2
    if reference_tar is None:
        statements.append(f"TAR@FAR={headline_key} is not measurable on this held-out set.")
    elif not floor_cleared:
        statements.append(f"ArcFace alone reaches {reference_tar * 100:.1f}% TAR@FAR={headline_key} (under 20%): "
                          f"near the floor, so the verdict there is weak.")
    main_gradients = gradients.get("method")
    if main_gradients:
        statements.append(f"On refined-branch steps {TERM_NAMES[main_gradients['dominant']]}'s weighted gradient "
                          f"dominates (ArcFace {main_gradients['weighted']['erb']:.3g}, closeness "
                          f"{main_gradients['weighted']['closeness']:.3g}, diversity "
                          f"{main_gradients['weighted']['diversity']:.3g}; cos(ArcFace, diversity) "
                          f"{main_gradients['cos'].get('erb_diversity', float('nan')):+.2f}).")
    floor = {arm.key: {"label": arm.label,
                       "tar_no_hard": {m: spread([row[arm.key]["tar_at_far_no_hard"][m] for row in per_seed])
                                       for m in metrics[1:]},
                       "top_impostors_both_hard": spread([row[arm.key]["top_impostors_both_hard"]
                                                          for row in per_seed]),
                       "hard_genuine_tar": spread([row[arm.key].get("hard_genuine_tar") for row in per_seed])}
             for arm in ARMS}
    no_hard_tar = floor[REFERENCE]["tar_no_hard"][headline_key]["mean"]
    if reference_tar is not None and not floor_cleared and no_hard_tar is not None:
        statements.append(f"Without the pairs that hold a hard image it reaches {no_hard_tar * 100:.1f}%, and "
                          f"{floor[REFERENCE]['top_impostors_both_hard']['mean']:.0%} of the impostor pairs above "
                          f"its FAR={headline_key} threshold pair two hard images: the floor is the hard samples'.")
    one_seed = [e for group in ("sweep", "variants", "doses") for e in trained.get(group) or [] if not e["is_arm"]]
    leads = []
    for lead in trained.get("leads") or []:
        def lead_values(metric: str) -> list[Optional[float]]:
            return [s["accuracy"] if metric == "accuracy" else s["tar_at_far"][metric] for s in lead["per_seed"]]

        leads.append({**lead, "comparisons": [compare(values(REFERENCE, m)[:len(lead["per_seed"])], lead_values(m),
                                                      metric_label[m], subject=lead["label"],
                                                      reference=labels[REFERENCE]) for m in metrics]})
        by_metric = {c["metric"]: c for c in leads[-1]["comparisons"]}
        statements.append(f"Seed-0 lead {lead['label']} ({lead['group']}), rerun with {len(lead['per_seed'])} "
                          f"seeds: {_verdict_phrase(by_metric[f'TAR@FAR={headline_key}'])} at "
                          f"TAR@FAR={headline_key}, {_verdict_phrase(by_metric['Verification accuracy'])} at "
                          f"accuracy.")
    if one_seed and not leads and per_seed[0][REFERENCE]["tar_at_far"][headline_key] is not None:
        best = max(one_seed, key=lambda e: e["scores"]["tar_at_far"][headline_key] or 0.0)
        statements.append(f"None of the {len(one_seed)} one-seed runs (sweep, variants, doses) beats ArcFace alone's "
                          f"seed-0 TAR@FAR={headline_key} "
                          f"({per_seed[0][REFERENCE]['tar_at_far'][headline_key] * 100:.1f}%); the closest is "
                          f"{best['label']} ({(best['scores']['tar_at_far'][headline_key] or 0.0) * 100:.1f}%).")
    headline_comparison = next(c for c in comparisons["method"] if c["metric"] == f"TAR@FAR={headline_key}")
    return {"arms": arms, "comparisons": comparisons, "gradients": gradients, "floor": floor,
            "leads": leads, "headline": " ".join(statements),
            "headline_comparison": headline_comparison, "floor_cleared": floor_cleared,
            "reference_tar": reference_tar}


def _verdict_phrase(c: dict) -> str:
    if c["verdict"] in ("helps", "hurts"):
        return f"{c['verdict']} ({c['difference'] * 100:+.2f} points, every seed agreeing, 95% CI excluding 0)"
    if c["verdict"] == "unavailable":
        return "unavailable"
    reason = "one seed" if c["verdict"] == "one seed" else "the paired 95% CI includes 0"
    return f"not distinguishable from noise ({c['difference'] * 100:+.2f} points, {reason})"


def run_study(size: Size, work: Path, doc: Path, figures: Path, results_dir: Path, command: str) -> dict:
    import torch

    from cdface.training.evaluation.plots import plot_similarity_gradients
    from cdface.training.evaluation.roc import allowed_false_accepts, far_key

    started = time.perf_counter()
    load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    if size.threads:
        torch.set_num_threads(size.threads)
    work.mkdir(parents=True, exist_ok=True)
    data, heldout_path = make_data(size, work)
    heldout = Heldout.load(heldout_path, size.data_seed)
    runs = work / "runs"
    device = "cuda" if size.device == "cuda" else "cpu"
    trained = train_arms(size, data, heldout, runs, device)
    summary = summarise(trained)

    figures.mkdir(parents=True, exist_ok=True)
    prefix = f"study_{size.name}"
    hist = plot_arm_histograms({f"{arm.label}, seed 0": trained["embeddings"][(0, arm.key)] for arm in ARMS[:2]},
                               heldout, figures / f"{prefix}_similarity_histograms.png")
    curves = {}
    for seed in range(size.seeds):
        for arm in ARMS:
            scores = pair_scores(trained["embeddings"][(seed, arm.key)], heldout)
            curves[(arm.label, seed)] = (scores[heldout.same], scores[~heldout.same])
    roc = plot_arm_rocs(curves, figures / f"{prefix}_roc.png", title="held-out identities, all pairs")
    epochs = plot_epoch_curves({arm.label: trained["curves"][arm.key] for arm in ARMS if arm.curve},
                               figures / f"{prefix}_epoch_curves.png")
    gradients = plot_similarity_gradients(figures / "study_similarity_gradients.png")

    impostors = int((~heldout.same).sum())
    records = trained["records"]
    report = {
        "command": command,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_commit(),
        "machine": machine(),
        "size": asdict(size),
        "pairs": {"all": int(heldout.same.size), "genuine": int(heldout.same.sum()), "impostor": impostors,
                  "balanced": int(heldout.balanced.size),
                  "measurable_fars": [far_key(f) for f in ALL_FARS if allowed_false_accepts(f, impostors) >= 1]},
        "joint_steps": next((r["steps"] for r in records if r["stage"] == "joint"), None),
        "refined_steps": size.refined_steps,
        **summary,
        "per_seed": trained["per_seed"],
        "curves": {key: {str(seed): points for seed, points in by_seed.items()}
                   for key, by_seed in trained["curves"].items()},
        "loss_check": trained["loss_check"],
        "mining": mining_recall(runs / "seed0" / "pretrain", data),
        "sweep": trained["sweep"],
        "variants": trained["variants"],
        "doses": trained["doses"],
        "figures": {"histograms": str(hist), "roc": str(roc), "epochs": str(epochs), "gradients": str(gradients)},
        "runs": records,
        "train_wall_s": float(sum(r["wall_s"] for r in records)),
        "eval_wall_s": evaluation_wall_s(runs),
        "load_start": load_start,
    }
    report["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    report["wall_s"] = time.perf_counter() - started
    doc.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(doc, render_markdown(report, doc))
    # The result file is committed: figure paths inside the repository are kept relative to it.
    report["figures"] = {key: (os.path.relpath(path, REPO) if Path(path).resolve().is_relative_to(REPO) else path)
                         for key, path in report["figures"].items()}
    arm_means = {arm["key"]: arm for arm in summary["arms"]}
    headline_far = far_key(HEADLINE_FAR)
    report["result_json"] = str(write_result(
        result_name(size),
        metric=f"held-out TAR@FAR={headline_far}, mean over seeds: the method (lambdas {lambda_label(METHOD)}) vs "
               f"ArcFace alone, paired from the same pretrain (details.headline_comparison: the paired difference "
               f"and its spread)",
        value=arm_means["method"]["tar"][headline_far]["mean"],
        baseline=arm_means["baseline"]["tar"][headline_far]["mean"],
        target="method - ArcFace > 0, every seed agreeing and the paired 95% CI excluding 0", details=report,
        results_dir=results_dir))
    return report


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="smoke")
    parser.add_argument("--workdir", type=Path, help="data and runs (default work/study/<size>)")
    parser.add_argument("--doc", type=Path, help="the generated markdown (default docs/study.md for cpu)")
    parser.add_argument("--figures", type=Path, help="figure directory (default docs/figures)")
    parser.add_argument("--results-dir", type=Path, help="where study_ablation*.json goes (default benchmarks/results)")
    parser.add_argument("--variants", action="store_true", help="also run each faithful setting undone (seed 0)")
    parser.add_argument("--sweep", action="store_true", help="also run the lambda grid of Table A1 (seed 0)")
    parser.add_argument("--doses", action="store_true", help="also run the NP, K and interval doses (seed 0)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    command = " ".join(["python -m benchmarks.study", *map(shlex.quote, argv)])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    size = SIZES[args.size]
    if args.variants or args.sweep or args.doses:
        size = dataclasses.replace(size, variants=size.variants or args.variants, sweep=size.sweep or args.sweep,
                                   doses=size.doses or args.doses)
    paths = default_paths(size, args.workdir)
    doc = args.doc or paths["doc"]
    report = run_study(size, paths["work"], doc, args.figures or paths["figures"],
                       args.results_dir or paths["results"], command)
    print(f"wrote {doc} and {report['result_json']} in {report['wall_s']:.0f} s")
    print(report["headline"])


if __name__ == "__main__":
    main()
