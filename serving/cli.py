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

    Settings, the model repository and the gallery database are checked before the server starts.
    """
    settings = _settings(host=host, port=port, db_path=db, create_db=create, model_repository=model_repository,
                         model=model, triton_url=triton_url)
    served = _check_before_start(settings)

    import uvicorn

    from cdface.serving.app import create_app
    from cdface.serving.connections import bounded_protocol

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print("cdface gateway settings: " + json.dumps(settings.describe(), default=str), file=sys.stderr, flush=True)
    print(f"cdface gateway: serving {served}", file=sys.stderr, flush=True)
    if not settings.auth:
        print("cdface: WARNING: API keys are not required (CDFACE_SERVE_AUTH=false)", file=sys.stderr)
    # Reading a request's head is bounded by the protocol (time and size), its body and the rest of the
    # request by the application's deadline (serving.middleware.RequestLimits), idle connections by
    # the keep-alive timeout.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=settings.graceful_timeout_s, server_header=False,
                http=bounded_protocol(settings.header_timeout_s, settings.max_header_bytes),
                timeout_keep_alive=settings.keep_alive_s)


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., "--name", help="Who or what the key is for."),
    scope: list[str] = typer.Option(..., "--scope", help="embed, verify, identify, enroll, delete, admin (repeat)."),
    db: Optional[Path] = _DB,
    database_url: Optional[str] = _URL,
    create: Optional[bool] = _CREATE,
) -> None:
    """Create a key; it is printed once, only its hash is stored."""
    from cdface.serving.auth import create_key
    from cdface.serving.service import open_store

    settings = _settings(db_path=db, database_url=database_url, create_db=create)
    key, record = create_key(open_store(settings), name, scope, settings.pepper)
    print(key)
    print(f"created key {record.id} ({record.name}) with scopes {', '.join(record.scopes)}; it is not shown again",
          file=sys.stderr)


@keys_app.command("list")
def keys_list(db: Optional[Path] = _DB, database_url: Optional[str] = _URL) -> None:
    """List keys (ids, names, scopes; never the secrets)."""
    for k in _store(db, database_url).list_keys():
        state = f"revoked {k.revoked}" if k.revoked else "active"
        print(f"{k.id}\t{k.name}\t{','.join(k.scopes)}\t{k.created}\t{state}")


@keys_app.command("revoke")
def keys_revoke(key_id: str = typer.Argument(..., help="The key id (the part after 'cdf_')."), db: Optional[Path] = _DB,
                database_url: Optional[str] = _URL) -> None:
    """Revoke a key; requests with it are refused from now on."""
    record = _store(db, database_url).revoke_key(key_id)  # an unknown id: NotFound, a CdfaceError
    print(f"revoked {record.id} ({record.name})")


@gallery_app.command("status")
def gallery_status(db: Optional[Path] = _DB, database_url: Optional[str] = _URL) -> None:
    """Faces per model (the served model's are searchable; others need re-embedding or re-enrolment)."""
    from cdface.serving.usecases.maintenance import census

    print(json.dumps(dataclasses.asdict(census(_store(db, database_url)))))


@gallery_app.command("reembed")
def gallery_reembed(
    db: Optional[Path] = _DB,
    database_url: Optional[str] = _URL,
    model_repository: Optional[Path] = _setting("model_repository", "--model-repository",
                                                help="Triton model repository."),
    model: Optional[str] = _setting("model", "--model", help="Triton model name."),
    triton_url: Optional[str] = _setting("triton_url", "--triton-url", help="Triton gRPC target."),
    batch: int = typer.Option(32, "--batch", min=1, max=256, help="Crops per Triton request."),
) -> None:
    """Recompute every face made by another model from its retained crop, with the served model.

    Faces enrolled without a retained crop cannot be re-embedded: they are counted and must be
    re-enrolled. Restart the gateway afterwards (it rebuilds its index from the store); gateways on
    PostgreSQL follow the change log and pick the new embeddings up by themselves.
    """
    settings = _settings(db_path=db, database_url=database_url, model_repository=model_repository, model=model,
                         triton_url=triton_url)
    print(json.dumps(dataclasses.asdict(asyncio.run(_reembed(settings, batch)))))


async def _reembed(settings: Settings, batch: int) -> Reembedded:
    from cdface.serving.service import open_embedder, open_store, resolve_manifest
    from cdface.serving.store import ModelKey
    from cdface.serving.usecases.maintenance import reembed

    manifest, version = resolve_manifest(settings)
    store = open_store(settings)
    embedder = open_embedder(settings, manifest, version)
    try:
        return await reembed(store, embedder, ModelKey(manifest.name, manifest.version), batch)
    finally:
        await embedder.close()
        store.close()


cli = command_group(help="cdface serving stage.")
cli.command("serve")(serve_command)
cli.add_typer(keys_app, name="keys")
cli.add_typer(gallery_app, name="gallery")


def main() -> None:
    exit_on_error(cli)


if __name__ == "__main__":
    main()
