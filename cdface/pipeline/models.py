"""The model lifecycle: which model the gateways answer with, and how it changes under live traffic.

The store holds the model pointer (``ModelState``: active, candidate, previous; Triton ``NAME:VERSION``
refs) and every gateway follows it (``cdface.serving.service``). An upgrade is:

1. ``set_candidate``: the new version is named the candidate. Triton serves it beside the active one;
   gateways build its index in the background, embed new enrolments with both models, and shadow a
   share of identifications with it.
2. re-embedding (``cdface gallery reembed``) adds its embeddings beside the old ones, from retained crops.
3. ``promote``: only a candidate that covers every face of the gallery, and whose evaluation is no
   worse than the active model's on a held-out set both were measured on (within ``margin``). The
   old active becomes ``previous``.
4. ``rollback`` returns to ``previous`` at any time: its embeddings and index were never removed.

Triton (``sync_triton``): the model's version policy lists exactly the versions someone may call (the
active, the candidate, the previous one for ``grace_s`` after a promotion, and any version a gateway
reported using lately), so a scheduled run can never unload a version a gateway still calls.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cdface.core.errors import CdfaceError
from cdface.core.manifest import Evaluation, ModelManifest
from cdface.export.triton_config import VersionPolicy, read_settings
from cdface.export.triton_repo import list_versions, read_version_manifest, set_version_policy
from cdface.serving.store import GalleryStore, ModelKey, utc_iso
from cdface.serving.store.base import ModelState

log = logging.getLogger("cdface.pipeline.models")

CONTROL_HEADER_ENV = "CDFACE_TRITON_CONTROL_HEADER"
CONTROL_KEY_ENV = "CDFACE_TRITON_CONTROL_KEY"
DEFAULT_MARGIN = 0.005
"""How much worse (absolute, e.g. 0.005 = half a point of TAR) a candidate may measure and still be promoted:
evaluation noise, not a regression."""
DEFAULT_GRACE_S = 24 * 3600.0
IN_USE_WINDOW_S = 300.0
"""A gateway that reported a model within this window still uses it (gateways report every ~15 s)."""


@dataclass(frozen=True)
class Lifecycle:
    """What the lifecycle commands act on: the gallery's store, the Triton model repository and, when given,
    the Triton server (gRPC ``host:port``) whose repository API loads versions."""

    store: GalleryStore
    repository: Path
    triton_url: str | None = None
    grace_s: float = DEFAULT_GRACE_S

    def manifest(self, ref: ModelKey) -> ModelManifest:
        if ref.version not in list_versions(self.repository, ref.name):
            raise CdfaceError(f"{ref} is not in the model repository {self.repository} (versions of {ref.name!r}: "
                              f"{list_versions(self.repository, ref.name) or 'none'})")
        return read_version_manifest(self.repository, ref.name, ref.version)


@dataclass(frozen=True)
class Coverage:
    """How much of the gallery a model has embedded (all tenants)."""

    model: str  # the manifest's name:version (what embeddings are keyed by)
    faces: int  # faces in the gallery
    embedded: int  # of them, faces with this model's embedding
    missing_with_crop: int  # re-embedding can make these
    missing_without_crop: int  # these must be re-enrolled

    @property
    def complete(self) -> bool:
        return self.embedded >= self.faces

    @property
    def share(self) -> float:
        return 1.0 if self.faces == 0 else self.embedded / self.faces


def coverage(store: GalleryStore, manifest: ModelManifest) -> Coverage:
    key = ModelKey(manifest.name, manifest.version)
    with_crop, without_crop = store.faces_missing(key)
    return Coverage(str(key), store.count_faces(), store.count_faces_by_model().get(key, 0), with_crop, without_crop)


def evaluation_regressions(active: Evaluation | None, candidate: Evaluation | None, margin: float) -> list[str]:
    """Why ``candidate`` must not replace ``active``, from their evaluation reports; [] when it may.

    Compared on every (dataset, metric) both reports measured (all higher-is-better: accuracy, TAR@FAR).
    No report, or no measurement in common, is a reason too: an upgrade is never decided blind.
    """
    if candidate is None or not _measured(candidate):
        return ["the candidate's manifest has no evaluation report (run `cdface eval` on the held-out set first)"]
    if active is None or not _measured(active):
        return ["the active model's manifest has no evaluation report to compare with"]
    theirs, ours = _measured(active), _measured(candidate)
    shared = sorted(set(theirs) & set(ours))
    if not shared:
        return [f"the two reports share no held-out measurement (active: {sorted(theirs)}, candidate: "
                f"{sorted(ours)}); evaluate both on the same set"]
    return [f"{dataset} {metric}: {ours[dataset, metric]:.4f} vs the active model's {theirs[dataset, metric]:.4f}"
            for dataset, metric in shared if ours[dataset, metric] < theirs[dataset, metric] - margin]


def _measured(evaluation: Evaluation) -> dict[tuple[str, str], float]:
    return {(str(r["dataset"]), str(r["metric"])): float(r["value"]) for r in evaluation.results
            if isinstance(r.get("value"), (int, float)) and "dataset" in r and "metric" in r}


def set_candidate(lc: Lifecycle, ref: ModelKey) -> ModelState:
    """Name ``ref`` the candidate: Triton serves it, gateways index it, enrolments are embedded by it too."""
    lc.manifest(ref)  # it must exist before anyone follows the pointer to it
    state = lc.store.model_state()
    if state.active is None:
        raise CdfaceError("the gallery has no active model yet: start a gateway on it first (it names the active one)")
    if ref == state.active:
        raise CdfaceError(f"{ref} is already the active model")
    if ref != state.candidate:
        state = lc.store.set_model_state(state.active, ref, state.previous, action="model_candidate", expect=state)
    sync_triton(lc, state)
    return state


def promote(lc: Lifecycle, ref: ModelKey | None = None, *, margin: float = DEFAULT_MARGIN,
            without_baseline: bool = False) -> ModelState:
    """Make the candidate (or ``ref``, which must be it) the active model, if the gates pass; else CdfaceError.

    Gates: it covers every face of the gallery; its evaluation is no worse than the active model's beyond
    ``margin`` (``without_baseline``: accept an active model that has no report, e.g. a wrapped one);
    Triton serves it, when a server is given.
    """
    state = lc.store.model_state()
    ref = ref or state.candidate
    if ref is None:
        raise CdfaceError("there is no candidate model to promote; name one with `cdface model candidate NAME:VERSION`")
    if ref != state.candidate:
        raise CdfaceError(f"{ref} is not the candidate ({state.candidate or 'none'}); make it the candidate first, so "
                          "that gateways index it before they answer with it")
    assert state.active is not None  # a candidate is only set beside an active model
    manifest = lc.manifest(ref)
    covered = coverage(lc.store, manifest)
    if not covered.complete:
        raise CdfaceError(
            f"promotion refused: {ref} covers {covered.embedded} of {covered.faces} faces ({covered.share:.1%}); "
            f"`cdface gallery reembed --to {ref}` can embed {covered.missing_with_crop}, and "
            f"{covered.missing_without_crop} have no retained crop and must be re-enrolled")
    reasons = evaluation_regressions(lc.manifest(state.active).evaluation, manifest.evaluation, margin)
    if without_baseline and reasons == ["the active model's manifest has no evaluation report to compare with"]:
        reasons = []
    if reasons:
        raise CdfaceError(f"promotion refused: {'; '.join(reasons)} (margin {margin:g})")
    if lc.triton_url is not None and not _triton_ready(lc.triton_url, ref):
        raise CdfaceError(f"promotion refused: Triton at {lc.triton_url} does not report {ref} ready")
    state = lc.store.set_model_state(ref, None, state.active, action="model_promote", expect=state)
    log.info("promoted %s (previous: %s)", ref, state.previous)
    sync_triton(lc, state)
    return state


def rollback(lc: Lifecycle) -> ModelState:
    """Return to the previous model (its embeddings and Triton version are still there); the model rolled
    back from becomes ``previous``, so the rollback can itself be undone."""
    state = lc.store.model_state()
    if state.previous is None:
        raise CdfaceError("there is no previous model to roll back to")
    lc.manifest(state.previous)
    state = lc.store.set_model_state(state.previous, None, state.active, action="model_rollback", expect=state)
    log.info("rolled back to %s", state.active)
    sync_triton(lc, state)
    return state


def needed_versions(state: ModelState, in_use: set[ModelKey], grace_s: float,
                    now: _dt.datetime | None = None) -> dict[str, list[int]]:
    """Per Triton model name, the versions Triton must serve: the active, the candidate, the previous one until
    ``grace_s`` after the promotion, and every version a gateway reported using."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    refs = {ref for ref in (state.active, state.candidate) if ref is not None} | set(in_use)
    if state.previous is not None:
        promoted = None if state.promoted is None else _dt.datetime.fromisoformat(state.promoted)
        if promoted is None or promoted + _dt.timedelta(seconds=grace_s) > now:
            refs.add(state.previous)
    versions: dict[str, list[int]] = {}
    for ref in refs:
        versions.setdefault(ref.name, []).append(ref.version)
    return {name: sorted(v) for name, v in sorted(versions.items())}


