"""What the routes call: faces from images, embeddings from Triton, decisions, the gallery.

Blocking work (decoding, detection, SQLite with fsync) runs in the thread pool; Triton calls are
async. All faces of one request go to Triton as one batch.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from starlette.concurrency import run_in_threadpool

from cdface.core.errors import CdfaceError
from cdface.core.manifest import ModelManifest, read_manifest
from cdface.serving.errors import ApiError
from cdface.serving.faces import Detector, FaceCrop, extract_faces
from cdface.serving.gallery import Follower, Gallery
from cdface.core.imaging import ImageError, decode_image, encode_png
from cdface.serving.index import IndexSpec
from cdface.serving.schemas import ImageInput, ModelInfo
from cdface.serving.settings import Settings
from cdface.serving.store import Face, GalleryStore, ModelKey, SQLiteStore
from cdface.serving.triton import TritonEmbedder

log = logging.getLogger("cdface.serving")


def resolve_manifest(settings: Settings) -> tuple[ModelManifest, int]:
    """The served model's manifest and the Triton version to call."""
    if settings.manifest is not None:
        manifest = read_manifest(settings.manifest)
        return manifest, settings.model_version or manifest.version
    if settings.model_repository is None:
        raise CdfaceError("set CDFACE_SERVE_MODEL_REPOSITORY (the Triton model repository) or CDFACE_SERVE_MANIFEST")
    model_dir = Path(settings.model_repository) / settings.model
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()) \
        if model_dir.is_dir() else []
    if not versions:
        raise CdfaceError(f"model {settings.model!r} has no versions in {settings.model_repository}")
    version = settings.model_version or versions[-1]
    if version not in versions:
        raise CdfaceError(f"model {settings.model!r} has no version {version} (it has {versions})")
    return read_manifest(model_dir / str(version) / "manifest.json"), version


def open_store(settings: Settings) -> GalleryStore:
    """PostgreSQL when ``database_url`` is set (several replicas), else the SQLite file ``db_path``."""
    if settings.database_url is not None:
        from cdface.serving.store_postgres import PostgresStore  # psycopg is needed only here

        return PostgresStore(settings.database_url.get_secret_value())
    return SQLiteStore(settings.db_path)


def bootstrap_admin_key(store: GalleryStore, settings: Settings) -> bool:
    """Store ``settings.bootstrap_admin_key`` (hashed, admin scope) unless its id is there; True if stored."""
    from cdface.serving.auth import PREFIX, hash_key
    from cdface.serving.store import Conflict

    if settings.bootstrap_admin_key is None:
        return False
    key = settings.bootstrap_admin_key.get_secret_value().strip()
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2] or len(key) > 256:
        raise CdfaceError("CDFACE_SERVE_BOOTSTRAP_ADMIN_KEY must look like cdf_<id>_<secret>")
    if store.find_key(parts[1]) is not None:  # present (or revoked: an operator's decision stands)
        return False
    pepper = settings.key_pepper.get_secret_value() if settings.key_pepper else None
    try:
        store.add_key(parts[1], hash_key(key, pepper), "bootstrap-admin", ["admin"])
    except Conflict:  # another replica stored it first
        return False
    log.info("stored the bootstrap admin key %s", parts[1])
    return True


@dataclass
class Prepared:
    image: int
    face: FaceCrop


