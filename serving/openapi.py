"""The OpenAPI document: request bodies that are JSON (images as base64) or multipart/form-data (images as files).

FastAPI documents a body it parses itself; these bodies are parsed by ``dependencies.json_or_form``,
so each route declares both forms with ``body_doc`` and the JSON models are added to the schemas.
"""

from __future__ import annotations

from typing import Any, Callable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from cdface.serving import schemas as s

# The models ``body_doc`` refers to, added to the document's schemas.
REQUEST_MODELS: tuple[type[BaseModel], ...] = (s.DetectRequest, s.EmbeddingsRequest, s.VerifyRequest,
                                               s.IdentifyRequest, s.EnrollRequest)


def _face_spec_doc() -> dict[str, Any]:
    return {
        "mode": {"type": "string", "enum": ["aligned", "landmarks", "detect", "detect_all"], "default": "detect"},
        "format": {"type": "string", "enum": ["file", "rgb24"], "default": "file",
                   "description": "rgb24: each file is an aligned crop's raw pixels (112x112x3 bytes, RGB)."},
        "landmarks": {"type": "string", "description": "JSON: five [x, y] pairs (mode 'landmarks')."},
        "min_face_size": {"type": "number", "minimum": 0},
        "min_score": {"type": "number", "minimum": 0, "maximum": 1},
    }


def body_doc(model: type[BaseModel], form_properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """``openapi_extra`` of a route whose body is ``model`` as JSON or these form fields ("file", "files", a schema)."""
    binary = {"type": "string", "format": "binary"}
    properties = {name: ({"type": "array", "items": binary} if spec == "files" else binary if spec == "file" else spec)
                  for name, spec in form_properties.items()}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}},
        "multipart/form-data": {"schema": {"type": "object", "required": required,
                                           "properties": {**properties, **_face_spec_doc()}}},
    }}}


def openapi_builder(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """``app.openapi``: FastAPI's document plus the JSON request models (built once)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_MODELS:
            doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(doc.pop("$defs", {}))
            components[model.__name__] = doc
        app.openapi_schema = schema
        return schema

    return openapi
