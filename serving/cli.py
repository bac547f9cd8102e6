"""Command line of the serving stage: ``serve_command`` (cdface serve), ``keys_app`` and ``gallery_app``.

Register in ``cdface/cli.py``::

    from cdface.serving.cli import gallery_app, keys_app, serve_command
    app.command("serve")(serve_command)
    app.add_typer(keys_app, name="keys")
    app.add_typer(gallery_app, name="gallery")

``python -m cdface.serving.cli`` runs the same three without the rest of cdface.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from cdface.core.commandline import command_group
from cdface.core.errors import CdfaceError, exit_on_error
from cdface.serving.settings import Settings, env_name, is_secret, unknown_env

if TYPE_CHECKING:  # imported when used: the command line starts without the gateway's dependencies
    from cdface.serving.store import ModelKey
    from cdface.serving.usecases.maintenance import Reembedded

keys_app = command_group(help="Manage API keys (stored hashed in the gallery database).")
gallery_app = command_group(help="Inspect and maintain the identity gallery.")


def _setting(field: str, *flags: str, help: str) -> Any:
    """An option that overrides the setting ``field``; left out, the setting's variable or default applies.

    The option's own default stays None (so CDFACE_SERVE_<FIELD> still counts); its help names the
    variable and shows the setting's default.
    """
    default = Settings.model_fields[field].default
    return typer.Option(None, *flags, help=f"{help} Overrides {env_name(field)}.",
                        show_default=str(default) if default is not None else False)


_DB = _setting("db_path", "--db", help="Gallery SQLite file.")
_URL = _setting("database_url", "--database-url", help="PostgreSQL gallery, postgresql://... (instead of --db).")
_CREATE = typer.Option(None, "--create", help="Create the SQLite gallery file if it does not exist (otherwise a "
                       f"missing file is an error). Overrides {env_name('create_db')}.")


def _settings(**overrides: Any) -> Settings:
    for name, suggestion in unknown_env(os.environ):
        hint = f"; did you mean {suggestion}?" if suggestion else ""
        print(f"cdface: warning: unknown setting {name} is ignored{hint}", file=sys.stderr)
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:  # pydantic's ValidationError, or pydantic-settings' SettingsError for bad JSON
        raise CdfaceError(_invalid_settings(exc)) from None


def _invalid_settings(exc: Exception) -> str:
    """One line naming each bad setting by its variable, with the value given (secrets left out)."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        # pydantic-settings reads list and dict settings as JSON: 'error parsing value for field "x" ...'
        parsed = re.search(r'field "(\w+)"', str(exc))
        if parsed and parsed.group(1) in Settings.model_fields:
            return f"invalid serving settings: {env_name(parsed.group(1))} is not valid JSON " \
                   "(lists are written as JSON, e.g. [\"https://app.example\"])"
        return f"invalid serving settings: {exc}"
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        given = "" if is_secret(field) or "input" not in error else f" (got {error['input']!r})"
        name = env_name(field) if field in Settings.model_fields else field
        problems.append(f"{name}: {error['msg']}{given}")
    return "invalid serving settings: " + "; ".join(problems)


def _store(db: Optional[Path], database_url: Optional[str] = None):
    from cdface.serving.service import open_store

    return open_store(_settings(db_path=db, database_url=database_url))


def _check_before_start(settings: Settings) -> str:
    """What the gateway would otherwise find out inside uvicorn's start-up, with a traceback: the model
    repository, the served version and its manifest, the YuNet file, the gallery database. Returns a
    description of the served model; a problem is a CdfaceError (one line, exit status 2)."""
    from cdface.serving.service import open_store, resolve_manifest

    manifest, version = resolve_manifest(settings)
    if settings.yunet_model is not None and not Path(settings.yunet_model).is_file():
        raise CdfaceError(f"YuNet model {settings.yunet_model} ({env_name('yunet_model')}) is not a file")
    open_store(settings).close()
    return f"model {manifest.name} version {manifest.version} (Triton {settings.model!r} version {version})"


