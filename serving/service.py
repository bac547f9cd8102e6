"""The gateway's running parts, built from settings: the models it serves (each with its Triton client and
gallery), the store, the detector.

``FaceService`` only holds and wires them (and starts and stops what runs in the background); what
the gateway does with them is in ``cdface.serving.usecases``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from anyio import to_thread

from cdface.core.errors import CdfaceError
from cdface.core.manifest import ModelManifest, read_manifest
from cdface.serving.auth import bootstrap_admin_key
from cdface.serving.errors import Conflict
from cdface.serving.faces import Detector
from cdface.serving.gallery import Follower, Gallery
from cdface.serving.index import IndexSpec
from cdface.serving.retention import LastSeen, RetentionPolicy
from cdface.serving.settings import Settings
from cdface.serving.shadow import ShadowTally
from cdface.serving.store import GalleryStore, ModelKey, ModelState, SQLiteStore, SqlStore
from cdface.serving.triton import TritonEmbedder

log = logging.getLogger("cdface.serving")


def resolve_manifest(settings: Settings) -> tuple[ModelManifest, int]:
    """The served model's manifest and the Triton version to call."""
    if settings.manifest is not None:
        manifest = read_manifest(settings.manifest)
        return manifest, settings.model_version or manifest.version
    if settings.model_repository is None:
        raise CdfaceError("set CDFACE_SERVE_MODEL_REPOSITORY (the Triton model repository) or CDFACE_SERVE_MANIFEST")
    repo = Path(settings.model_repository)
    if not repo.is_dir():
        raise CdfaceError(f"model repository {repo} does not exist or is not a directory")
    model_dir = repo / settings.model
    if not model_dir.is_dir():
        models = sorted(p.name for p in repo.iterdir() if p.is_dir())
        raise CdfaceError(f"model {settings.model!r} is not in the model repository {repo} "
                          + (f"(it has: {', '.join(models)})" if models else "(the repository is empty)"))
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise CdfaceError(f"model {settings.model!r} has no numbered version directories in {model_dir}")
    version = settings.model_version or versions[-1]
    if version not in versions:
        raise CdfaceError(f"model {settings.model!r} has no version {version} (it has {versions})")
    return read_manifest(model_dir / str(version) / "manifest.json"), version


def open_store(settings: Settings) -> GalleryStore:
    """PostgreSQL when ``database_url`` is set (several replicas), else the SQLite file ``db_path``."""
    if settings.database_url is not None:
        from cdface.serving.store.postgres import PostgresStore  # psycopg is needed only here

        return with_crop_keys(PostgresStore(settings.database_url.get_secret_value()), settings)
    path = Path(settings.db_path)
    if not settings.create_db and not path.exists():
        raise CdfaceError(f"gallery database {path} does not exist; pass --create (or set CDFACE_SERVE_CREATE_DB=1) "
                          "to create it")
    return with_crop_keys(SQLiteStore(path), settings)  # a file it cannot open is a CdfaceError too (SqlStore)


def with_crop_keys(store: SqlStore, settings: Settings) -> SqlStore:
    """``store`` sealing retained crops with ``crop_keys``; without keys it refuses to store a crop at all."""
    from cdface.serving.crop_cipher import CropCipher

    keys = settings.crop_keys
    store.use_crop_cipher(CropCipher.from_setting(keys.get_secret_value()) if keys is not None else None)
    return store


def open_embedder(settings: Settings, manifest: ModelManifest, version: int,
                  model: str | None = None) -> TritonEmbedder:
    """The Triton client for version ``version`` of ``model`` (default: the configured model name)."""
    return TritonEmbedder(settings.triton_url, model or settings.model, version, dim=manifest.embedding_size,
                          timeout_s=settings.triton_timeout_s, retries=settings.triton_retries,
                          breaker_failures=settings.breaker_failures, breaker_reset_s=settings.breaker_reset_s,
                          max_batch=settings.triton_max_batch, merge_slots=settings.triton_merge_slots,
                          shared_memory_slots=settings.triton_shared_memory_slots)


@dataclass(frozen=True, eq=False)
class ServedModel:
    """A model the gateway can answer with: where Triton serves it (``ref``, model name and version), what
    it is (its manifest: embedding size, thresholds), its Triton client and its gallery (index)."""

    ref: ModelKey
    manifest: ModelManifest
    embedder: TritonEmbedder
    gallery: Gallery

    @property
    def key(self) -> ModelKey:
        """The manifest's identity: what the store keys this model's embeddings by."""
        return self.gallery.model


