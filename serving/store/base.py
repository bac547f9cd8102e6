"""The gallery's store of record: its records and ``GalleryStore``, the one interface every store implements.

A store holds identities, their faces, each face's embeddings (one per model that embedded it, side by
side: a re-embedding adds the new model's next to the old one's), API keys (hashes only), the model
pointer (which served model is active, which is the candidate), an ordered change log and an append-only
audit log (``AuditEntry``: each write's row commits in the write's own
transaction). Every write is one transaction and is durable when the call returns, so a write the caller saw
acknowledged survives a crash of the process (kill -9) or of the machine.

The change log (a strictly increasing ``seq``) is the change feed: gateways sharing one store
(``shared``) follow it to keep their in-memory indexes in step (``changes_since`` from their
watermark, ``wait_for_change`` to sleep until there is something to read).

Ids: identities get opaque string ids (``idt_`` + 24 hex digits) plus an optional caller-chosen
``external_id``, unique within the identity's tenant; faces get integer ids that are never reused,
which is what the FAISS index stores.

Tenants: every identity, API key and audit row belongs to one tenant, a name matching
``TENANT_PATTERN`` ("default" when none is given). A tenant's identities are its gallery. The
methods a request reaches take the tenant (``tenant=`` for reads, ``actor.tenant`` for writes) and
see only that tenant's rows: another tenant's identity answers exactly like a nonexistent id
(``unknown_identity``), so ids cannot be probed across tenants. The tenant defaults to "default",
so a caller that forgets it sees less, never more. What the operator runs over the whole gallery
(``load_embeddings``, re-embedding, counts) spans every tenant and reports each face's tenant.
"""

from __future__ import annotations

import abc
import datetime as _dt
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from cdface.serving.errors import InvalidRequest


def utc_now() -> str:
    return utc_iso(_dt.datetime.now(_dt.timezone.utc))


def utc_iso(moment: _dt.datetime) -> str:
    """``moment`` as the store writes times (UTC, milliseconds), so stored times compare as text."""
    if moment.tzinfo is None:
        raise ValueError("a time without a time zone is ambiguous; give one (e.g. Z or +00:00)")
    return moment.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds")


def new_identity_id() -> str:
    return "idt_" + uuid.uuid4().hex[:24]


DEFAULT_TENANT = "default"
"""The tenant of every row when none is named: gateways without API keys, and version-1 galleries."""
TENANT_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def check_tenant(name: str) -> str:
    """``name`` when it is a valid tenant name (``TENANT_PATTERN``), else ``InvalidRequest`` (``invalid_tenant``)."""
    if not isinstance(name, str) or not TENANT_PATTERN.fullmatch(name):
        raise InvalidRequest(f"a tenant name is 1-63 characters of a-z, 0-9, '_' and '-', starting with a letter or "
                         f"digit; got {name!r}", code="invalid_tenant")
    return name


@dataclass(frozen=True)
class ModelKey:
    """Which model made an embedding: embeddings of different models never meet in one search."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}:{self.version}"

    @classmethod
    def parse(cls, text: str) -> ModelKey:
        """``NAME:VERSION`` (e.g. ``face:2``; the name may hold colons, the version is after the last one)."""
        name, _, version = text.rpartition(":")
        if not name or not version.isdigit() or int(version) < 1:
            raise InvalidRequest(f"{text!r} is not NAME:VERSION (a model name and a version number from 1, e.g. "
                                 f"face:2)", code="invalid_model_ref")
        return cls(name, int(version))


@dataclass(frozen=True)
class Identity:
    id: str
    external_id: str | None
    name: str | None
    metadata: dict[str, Any]
    created: str
    updated: str
    face_count: int = 0


@dataclass(frozen=True)
class NewFace:
    embedding: np.ndarray  # float32 [D], L2-normalised
    model: ModelKey  # the model that made ``embedding``: the face's enrolling model
    crop: bytes | None = None  # the aligned 112x112 crop as PNG, kept only when asked (re-embedding)
    box: list[float] | None = None
    quality: dict[str, float] = field(default_factory=dict)
    # Embeddings of the same crop by other models (a gateway enrolling while a candidate model exists embeds
    # with both), stored with the face in the same transaction.
    also: tuple[tuple[ModelKey, np.ndarray], ...] = ()

    def __post_init__(self) -> None:
        models = [self.model, *(model for model, _ in self.also)]
        if len(set(models)) != len(models):  # the store keeps one embedding per (face, model)
            raise ValueError(f"a face has one embedding per model; got models {', '.join(map(str, models))}")


@dataclass(frozen=True)
class Face:
    id: int
    identity_id: str
    model: ModelKey
    dim: int  # the size of its enrolling model's embedding
    created: str
    has_crop: bool
    box: list[float] | None
    quality: dict[str, float]
    models: tuple[ModelKey, ...] = ()  # the models that embedded it (side by side), by name and version


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    scopes: tuple[str, ...]
    created: str
    revoked: str | None
    tenant: str = DEFAULT_TENANT  # the one tenant whose gallery the key acts on, whatever its scopes


@dataclass(frozen=True)
class Change:
    seq: int
    # identity.create | identity.update | identity.delete | face.add | face.delete | face.embed (an embedding by
    # another model was added to the face) | model.switch (the model pointer moved; identity and face None)
    op: str
    identity_id: str | None
    face_id: int | None
    at: str


@dataclass(frozen=True)
class Actor:
    """Who made a request, as the audit log records it: the API key's public id (None when auth is off
    or for the command line), the request's id when there is one, and the tenant it acts for (the
    key's; "default" without a key). Writes act only on identities of ``tenant``."""

    key_id: str | None = None
    request_id: str | None = None
    tenant: str = DEFAULT_TENANT

    @classmethod
    def of(cls, key: ApiKey | None, request_id: str | None = None) -> Actor:
        if key is None:
            return cls(None, request_id)
        return cls(key.id, request_id, key.tenant)


