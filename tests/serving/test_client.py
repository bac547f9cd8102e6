"""The Python client (``cdface.client``) against the real gateway and a real Triton, on real photos: every /v1
route through the sync client, several through the async one, typed errors with their stable codes, and
503 + Retry-After while Triton is stopped (retried, bounded, then raised; or answered once Triton is back).
"""

from __future__ import annotations

import asyncio
import io
import re
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from cdface.client import (
    AsyncClient,
    AuthenticationError,
    CdfaceAPIError,
    CdfaceConnectionError,
    Client,
    ClientRequestError,
    ConflictError,
    FaceImage,
    NotFoundError,
    PermissionDeniedError,
    RetryPolicy,
    ServerError,
    ServiceUnavailableError,
    UnprocessableError,
)
from cdface.client import models as m

from .conftest import start_gateway

pytestmark = pytest.mark.slow


def _client(gateway, scope: str = "admin", **kw) -> Client:
    return Client(gateway.url, api_key=gateway.keys[scope], **kw)


def test_every_route_through_the_sync_client(gateway, photos):
    with _client(gateway) as client:
        assert client.health().status == "ok"
        ready = client.readiness()
        assert ready.ready and ready.triton and ready.model.embedding_size == 128

        # the gallery: create, look up, search, update
        obama = client.create_identity("sync-route-obama", "Barack Obama", {"team": "client"})
        biden = client.create_identity("sync-route-biden", "Joe Biden")
        assert isinstance(obama, m.Identity) and obama.face_count == 0 and obama.metadata == {"team": "client"}
        found = client.find_identity("sync-route-obama")
        assert found is not None and found.id == obama.id
        assert client.find_identity("sync-route-nobody") is None
        assert {i.id for i in client.iter_identities(page_size=1, q="SYNC-ROUTE-")} == {obama.id, biden.id}
        page = client.list_identities(1, q="sync-route-")
        assert len(page.items) == 1 and page.next_cursor == page.items[0].id
        assert client.get_identity(obama.id).external_id == "sync-route-obama"
        renamed = client.update_identity(biden.id, name="Joseph R. Biden", metadata=None)  # external_id: unset
        assert (renamed.name, renamed.external_id, renamed.metadata) == ("Joseph R. Biden", "sync-route-biden", {})

        # enrolment from a path, from bytes, and with the caller's landmarks
        faces = client.enroll(obama.id, [photos["obama"], photos["obama3"].read_bytes()], retain_crop=True)
        assert len(faces) == 2 and all(f.current and f.has_crop for f in faces)
        group = client.detect(photos["t1"], mode="detect_all")
        assert len(group.faces) == 6 and all(f.box and len(f.landmarks or []) == 5 for f in group.faces)
        landmarked = FaceImage(photos["biden"], mode="landmarks",
                               landmarks=client.detect(photos["biden"]).faces[0].landmarks)
        assert len(client.enroll(biden.id, landmarked)) == 1

        # faces: a page, the iterator, the crop
        first = client.list_faces(obama.id, limit=1)
        assert [f.id for f in first.items] == [faces[0].id] and first.next_cursor == str(faces[0].id)
        assert [f.id for f in client.iter_faces(obama.id, page_size=1)] == [f.id for f in faces]
        crop = Image.open(io.BytesIO(client.get_face_crop(obama.id, faces[0].id)))
        assert crop.size == (112, 112)

        # an aligned crop as its file and as its raw pixels (a numpy array's bytes): the same embedding
        aligned = np.asarray(Image.open(photos["tom_hanks_aligned"]).convert("RGB"))
        as_file = client.embed(FaceImage(photos["tom_hanks_aligned"], mode="aligned")).faces[0].embedding
        as_pixels = client.embed(FaceImage(aligned.tobytes(), mode="aligned", format="rgb24")).faces[0].embedding
        assert np.allclose(as_file, as_pixels, atol=1e-6)

        # recognition
        vectors = client.embed([photos["obama2"], photos["biden"]])
        assert len(vectors.faces) == 2 and vectors.model.name == "sface"
        obama2 = np.asarray(vectors.faces[0].embedding)
        by_image = client.identify(photos["obama2"], top_k=3)
        by_vector = client.identify(embedding=obama2, top_k=3)  # a numpy array is a sequence of floats
        for answer in (by_image, by_vector):
            match = answer.faces[0].match
            assert match is not None and "obama" in (match.external_id or "")
            assert answer.faces[0].candidates[0].similarity > answer.threshold
        versus = client.verify(photos["obama"], other=photos["biden"])
        assert versus.match is False and len(versus.faces) == 2
        same = client.verify(embedding=obama2, identity_id=obama.id)
        assert same.match is True and same.identity_id == obama.id
        given = client.verify(embedding=obama2, other_embedding=vectors.faces[1].embedding)
        assert given.similarity == pytest.approx(float(obama2 @ np.asarray(vectors.faces[1].embedding)), abs=1e-5)
        assert given.match is False

        # operations, deletes
        status = client.gallery_status()
        assert status.consistent and status.faces_indexed >= 3
        client.delete_face(obama.id, faces[1].id)
        assert client.get_identity(obama.id).face_count == 1
        client.delete_identity(biden.id)
        client.delete_identity(obama.id)  # other modules identify Obama on this session gateway too
        with pytest.raises(NotFoundError) as gone:
            client.get_identity(biden.id)
        assert gone.value.status == 404 and gone.value.code == "unknown_identity"


