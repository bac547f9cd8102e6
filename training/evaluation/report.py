"""The evaluation report: one JSON file per model, written atomically; export copies its thresholds into the
model manifest.

    {
      "format": "cdface-eval/1",
      "model": "runs/x/model.pt",
      "results": [{"dataset": "lfw", "metric": "accuracy", "value": 0.9973, "std": 0.0021, ...},
                  {"dataset": "lfw", "metric": "tar@far=1e-3", "value": 0.991, "threshold": 0.31, ...},
                  {"dataset": "lfw", "metric": "tar@far=1e-4", "value": null, "unavailable": "..."}],
      "thresholds": {"1e-3": 0.31, ...},
      "threshold_rule": "accept when cosine similarity > threshold",
      "thresholds_source": "lfw"
    }

The thresholds come from the evaluated set with the most impostor pairs (the one that can measure the
lowest FARs); a FAR level that set cannot measure is absent rather than guessed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import numpy as np

from cdface.core.atomic import atomic_write_text
from cdface.core.matching import MATCH_RULE

FORMAT = "cdface-eval/1"
THRESHOLD_RULE = MATCH_RULE

# Evaluation dict keys that become their own rows (or are raw arrays) rather than columns of a row.
_RAW_KEYS = {"scores", "issame", "tar_at_far", "fold_accuracies", "fold_thresholds"}


def result_rows(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten one evaluation dict (from evaluate_bin / evaluate_pairs / evaluate_ijb / evaluate_rank) to rows."""
    dataset = evaluation["dataset"]
    context = {k: v for k, v in evaluation.items()
               if k not in _RAW_KEYS and k != "dataset" and not k.startswith(("accuracy", "rank"))}
    rows: list[dict[str, Any]] = []
    if "accuracy" in evaluation:
        rows.append({"dataset": dataset, "metric": "accuracy", "value": evaluation["accuracy"],
                     "std": evaluation.get("accuracy_std"), **context})
    for key in sorted(k for k in evaluation if k.startswith("rank")):
        rows.append({"dataset": dataset, "metric": key, "value": evaluation[key], **context})
    for far, point in evaluation.get("tar_at_far", {}).items():
        metric = f"tar@far={far}"
        if point is None:
            rows.append({"dataset": dataset, "metric": metric, "value": None,
                         "unavailable": f"fewer than 1/{far} impostor pairs: this FAR cannot be measured here"})
        else:
            rows.append({"dataset": dataset, "metric": metric, "value": point["tar"],
                         "threshold": point["threshold"], "far": point["far"]})
    return rows


def _impostor_count(evaluation: dict[str, Any]) -> int:
    issame = evaluation.get("issame")
    return int(np.sum(~np.asarray(issame, dtype=bool))) if issame is not None else 0


def build_report(model: str, evaluations: Iterable[dict[str, Any]]) -> dict[str, Any]:
    evaluations = list(evaluations)
    results = [row for evaluation in evaluations for row in result_rows(evaluation)]
    report: dict[str, Any] = {"format": FORMAT, "model": model, "results": results, "thresholds": {},
                              "threshold_rule": THRESHOLD_RULE, "thresholds_source": None}
    with_far = [e for e in evaluations if e.get("tar_at_far")]
    if with_far:
        source = max(with_far, key=_impostor_count)  # max keeps the first on ties: deterministic
        report["thresholds"] = {far: point["threshold"] for far, point in source["tar_at_far"].items()
                                if point is not None}
        report["thresholds_source"] = source["dataset"]
    return report


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"cannot write {type(value).__name__} to a report")


def write_report(path: str | os.PathLike, report: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(report, indent=2, default=_json_default, allow_nan=False) + "\n")


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