NO_ACTOR = Actor()
"""Writes with no API key behind them: auth off, or the command line."""


@dataclass(frozen=True)
class AuditEntry:
    """One row of the append-only audit log: who did what to which identity, never an image or an embedding.

    ``action``: create_identity | update_identity | delete_identity | enroll | delete_face | reembed | expire |
    rotate_crop_key | model_candidate | model_promote | model_rollback | model_activate (writes, recorded in
    the write's own transaction) | identify | verify (searches, recorded after they answer).
    ``outcome`` holds counts, ids and decisions only (e.g. ``{"faces": 2}``, ``{"match": true}``).
    """

    id: int
    at: str  # UTC, ISO 8601 with milliseconds
    key_id: str | None
    action: str
    identity_id: str | None
    face_ids: list[int]
    outcome: dict[str, Any]
    request_id: str | None
    tenant: str | None = None  # the acting key's tenant; None for the operator's gallery-wide writes (reembed)


MODEL_ACTIONS = ("model_candidate", "model_promote", "model_rollback", "model_activate")
"""The audit actions of a move of the model pointer (``set_model_state``)."""


@dataclass(frozen=True)
class ModelState:
    """The model pointer: which served model (Triton ``NAME:VERSION``) gateways search with (``active``),
    which one is being prepared (``candidate``: re-embedded, shadow-scored, then promoted) and which one
    ``rollback`` returns to (``previous``). ``changed``: when the pointer last moved; ``promoted``: when
    ``active`` last changed (the start of the old version's grace period). UTC ISO texts."""

    active: ModelKey | None = None
    candidate: ModelKey | None = None
    previous: ModelKey | None = None
    changed: str | None = None
    promoted: str | None = None


@dataclass(frozen=True)
class ShadowCounts:
    """Shadow scoring of identify requests by the candidate: how many were scored by both models, how many
    got the same decision (match or not), and how many the same top-1 identity."""

    total: int = 0
    same_decision: int = 0
    same_top1: int = 0


Embeddings = tuple[np.ndarray, list[str], list[str], np.ndarray]
"""(face ids int64 [N], their identity ids, their identities' tenants, embeddings float32 [N, dim]), in face id
order."""


