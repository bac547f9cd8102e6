"""Shadow mode: how a candidate model would have answered, counted before anyone switches to it.

A share of identify requests (``shadow_share``) is answered a second time by the candidate model, off
the request path: the faces the active model saw are embedded by the candidate, searched in the
candidate's gallery and decided with the candidate's own threshold. Per face the two answers agree
on the *decision* (both match, or neither) and on the *top-1* (the same best identity, or none for
both). ``ShadowTally`` counts the comparisons in memory (``/metrics``) and adds them to the store
every ``report_interval_s`` (``cdface model status`` sums every gateway's).

Only counts leave this module: no image, embedding, identity or score is logged or stored.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from cdface.serving.store import GalleryStore, ModelKey

log = logging.getLogger("cdface.serving.shadow")


@dataclass
class Agreement:
    compared: int = 0  # faces answered by both models
    same_decision: int = 0
    same_top1: int = 0
    failed: int = 0  # shadow answers that could not be made (the candidate's Triton version unavailable, ...)


Pair = tuple[ModelKey, ModelKey]
"""(active, candidate), Triton refs."""


class ShadowTally:
    """Agreement counts per (active, candidate): since the gateway started (``totals``) and not yet in the
    store (``flush``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[Pair, Agreement] = {}
        self._pending: dict[Pair, Agreement] = {}

    def record(self, active: ModelKey, candidate: ModelKey, same_decision: bool, same_top1: bool) -> None:
        with self._lock:
            for book in (self._totals, self._pending):
                counts = book.setdefault((active, candidate), Agreement())
                counts.compared += 1
                counts.same_decision += same_decision
                counts.same_top1 += same_top1

    def failure(self, active: ModelKey, candidate: ModelKey) -> None:
        with self._lock:
            self._totals.setdefault((active, candidate), Agreement()).failed += 1

    def totals(self) -> dict[Pair, Agreement]:
        with self._lock:
            return {pair: Agreement(**vars(counts)) for pair, counts in self._totals.items()}

    def flush(self, store: GalleryStore) -> None:
        """Add the counts made since the last flush to the store (kept for the next flush if it fails)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for index, ((active, candidate), counts) in enumerate(pending.items()):
            try:
                store.add_shadow_counts(active, candidate, counts.compared, counts.same_decision, counts.same_top1)
            except Exception:
                with self._lock:  # not written: put back what is left, merged with what came meanwhile
                    for pair, left in list(pending.items())[index:]:
                        merged = self._pending.setdefault(pair, Agreement())
                        merged.compared += left.compared
                        merged.same_decision += left.same_decision
                        merged.same_top1 += left.same_top1
                raise
