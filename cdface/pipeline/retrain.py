"""``cdface retrain``: one command from training data to a promoted model, each step idempotent under a run id.

    cdface retrain --run-id 2026-12-03 --model-repository /models --model face --db gallery.db
    torchrun --nproc-per-node 8 -m cdface.cli retrain --run-id R --steps train ...   (the GPU Job)
    cdface retrain --run-id R --steps eval,export,publish,load,reembed,promote ...    (the CPU Job)

The steps, in order:

1. ``train``: pretrain (plain ArcFace) then the joint stage, under ``WORK_DIR/RUN_ID``; a stage that
   stopped resumes from its last checkpoint (the trainer's exact resume). The held-out verification
   sets (the training config's ``data.val``) are copied into the run, so the CPU steps need only the run.
2. ``eval``: the trained model on those held-out sets -> ``eval.json``, the report the manifest carries
   and promotion compares.
3. ``export``: ONNX with the parity gate -> ``export/`` (``model.onnx`` + ``manifest.json`` named after the
   Triton model, at the version it will get).
4. ``publish``: the export becomes a version of the model repository (with its TensorRT engine built
   first for ``tensorrt_plan``). The run is recorded beside it (``<model>/.cdface-runs/RUN_ID.json``), and
   a retried run finds its version (by that record, or by the ONNX file's digest in the versions'
   manifests when it was killed before writing the record) instead of adding a second one.
5. ``load``: the version policy becomes ``specific`` over the new version and every version still needed
   (``cdface.pipeline.models.needed_versions``: the pointer's models, the previous one within its grace
   period, whatever a live gateway reports using); every Triton server behind the target loads the model,
   and the step waits until the new version is ready on each.
6. ``reembed``: the new version becomes the candidate (gateways index it and embed new enrolments with it
   too), then every face is re-embedded with it from its retained crop.
7. ``promote``: the candidate becomes the active model when the gates pass; otherwise it stays the
   candidate and the command says why (one line, exit status 2).

Each finished step writes ``WORK_DIR/RUN_ID/steps/<step>.json`` (atomically) with its result; a rerun skips
it and reuses the result, so a retried or resumed run publishes one version, never two. ``--steps`` runs a
subset: the chart runs ``train`` on GPUs in one Job and the CPU steps in another.

Settings: ``CDFACE_RETRAIN_*``, overridden by the options. The gallery and Triton settings left unset are
the gateway's (``CDFACE_SERVE_DB_PATH``, ``..._DATABASE_URL``, ``..._MODEL_REPOSITORY``, ``..._MODEL``,
``..._TRITON_URL``); ``CDFACE_SERVE_CROP_KEYS`` opens the retained crops, and Triton's model-control
header comes from ``CDFACE_TRITON_CONTROL_HEADER`` / ``CDFACE_TRITON_CONTROL_KEY``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Final, Literal, Optional, get_args

import typer
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cdface.core.atomic import atomic_write_text
from cdface.core.errors import CdfaceError
from cdface.export.triton_config import Backend

if TYPE_CHECKING:  # imported where used: `cdface --help` loads neither torch nor the store nor tritonclient
    from cdface.pipeline.models import Lifecycle
    from cdface.serving.settings import Settings as ServingSettings
    from cdface.serving.store import GalleryStore, ModelKey

log = logging.getLogger("cdface.retrain")

Step = Literal["train", "eval", "export", "publish", "load", "reembed", "promote"]
STEPS: Final[tuple[Step, ...]] = get_args(Step)
ENV_PREFIX: Final = "CDFACE_RETRAIN_"
RUN_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
RUNS_DIR: Final = ".cdface-runs"  # in <repo>/<model>/: which run published which version (Triton skips it)
_READY_POLL_S: Final = 0.5


class RetrainSettings(BaseSettings):
    """The retraining's settings: ``CDFACE_RETRAIN_<FIELD>``, overridden by the command's options."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    run_id: str = Field(pattern=RUN_ID_PATTERN, description=(
        "The run's stable name: its files are WORK_DIR/RUN_ID, and a rerun with the same id resumes it."))
    steps: Annotated[tuple[Step, ...], NoDecode] = Field(default=STEPS, description=(
        "The steps to run, comma-separated (they run in the pipeline's order)."))
    preset: str = Field(default="demo", description="Training preset name or YAML file (as `cdface train`).")
    work_dir: Path = Field(default=Path("runs/retrain"), description="Runs are kept in WORK_DIR/RUN_ID.")
    two_stage: bool = Field(default=True, description="Pretrain with plain ArcFace before the joint stage.")
    eval_device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="Device of the eval step.")
    eval_batch_size: int = Field(default=64, ge=1)
    # The gallery and Triton; None: the gateway's setting (CDFACE_SERVE_*).
    db_path: Optional[Path] = Field(default=None, description="Gallery SQLite file.")
    database_url: Optional[SecretStr] = Field(default=None, description="PostgreSQL gallery (instead of db_path).")
    model_repository: Optional[Path] = Field(default=None, description="Triton model repository.")
    model: Optional[str] = Field(default=None, description="Triton model name.")
    triton_url: Optional[str] = Field(default=None, description=(
        "Triton gRPC target; the load step loads the model on every address it names (a headless Service's "
        "name resolves to one per pod)."))
    backend: Optional[Backend] = Field(default=None, description=(
        "Triton backend of a published version; default: the model's current one (python for a new model)."))
    max_batch_size: Optional[int] = Field(default=None, ge=1, description=(
        "Triton max_batch_size of the model; default: its current config's."))
    engine_cache: Optional[Path] = Field(default=None, description=(
        "tensorrt_plan: TensorRT engine cache (default WORK_DIR/RUN_ID/engines)."))
    tensorrt_cache: Optional[str] = Field(default=None, description=(
        "onnxruntime_onnx on GPU: ONNX Runtime's TensorRT accelerator, engines built by Triton when the version "
        "loads and kept in this directory on Triton's side (the chart's /engine-cache); default: the model's."))
    load_timeout_s: float = Field(default=600.0, gt=0, description="How long the load step waits for readiness.")
    grace_s: Optional[float] = Field(default=None, ge=0, description=(
        "How long the previous model stays loaded after a promotion; default: the lifecycle commands'."))
    margin: Optional[float] = Field(default=None, ge=0, description=(
        "Promotion refuses a candidate evaluated worse than the active model by more than this; default: the "
        "lifecycle commands'."))
    without_baseline: bool = Field(default=False, description=(
        "Promote even when the active model has no evaluation report (e.g. a wrapped third-party model)."))
    reembed_batch: int = Field(default=32, ge=1, le=256, description="Crops per Triton request when re-embedding.")

    @field_validator("steps", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            names = [part.strip() for part in value.split(",") if part.strip()]
            unknown = [name for name in names if name not in STEPS]
            if unknown or not names:
                raise ValueError(f"steps are a comma-separated subset of {','.join(STEPS)}; got {value!r}")
            return tuple(names)
        return value

    @field_validator("steps")
    @classmethod
    def _pipeline_order(cls, steps: tuple[Step, ...]) -> tuple[Step, ...]:
        return tuple(step for step in STEPS if step in steps)

    def serving_settings(self) -> "ServingSettings":
        """The gateway's settings, with the gallery and Triton this run names where it names them."""
        from cdface.serving.settings import Settings

        overrides: dict[str, Any] = {
            "db_path": self.db_path, "database_url": self.database_url, "model_repository": self.model_repository,
            "model": self.model, "triton_url": self.triton_url}
        try:
            return Settings(**{k: v for k, v in overrides.items() if v is not None})
        except (ValidationError, ValueError) as exc:
            raise CdfaceError(f"invalid gallery or Triton settings: {_one_line(exc)}") from None


@dataclasses.dataclass(frozen=True)
class RunDir:
    """Where one run keeps its files."""

    root: Path

    def marker(self, step: Step) -> Path:
        return self.root / "steps" / f"{step}.json"

    @property
    def pretrain(self) -> Path:
        return self.root / "pretrain"

    @property
    def joint(self) -> Path:
        return self.root / "joint"

    @property
    def model(self) -> Path:
        return self.joint / "model.pt"

    @property
    def held_out(self) -> Path:
        return self.root / "held-out"

    @property
    def eval_report(self) -> Path:
        return self.root / "eval.json"

    @property
    def export(self) -> Path:
        return self.root / "export"


class Retrain:
    """One run of the pipeline: its settings, its folder, the gateway's settings (gallery, Triton)."""

    def __init__(self, settings: RetrainSettings, train_overrides: list[str], *, main_process: bool = True) -> None:
        self.settings = settings
        self.serving = settings.serving_settings()
        self.train_overrides = list(train_overrides)
        self.run = RunDir(settings.work_dir / settings.run_id)
        # Under torchrun every rank trains; only rank 0 records and reports.
        self.main_process = main_process
        self._store: GalleryStore | None = None

    # -- the driver ----------------------------------------------------------------------------

    def execute(self) -> dict[str, dict]:
        """Run the selected steps in order; returns each step's result (those done earlier included)."""
        actions: dict[Step, Callable[[dict[str, dict]], dict]] = {
            "train": self.train, "eval": self.evaluate, "export": self.export, "publish": self.publish,
            "load": self.load, "reembed": self.reembed, "promote": self.promote,
        }
        results: dict[str, dict] = {}
        try:
            for step in self.settings.steps:
                marker = self.run.marker(step)
                if marker.is_file():
                    results[step] = self._read_marker(marker)
                    self._log(f"{step}: done earlier, skipped")
                    continue
                started = time.monotonic()
                try:
                    result = actions[step](results)
                except ModuleNotFoundError as exc:  # e.g. an image built with the train extra only
                    raise CdfaceError(f"the {step} step needs the Python package {exc.name!r}, which is not "
                                      "installed: install cdface with the train, export and serve extras") from None
                seconds = round(time.monotonic() - started, 1)
                results[step] = result
                if self.main_process:
                    record = {"step": step, "run_id": self.settings.run_id, "seconds": seconds,
                              "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "result": result}
                    atomic_write_text(marker, json.dumps(record, indent=2) + "\n")
                self._log(f"{step}: done in {seconds:.1f} s ({_summary(result)})")
        finally:
            if self._store is not None:
                self._store.close()
        return results

    def _log(self, message: str) -> None:
        if self.main_process:
            log.info("retrain %s: %s", self.settings.run_id, message)

    @staticmethod
    def _read_marker(marker: Path) -> dict:
        try:
            return dict(json.loads(marker.read_text())["result"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CdfaceError(f"step record {marker} is unreadable ({exc}); delete it to run the step again") from None

    def _earlier(self, step: Step, results: dict[str, dict]) -> dict:
        """The result of an earlier step of this run: from this invocation or from its record."""
        if step in results:
            return results[step]
        marker = self.run.marker(step)
        if not marker.is_file():
            raise CdfaceError(f"run {self.settings.run_id} has not done the {step} step ({marker} is missing): "
                              f"run it first (--steps {step},...)")
        return self._read_marker(marker)

    # -- 1. train --------------------------------------------------------------------------------

    def _train_config(self, stage: Literal["pretrain", "joint"]):
        from cdface.training.config import load_config

        extra = [f"run.stage={stage}", f"run.output={self.run.pretrain if stage == 'pretrain' else self.run.joint}"]
        if stage == "joint" and self.settings.two_stage:
            extra.append(f"run.init_from={self.run.pretrain / 'checkpoints' / 'last.pt'}")
        # The run's own paths come last: they win over a --set naming others.
        return load_config(self.settings.preset, [*self.train_overrides, *extra])

    def train(self, results: dict[str, dict]) -> dict:
        from cdface.training.trainer import train

        stages: list[Literal["pretrain", "joint"]] = ["pretrain", "joint"] if self.settings.two_stage else ["joint"]
        configs = [self._train_config(stage) for stage in stages]  # every stage's settings checked first
        held_out = [Path(p) for p in configs[-1].data.val]
        if not held_out:
            raise CdfaceError("the training configuration names no held-out verification set (data.val): the eval "
                              "step and promotion need one (--set data.val=[/data/val.bin])")
        names = [p.name for p in held_out]
        if len(set(names)) != len(names):
            raise CdfaceError(f"the held-out sets' file names must differ (reports name a set by its file): {names}")
        for path in held_out:
            if not path.is_file():
                raise CdfaceError(f"held-out verification file not found: {path}")
        steps = {}
        for stage, cfg in zip(stages, configs):
            output = Path(cfg.run.output)
            if (output / "model.pt").is_file():  # written last, when the stage ended
                continue
            # The held-out evaluation is the eval step's; a stage that stopped resumes from checkpoints/last.pt.
            steps[stage] = train(cfg).steps
        if self.main_process:
            # Kept with the run: the CPU steps (another Job, without the data volume) evaluate on them.
            for path in held_out:
                _copy_atomic(path, self.run.held_out / path.name)
        return {"model": str(self.run.model), "steps": steps,
                "held_out": [str(self.run.held_out / name) for name in names]}

    # -- 2. eval ---------------------------------------------------------------------------------

    def evaluate(self, results: dict[str, dict]) -> dict:
        from cdface.training.evaluation.embedders import open_embedder
        from cdface.training.evaluation.report import build_report, write_report
        from cdface.training.evaluation.run import evaluate_bins

        held_out = [Path(p) for p in self._earlier("train", results)["held_out"]]
        for path in [self.run.model, *held_out]:
            if not path.is_file():
                raise CdfaceError(f"{path} is missing from the run; run the train step again (delete "
                                  f"{self.run.marker('train')})")
        embedder = open_embedder(self.run.model, device=self.settings.eval_device,
                                 batch_size=self.settings.eval_batch_size)
        evaluations = evaluate_bins(embedder, held_out, batch_size=self.settings.eval_batch_size)
        report = build_report(str(self.run.model), evaluations)
        write_report(self.run.eval_report, report)
        accuracy = {row["dataset"]: row["value"] for row in report["results"] if row["metric"] == "accuracy"}
        return {"report": str(self.run.eval_report), "accuracy": accuracy}

    # -- 3. export -------------------------------------------------------------------------------

    def _repo(self) -> Path:
        if self.serving.model_repository is None:
            raise CdfaceError("set the model repository: --model-repository (or CDFACE_RETRAIN_MODEL_REPOSITORY, "
                              "CDFACE_SERVE_MODEL_REPOSITORY)")
        return Path(self.serving.model_repository)

    def export(self, results: dict[str, dict]) -> dict:
        from cdface.export.onnx_export import export_checkpoint
        from cdface.export.triton_repo import list_versions

        self._earlier("eval", results)
        repo, model = self._repo(), self.serving.model
        # The version it will get; publish renumbers it if another run takes that number meanwhile.
        version = max(list_versions(repo, model), default=0) + 1
        exported = export_checkpoint(self.run.model, self.run.export, name=model, version=version,
                                     eval_report=self.run.eval_report)
        return {"dir": str(self.run.export), "name": model, "version": version,
                "onnx_sha256": exported.manifest.onnx_sha256}

    # -- 4. publish ------------------------------------------------------------------------------

    def publish(self, results: dict[str, dict]) -> dict:
        from cdface.core.manifest import read_manifest, write_manifest
        from cdface.export.triton_config import read_settings
        from cdface.export.triton_repo import add_model_version, list_versions

        self._earlier("export", results)
        repo, model = self._repo(), self.serving.model
        manifest = read_manifest(self.run.export)
        found = self._published_version(repo, model, manifest.onnx_sha256)
        if found is not None:
            self._record_run(repo, model, found, manifest.onnx_sha256)
            return {"model": model, "version": found, "added": False}
        current = read_settings(repo, model)
        backend: Backend = self.settings.backend or (current.backend if current is not None else "python")
        if backend == "tensorrt_plan":
            self._build_engine()
        for _ in range(3):  # another run may take the number between the check and the copy
            taken = list_versions(repo, model)
            if manifest.version in taken:
                # The manifest names the Triton version it is served as: renumber both together.
                manifest = manifest.model_copy(update={"version": max(taken) + 1})
                write_manifest(self.run.export / "manifest.json", manifest)
            try:
                added = add_model_version(repo, model, self.run.export, backend=backend, version=manifest.version,
                                          max_batch_size=self.settings.max_batch_size,
                                          tensorrt_cache=self.settings.tensorrt_cache)
            except CdfaceError:
                if manifest.version in list_versions(repo, model):
                    continue
                raise
            self._record_run(repo, model, added.version, manifest.onnx_sha256)
            return {"model": model, "version": added.version, "added": True, "backend": backend}
        raise CdfaceError(f"found no free version number for {model} in {repo}: other runs kept taking them")

    def _published_version(self, repo: Path, model: str, onnx_sha256: str) -> int | None:
        """The version that holds this run's export already: by the run's record, else by the ONNX digest
        (a run killed between copying its version and recording it left no record)."""
        from cdface.core.manifest import read_manifest
        from cdface.export.triton_repo import list_versions

        versions = list_versions(repo, model)
        record = repo / model / RUNS_DIR / f"{self.settings.run_id}.json"
        if record.is_file():
            try:
                version = int(json.loads(record.read_text())["version"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CdfaceError(f"run record {record} is unreadable ({exc})") from None
            if version in versions:
                return version
        for version in reversed(versions):
            try:
                if read_manifest(repo / model / str(version)).onnx_sha256 == onnx_sha256:
                    return version
            except CdfaceError:
                continue  # a version without a valid manifest is nobody's export
        return None

    def _record_run(self, repo: Path, model: str, version: int, onnx_sha256: str) -> None:
        record = {"run_id": self.settings.run_id, "version": version, "onnx_sha256": onnx_sha256,
                  "recorded": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        atomic_write_text(repo / model / RUNS_DIR / f"{self.settings.run_id}.json", json.dumps(record, indent=2) + "\n")

    def _build_engine(self) -> None:
        """tensorrt_plan: the engine for this node's GPU (built, or taken from the cache) beside the export."""
        from cdface.export.tensorrt import build_cached_engine

        plan = self.run.export / "model.plan"
        if not plan.is_file():
            cache = self.settings.engine_cache or self.run.root / "engines"
            engine, _ = build_cached_engine(self.run.export / "model.onnx", cache)
            _copy_atomic(engine, plan)

    # -- 5. load ---------------------------------------------------------------------------------

    def _lifecycle(self) -> "Lifecycle":
        from cdface.pipeline.models import DEFAULT_GRACE_S, Lifecycle
        from cdface.serving.service import open_store

        if self._store is None:
            self._store = open_store(self.serving)
        grace = DEFAULT_GRACE_S if self.settings.grace_s is None else self.settings.grace_s
        # No Triton URL: this command loads on every server of the target itself (_load_everywhere).
        return Lifecycle(self._store, self._repo(), triton_url=None, grace_s=grace)

    def _new_ref(self, results: dict[str, dict]) -> "ModelKey":
        from cdface.serving.store import ModelKey

        published = self._earlier("publish", results)
        return ModelKey(str(published["model"]), int(published["version"]))

    def load(self, results: dict[str, dict]) -> dict:
        from cdface.export.triton_repo import list_versions, set_version_policy
        from cdface.pipeline.models import IN_USE_WINDOW_S, needed_versions
        from cdface.serving.store import utc_iso

        ref = self._new_ref(results)
        lc = self._lifecycle()
        since = utc_iso(_dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(seconds=IN_USE_WINDOW_S))
        needed = needed_versions(lc.store.model_state(), lc.store.models_in_use(since), lc.grace_s)
        present = set(list_versions(lc.repository, ref.name))
        versions = sorted({v for v in needed.get(ref.name, []) if v in present} | {ref.version})
        set_version_policy(lc.repository, ref.name, "specific:" + ",".join(map(str, versions)))
        servers = self._load_everywhere(ref)
        return {"model": ref.name, "version": ref.version, "served_versions": versions, "servers": servers}

    def _load_everywhere(self, ref: "ModelKey") -> int:
        """Every Triton server of the target loads the model's current config (the versions staying serve on
        throughout), then reports ``ref`` ready; returns how many servers."""
        from cdface.pipeline.models import load_in_triton

        servers = triton_servers(self.serving.triton_url)
        deadline = time.monotonic() + self.settings.load_timeout_s
        for server in servers:
            load_in_triton(server, ref.name)
        for server in servers:
            self._wait_ready(server, ref, deadline)
        return len(servers)

    def _wait_ready(self, server: str, ref: "ModelKey", deadline: float) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(server)
        try:
            while True:
                try:
                    if client.is_model_ready(ref.name, str(ref.version)):
                        return
                except InferenceServerException:
                    pass  # not answering yet: keep asking until the deadline
                if time.monotonic() > deadline:
                    raise CdfaceError(f"Triton {server} did not report {ref} ready within "
                                      f"{self.settings.load_timeout_s:g} s")
                time.sleep(_READY_POLL_S)
        finally:
            client.close()

    # -- 6. reembed ------------------------------------------------------------------------------

    def reembed(self, results: dict[str, dict]) -> dict:
        import asyncio

        from cdface.serving.service import open_embedder
        from cdface.serving.store import ModelKey
        from cdface.serving.usecases.maintenance import reembed

        self._earlier("load", results)
        ref = self._new_ref(results)
        lc = self._lifecycle()
        self._make_candidate(lc, ref)
        manifest = lc.manifest(ref)
        target = ModelKey(manifest.name, manifest.version)  # embeddings are keyed by the manifest's identity

        async def run() -> Any:
            embedder = open_embedder(self.serving, manifest, ref.version)
            try:
                return await reembed(lc.store, embedder, target, self.settings.reembed_batch)
            finally:
                await embedder.close()

        return {"candidate": str(ref), **_as_dict(asyncio.run(run()))}

    def _make_candidate(self, lc: "Lifecycle", ref: "ModelKey") -> None:
        """``ref`` becomes the candidate before any face is re-embedded: from then on gateways embed new
        enrolments with it too, so none is missed. Nothing to do when it is the candidate or active already."""
        from cdface.pipeline.models import set_candidate

        state = lc.store.model_state()
        if ref not in (state.candidate, state.active):
            set_candidate(lc, ref)
            self._load_everywhere(ref)  # the version policy changed with the pointer

    # -- 7. promote ------------------------------------------------------------------------------

    def promote(self, results: dict[str, dict]) -> dict:
        from cdface.pipeline.models import DEFAULT_MARGIN, promote

        self._earlier("load", results)
        ref = self._new_ref(results)
        lc = self._lifecycle()
        if lc.store.model_state().active == ref:  # an earlier try promoted it and stopped before its record
            return {"active": str(ref), "promoted": False}
        self._make_candidate(lc, ref)
        deadline = time.monotonic() + self.settings.load_timeout_s
        for server in triton_servers(self.serving.triton_url):
            self._wait_ready(server, ref, deadline)  # no gateway may follow the pointer to a version not served
        margin = DEFAULT_MARGIN if self.settings.margin is None else self.settings.margin
        try:
            state = promote(lc, ref, margin=margin, without_baseline=self.settings.without_baseline)
        except CdfaceError as exc:
            raise CdfaceError(f"{ref} stays the candidate: {exc}") from None
        self._load_everywhere(ref)  # the version policy changed with the pointer
        return {"active": str(ref), "previous": None if state.previous is None else str(state.previous),
                "promoted": True}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def triton_servers(target: str) -> list[str]:
    """Each server (``host:port``) a gRPC target names. A version must be loaded on every one of them, while
    inference goes to one at a time: a name is resolved now to all its addresses (a Kubernetes headless
    Service has one per pod), ``ipv4:``/``ipv6:`` lists are split."""
    lower = target.lower()
    if lower.startswith(("ipv4:", "ipv6:")):
        return [address.strip() for address in target[5:].split(",") if address.strip()]
    rest = target
    if lower.startswith("dns:"):
        rest = target[4:]
        if rest.startswith("//"):  # dns://[resolver]/name:port
            _, _, rest = rest[2:].partition("/")
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        raise CdfaceError(f"cannot resolve the Triton servers of {target!r}: {exc}") from None
    # IPv4 when the name has IPv4 addresses: "localhost" also resolves to ::1, where Triton may not listen.
    ipv4 = sorted({str(info[4][0]) for info in infos if info[0] == socket.AF_INET})
    addresses = ipv4 or sorted({str(info[4][0]) for info in infos})
    return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]


def _copy_atomic(src: Path, dst: Path) -> None:
    """``src`` copied to ``dst``, which appears complete or not at all."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.with_name(f".{dst.name}.partial")
    shutil.copyfile(src, staging)
    with open(staging, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(staging, dst)


def _as_dict(value: Any) -> dict:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json.loads(json.dumps(dataclasses.asdict(value), default=str))
    return {"result": str(value)}


def _summary(result: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in result.items() if isinstance(v, (int, float, str)))[:300]


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors())
    return " ".join(str(exc).split())


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


def _option(field: str, *flags: str, help: str) -> Any:
    """An option overriding the setting ``field`` (left out: CDFACE_RETRAIN_<FIELD>, then the default)."""
    return typer.Option(None, *flags, help=f"{help} Overrides {ENV_PREFIX}{field.upper()}.")


def retrain_command(
    run_id: Optional[str] = _option("run_id", "--run-id", help="The run's stable name (letters, digits, '_', '.', "
                                    "'-'); a rerun with the same id resumes it."),
    steps: Optional[str] = _option("steps", "--steps", help=f"Comma-separated subset of {','.join(STEPS)} "
                                   "(default: all)."),
    preset: Optional[str] = _option("preset", "--preset", "--config", "-p",
                                    help="Training preset name or YAML file (default demo)."),
    train_overrides: Optional[list[str]] = typer.Option(
        None, "--set", "-s", help="Training setting section.key=value (repeatable), as for `cdface train`."),
    work_dir: Optional[Path] = _option("work_dir", "--work-dir", help="Runs are kept in WORK_DIR/RUN_ID "
                                       "(default runs/retrain)."),
    model_repository: Optional[Path] = _option("model_repository", "--model-repository",
                                               help="Triton model repository (default CDFACE_SERVE_MODEL_REPOSITORY)."),
    model: Optional[str] = _option("model", "--model", help="Triton model name (default CDFACE_SERVE_MODEL)."),
    triton_url: Optional[str] = _option("triton_url", "--triton-url", help="Triton gRPC target: host:port, "
                                        "dns:///name:port or ipv4:a:port,b:port; the load step loads the model on "
                                        "each address (default CDFACE_SERVE_TRITON_URL)."),
    db: Optional[Path] = _option("db_path", "--db", help="Gallery SQLite file (default CDFACE_SERVE_DB_PATH)."),
    database_url: Optional[str] = _option("database_url", "--database-url", help="PostgreSQL gallery, "
                                          "postgresql://... (default CDFACE_SERVE_DATABASE_URL)."),
    backend: Optional[str] = _option("backend", "--backend", help="Triton backend of the new version (default: "
                                     "the model's)."),
    max_batch_size: Optional[int] = _option("max_batch_size", "--max-batch-size",
                                            help="Triton max_batch_size (default: the model's)."),
    tensorrt_cache: Optional[str] = _option("tensorrt_cache", "--tensorrt-cache", help="onnxruntime_onnx on GPU: "
                                            "TensorRT engines built by Triton at load, kept in this directory."),
    margin: Optional[float] = _option("margin", "--margin", help="Promotion refuses a candidate evaluated worse "
                                      "than the active model by more than this."),
    without_baseline: Optional[bool] = typer.Option(
        None, "--without-baseline", help="Promote even when the active model has no evaluation report. Overrides "
        f"{ENV_PREFIX}WITHOUT_BASELINE."),
) -> None:
    """Retrain and roll out a model: train, eval, export, publish, load, reembed, promote.

    Each step is recorded in WORK_DIR/RUN_ID/steps/ when it finishes; a rerun with the same run id skips
    what is done, so a retried run publishes one version, never two. A candidate the promotion gates refuse
    stays the candidate: the command says why and exits with status 2. The step results are printed as JSON.
    """
    overrides: dict[str, Any] = {
        "run_id": run_id, "steps": steps, "preset": preset, "work_dir": work_dir, "model_repository": model_repository,
        "model": model, "triton_url": triton_url, "db_path": db, "database_url": database_url, "backend": backend,
        "max_batch_size": max_batch_size, "tensorrt_cache": tensorrt_cache, "margin": margin,
        "without_baseline": without_baseline}
    try:
        settings = RetrainSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise CdfaceError(f"invalid retrain settings: {_one_line(exc)}") from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and settings.steps != ("train",):
        raise CdfaceError("under torchrun only the train step runs (--steps train); run the others in one process")
    main_process = int(os.environ.get("RANK", "0")) == 0
    # cdface's own progress lines (one per step, the trainer's); libraries only when they warn.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cdface").setLevel(logging.INFO if main_process else logging.WARNING)
    results = Retrain(settings, train_overrides or [], main_process=main_process).execute()
    if main_process:
        typer.echo(json.dumps({"run_id": settings.run_id, "steps": results}, indent=2))


if __name__ == "__main__":
    from cdface.core.errors import exit_on_error

    exit_on_error(lambda: typer.run(retrain_command), "cdface retrain")
