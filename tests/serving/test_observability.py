"""Operations: request ids (``X-Request-ID`` on every response, in the logs and the audit log), JSON logs,
and per-stage latency histograms (``cdface_stage_seconds``) in ``/metrics``.

Through real gateway processes (``cdface serve``: real Triton, SFace, SQLite) on real photos; the log
formatter also on its own, behind the real request-id middleware.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdface.serving.logs import RequestContext, formatter
from cdface.serving.request_ids import HEADER, RequestIds, current_request_id
from cdface.serving.store import SQLiteStore

from .conftest import b64, start_gateway

MAX_REQUEST_BYTES = 4 * 1024 * 1024
MADE = re.compile(r"[0-9a-f]{32}")  # an id the gateway made: uuid4 hex
NAME = "Quintessa Vandermolen-Ortiz"  # given at enrolment: personal data, never in a log


@pytest.fixture(scope="module")
def gw(triton, model_repo, tmp_path_factory):
    """A gateway of its own: a clean audit log and log file, INFO logs (access lines), the default format."""
    gw = start_gateway(tmp_path_factory.mktemp("observed"), triton.grpc_url, model_repo,
                       extra_env={"CDFACE_SERVE_LOG_LEVEL": "info",
                                  "CDFACE_SERVE_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
                                  "CDFACE_SERVE_RATE_LIMITS": json.dumps({"delete": "1/minute"})})
    yield gw
    gw.stop()


# -- request ids ---------------------------------------------------------------------------------------


def test_every_response_carries_a_request_id_the_clients_when_well_formed(gw):
    with gw.client("identify") as c:
        made = {c.get("/healthz").headers.get(HEADER) for _ in range(3)}
        assert len(made) == 3 and all(MADE.fullmatch(i or "") for i in made)  # one per request
        for given in ("req-1", "Ab.9_z:-x", "x" * 128):
            assert c.get("/v1/identities", headers={HEADER: given}).headers[HEADER] == given
        for malformed in ("x" * 129, "x" * 300, "has space", "semi;colon", "new\tline", "é"):
            r = c.get("/v1/identities", headers={HEADER: malformed.encode("utf-8")})
            assert r.status_code == 200 and MADE.fullmatch(r.headers[HEADER]), (malformed, r.headers.get(HEADER))
        # Two ids: which one is meant is unknown, so neither is used.
        r = c.get("/healthz", headers=[(HEADER, "one"), (HEADER, "two")])
        assert MADE.fullmatch(r.headers[HEADER])
        assert r.headers.get_list(HEADER) == [r.headers[HEADER]]


def test_error_responses_carry_it_too(gw):
    with httpx.Client(base_url=gw.url, timeout=60) as anonymous:
        r = anonymous.get("/v1/identities", headers={HEADER: "no-key-1"})
        assert r.status_code == 401 and r.headers[HEADER] == "no-key-1"
        assert r.json()["error"]["code"] == "unauthorized"
        r = anonymous.get("/no/such/route")
        assert r.status_code == 404 and MADE.fullmatch(r.headers[HEADER])
    with gw.client("enroll") as c:
        # Refused by the body-limit middleware before any route runs.
        r = c.post("/v1/embeddings", content=b"x" * (MAX_REQUEST_BYTES + 1),
                   headers={"Content-Type": "application/json", HEADER: "too-big-1"})
        assert r.status_code == 413 and r.headers[HEADER] == "too-big-1"
        assert r.json() == {"error": {"code": "payload_too_large", "message": r.json()["error"]["message"]}}
        r = c.post("/v1/identities", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and MADE.fullmatch(r.headers[HEADER])
    with gw.client("delete") as c:  # one delete a minute: the second is refused by the rate limiter
        unknown = "/v1/identities/idt_000000000000000000000000"
        assert c.delete(unknown, headers={HEADER: "limit-1"}).status_code == 404
        r = c.delete(unknown, headers={HEADER: "limit-2"})
        assert r.status_code == 429 and r.headers[HEADER] == "limit-2" and "Retry-After" in r.headers


def test_audit_rows_carry_the_request_id_the_client_saw(gw, photos):
    store = SQLiteStore(gw.db)  # WAL: read while the gateway writes
    try:
        seen = max([e.id for e in store.audit_entries(0, 100_000)], default=0)
        with gw.client("enroll") as c:
            created = c.post("/v1/identities", json={"images": [{"data": b64(photos["obama"])}]},
                             headers={HEADER: "client-create-1"})
            assert created.status_code == 201, created.text
            identity = created.json()["id"]
            enrolled = c.post(f"/v1/identities/{identity}/faces", json={"images": [{"data": b64(photos["obama2"])}]})
            assert enrolled.status_code == 201, enrolled.text
        with gw.client("identify") as c:
            identified = c.post("/v1/identify", json={"image": {"data": b64(photos["obama3"])}},
                                headers={HEADER: "x" * 200})  # malformed: replaced, and the row has the new id
            assert identified.status_code == 200, identified.text
        rows = store.audit_entries(seen, 1000)
        assert [(e.action, e.identity_id, e.request_id) for e in rows] == [
            ("create_identity", identity, "client-create-1"),
            ("enroll", identity, enrolled.headers[HEADER]),
            ("identify", None, identified.headers[HEADER])]
        assert MADE.fullmatch(enrolled.headers[HEADER]) and MADE.fullmatch(identified.headers[HEADER])
    finally:
        store.close()


# -- per-stage latency ----------------------------------------------------------------------------------


def _stage_counts(gw) -> dict[str, float]:
    text = httpx.get(gw.url + "/metrics", timeout=30).text
    return {sample.labels["stage"]: sample.value for family in text_string_to_metric_families(text)
            if family.name == "cdface_stage_seconds" for sample in family.samples
            if sample.name == "cdface_stage_seconds_count"}


def test_one_identify_is_counted_in_each_stage_it_went_through(gw, photos):
    before = _stage_counts(gw)
    assert set(before) == {"decode", "detect", "align", "quality", "triton", "search", "store"}
    with gw.client("identify") as c:
        r = c.post("/v1/identify", json={"image": {"data": b64(photos["obama3"])}})
        assert r.status_code == 200, r.text
    wanted = {"decode", "detect", "align", "triton", "search", "store"}  # the face gate is off in the test gateways
    # The middleware observes the stages as the request ends, just after the last byte went out.
    deadline = time.monotonic() + 10
    while True:
        after = _stage_counts(gw)
        grown = {stage for stage in after if after[stage] > before[stage]}
        if wanted <= grown or time.monotonic() > deadline:
            break
    assert wanted <= grown, (before, after)
    assert all(after[stage] == before[stage] + 1 for stage in wanted), (before, after)  # one observation per request
    assert after["quality"] == before["quality"]
    text = httpx.get(gw.url + "/metrics", timeout=30).text
    bounds = {sample.labels["le"] for family in text_string_to_metric_families(text)
              if family.name == "cdface_stage_seconds" for sample in family.samples if "le" in sample.labels}
    assert {"0.0005", "0.001", "5.0", "+Inf"} <= bounds, bounds  # fine at the low end


# -- logs ----------------------------------------------------------------------------------------------


def _capture(log_format: str) -> tuple[io.StringIO, logging.Logger, logging.Handler]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter(log_format))  # type: ignore[arg-type]
    handler.addFilter(RequestContext())
    logger = logging.getLogger(f"cdface.test.observability.{log_format}")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return out, logger, handler


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_record_made_inside_a_request_names_its_id(log_format):
    out, logger, handler = _capture(log_format)

    async def app(scope, receive, send):
        logger.info("serving %s", scope["path"])
        try:
            raise ValueError("a fault\nover two lines")
        except ValueError:
            logger.exception("it failed")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def serve() -> list[str]:
        transport = httpx.ASGITransport(app=RequestIds(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            given = await client.get("/v1/identities", headers={HEADER: "unit-1"})
            made = await client.get("/healthz")
        return [given.headers[HEADER], made.headers[HEADER]]

    import anyio

    try:
        ids = anyio.run(serve)
        logger.info("outside any request")
    finally:
        logger.removeHandler(handler)
    assert ids[0] == "unit-1" and MADE.fullmatch(ids[1]) and current_request_id() is None
    lines = out.getvalue().splitlines()
    if log_format == "text":
        assert "[unit-1]: serving /v1/identities" in lines[0] and f"[{ids[1]}]: serving /healthz" in out.getvalue()
        return
    records = [json.loads(line) for line in lines]  # one object per line, the traceback's newlines escaped
    assert len(records) == 5
    first, failed, last = records[0], records[1], records[-1]
    assert set(first) == {"time", "level", "logger", "message", "request_id"}
    assert first["request_id"] == "unit-1" and first["message"] == "serving /v1/identities"
    assert first["level"] == "INFO" and first["logger"] == logger.name
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["time"])
    assert failed["level"] == "ERROR" and failed["request_id"] == "unit-1"
    assert "ValueError: a fault\nover two lines" in failed["exception"] and "Traceback" in failed["exception"]
    assert records[2]["request_id"] == ids[1]
    assert "request_id" not in last and last["message"] == "outside any request"


def test_access_lines_give_the_path_without_the_query_string():
    out, logger, handler = _capture("json")
    access = logging.getLogger("uvicorn.access")
    record = access.makeRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", f"/v1/identities?q={NAME}", "1.1", 200), None)
    try:
        handler.handle(record)
    finally:
        logger.removeHandler(handler)
    line = json.loads(out.getvalue())
    assert line["path"] == "/v1/identities" and line["status"] == 200 and line["method"] == "GET"
    assert NAME not in out.getvalue() and "Quintessa" not in out.getvalue()


@pytest.mark.slow
def test_a_served_gateway_logs_json_lines_with_request_ids_and_no_names(triton, model_repo, photos, tmp_path):
    """``cdface serve`` with the default format, at INFO: every line of its output is a JSON object; the
    access lines carry the ids the responses did; the name given at enrolment appears nowhere."""
    served = start_gateway(tmp_path / "gw", triton.grpc_url, model_repo, extra_env={"CDFACE_SERVE_LOG_LEVEL": "info"})
    try:
        with served.client("admin") as c:
            created = c.post("/v1/identities", json={"name": NAME, "metadata": {"note": NAME},
                                                     "images": [{"data": b64(photos["biden"])}]})
            assert created.status_code == 201, created.text
            listed = c.get("/v1/identities", params={"q": NAME.split()[0]})
            assert listed.status_code == 200 and [i["name"] for i in listed.json()["items"]] == [NAME]
            identified = c.post("/v1/identify", json={"image": {"data": b64(photos["biden"])}, "top_k": 3})
            assert identified.status_code == 200 and identified.json()["faces"][0]["match"] is not None
            patched = c.patch(f"/v1/identities/{created.json()['id']}", json={"name": NAME + " Jr"})
            assert patched.status_code == 200, patched.text
            missing = c.get("/v1/identities/idt_000000000000000000000000", headers={HEADER: "trace-404"})
            assert missing.status_code == 404
    finally:
        served.stop()
    text = served.log.read_text()
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n{text[-3000:]}")
        assert set(records[-1]) >= {"time", "level", "logger", "message"}, line
    loggers = {r["logger"] for r in records}
    assert {"cdface.serving.start", "uvicorn.error", "uvicorn.access"} <= loggers, loggers
    access = {r["request_id"]: r for r in records if r["logger"] == "uvicorn.access"}
    for response in (created, listed, identified, patched, missing):
        line = access[response.headers[HEADER]]
        assert line["status"] == response.status_code and "?" not in line["path"] and "?" not in line["message"]
    assert access["trace-404"]["path"] == "/v1/identities/idt_000000000000000000000000"
    assert NAME not in text and NAME.split()[0] not in text  # no personal data
    assert b64(photos["biden"])[:64] not in text and "Traceback" not in text


def test_an_internal_error_is_answered_and_logged_with_the_request_id():
    """Starlette answers an unhandled exception outside every middleware: the id must survive to it."""
    from fastapi import FastAPI

    from cdface.serving.http_errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("a bug")

    app.add_middleware(RequestIds)
    out, _, handler = _capture("json")
    logging.getLogger("cdface.serving").addHandler(handler)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            return await client.get("/boom", headers={HEADER: "bug-1"})

    import anyio

    try:
        r = anyio.run(call)
    finally:
        logging.getLogger("cdface.serving").removeHandler(handler)
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert r.headers[HEADER] == "bug-1"
    logged = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["message"], e["request_id"]) for e in logged] == [("internal error on GET /boom", "bug-1")]
    assert "RuntimeError: a bug" in logged[0]["exception"]
