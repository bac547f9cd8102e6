"""OWASP API7 (server-side request forgery): the gateway never fetches what a request names.

Images travel as bytes (base64 in JSON, files in multipart), never as URLs. A URL given where an
image belongs is refused as an image that cannot be read, and nothing is fetched: a real HTTP
server, named in every image field, counts the requests it receives.
"""

from __future__ import annotations

import http.server
import threading

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def listener():
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the stdlib's name)
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hits
    server.shutdown()


def test_urls_in_image_fields_are_refused_and_never_fetched(gateway, listener):
    url, hits = listener
    with gateway.client("admin") as c:
        person = c.post("/v1/identities", json={"name": "ssrf probe"}).json()["id"]
        requests = [("/v1/embeddings", {"images": [{"data": url + "/a.jpg"}]}),
                    ("/v1/detect", {"images": [{"data": url + "/b.jpg"}]}),
                    ("/v1/identify", {"image": {"data": url + "/c.jpg"}}),
                    ("/v1/verify", {"image": {"data": url + "/d.jpg"}, "other": {"data": url + "/e.jpg"}}),
                    (f"/v1/identities/{person}/faces", {"images": [{"data": url + "/f.jpg"}]}),
                    ("/v1/identities", {"name": "x", "images": [{"data": url + "/g.jpg"}]})]
        for path, body in requests:
            r = c.post(path, json=body)
            assert 400 <= r.status_code < 500 and r.json()["error"]["code"], (path, r.status_code, r.text)
    assert hits == []