class FaceService:
    def __init__(self, settings: Settings, manifest: ModelManifest, triton_version: int, store: GalleryStore,
                 gallery: Gallery, detector: Detector | None, embedder: TritonEmbedder) -> None:
        self.settings = settings
        self.manifest = manifest
        self.store = store
        self.gallery = gallery
        self.detector = detector
        self.embedder = embedder
        self.model_key = ModelKey(manifest.name, manifest.version)
        self.model_info = ModelInfo(name=manifest.name, version=manifest.version,
                                    embedding_size=manifest.embedding_size, triton_model=settings.model)
        self.triton_version = triton_version
        self.follower: Follower | None = None

    def follow(self) -> None:
        """On a shared store, follow its change log so other replicas' writes reach this index."""
        if getattr(self.store, "shared", False) and self.follower is None:
            self.follower = Follower(self.gallery, self.settings.sync_poll_s)
            self.follower.start()

    @classmethod
    def create(cls, settings: Settings) -> "FaceService":
        manifest, version = resolve_manifest(settings)
        if settings.faiss_threads:
            import faiss

            faiss.omp_set_num_threads(settings.faiss_threads)
        store = open_store(settings)
        bootstrap_admin_key(store, settings)
        spec = IndexSpec(settings.index_kind, settings.ivf_nlist, settings.ivf_nprobe, settings.faiss_gpu)
        gallery = Gallery(store, ModelKey(manifest.name, manifest.version), manifest.embedding_size, spec)
        yunet = settings.yunet_model
        if yunet is None:
            from cdface.core import assets

            yunet = assets.yunet_onnx()
        detector = Detector(yunet, score=settings.detect_score, max_side=settings.detect_max_side,
                            instances=settings.detectors)
        embedder = TritonEmbedder(settings.triton_url, settings.model, version, dim=manifest.embedding_size,
                                  timeout_s=settings.triton_timeout_s, retries=settings.triton_retries,
                                  breaker_failures=settings.breaker_failures, breaker_reset_s=settings.breaker_reset_s,
                                  max_batch=settings.triton_max_batch)
        return cls(settings, manifest, version, store, gallery, detector, embedder)

    async def close(self) -> None:
        if self.follower is not None:
            await run_in_threadpool(self.follower.stop)
        await self.embedder.close()
        self.store.close()

    # -- decisions ------------------------------------------------------------------------------

    def decision(self, far: float | None) -> tuple[float, str, float | None]:
        """(threshold, source, far) for a request asking for ``far`` (None: the server's FAR)."""
        wanted = self.settings.far if far is None else far
        evaluation = self.manifest.evaluation
        if evaluation is not None:
            try:
                return evaluation.threshold_at(wanted), "manifest", wanted
            except KeyError:
                pass
        if far is None or abs(far - self.settings.far) <= 1e-12:
            return self.settings.threshold, "configured", None
        have = sorted(evaluation.thresholds) if evaluation else []
        raise ApiError(422, "far_not_available",
                       f"no threshold for FAR {far:g}: the model's manifest has {have or 'none'}; omit 'far' to use "
                       f"the server's configured threshold")

    # -- faces ----------------------------------------------------------------------------------

    def _decode_b64(self, text: str, what: str) -> bytes:
        limit = self.settings.max_image_bytes
        if len(text) > (limit * 4) // 3 + 8:
            raise ImageError("image_too_large", f"the {what} is over {limit} bytes", 413)
        cleaned = "".join(text.split())
        if "," in cleaned[:64] and cleaned.startswith("data:"):
            cleaned = cleaned.split(",", 1)[1]  # a data: URL
        try:
            return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("invalid_base64", f"the {what} is not valid base64") from None

    def _prepare_one(self, index: int, data: bytes, spec: ImageInput) -> list[FaceCrop]:
        what = f"image {index}"
        rgb = decode_image(data, max_bytes=self.settings.max_image_bytes, max_pixels=self.settings.max_image_pixels,
                           what=what)
        return extract_faces(rgb, spec.mode, detector=self.detector, landmarks=spec.landmarks,
                             max_faces=self.settings.max_faces_per_image, min_face_size=spec.min_face_size,
                             min_score=spec.min_score)

    def _check_count(self, n: int) -> None:
        if n > self.settings.max_images:
            raise ApiError(422, "too_many_images", f"{n} images in one request; the limit is {self.settings.max_images}")

    async def prepare(self, items: list[tuple[bytes | str, ImageInput]]) -> list[Prepared]:
        """Decode and find faces in each image (bytes from multipart, str = base64 from JSON)."""
        self._check_count(len(items))

        def work() -> list[Prepared]:
            out = []
            for i, (data, spec) in enumerate(items):
                raw = self._decode_b64(data, f"image {i}") if isinstance(data, str) else data
                out += [Prepared(i, face) for face in self._prepare_one(i, raw, spec)]
            return out

        return await run_in_threadpool(work)

    async def embed(self, prepared: list[Prepared]) -> np.ndarray:
        crops = np.stack([p.face.crop for p in prepared]) if prepared else np.zeros((0, 112, 112, 3), np.uint8)
        vectors = await self.embedder.embed(crops)
        # The contract says L2-normalised; renormalise anyway so cosine == inner product holds exactly.
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, 1e-12)

    # -- gallery --------------------------------------------------------------------------------

    async def enroll(self, identity_id: str, prepared: list[Prepared], embeddings: np.ndarray,
                     retain: bool) -> list[Face]:
        crops = [encode_png(p.face.crop) if retain else None for p in prepared]
        return await run_in_threadpool(self.gallery.enroll, identity_id, embeddings, crops,
                                       [p.face.box for p in prepared], [p.face.quality for p in prepared])