def serve_command(
    host: Optional[str] = _setting("host", "--host", help="Bind address."),
    port: Optional[int] = _setting("port", "--port", help="HTTP port."),
    db: Optional[Path] = _DB,
    create: Optional[bool] = _CREATE,
    model_repository: Optional[Path] = _setting("model_repository", "--model-repository",
                                                help="Triton model repository (manifests are read from it)."),
    model: Optional[str] = _setting("model", "--model", help="Triton model name."),
    triton_url: Optional[str] = _setting("triton_url", "--triton-url", help="Triton gRPC target: host:port, "
                                         "dns:///name:port or ipv4:a:port,b:port (round-robin)."),
) -> None:
    """Run the HTTP gateway (settings from CDFACE_SERVE_* variables; options override them).

    Settings, the model repository and the gallery database are checked before the server starts. Logs go
    to stderr, one JSON object per line (CDFACE_SERVE_LOG_FORMAT=text for plain lines).
    """
    settings = _settings(host=host, port=port, db_path=db, create_db=create, model_repository=model_repository,
                         model=model, triton_url=triton_url)
    served = _check_before_start(settings)

    import uvicorn

    from cdface.serving.app import create_app
    from cdface.serving.connections import bounded_protocol
    from cdface.serving.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    # What the gateway serves, and with what settings, is logged whatever the log level.
    start = logging.getLogger("cdface.serving.start")
    start.setLevel(logging.INFO)
    start.info("cdface gateway settings: %s", json.dumps(settings.describe(), default=str))
    start.info("cdface gateway: serving %s", served)
    if not settings.auth:
        start.warning("API keys are not required (CDFACE_SERVE_AUTH=false)")
    # Reading a request's head is bounded by the protocol (time and size), its body and the rest of the
    # request by the application's deadline (serving.middleware.RequestLimits), idle connections by
    # the keep-alive timeout.
    # log_config=None: uvicorn keeps the handlers configure_logging gave it (its own would bypass them).
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                log_config=None,
                timeout_graceful_shutdown=settings.graceful_timeout_s, server_header=False,
                http=bounded_protocol(settings.header_timeout_s, settings.max_header_bytes),
                timeout_keep_alive=settings.keep_alive_s)


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., "--name", help="Who or what the key is for."),
    tenant: str = typer.Option("default", "--tenant",
                               help="The tenant whose gallery the key acts on (a-z, 0-9, '_', '-'; at most 63)."),
    scope: list[str] = typer.Option(..., "--scope", help="embed, verify, identify, enroll, delete, admin (repeat)."),
    db: Optional[Path] = _DB,
    database_url: Optional[str] = _URL,
    create: Optional[bool] = _CREATE,
) -> None:
    """Create a key; it is printed once, only its hash is stored."""
    from cdface.serving.auth import create_key
    from cdface.serving.service import open_store

    settings = _settings(db_path=db, database_url=database_url, create_db=create)
    key, record = create_key(open_store(settings), name, scope, settings.pepper, tenant)
    print(key)
    print(f"created key {record.id} ({record.name}) of tenant {record.tenant} with scopes {', '.join(record.scopes)}; "
          f"it is not shown again", file=sys.stderr)


@keys_app.command("list")
def keys_list(db: Optional[Path] = _DB, database_url: Optional[str] = _URL) -> None:
    """List keys (id, name, scopes, created, state, tenant; never the secrets)."""
    for k in _store(db, database_url).list_keys():
        state = f"revoked {k.revoked}" if k.revoked else "active"
        print(f"{k.id}\t{k.name}\t{','.join(k.scopes)}\t{k.created}\t{state}\t{k.tenant}")


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key id (the part after 'cdf_')."), db: Optional[Path] = _DB,
                database_url: Optional[str] = _URL) -> None:
    """Revoke a key; requests with it are refused from now on."""
    record = _store(db, database_url).revoke_key(key_id)  # an unknown id: NotFound, a CdfaceError
    print(f"revoked {record.id} ({record.name})")


@gallery_app.command("status")
def gallery_status(db: Optional[Path] = _DB, database_url: Optional[str] = _URL) -> None:
    """Faces in the gallery, faces each model has embedded, and the model pointer (active, candidate, previous).

    A model searches the faces it has embedded; `cdface gallery reembed` fills in a model's missing
    embeddings from the retained crops.
    """
    from cdface.serving.usecases.maintenance import census

    store = _store(db, database_url)
    try:
        print(json.dumps(dataclasses.asdict(census(store))))
    finally:
        store.close()


@gallery_app.command("reembed")
def gallery_reembed(
    to: Optional[str] = typer.Option(None, "--to", metavar="NAME:VERSION", help="The Triton model and version to "
                                     "embed with (its manifest in the model repository names the embeddings). "
                                     "Default: the candidate of the gallery's model pointer."),
    db: Optional[Path] = _DB,
    database_url: Optional[str] = _URL,
    model_repository: Optional[Path] = _setting("model_repository", "--model-repository",
                                                help="Triton model repository."),
    triton_url: Optional[str] = _setting("triton_url", "--triton-url", help="Triton gRPC target."),
    batch: int = typer.Option(32, "--batch", min=1, max=256, help="Crops per Triton request and per transaction."),
) -> None:
    """Embed every face's retained crop with another model, next to the faces' existing embeddings.

    Streams the gallery a batch at a time (one transaction per batch) and shows a progress bar on
    stderr. Resumable: a run that stops keeps what it committed, and the next run does only the faces
    still missing; faces that already have the model's embedding are left as they are. Faces enrolled
    without a retained crop cannot be re-embedded: they are counted and must be re-enrolled. Prints
    the result as JSON, with the model's coverage (faces it has embedded / faces in the gallery).
    """
    from cdface.serving.store import ModelKey

    settings = _settings(db_path=db, database_url=database_url, model_repository=model_repository,
                         triton_url=triton_url)
    target = ModelKey.parse(to) if to is not None else None
    print(json.dumps(dataclasses.asdict(asyncio.run(_reembed(settings, target, batch)))))