class FaceService:
    """The models a gateway answers with, the store, the detector, and what keeps them in step.

    ``active`` is the model every request answers with; a request reads it once, so a model switch
    never mixes two models in one answer. Unless the version is pinned (``model_version`` or
    ``manifest``), the gateway follows the store's model pointer (``cdface model ...``): it builds the
    galleries of the candidate and of the previous model in the background, switches ``active`` in one
    assignment once the new model's gallery is ready, dual-embeds enrolments while a candidate is ready,
    and shadows a share of identifications with it (``cdface.serving.shadow``).
    """

    def __init__(self, settings: Settings, active: ServedModel, store: GalleryStore, detector: Detector | None) -> None:
        self.settings = settings
        self.store = store
        self.detector = detector
        self.active = active
        self.candidate: ServedModel | None = None  # ready (index built), shadowed, enrolments dual-embedded
        self.pinned = settings.manifest is not None or settings.model_version is not None
        self.write_lock = active.gallery.write_lock  # every model's gallery of this gateway shares it
        self._models: dict[ModelKey, ServedModel] = {active.ref: active}  # by Triton ref: every ready model
        self._loading: dict[ModelKey, float] = {}  # ref -> time.monotonic() its load started or last failed
        self._retired: list[ServedModel] = []  # dropped models: their clients are closed at shutdown
        self._models_lock = threading.RLock()  # the model set, the pointer's state, the loads under way
        self.follower: Follower | None = None
        self.gateway_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._reported_at = 0.0
        # Match times for the retention policy, written in the background (never on the request path).
        self.last_seen = LastSeen(store, settings.last_seen_flush_s, settings.last_seen_max_pending)
        self.retention = RetentionPolicy(store, settings.face_retention_days, settings.audit_retention_days,
                                         settings.retention_interval_s)
        self.shadow = ShadowTally()
        self.background: set[asyncio.Task] = set()  # shadow comparisons under way

    @classmethod
    def create(cls, settings: Settings) -> "FaceService":
        manifest, version = resolve_manifest(settings)
        if settings.faiss_threads:
            import faiss

            faiss.omp_set_num_threads(settings.faiss_threads)
        store = open_store(settings)
        bootstrap_admin_key(store, settings)
        if settings.retain_crops and settings.crop_keys is None:
            log.warning("enrolled crops are not retained: no crop key is configured (CDFACE_SERVE_CROP_KEYS); "
                        "a request asking to retain one is refused (crop_retention_off)")
        ref = ModelKey(settings.model, version)
        if settings.manifest is None and settings.model_version is None:
            ref = _active_ref(store, ref)
            manifest = read_served_manifest(settings, ref)
        yunet = settings.yunet_model
        if yunet is None:
            from cdface.core import assets

            yunet = assets.yunet_onnx()
        detector = Detector(yunet, score=settings.detect_score, max_side=settings.detect_max_side,
                            instances=settings.detectors)
        write_lock = threading.Lock()
        active = _served_model(settings, store, ref, manifest, write_lock)
        return cls(settings, active, store, detector)

    def start(self) -> None:
        """Build the index from the store; on a shared store, follow its change log (blocking: run in a thread)."""
        self.active.gallery.load()
        if self.store.shared and self.follower is None:
            # Other replicas and the command line write to the store too: their writes reach this index through
            # the log, and the model pointer is followed from the same thread.
            self.follow()
            self.follower = Follower(self.store, self.follow, self.settings.sync_poll_s)
            self.follower.start()
        self.last_seen.start()
        self.retention.start()

    # -- following the store --------------------------------------------------------------------

    def follow(self) -> None:
        """One step of following the store: apply the change log to every gallery, follow the model pointer,
        and now and then report the models in use and the shadow counts (the follower thread runs this)."""
        for model in self.ready_models():
            model.gallery.sync()
        if not self.pinned:
            self._follow_pointer(self.store.model_state())
        now = time.monotonic()
        if now - self._reported_at >= self.settings.report_interval_s:
            self._reported_at = now
            self.store.report_models_in_use(self.gateway_id, [m.ref for m in self.ready_models()])
            self.shadow.flush(self.store)

    def ready_models(self) -> list[ServedModel]:
        with self._models_lock:
            return list(self._models.values())

    def _follow_pointer(self, state: ModelState) -> None:
        wanted = [ref for ref in (state.active, state.candidate, state.previous) if ref is not None]
        with self._models_lock:
            for ref in wanted:
                if ref not in self._models and time.monotonic() - self._loading.get(ref, -1e9) > LOAD_RETRY_S:
                    self._loading[ref] = time.monotonic()
                    threading.Thread(target=self._load, args=(ref,), name=f"cdface-load-{ref}", daemon=True).start()
            if state.active is not None and state.active != self.active.ref and state.active in self._models:
                log.info("model switch: %s -> %s (the store's pointer moved)", self.active.ref, state.active)
                self.active = self._models[state.active]  # one assignment: a request sees one model or the other
            self.candidate = self._models.get(state.candidate) if state.candidate is not None else None
            for ref in [r for r in self._models if r not in wanted and r != self.active.ref]:
                log.info("model %s is no longer active, candidate or previous: its gallery is dropped", ref)
                self._retired.append(self._models.pop(ref))

    def _load(self, ref: ModelKey) -> None:
        """Build ``ref``'s gallery in the background (the active model keeps answering meanwhile)."""
        try:
            manifest = read_served_manifest(self.settings, ref)
            model = _served_model(self.settings, self.store, ref, manifest, self.write_lock)
            model.gallery.load()
        except Exception as exc:  # a version not in the repository yet, the database away: retried later
            log.warning("model %s could not be loaded (%s); retrying in %.0f s", ref, exc, LOAD_RETRY_S)
            with self._models_lock:
                self._loading[ref] = time.monotonic()
            return
        with self._models_lock:
            self._models[ref] = model
            self._loading.pop(ref, None)
        log.info("model %s ready: %d faces indexed", ref, model.gallery.faces_indexed)
        self.follow_soon()

    def follow_soon(self) -> None:
        """Apply the pointer now rather than at the next change or poll (a model just became ready)."""
        try:
            self._follow_pointer(self.store.model_state())
        except Exception as exc:  # the follower thread retries
            log.warning("following the model pointer failed (%s)", exc)

    def others(self, model: ServedModel) -> list[Gallery]:
        """The galleries of the models other than ``model``: a deletion reaches every one of them."""
        return [m.gallery for m in self.ready_models() if m is not model]

    async def close(self) -> None:
        if self.follower is not None:
            await to_thread.run_sync(self.follower.stop)
        await to_thread.run_sync(self.retention.stop)
        await to_thread.run_sync(self.last_seen.stop)
        for model in {*self.ready_models(), *self._retired}:
            await model.embedder.close()
        self.store.close()


