"""``cdface model``: the model lifecycle from the command line (``cdface.pipeline.models``).

Every command prints one JSON object; a refused step prints one line on stderr and exits 2.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

import typer

from cdface.core.commandline import command_group
from cdface.core.errors import CdfaceError
from cdface.serving.cli import _DB, _URL, _setting, _settings
from cdface.serving.store import ModelKey

if TYPE_CHECKING:
    from cdface.pipeline.models import Lifecycle
    from cdface.serving.store.base import ModelState

model_app = command_group(help="The served model: status, candidate, promote, rollback, Triton's versions.")

_REPO = _setting("model_repository", "--model-repository", help="Triton model repository.")
_TRITON = typer.Option(None, "--triton-url", help="Triton gRPC host:port whose repository API loads versions "
                       "(explicit model control); left out, only the repository's config is written.")
_GRACE = typer.Option(24 * 3600.0, "--grace-s", min=0.0, help="How long after a promotion Triton keeps serving the "
                      "previous version (a rollback stays instant meanwhile).")


@contextlib.contextmanager
def _lifecycle(db: Optional[Path], database_url: Optional[str], repository: Optional[Path], triton_url: Optional[str],
               grace_s: float) -> Iterator[Lifecycle]:
    from cdface.pipeline.models import Lifecycle
    from cdface.serving.service import open_store

    settings = _settings(db_path=db, database_url=database_url, model_repository=repository)
    if settings.model_repository is None:
        raise CdfaceError("give --model-repository (or CDFACE_SERVE_MODEL_REPOSITORY): manifests are read from it")
    store = open_store(settings)
    try:
        yield Lifecycle(store, Path(settings.model_repository), triton_url, grace_s)
    finally:
        store.close()


def _state(state: ModelState) -> None:
    from cdface.pipeline.models import pointer

    print(json.dumps(pointer(state)))


@model_app.command("status")
def model_status(db: Optional[Path] = _DB, database_url: Optional[str] = _URL, repository: Optional[Path] = _REPO,
                 grace_s: float = _GRACE) -> None:
    """The model pointer, each model's coverage of the gallery, shadow-mode agreement, versions in use."""
    from cdface.pipeline.models import status

    with _lifecycle(db, database_url, repository, None, grace_s) as lc:
        print(json.dumps(status(lc)))


@model_app.command("candidate")
def model_candidate(ref: str = typer.Argument(..., help="NAME:VERSION of the Triton model to prepare."),
                    db: Optional[Path] = _DB, database_url: Optional[str] = _URL, repository: Optional[Path] = _REPO,
                    triton_url: Optional[str] = _TRITON, grace_s: float = _GRACE) -> None:
    """Name the candidate: Triton serves it beside the active model, gateways index and shadow it."""
    from cdface.pipeline.models import set_candidate

    with _lifecycle(db, database_url, repository, triton_url, grace_s) as lc:
        _state(set_candidate(lc, ModelKey.parse(ref)))


@model_app.command("promote")
def model_promote(ref: Optional[str] = typer.Argument(None, help="NAME:VERSION (default: the candidate)."),
                  margin: float = typer.Option(0.005, "--margin", min=0.0, max=1.0, help="How much lower the "
                                               "candidate's held-out measurements may be than the active's."),
                  without_baseline: bool = typer.Option(False, "--without-baseline", help="Accept an active model "
                                                        "whose manifest has no evaluation report (e.g. wrapped)."),
                  db: Optional[Path] = _DB, database_url: Optional[str] = _URL, repository: Optional[Path] = _REPO,
                  triton_url: Optional[str] = _TRITON, grace_s: float = _GRACE) -> None:
    """Make the candidate the active model, if it covers the gallery and evaluates no worse."""
    from cdface.pipeline.models import promote

    with _lifecycle(db, database_url, repository, triton_url, grace_s) as lc:
        _state(promote(lc, ModelKey.parse(ref) if ref else None, margin=margin, without_baseline=without_baseline))


@model_app.command("rollback")
def model_rollback(db: Optional[Path] = _DB, database_url: Optional[str] = _URL, repository: Optional[Path] = _REPO,
                   triton_url: Optional[str] = _TRITON, grace_s: float = _GRACE) -> None:
    """Return to the previous model (instant while its Triton version is still served)."""
    from cdface.pipeline.models import rollback

    with _lifecycle(db, database_url, repository, triton_url, grace_s) as lc:
        _state(rollback(lc))


@model_app.command("sync-triton")
def model_sync_triton(db: Optional[Path] = _DB, database_url: Optional[str] = _URL,
                      repository: Optional[Path] = _REPO, triton_url: Optional[str] = _TRITON,
                      grace_s: float = _GRACE) -> None:
    """Serve exactly the versions in use (active, candidate, previous within the grace period, any a gateway
    reported); run on a schedule, it unloads a version only once nobody can call it."""
    from cdface.pipeline.models import sync_triton

    with _lifecycle(db, database_url, repository, triton_url, grace_s) as lc:
        print(json.dumps(sync_triton(lc)))
