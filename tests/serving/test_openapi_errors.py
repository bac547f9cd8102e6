"""The OpenAPI document lists every error status a /v1 route can answer, each with the error body."""

from __future__ import annotations

from cdface.serving.app import create_app
from cdface.serving.http_errors import STATUS, UNPROCESSABLE
from cdface.serving.settings import Settings


def test_every_error_status_is_documented_on_every_v1_route(tmp_path):
    spec = create_app(Settings(db_path=tmp_path / "g.db")).openapi()
    wanted = {str(s) for s in {*STATUS.values(), UNPROCESSABLE}}
    assert {"408", "431", "502", "504", "429"} <= wanted  # the limits' and the model server's statuses are there
    routes = [(path, method, op) for path, ops in spec["paths"].items() if path.startswith("/v1/")
              for method, op in ops.items()]
    assert len(routes) >= 10
    for path, method, op in routes:
        missing = wanted - set(op["responses"])
        assert not missing, (method, path, sorted(missing))
        for status in wanted:
            assert op["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith(
                "/ErrorResponse"), (method, path, status)