LOAD_RETRY_S = 10.0
"""How long a gateway waits before it tries again to load a model that failed to load."""


def read_served_manifest(settings: Settings, ref: ModelKey) -> ModelManifest:
    """The manifest of Triton model ``ref`` (name:version) in the model repository."""
    if settings.model_repository is None:
        raise CdfaceError("following the store's model pointer needs CDFACE_SERVE_MODEL_REPOSITORY")
    path = Path(settings.model_repository) / ref.name / str(ref.version) / "manifest.json"
    if not path.is_file():
        raise CdfaceError(f"the store's model {ref} is not in the model repository ({path} does not exist)")
    return read_manifest(path)


def _active_ref(store: GalleryStore, newest: ModelKey) -> ModelKey:
    """The store's active model; a gallery without one starts with ``newest`` (the repository's newest)."""
    state = store.model_state()
    if state.active is not None:
        return state.active
    try:
        return store.set_model_state(newest, None, None, action="model_activate", expect=state).active or newest
    except Conflict:  # another gateway set it first: follow that one
        return store.model_state().active or newest


def _served_model(settings: Settings, store: GalleryStore, ref: ModelKey, manifest: ModelManifest,
                  write_lock: threading.Lock) -> ServedModel:
    spec = IndexSpec(settings.index_kind, settings.ivf_nlist, settings.ivf_nprobe, settings.faiss_gpu,
                     hnsw_m=settings.hnsw_m, hnsw_ef_search=settings.hnsw_ef_search, pq_m=settings.pq_m,
                     pq_rerank=settings.pq_rerank)
    gallery = Gallery(store, ModelKey(manifest.name, manifest.version), manifest.embedding_size, spec, write_lock)
    return ServedModel(ref, manifest, open_embedder(settings, manifest, ref.version, ref.name), gallery)