class GalleryStore(abc.ABC):
    """What the gateway needs from a store of record. Every write is one transaction and is durable on return.

    Missing records raise ``NotFound`` and uniqueness violations ``Conflict`` (``cdface.serving.errors``),
    each with its code. Writes act within ``actor.tenant``: they create identities there and find the
    identity they change only there (see the module docstring).
    """

    shared: bool = True
    """True when other processes may write to this store: each gateway then follows the change log. Every
    store today: replicas share PostgreSQL, and the command line (``cdface gallery expire``, ``reembed``,
    ``rotate-crop-key``) writes to a SQLite gallery while its gateway runs, whose index must drop an
    expired face at once, not at its next restart."""

    # -- identities -----------------------------------------------------------------------------

    @abc.abstractmethod
    def create_identity(self, external_id: str | None, name: str | None, metadata: dict[str, Any],
                        actor: Actor = NO_ACTOR) -> Identity: ...

    @abc.abstractmethod
    def create_identity_with_faces(self, external_id: str | None, name: str | None, metadata: dict[str, Any],
                                   faces: Sequence[NewFace], actor: Actor = NO_ACTOR) -> tuple[Identity, list[Face]]:
        """Create the identity and add its faces, all or nothing (one transaction)."""

    @abc.abstractmethod
    def get_identity(self, identity_id: str, *, tenant: str = DEFAULT_TENANT) -> Identity:
        """The identity, if it belongs to ``tenant`` (else ``unknown_identity``, as for an id that does not exist)."""

    @abc.abstractmethod
    def list_identities(self, limit: int, after: str | None = None, external_id: str | None = None,
                        contains: str | None = None, *, tenant: str = DEFAULT_TENANT) -> list[Identity]:
        """``tenant``'s identities with an id after ``after``, by id in byte order (the cursor of a paginated list).

        ``external_id``: only the identity with exactly this external id; ``contains``: only those whose
        name or external id contains this text, case-insensitively. Both narrow the same id order, so
        the cursor pages a filtered list like the full one.
        """

    @abc.abstractmethod
    def update_identity(self, identity_id: str, changes: dict[str, Any], actor: Actor = NO_ACTOR) -> Identity: ...

    @abc.abstractmethod
    def delete_identity(self, identity_id: str, actor: Actor = NO_ACTOR) -> list[int]:
        """Delete the identity and all its faces; return the deleted face ids."""

    @abc.abstractmethod
    def identities_by_id(self, ids: Sequence[str], *, tenant: str = DEFAULT_TENANT) -> dict[str, Identity]:
        """The identities among ``ids`` that exist in ``tenant``."""

    # -- faces ----------------------------------------------------------------------------------

    @abc.abstractmethod
    def add_faces(self, identity_id: str, faces: Sequence[NewFace], actor: Actor = NO_ACTOR) -> list[Face]:
        """Add all the faces or none (one transaction)."""

    @abc.abstractmethod
    def list_faces(self, identity_id: str, limit: int | None = None, after: int | None = None, *,
                   tenant: str = DEFAULT_TENANT) -> list[Face]:
        """The identity's faces by id: all of them, or up to ``limit`` with an id above ``after`` (a page)."""

    @abc.abstractmethod
    def face_crop(self, identity_id: str, face_id: int, *, tenant: str = DEFAULT_TENANT) -> bytes:
        """The face's retained aligned crop (PNG); ``NotFound`` when the identity, the face or the crop is absent."""

    @abc.abstractmethod
    def delete_face(self, identity_id: str, face_id: int, actor: Actor = NO_ACTOR) -> None: ...

    @abc.abstractmethod
    def face_embeddings(self, identity_id: str, model: ModelKey, *, tenant: str = DEFAULT_TENANT) -> np.ndarray:
        """float32 [N, D]: the identity's embeddings made by ``model`` (shape (0, 0) when there are none)."""

    @abc.abstractmethod
    def load_embeddings(self, model: ModelKey, dim: int) -> Embeddings:
        """Every face ``model`` embedded, of every tenant (each face's tenant comes with it)."""

    @abc.abstractmethod
    def embeddings_of(self, face_ids: Sequence[int], model: ModelKey, dim: int) -> Embeddings:
        """Like ``load_embeddings`` for just these faces (those still present and embedded by ``model``)."""

    @abc.abstractmethod
    def count_faces(self, tenant: str | None = None) -> int:
        """Faces of ``tenant``'s identities, or of every tenant (None: the operator's view)."""

    @abc.abstractmethod
    def count_faces_by_model(self, tenant: str | None = None) -> dict[ModelKey, int]:
        """Faces having an embedding by each model (a face counts under every model that embedded it): of
        ``tenant``'s identities, or of every tenant (None)."""

    @abc.abstractmethod
    def faces_to_reembed(self, model: ModelKey, after: int = 0, limit: int = 256) -> list[tuple[int, bytes]]:
        """Up to ``limit`` (face id, retained crop PNG) of faces with an id above ``after`` that ``model`` has
        not embedded and that kept their crop, by id: a page (the caller loops with ``after`` = the last id), so
        a large gallery's crops are never in memory together."""

    @abc.abstractmethod
    def faces_missing(self, model: ModelKey) -> tuple[int, int]:
        """Faces without an embedding by ``model``: (those with a retained crop, those without one: they can
        only be re-enrolled)."""

    @abc.abstractmethod
    def add_embeddings(self, items: Sequence[tuple[int, np.ndarray]], model: ModelKey,
                       actor: Actor = NO_ACTOR) -> int:
        """Store ``model``'s embeddings of these faces next to their other ones, in one transaction; return how
        many were inserted. A face ``model`` has embedded already keeps its embedding (idempotent, never
        overwritten); a face deleted meanwhile is skipped. Each insert writes a change ``face.embed``; the
        call writes one audit row ``reembed``."""

    # -- the model pointer and what decides its moves ------------------------------------------

    @abc.abstractmethod
    def model_state(self) -> ModelState:
        """The model pointer (all None before the first ``set_model_state``)."""

    @abc.abstractmethod
    def set_model_state(self, active: ModelKey | None, candidate: ModelKey | None, previous: ModelKey | None, *,
                        action: str, actor: Actor = NO_ACTOR, expect: ModelState | None = None) -> ModelState:
        """Move the pointer, with a change ``model.switch`` and an audit row ``action`` (one of
        ``MODEL_ACTIONS``). ``expect``: compare-and-set on (active, candidate, previous): when the pointer is
        no longer there, nothing changes and ``Conflict`` (``model_state_changed``) is raised."""

    @abc.abstractmethod
    def add_shadow_counts(self, active: ModelKey, candidate: ModelKey, total: int, same_decision: int,
                          same_top1: int) -> None:
        """Add a gateway's shadow-scoring counts for (active, candidate) to the totals of every gateway."""

    @abc.abstractmethod
    def shadow_counts(self, active: ModelKey, candidate: ModelKey) -> ShadowCounts:
        """The totals for (active, candidate); zeros when none were added."""

    @abc.abstractmethod
    def report_models_in_use(self, gateway_id: str, models: Sequence[ModelKey]) -> None:
        """A gateway's heartbeat: the served models (Triton coordinates) it calls now, replacing its last report."""

    @abc.abstractmethod
    def models_in_use(self, since: str) -> set[ModelKey]:
        """Every model a gateway reported in a heartbeat at or after ``since`` (UTC ISO)."""

    # -- the change feed ------------------------------------------------------------------------

    @abc.abstractmethod
    def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        """Up to ``limit`` changes after ``seq``, in ``seq`` order (which is commit order)."""

    @abc.abstractmethod
    def last_seq(self) -> int:
        """The newest change's ``seq`` (0 for an empty log)."""

    @abc.abstractmethod
    def wait_for_change(self, timeout: float) -> bool:
        """Block up to ``timeout`` s until a change may have been committed; True if one was seen.

        Only a wake-up: what changed is read from ``changes_since``, so a missed wake-up costs a
        ``timeout``, never a change.
        """

    # -- the audit log (append-only) ------------------------------------------------------------

    @abc.abstractmethod
    def append_audit(self, actor: Actor, action: str, identity_id: str | None = None,
                     face_ids: Sequence[int] = (), outcome: dict[str, Any] | None = None) -> None:
        """Record a search (identify, verify); writes record themselves inside their own transaction."""

    @abc.abstractmethod
    def audit_entries(self, after: int = 0, limit: int = 1000, since: str | None = None,
                      until: str | None = None) -> list[AuditEntry]:
        """Up to ``limit`` rows with an id above ``after``, by id, with ``since <= at < until`` (UTC ISO texts)."""

    @abc.abstractmethod
    def prune_audit(self, before: str) -> int:
        """Delete the rows older than ``before`` (UTC ISO): the retention policy, the log's only deletion."""

    # -- retention and erasure (docs/data-protection.md) -----------------------------------------

    @abc.abstractmethod
    def reseal_crops(self, after: int = 0, batch: int = 100) -> Iterator[tuple[int, int, int]]:
        """Seal every retained crop with the first crop key, a batch per transaction; yields (last face id,
        re-sealed, already current) per batch (``cdface gallery rotate-crop-key``)."""

    @abc.abstractmethod
    def touch_faces(self, face_ids: Sequence[int], identity_ids: Sequence[str], at: str) -> int:
        """Set ``last_seen`` to ``at`` (never back) on these faces and on all faces of these identities."""

    @abc.abstractmethod
    def expire_faces(self, before: str, *, dry_run: bool = False, drop_identities: bool = False,
                     batch: int = 500) -> tuple[int, int]:
        """Delete faces not matched since ``before`` (and, asked, identities left empty); (faces, identities)."""

    @abc.abstractmethod
    def vacuum(self) -> None:
        """Rewrite the face, embedding and identity tables so deleted rows leave the database files."""

    # -- API keys (hashes only) -----------------------------------------------------------------

    @abc.abstractmethod
    def add_key(self, key_id: str, key_hash: str, name: str, scopes: Sequence[str],
                tenant: str = DEFAULT_TENANT) -> ApiKey: ...

    @abc.abstractmethod
    def find_key(self, key_id: str) -> tuple[ApiKey, str] | None:
        """The key and its stored hash, or None."""

    @abc.abstractmethod
    def list_keys(self) -> list[ApiKey]: ...

    @abc.abstractmethod
    def revoke_key(self, key_id: str) -> ApiKey: ...

    # -- lifecycle ------------------------------------------------------------------------------

    @abc.abstractmethod
    def check(self) -> None:
        """Raise unless the store answers (readiness)."""

    @abc.abstractmethod
    def close(self) -> None: ...