def test_errors_are_typed_and_carry_the_stable_code(gateway, photos):
    grey = io.BytesIO()
    Image.new("RGB", (160, 160), (128, 128, 128)).save(grey, format="PNG")
    with _client(gateway) as client:
        client.create_identity("client-dup")
        with pytest.raises(ConflictError) as dup:
            client.create_identity("client-dup")
        assert (dup.value.status, dup.value.code) == (409, "duplicate_external_id")
        assert "client-dup" in dup.value.message and dup.value.attempts == 1  # a 4xx is never retried
        with pytest.raises(UnprocessableError) as no_face:
            client.embed(grey.getvalue())
        assert (no_face.value.status, no_face.value.code) == (422, "no_face")
        with pytest.raises(UnprocessableError) as size:
            client.identify(embedding=[0.5] * 7)
        assert size.value.code == "embedding_size_mismatch"
        with pytest.raises(NotFoundError) as no_face_id:
            client.delete_face(client.create_identity().id, 999_999_999)
        assert no_face_id.value.code == "unknown_face"
        assert isinstance(no_face_id.value, ClientRequestError) and isinstance(no_face_id.value, CdfaceAPIError)
    with _client(gateway, "identify") as client:
        with pytest.raises(PermissionDeniedError) as denied:
            client.create_identity("client-denied")
        assert (denied.value.status, denied.value.code) == (403, "forbidden")
    with Client(gateway.url, api_key="cdf_nope_nope") as client:
        with pytest.raises(AuthenticationError) as unknown_key:
            client.list_identities()
        assert (unknown_key.value.status, unknown_key.value.code) == (401, "invalid_api_key")


def test_the_async_client(gateway, photos):
    async def main() -> None:
        async with AsyncClient(gateway.url, api_key=gateway.keys["admin"]) as client:
            assert (await client.health()).status == "ok" and (await client.readiness()).ready
            person = await client.create_identity("async-obama", "Async Obama")
            faces = await client.enroll(person.id, photos["obama"], retain_crop=True)
            crop, vectors = await asyncio.gather(client.get_face_crop(person.id, faces[0].id),
                                                 client.embed(photos["obama2"]))
            assert Image.open(io.BytesIO(crop)).size == (112, 112)
            answer = await client.identify(embedding=vectors.faces[0].embedding, top_k=1)
            assert answer.faces[0].match is not None and "obama" in (answer.faces[0].match.external_id or "")
            assert [i.id async for i in client.iter_identities(q="async-obama")] == [person.id]
            assert [f.id async for f in client.iter_faces(person.id, page_size=1)] == [faces[0].id]
            assert (await client.verify(photos["obama3"], identity_id=person.id)).match is True
            await client.delete_identity(person.id)
            with pytest.raises(NotFoundError) as gone:
                await client.get_identity(person.id)
            assert gone.value.code == "unknown_identity"

    asyncio.run(main())


def test_a_gateway_that_is_not_there_raises_a_connection_error_after_the_retries(tmp_path):
    from cdface.devtools.triton_local import free_port

    with Client(f"http://127.0.0.1:{free_port()}", api_key="cdf_x_y",
                retry=RetryPolicy(retries=2, backoff_s=0.05)) as client:
        with pytest.raises(CdfaceConnectionError) as refused:
            client.health()
    assert refused.value.attempts == 3


