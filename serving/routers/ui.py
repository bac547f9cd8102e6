"""The gallery web page (``/ui``): static HTML, CSS and JavaScript shipped as package data (``cdface.serving.ui``).

The page holds no data and needs no key to load: its script calls the ``/v1`` API with the key the
user pastes. Every ``/ui`` response carries a strict Content-Security-Policy: script and styles only
from the gateway itself, never inline (so an injected ``<script>`` or ``onclick=`` does not run),
images also from ``blob:``/``data:`` URLs (uploads and retained crops are shown that way), API calls
only to this origin, and no framing (clickjacking).
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob: data:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",  # the page's forms are handled by its script, never submitted
    "frame-ancestors 'none'",
    "require-trusted-types-for 'script'",  # the script builds the page with DOM calls, never from HTML strings
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # for browsers that predate frame-ancestors
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so a gateway upgrade never pairs a new page with an old script
}
_MEDIA_TYPES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
                "app.css": "text/css; charset=utf-8"}

router = APIRouter(include_in_schema=False)


@functools.cache
def _asset(name: str) -> bytes:
    return resources.files("cdface.serving.ui").joinpath(name).read_bytes()


def _serve(name: str) -> Response:
    return Response(_asset(name), media_type=_MEDIA_TYPES[name], headers=SECURITY_HEADERS)


@router.get("/ui")
def ui_redirect() -> RedirectResponse:
    # Relative, so the page still resolves behind a path prefix; its assets are relative to "ui/".
    return RedirectResponse("ui/", status_code=307, headers=SECURITY_HEADERS)


@router.get("/ui/")
def ui_page() -> Response:
    return _serve("index.html")


@router.get("/ui/app.js")
def ui_script() -> Response:
    return _serve("app.js")


@router.get("/ui/app.css")
def ui_styles() -> Response:
    return _serve("app.css")
