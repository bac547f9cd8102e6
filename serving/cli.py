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
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from cdface.core.errors import CdfaceError, exit_on_error

keys_app = typer.Typer(help="Manage API keys (stored hashed in the gallery database).", no_args_is_help=True,
                       add_completion=False, pretty_exceptions_enable=False)
gallery_app = typer.Typer(help="Inspect and maintain the identity gallery.", no_args_is_help=True,
                          add_completion=False, pretty_exceptions_enable=False)

_DB = typer.Option(None, "--db", help="Gallery SQLite file [default: $CDFACE_SERVE_DB_PATH or gallery.db].")
_URL = typer.Option(None, "--database-url", help="PostgreSQL gallery, postgresql://... (instead of --db) "
                    "[default: $CDFACE_SERVE_DATABASE_URL].")


def _settings(**overrides: Any):
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
    triton_url: Optional[str] = typer.Option(None, "--triton-url", help="Triton gRPC host:port."),
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
                timeout_graceful_shutdown=5, server_header=False)


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., "--name", help="Who or what the key is for."),
    scope: list[str] = typer.Option(..., "--scope", help="embed, verify, identify, enroll, delete, admin (repeat)."),
    db: Optional[Path] = _DB,
    database_url: Optional[str] = _URL,
) -> None:
    """Create a key; it is printed once, only its hash is stored."""
    from cdface.serving.auth import create_key

    settings = _settings(db_path=db)
    pepper = settings.key_pepper.get_secret_value() if settings.key_pepper else None
    key, record = create_key(_store(db, database_url), name, scope, pepper)
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
    from cdface.serving.store import NotFound

    try:
        record = _store(db, database_url).revoke_key(key_id)
    except NotFound as exc:
        raise CdfaceError(str(exc)) from None
    print(f"revoked {record.id} ({record.name})")


@gallery_app.command("status")
def gallery_status(db: Optional[Path] = _DB, database_url: Optional[str] = _URL) -> None:
    """Faces per model (the served model's are searchable; others need re-embedding or re-enrolment)."""
    store = _store(db, database_url)
    counts = store.count_faces_by_model()
    print(json.dumps({"faces_by_model": {str(k): v for k, v in counts.items()}, "last_change": store.last_seq()}))


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
    settings = _settings(db_path=db, database_url=database_url, model_repository=model_repository, model=model, triton_url=triton_url)
    result = asyncio.run(reembed(settings, batch))
    print(json.dumps(result))


async def reembed(settings, batch: int = 32) -> dict[str, Any]:
    import numpy as np

    from cdface.core.imaging import decode_image
    from cdface.serving.service import open_store, resolve_manifest
    from cdface.serving.store import ModelKey
    from cdface.serving.triton import TritonEmbedder

    manifest, version = resolve_manifest(settings)
    target = ModelKey(manifest.name, manifest.version)
    store = open_store(settings)
    embedder = TritonEmbedder(settings.triton_url, settings.model, version, dim=manifest.embedding_size,
                              timeout_s=settings.triton_timeout_s, retries=settings.triton_retries,
                              max_batch=settings.triton_max_batch)
    done = 0
    try:
        pending = list(store.faces_to_reembed(target))
        for i in range(0, len(pending), batch):
            chunk = pending[i:i + batch]
            crops = np.stack([decode_image(png, what=f"retained crop of face {fid}") for fid, png in chunk])
            vectors = await embedder.embed(crops)
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            done += store.replace_embeddings([(fid, v) for (fid, _), v in zip(chunk, vectors)], target)
    finally:
        await embedder.close()
    counts = store.count_faces_by_model()
    left = sum(v for k, v in counts.items() if k != target)
    store.close()
    return {"model": str(target), "reembedded": done, "need_reenrolment": left}


cli = typer.Typer(help="cdface serving stage.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
cli.command("serve")(serve_command)
cli.add_typer(keys_app, name="keys")
cli.add_typer(gallery_app, name="gallery")


def main() -> None:
    exit_on_error(cli)


if __name__ == "__main__":
    main()