async def _reembed(settings: Settings, target: "ModelKey | None", batch: int) -> Reembedded:
    from cdface.serving.service import open_embedder, open_store, read_served_manifest
    from cdface.serving.store import ModelKey
    from cdface.serving.usecases.maintenance import reembed

    store = open_store(settings)
    try:
        if target is None:
            target = store.model_state().candidate
            if target is None:
                raise CdfaceError("the gallery has no candidate model to re-embed for; name one with --to NAME:VERSION")
        manifest = read_served_manifest(settings, target)
        embedder = open_embedder(settings, manifest, target.version, model=target.name)
        try:
            return await reembed(store, embedder, ModelKey(manifest.name, manifest.version), batch)
        finally:
            await embedder.close()
    finally:
        store.close()


@keys_app.command("crop-key")
def keys_crop_key() -> None:
    """Make a key that seals retained crops (AES-256): `<key id>:<base64>`, printed once, stored nowhere."""
    from cdface.serving.crop_cipher import new_key

    print(new_key())
    print("a new crop key, shown once: put it FIRST in CDFACE_SERVE_CROP_KEYS (comma-separated; keep older keys after "
          "it until `cdface gallery rotate-crop-key` has re-sealed every crop)", file=sys.stderr)


@gallery_app.command("rotate-crop-key")
def gallery_rotate_crop_key(
    db: Optional[Path] = _DB,
    database_url: Optional[str] = _URL,
    after: int = typer.Option(0, "--after", min=0, help="Start after this face id (resume a run that stopped)."),
    batch: int = typer.Option(100, "--batch", min=1, max=10_000, help="Crops per transaction."),
) -> None:
    """Re-seal every retained crop with the first key of CDFACE_SERVE_CROP_KEYS (key rotation).

    Every key in the list must still be there: crops sealed with an older one are opened with it and
    sealed again with the first. Each batch is one transaction; a run that stops keeps what it did, and
    a rerun skips crops already sealed with the first key. Crops stored in the clear by an older cdface
    are sealed too. Afterwards the old keys can be dropped from the list.
    """
    from cdface.serving.crop_cipher import CropKeyError

    store = _store(db, database_url)
    resealed = current = 0
    last = after
    try:
        for done_up_to, done, same in store.reseal_crops(after, batch):
            last, resealed, current = done_up_to, resealed + done, current + same
    except CropKeyError as exc:
        raise CdfaceError(f"{exc}; crops up to face {last} are re-sealed, rerun (with --after {last}) once the "
                          "key is in the list") from None
    finally:
        store.close()
    print(json.dumps({"key": store.crop_cipher.primary, "resealed": resealed, "already_current": current,
                      "last_face": last}))


@gallery_app.command("vacuum")
def gallery_vacuum(db: Optional[Path] = _DB, database_url: Optional[str] = _URL) -> None:
    """Rewrite the identity, face and embedding tables so deleted faces leave the database files (erasure).

    PostgreSQL keeps a deleted row in the table's file until it is vacuumed: this runs VACUUM FULL on
    faces and identities, which locks each table (ACCESS EXCLUSIVE) while it is copied, so run it in a
    quiet hour. SQLite erases on delete already (secure_delete and a WAL checkpoint); there this runs
    VACUUM, which also gives the freed pages back to the file system. Copies outside the database's
    files (PostgreSQL's WAL archive, backups) are not reached: see docs/data-protection.md.
    """
    import time

    store = _store(db, database_url)
    started = time.monotonic()
    try:
        store.vacuum()
    finally:
        store.close()
    print(json.dumps({"vacuumed": store.where, "seconds": round(time.monotonic() - started, 3)}))


@gallery_app.command("expire")
def gallery_expire(
    not_seen_days: int = typer.Option(..., "--not-seen-days", min=1,
                                      help="Delete faces no search has matched for this many days."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Count what would be deleted; change nothing."),
    drop_identities: bool = typer.Option(False, "--drop-empty-identities", help="Also delete the identities left "
                                         "without a face that were not updated in those days either."),
    db: Optional[Path] = _DB,
    database_url: Optional[str] = _URL,
) -> None:
    """Retention: delete the faces not matched for N days (a face never matched counts from its enrolment).

    A match is an identification whose best candidate matched, or a matching verification against the
    identity; gateways record it in faces.last_seen (written every CDFACE_SERVE_LAST_SEEN_FLUSH_S).
    Deletions go through the change log (gateways on PostgreSQL drop the faces from search by
    themselves; a gateway on a SQLite file must be restarted) and the audit log (action "expire").
    """
    import datetime as dt

    from cdface.serving.store import utc_iso

    before = utc_iso(dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=not_seen_days))
    store = _store(db, database_url)
    try:
        faces, identities = store.expire_faces(before, dry_run=dry_run, drop_identities=drop_identities)
    finally:
        store.close()
    print(json.dumps({"not_seen_since": before, "dry_run": dry_run, "faces": faces, "identities": identities}))


cli = command_group(help="cdface serving stage.")
cli.command("serve")(serve_command)
cli.add_typer(keys_app, name="keys")
cli.add_typer(gallery_app, name="gallery")


def main() -> None:
    exit_on_error(cli)


if __name__ == "__main__":
    main()
