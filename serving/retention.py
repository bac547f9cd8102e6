"""When a face last matched (``faces.last_seen``), for the retention policy ``cdface gallery expire``.

A search must not write to the database: ``LastSeen`` collects the matched faces in memory (a set
bounded by ``last_seen_max_pending``) and a background thread writes them in one transaction every
``last_seen_flush_s`` seconds, and once more when the gateway stops. What it had not written when
the process dies is lost: a face then looks older than it is by at most one interval, which only
matters for a face that is near its expiry and matched in that last interval.

What counts as seen: an identification's best candidate when it is a match (that one face), and a
verification against an enrolled identity that matches (every face of that identity: the decision
is about the identity). The time written is the flush's, so it trails the match by at most one
interval.
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable

from cdface.serving.store import GalleryStore, utc_now

log = logging.getLogger("cdface.serving.retention")


class LastSeen:
    def __init__(self, store: GalleryStore, flush_s: float, max_pending: int) -> None:
        self.store = store
        self.flush_s = flush_s
        self.max_pending = max_pending
        self._faces: set[int] = set()
        self._identities: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.dropped = 0  # matches not recorded because the set was full (a flush was late)
        self.written = 0  # faces whose last_seen a flush moved forward

    def saw(self, face_ids: Iterable[int] = (), identity_ids: Iterable[str] = ()) -> None:
        """Note matches (memory only: called on the request path)."""
        with self._lock:
            for face_id in face_ids:
                if len(self._faces) + len(self._identities) >= self.max_pending:
                    self.dropped += 1
                else:
                    self._faces.add(int(face_id))
            for identity_id in identity_ids:
                if len(self._faces) + len(self._identities) >= self.max_pending:
                    self.dropped += 1
                else:
                    self._identities.add(identity_id)
            full = len(self._faces) + len(self._identities) >= self.max_pending
        if full:
            self._wake.set()  # write now rather than drop what comes next

    def flush(self) -> int:
        """Write what was collected in one transaction; return how many faces moved forward."""
        with self._lock:
            faces, identities = sorted(self._faces), sorted(self._identities)
            self._faces, self._identities = set(), set()
        if not faces and not identities:
            return 0
        written = self.store.touch_faces(faces, identities, utc_now())
        self.written += written
        return written

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cdface-last-seen", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_s)
            self._wake.clear()
            self._flush_logged()

    def _flush_logged(self) -> None:
        try:
            self.flush()
        except Exception as exc:  # the database is away: these matches are lost, the next ones are not
            log.warning("writing last-seen times failed (%s); the matches of this interval are not recorded",
                        type(exc).__name__)

    def stop(self) -> None:
        """Stop the thread and write what is left (the gateway is shutting down)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.flush_s + 10)
            self._thread = None
        self._flush_logged()


class RetentionPolicy:
    """The retention settings, applied by the gateway itself: every ``interval_s`` (the first time at start)
    faces not matched for ``face_days`` expire (``GalleryStore.expire_faces``: change log and audit rows,
    so every gateway drops them) and audit rows older than ``audit_days`` are pruned.

    Every replica runs it: the deletes are idempotent, and on PostgreSQL they queue on the writers' lock,
    so a second replica finds nothing left to do. ``cdface gallery expire`` and ``cdface audit prune``
    do the same from the command line.
    """

    def __init__(self, store: GalleryStore, face_days: int | None, audit_days: int | None,
                 interval_s: float) -> None:
        self.store = store
        self.face_days, self.audit_days, self.interval_s = face_days, audit_days, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.face_days is not None or self.audit_days is not None

    def apply(self) -> tuple[int, int]:
        """Apply the policy once; return (faces expired, audit rows pruned)."""
        import datetime as dt

        from cdface.serving.store import utc_iso

        now = dt.datetime.now(dt.timezone.utc)
        faces = pruned = 0
        if self.face_days is not None:
            faces, _ = self.store.expire_faces(utc_iso(now - dt.timedelta(days=self.face_days)))
        if self.audit_days is not None:
            pruned = self.store.prune_audit(utc_iso(now - dt.timedelta(days=self.audit_days)))
        if faces or pruned:
            log.info("retention: %d faces not matched for %s days expired, %d audit rows older than %s days pruned",
                     faces, self.face_days, pruned, self.audit_days)
        return faces, pruned

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cdface-retention", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.apply()
            except Exception as exc:  # the database is away: the next interval tries again
                log.warning("applying the retention policy failed (%s); retrying in %.0f s", type(exc).__name__,
                            self.interval_s)
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
