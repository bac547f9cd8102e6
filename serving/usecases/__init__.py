"""What the gateway and the command line do, in plain Python: no HTTP, no request or response schemas.

Use cases take plain values (``ImageIn`` for an image), return dataclasses and raise domain errors
(``cdface.serving.errors``, ``cdface.core.imaging.ImageError``), each with a stable code; the HTTP
layer (``cdface.serving.routers``) turns them into responses.

- ``recognition``: embed, verify, identify (and the match decision);
- ``identities``: identities and their faces, enrolment;
- ``operations``: readiness, metrics, the gallery's status;
- ``maintenance``: the command line's census and re-embedding.
"""
