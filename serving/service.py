"""The gateway's running parts, built from settings: the served model, the store, the gallery, the detector, Triton.

``FaceService`` only holds and wires them (and starts and stops what runs in the background); what
the gateway does with them is in ``cdface.serving.usecases``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from anyio import to_thread

from cdface.core.errors import CdfaceError
from cdface.core.manifest import ModelManifest, read_manifest
from cdface.serving.auth import bootstrap_admin_key
from cdface.serving.faces import Detector
from cdface.serving.gallery import Follower, Gallery
from cdface.serving.index import IndexSpec
from cdface.serving.retention import LastSeen, RetentionPolicy
from cdface.serving.settings import Settings
from cdface.serving.store import GalleryStore, ModelKey, SQLiteStore, SqlStore
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


def open_embedder(settings: Settings, manifest: ModelManifest, version: int) -> TritonEmbedder:
    """The Triton client for version ``version`` of the served model."""
    return TritonEmbedder(settings.triton_url, settings.model, version, dim=manifest.embedding_size,
                          timeout_s=settings.triton_timeout_s, retries=settings.triton_retries,
                          breaker_failures=settings.breaker_failures, breaker_reset_s=settings.breaker_reset_s,
                          max_batch=settings.triton_max_batch)


class FaceService:
    """The served model (manifest, Triton client), the store, the gallery and the detector of one gateway."""

    def __init__(self, settings: Settings, manifest: ModelManifest, triton_version: int, store: GalleryStore,
                 gallery: Gallery, detector: Detector | None, embedder: TritonEmbedder) -> None:
        self.settings = settings
        self.manifest = manifest
        self.store = store
        self.gallery = gallery
        self.detector = detector
        self.embedder = embedder
        self.model_key = ModelKey(manifest.name, manifest.version)
        self.triton_version = triton_version
        self.follower: Follower | None = None
        # Match times for the retention policy, written in the background (never on the request path).
        self.last_seen = LastSeen(store, settings.last_seen_flush_s, settings.last_seen_max_pending)
        self.retention = RetentionPolicy(store, settings.face_retention_days, settings.audit_retention_days,
                                         settings.retention_interval_s)

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
        spec = IndexSpec(settings.index_kind, settings.ivf_nlist, settings.ivf_nprobe, settings.faiss_gpu,
                         hnsw_m=settings.hnsw_m, hnsw_ef_search=settings.hnsw_ef_search, pq_m=settings.pq_m,
                         pq_rerank=settings.pq_rerank)
        gallery = Gallery(store, ModelKey(manifest.name, manifest.version), manifest.embedding_size, spec)
        yunet = settings.yunet_model
        if yunet is None:
            from cdface.core import assets

            yunet = assets.yunet_onnx()
        detector = Detector(yunet, score=settings.detect_score, max_side=settings.detect_max_side,
                            instances=settings.detectors)
        return cls(settings, manifest, version, store, gallery, detector, open_embedder(settings, manifest, version))

    def start(self) -> None:
        """Build the index from the store; on a shared store, follow its change log (blocking: run in a thread)."""
        self.gallery.load()
        if self.store.shared and self.follower is None:
            # Other replicas write to the store too: their writes reach this index through the log.
            self.follower = Follower(self.gallery, self.settings.sync_poll_s)
            self.follower.start()
        self.last_seen.start()
        self.retention.start()

    async def close(self) -> None:
        if self.follower is not None:
            await to_thread.run_sync(self.follower.stop)
        await to_thread.run_sync(self.retention.stop)
        await to_thread.run_sync(self.last_seen.stop)
        await self.embedder.close()
        self.store.close()