def sync_triton(lc: Lifecycle, state: ModelState | None = None) -> dict[str, list[int]]:
    """Write each model's version policy (``specific``: exactly ``needed_versions``) and, with a Triton server,
    load the model through its repository API so that the policy takes effect."""
    state = state or lc.store.model_state()
    since = utc_iso(_dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=IN_USE_WINDOW_S))
    needed = needed_versions(state, lc.store.models_in_use(since), lc.grace_s)
    for name, versions in needed.items():
        present = [v for v in versions if v in list_versions(lc.repository, name)]
        if not present:
            continue
        policy = VersionPolicy.specific(*present)
        current = read_settings(lc.repository, name)
        changed = current is None or current.version_policy != policy
        if changed:
            set_version_policy(lc.repository, name, policy)
        # A reload is asked only when something changes: Triton then loads the new versions and unloads the
        # dropped ones while the others keep serving.
        if lc.triton_url is not None and (changed or not all(_triton_ready(lc.triton_url, ModelKey(name, v))
                                                             for v in present)):
            load_in_triton(lc.triton_url, name)
    return needed


def control_headers() -> dict[str, str]:
    """The gRPC metadata that Triton's restricted model-control API asks for (the chart gives the key to pipeline
    pods only). Triton reads a restricted gRPC header as ``triton-grpc-protocol-<header, lower case>``."""
    name, key = os.environ.get(CONTROL_HEADER_ENV), os.environ.get(CONTROL_KEY_ENV)
    return {"triton-grpc-protocol-" + name.lower(): key} if name and key else {}