def _answered_503(gw, route: str) -> int:
    """How many 503s the gateway answered on ``route`` (its Prometheus counter: the server's own count)."""
    text = httpx.get(gw.url + "/metrics", timeout=10).text
    found = re.search(r'cdface_http_requests_total\{method="POST",route="%s",status="503"\} ([0-9.e+]+)'
                      % re.escape(route), text)
    return int(float(found.group(1))) if found else 0


def test_503_while_triton_is_stopped_is_retried_then_raised_or_answered_when_triton_returns(
        model_repo, photos, tmp_path):
    from cdface.devtools.triton_local import TritonServer, free_port

    ports = dict(http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    server = TritonServer(model_repo, log_path=tmp_path / "triton.log", **ports).start()
    gw = start_gateway(tmp_path / "gw", server.grpc_url, model_repo)
    try:
        with Client(gw.url, api_key=gw.keys["admin"], retry=RetryPolicy(retries=2, max_wait_s=30)) as client:
            person = client.create_identity("outage-obama")
            client.enroll(person.id, photos["obama"])
            server.stop()

            before = _answered_503(gw, "/v1/identify")
            with pytest.raises(ServiceUnavailableError) as unavailable:
                client.identify(photos["obama2"])
            error = unavailable.value
            assert isinstance(error, ServerError) and error.status == 503 and error.code == "model_unavailable"
            assert error.retry_after is not None and error.retry_after >= 1
            assert error.attempts == 3 and _answered_503(gw, "/v1/identify") == before + 3  # sent 3 times

            # The total wait is bounded: a Retry-After beyond the budget is not waited for.
            with Client(gw.url, api_key=gw.keys["admin"], retry=RetryPolicy(retries=10, max_wait_s=0.5)) as brief:
                with pytest.raises(ServiceUnavailableError) as at_once:
                    brief.identify(photos["obama2"])
            assert at_once.value.attempts == 1
            # What needs no model keeps working, and readiness is an answer, not an error.
            assert client.get_identity(person.id).face_count == 1
            ready = client.readiness()
            assert ready.ready and ready.triton is False

            # Retried until Triton is back: the answer comes, no error.
            patient = Client(gw.url, api_key=gw.keys["admin"], retry=RetryPolicy(retries=100, max_wait_s=240))
            outcome: dict[str, object] = {}

            def identify() -> None:
                try:
                    outcome["answer"] = patient.identify(photos["obama2"], top_k=1)
                except Exception as exc:  # reported below
                    outcome["error"] = exc

            waiting = _answered_503(gw, "/v1/identify")
            worker = threading.Thread(target=identify)
            worker.start()
            while _answered_503(gw, "/v1/identify") == waiting and worker.is_alive():
                worker.join(0.1)  # until the gateway has refused the patient client at least once
            server.start()  # same ports
            worker.join(300)
            patient.close()
            assert "error" not in outcome, outcome.get("error")
            answer = outcome["answer"]
            assert isinstance(answer, m.Identification) and answer.faces[0].match is not None
            assert answer.faces[0].match.identity_id == person.id
            assert _answered_503(gw, "/v1/identify") > waiting  # it was refused, then retried
    finally:
        gw.stop()
        server.stop()


def test_the_readme_client_snippet_runs_against_the_gateway(gateway, monkeypatch, capsys):
    from .conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("### Python client", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "http://127.0.0.1:8080" in snippet
    monkeypatch.setenv("CDFACE_KEY", gateway.keys["admin"])
    try:
        exec(compile(snippet.replace("http://127.0.0.1:8080", gateway.url), "README.md", "exec"), {})
    finally:
        with _client(gateway) as client:  # other modules identify Obama on this session gateway too
            made = client.find_identity("obama")
            if made is not None:
                client.delete_identity(made.id)
    printed = capsys.readouterr().out.splitlines()
    # The best candidate is an Obama (other tests enroll him under other names): above the threshold.
    _, similarity, word, threshold = printed[0].rsplit(" ", 3)
    assert word == "threshold" and float(similarity) > float(threshold)
    assert printed[1] == "same person: True"
    assert printed[2] == "404 unknown_identity"
