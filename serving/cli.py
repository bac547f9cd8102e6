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
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from cdface.core.errors import CdfaceError, exit_on_error

if TYPE_CHECKING:  # imported when used: the command line starts without the gateway's dependencies
    from cdface.serving.settings import Settings
    from cdface.serving.usecases.maintenance import Reembedded

keys_app = typer.Typer(help="Manage API keys (stored hashed in the gallery database).", no_args_is_help=True,
                       add_completion=False, pretty_exceptions_enable=False)
gallery_app = typer.Typer(help="Inspect and maintain the identity gallery.", no_args_is_help=True,
                          add_completion=False, pretty_exceptions_enable=False)

_DB = typer.Option(None, "--db", help="Gallery SQLite file [default: $CDFACE_SERVE_DB_PATH or gallery.db].")
_URL = typer.Option(None, "--database-url", help="PostgreSQL gallery, postgresql://... (instead of --db) "
                    "[default: $CDFACE_SERVE_DATABASE_URL].")


def _settings(**overrides: Any) -> Settings:
    from cdface.serving.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:  # pydantic ValidationError: one readable line
        raise CdfaceError(f"invalid serving settings: {exc}".replace("\n", " ")) from None


def _store(db: Optional[Path], database_url: Optional[str] = None):
    from cdface.serving.service import open_store

    return open_store(_settings(db_path=db, database_url=database_url))


def serve_command(
    host: Optional[str] = typer.Option(None, "--host", help="Bind address [default: 127.0.0.1]."),
    port: Optional[int] = typer.Option(None, "--port", help="HTTP port [default: 8000]."),
    db: Optional[Path] = _DB,
    model_repository: Optional[Path] = typer.Option(None, "--model-repository", help="Triton model repository."),
    model: Optional[str] = typer.Option(None, "--model", help="Triton model name [default: face]."),
    triton_url: Optional[str] = typer.Option(None, "--triton-url", help="Triton gRPC target: host:port, "
                                             "dns:///name:port or ipv4:a:port,b:port (round-robin)."),
) -> None:
    """Run the HTTP gateway (settings from CDFACE_SERVE_* variables; options override them)."""
    import uvicorn

    from cdface.serving.app import create_app

    settings = _settings(host=host, port=port, db_path=db, model_repository=model_repository, model=model,
                         triton_url=triton_url)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print("cdface gateway settings: " + json.dumps(settings.describe(), default=str), file=sys.stderr, flush=True)
    if not settings.auth:
        print("cdface: WARNING: API keys are not required (CDFACE_SERVE_AUTH=false)", file=sys.stderr)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=settings.graceful_timeout_s, server_header=False)


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., "--name", help="Who or what the key is for."),
    scope: list[str] = typer.Option(..., "--scope", help="embed, verify, identify, enroll, delete, admin (repeat)."),
    db: Optional[Path] = _DB,
    database_url: Optional[str] = _URL,
) -> None:
    """Create a key; it is printed once, only its hash is stored."""
    from cdface.serving.auth import create_key

    key, record = create_key(_store(db, database_url), name, scope, _settings(db_path=db).pepper)
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
    model_repository: Optional[Path] = typer.Option(None, "--model-repository", help="Triton model repository."),
    model: Optional[str] = typer.Option(None, "--model", help="Triton model name [default: face]."),
    triton_url: Optional[str] = typer.Option(None, "--triton-url", help="Triton gRPC host:port."),
    batch: int = typer.Option(32, "--batch", min=1, max=256),
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


cli = typer.Typer(help="cdface serving stage.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
cli.command("serve")(serve_command)
cli.add_typer(keys_app, name="keys")
cli.add_typer(gallery_app, name="gallery")


def main() -> None:
    exit_on_error(cli)


if __name__ == "__main__":
    main()