def load_in_triton(triton_url: str, model: str) -> None:
    """(Re)load ``model`` with its current config (explicit model control); Triton keeps serving the versions
    that stay while it loads the new ones."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(triton_url)
    try:
        client.load_model(model, headers=control_headers())
    except InferenceServerException as exc:
        raise CdfaceError(f"Triton at {triton_url} did not load {model!r}: {exc.message()}") from None
    finally:
        client.close()


def _triton_ready(triton_url: str, ref: ModelKey) -> bool:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(triton_url)
    try:
        return bool(client.is_model_ready(ref.name, str(ref.version)))
    except InferenceServerException:
        return False
    finally:
        client.close()


def status(lc: Lifecycle) -> dict[str, Any]:
    """The pointer, each model's coverage, the shadow-mode agreement of the candidate, the versions in use."""
    state = lc.store.model_state()
    report = pointer(state)
    for role, ref in (("active", state.active), ("candidate", state.candidate), ("previous", state.previous)):
        if ref is not None:
            covered = coverage(lc.store, lc.manifest(ref))
            report[f"{role}_coverage"] = {"faces": covered.faces, "embedded": covered.embedded,
                                          "share": round(covered.share, 6),
                                          "missing_with_crop": covered.missing_with_crop,
                                          "missing_without_crop": covered.missing_without_crop}
    if state.active is not None and state.candidate is not None:
        counts = lc.store.shadow_counts(state.active, state.candidate)
        def share(part: int) -> float | None:
            return round(part / counts.total, 6) if counts.total else None

        report["shadow"] = {"compared": counts.total, "same_decision": counts.same_decision,
                            "same_top1": counts.same_top1, "decision_agreement": share(counts.same_decision),
                            "top1_agreement": share(counts.same_top1)}
    since = utc_iso(_dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=IN_USE_WINDOW_S))
    in_use = lc.store.models_in_use(since)
    report["in_use"] = sorted(str(ref) for ref in in_use)
    report["triton_versions"] = needed_versions(state, in_use, lc.grace_s)
    return report


def pointer(state: ModelState) -> dict[str, Any]:
    """The model pointer as JSON: the three refs as ``NAME:VERSION`` (or null) and when it last moved."""
    def text(ref: ModelKey | None) -> str | None:
        return None if ref is None else str(ref)

    return {"active": text(state.active), "candidate": text(state.candidate), "previous": text(state.previous),
            "changed": state.changed, "promoted": state.promoted}
