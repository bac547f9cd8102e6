"""Training metrics: JSON lines (the record) and TensorBoard (the view). Main rank only."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, directory: str | Path, tensorboard: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.directory / "metrics.jsonl", "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.directory / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self._tb = None

    def log(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        self._jsonl.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
