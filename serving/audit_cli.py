"""``cdface audit``: export and prune the gallery's append-only audit log.

The audit log (table ``audit_log``, see ``cdface.serving.store.base.AuditEntry``) has no update and no
delete API; ``cdface audit prune`` is the retention policy and the only way rows leave it. Run it from
a scheduler (cron, a Kubernetes CronJob) with the retention your policy sets.

Register in ``cdface/cli.py``::

    from cdface.serving.audit_cli import audit_app
    app.add_typer(audit_app, name="audit")
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import sys
from pathlib import Path
from typing import IO, Iterator, Optional

import typer

from cdface.core.atomic import atomic_open
from cdface.core.commandline import command_group
from cdface.core.errors import CdfaceError
from cdface.serving.cli import _DB, _URL, _store

audit_app = command_group(help="The audit log: who enrolled, searched, verified or deleted, and when.")

PAGE = 1000  # rows read per query: an export holds at most one page in memory, however long the log


def _moment(text: str | None, option: str) -> str | None:
    """An ISO 8601 time as the store writes times (UTC); a time without a zone is read as UTC."""
    if text is None:
        return None
    from cdface.serving.store import utc_iso

    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise CdfaceError(f"{option} {text!r} is not an ISO 8601 time (e.g. 2026-12-01 or 2026-12-01T08:00:00Z)") \
            from None
    return utc_iso(moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.timezone.utc))


@contextlib.contextmanager
def _output(out: Optional[Path]) -> Iterator[IO[str]]:
    if out is None:
        yield sys.stdout
    else:
        with atomic_open(out, "w") as f:  # a reader never sees half an export
            yield f


@audit_app.command("export")
def audit_export(
    since: Optional[str] = typer.Option(None, "--since", help="Only rows at or after this ISO 8601 time (UTC if "
                                        "no zone is given)."),
    until: Optional[str] = typer.Option(None, "--until", help="Only rows before this ISO 8601 time."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write to this file (atomically) instead of stdout."),
    db: Optional[Path] = _DB,
    database_url: Optional[str] = _URL,
) -> None:
    """Write the audit log as JSON lines, oldest first (ids, times, key ids, actions; never images or embeddings)."""
    start, end = _moment(since, "--since"), _moment(until, "--until")
    store = _store(db, database_url)
    rows = 0
    try:
        with _output(out) as sink:
            after = 0
            while page := store.audit_entries(after, PAGE, start, end):
                for entry in page:
                    sink.write(json.dumps(dataclasses.asdict(entry), separators=(",", ":")) + "\n")
                rows += len(page)
                after = page[-1].id
    finally:
        store.close()
    print(f"exported {rows} audit rows" + (f" to {out}" if out is not None else ""), file=sys.stderr)


@audit_app.command("prune")
def audit_prune(
    older_than: int = typer.Option(..., "--older-than", min=0, metavar="DAYS",
                                   help="Delete the rows older than this many days."),
    db: Optional[Path] = _DB,
    database_url: Optional[str] = _URL,
) -> None:
    """Apply the retention policy: delete audit rows older than DAYS (the only way rows leave the log)."""
    from cdface.serving.store import utc_iso

    before = utc_iso(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=older_than))
    store = _store(db, database_url)
    try:
        deleted = store.prune_audit(before)
    finally:
        store.close()
    print(json.dumps({"deleted": deleted, "before": before}))
