"""The training configuration: typed, with the reference values of the method as defaults.

Filled from a preset (``training/presets/<name>.yaml`` or a path), then ``CDFACE_TRAIN__*``
environment variables, then ``--set section.key=value``; see ``cdface.core.config``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cdface.core.config import build_config, read_yaml
from cdface.core.errors import CdfaceError

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
ENV_PREFIX = "CDFACE_TRAIN__"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Section):
    backbone: str = "ir100"
    width: float = Field(1.0, gt=0)
    embedding_size: int = Field(512, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    init_weights: Optional[str] = Field(None, description="arcface_torch backbone.pth to start the backbone from "
                                        "(fine-tuning; the head starts fresh); ignored when resuming or with "
                                        "run.init_from")


class HeadConfig(Section):
    kind: Literal["arcface", "cosface"] = "arcface"
    scale: float = Field(64.0, gt=0)
    margin: float = Field(0.5, ge=0)
    num_hard_negatives: int = Field(500, ge=1, description="NP: hard negative prototypes per sample")
    sharded: bool = Field(False, description="split the class centres across ranks (Partial FC); the loss, the "
                          "hard negatives and checkpoints stay the replicated head's")
    sample_rate: float = Field(1.0, gt=0, le=1, description="share of each shard's negative centres scored per "
                               "step (sharded head only; the batch's own classes are always kept)")


class MethodConfig(Section):
    """The refined branch: soft mining + closeness + diversity (joint stage only)."""

    interval: int = Field(5, ge=1, description="RRB runs every `interval` steps")
    identities: int = Field(64, ge=1, description="K identities mined per step, split across ranks")
    num_easy: int = Field(7, ge=2, description="NE easy samples per identity")
    num_hard: int = Field(1, ge=1, description="NH hard samples per identity")
    quantile: float = Field(0.2, gt=0, lt=1, description="easy/hard threshold: this quantile of the score bank")
    widen_step: float = Field(0.05, gt=0)
    ema_alpha: float = Field(0.9, ge=0, lt=1)
    bank_sync_every: int = Field(100, ge=1)
    hard_lower_bound: Optional[float] = Field(0.0, description="hard samples score in (this, threshold), as in "
                                              "the authors' code (0); null: no lower bound. When an identity is "
                                              "short, both ends of its window widen by widen_step")
    lambda_closeness: float = Field(0.5, ge=0)
    lambda_diversity: float = Field(2.0, ge=0, description="2.0 is the supplement's; the authors' code uses 1.0")
    diversity_scale: Optional[float] = Field(None, gt=0, description="s of the diversity loss; null (default): the "
                                             "head's scale, as in the authors' code. A different value changes "
                                             "diversity's weight as lambda2 does, and is logged as such")
    prototypes: Literal["shared", "per_sample"] = Field(
        "shared", description="shared: one set of hard-negative centres for all hard samples of a step, the union "
        "of the mined identities' top-NP with every mined identity removed (the authors' code); per_sample: each "
        "hard sample against its own identity's top-NP")
    separate_pass: bool = Field(True, description="mined images get their own backbone forward (their own "
                                "BatchNorm statistics), as in the authors' code; false: one forward for the batch "
                                "and the mined images together (cheaper, shares the batch statistics)")
    probe_gradients_every: int = Field(0, ge=0, description="every n-th refined-branch step, log each term's "
                                       "gradient norm over the backbone and the cosines between them (a "
                                       "diagnostic: three extra backward passes on those steps; single process "
                                       "only); 0: off")


class DataConfig(Section):
    path: str = "data/train"
    val: list[str] = Field(default_factory=list, description="verification .bin files evaluated during training")
    workers: int = Field(2, ge=0)
    flip: bool = True


class OptimConfig(Section):
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(512, ge=1, description="global batch over all ranks")
    epochs: int = Field(24, ge=1)
    schedule: Literal["step", "cosine"] = "step"
    milestones: list[float] = Field(default_factory=lambda: [10.0, 18.0, 22.0])
    gamma: float = Field(0.1, gt=0)
    warmup_epochs: float = Field(0.0, ge=0)
    grad_clip: float = Field(0.0, ge=0, description="max gradient norm; 0 (the method's setting: neither the "
                             "paper nor the authors' code clips) disables clipping")


class RunConfig(Section):
    stage: Literal["pretrain", "joint"] = "joint"
    pretrain_epochs: int = Field(4, ge=1, description="epochs of the plain-ArcFace pretrain stage")
    init_from: Optional[str] = Field(None, description="pretrain checkpoint for the joint stage")
    output: str = "runs/train"
    resume: bool = True
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: Optional[bool] = Field(None, description="default: on for CUDA")
    max_steps: Optional[int] = Field(None, ge=1, description="stop after this many steps (smoke runs, benchmarks)")
    checkpoint_every: int = Field(1000, ge=1, description="steps between checkpoints (and at each epoch end)")
    log_every: int = Field(20, ge=1)
    eval_every_epochs: int = Field(1, ge=1)
    threads: Optional[int] = Field(None, ge=1, description="CPU threads for torch")
    progress: bool = True
    tensorboard: bool = True


class TrainConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.method.identities > self.optim.batch_size:
            raise ValueError(f"method.identities (K={self.method.identities}) exceeds the batch size "
                             f"({self.optim.batch_size}): K identities must come from one batch")
        if self.head.sample_rate < 1.0 and not self.head.sharded:
            raise ValueError("head.sample_rate < 1 samples the centres of a sharded head: set head.sharded=true")
        return self

    @property
    def diversity_scale(self) -> float:
        """The diversity loss's s: the head's unless ``method.diversity_scale`` sets another."""
        return self.head.scale if self.method.diversity_scale is None else self.method.diversity_scale

    @property
    def epochs(self) -> int:
        return self.run.pretrain_epochs if self.run.stage == "pretrain" else self.optim.epochs


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def load_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    path = Path(preset)
    if not path.suffix:
        path = PRESETS_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise CdfaceError(f"unknown preset {preset!r}; known: {', '.join(list_presets())}")
    return build_config(TrainConfig, read_yaml(path), overrides, env_prefix=ENV_PREFIX)
