"""End to end on real photos: the wrapped SFace model in a real Triton, the gateway over real HTTP, SQLite."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from .conftest import b64

pytestmark = pytest.mark.slow

PEOPLE = {"obama": "Barack Obama", "biden": "Joe Biden"}


@pytest.fixture(scope="module")
def enrolled(gateway, photos):
    """obama.jpg and biden.jpg enrolled (JSON and multipart), each as its own identity."""
    ids = {}
    with gateway.client("enroll") as c:
        for person, name in PEOPLE.items():
            r = c.post("/v1/identities", json={"external_id": f"e2e-{person}", "name": name})
            assert r.status_code == 201, r.text
            ids[person] = r.json()["id"]
        r = c.post(f"/v1/identities/{ids['obama']}/faces", json={"images": [{"data": b64(photos["obama"])}]})
        assert r.status_code == 201, r.text
        with open(photos["biden"], "rb") as f:
            r = c.post(f"/v1/identities/{ids['biden']}/faces", files=[("images", ("biden.jpg", f, "image/jpeg"))])
        assert r.status_code == 201, r.text
        assert r.json()["faces"][0]["current"] and r.json()["faces"][0]["has_crop"]
    return ids


def test_health_readiness_metrics_and_docs_need_no_key(gateway):
    with gateway.client(scope="") as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["triton"] and ready.json()["gallery"]
        assert ready.json()["model"]["name"] == "sface" and ready.json()["model"]["embedding_size"] == 128
        assert "cdface_http_requests_total" in c.get("/metrics").text
        assert c.get("/docs").status_code == 200
        spec = c.get("/openapi.json").json()
        assert "multipart/form-data" in spec["paths"]["/v1/embeddings"]["post"]["requestBody"]["content"]


@pytest.mark.parametrize("probe", ["obama2", "obama3"])
def test_identify_finds_obama_first_and_above_threshold(gateway, photos, enrolled, probe):
    with gateway.client("identify") as c:
        r = c.post("/v1/identify", json={"image": {"data": b64(photos[probe])}, "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["threshold_source"] == "configured" and body["threshold"] == pytest.approx(0.363)
    face = body["faces"][0]
    assert face["candidates"][0]["identity_id"] == enrolled["obama"]
    assert face["candidates"][0]["similarity"] >= body["threshold"]
    assert face["match"]["external_id"] == "e2e-obama"


def test_verify_obama_vs_biden_is_no_match_and_obama_vs_obama_is(gateway, photos, enrolled):
    with gateway.client("verify") as c:
        no = c.post("/v1/verify", json={"image": {"data": b64(photos["obama"])}, "other": {"data": b64(photos["biden"])}})
        assert no.status_code == 200, no.text
        assert no.json()["match"] is False and no.json()["similarity"] < no.json()["threshold"]
        with open(photos["obama2"], "rb") as f:
            yes = c.post("/v1/verify", files={"image": ("o2.jpg", f, "image/jpeg")},
                         data={"identity_id": enrolled["obama"]})
        assert yes.status_code == 200, yes.text
        assert yes.json()["match"] is True and yes.json()["identity_id"] == enrolled["obama"]


def test_every_face_in_t1_is_detected_and_enrolls_separately(gateway, photos):
    with gateway.client("admin") as c:
        r = c.post("/v1/embeddings", json={"images": [{"data": b64(photos["t1"]), "mode": "detect_all"}]})
        assert r.status_code == 200, r.text
        faces = r.json()["faces"]
        assert len(faces) == 6
        assert all(f["box"] and f["quality"]["score"] > 0.5 and len(f["embedding"]) == 128 for f in faces)
        norms = np.linalg.norm(np.array([f["embedding"] for f in faces]), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-4)
        ids = []
        for i, face in enumerate(faces):
            ident = c.post("/v1/identities", json={"external_id": f"t1-{i}"}).json()["id"]
            r = c.post(f"/v1/identities/{ident}/faces", json={"images": [
                {"data": b64(photos["t1"]), "mode": "landmarks", "landmarks": face["landmarks"]}]})
            assert r.status_code == 201, r.text
            ids.append(ident)
        r = c.post("/v1/identify", json={"image": {"data": b64(photos["t1"]), "mode": "detect_all"}, "top_k": 1})
        assert r.status_code == 200, r.text
        found = [f["match"]["identity_id"] if f["match"] else None for f in r.json()["faces"]]
        assert found == ids  # same detection order, each face finds its own identity


def test_aligned_crop_mode_and_identity_crud(gateway, photos, enrolled):
    with gateway.client("admin") as c:
        r = c.post("/v1/embeddings", json={"images": [{"data": b64(photos["tom_hanks_aligned"]), "mode": "aligned"}]})
        assert r.status_code == 200 and r.json()["faces"][0]["box"] is None
        # the same crop as its raw pixels (format rgb24), in JSON and as a file part: the same embedding
        pixels = np.asarray(Image.open(photos["tom_hanks_aligned"]).convert("RGB")).tobytes()
        raw = c.post("/v1/embeddings", json={"images": [{"data": b64(pixels), "mode": "aligned", "format": "rgb24"}]})
        form = c.post("/v1/embeddings", files={"images": ("crop.rgb", pixels)},
                      data={"mode": "aligned", "format": "rgb24"})
        for answer in (raw, form):
            assert answer.status_code == 200, answer.text
            assert np.allclose(answer.json()["faces"][0]["embedding"], r.json()["faces"][0]["embedding"], atol=1e-6)
        short = c.post("/v1/embeddings", json={"images": [{"data": b64(pixels[:-3]), "mode": "aligned",
                                                           "format": "rgb24"}]})
        assert short.status_code == 422 and short.json()["error"]["code"] == "not_aligned_crop"
        assert "37632" in short.json()["error"]["message"]
        photo = c.post("/v1/embeddings", json={"images": [{"data": b64(pixels), "format": "rgb24"}]})  # mode detect
        assert photo.status_code == 422 and photo.json()["error"]["code"] == "invalid_request"
        r = c.patch(f"/v1/identities/{enrolled['biden']}", json={"metadata": {"role": "vp"}})
        assert r.status_code == 200 and r.json()["metadata"] == {"role": "vp"} and r.json()["name"] == "Joe Biden"
        got = c.get(f"/v1/identities/{enrolled['obama']}").json()
        assert got["face_count"] == 1 and got["faces_needing_reenrolment"] == 0
        page = c.get("/v1/identities", params={"limit": 1}).json()
        assert len(page["items"]) == 1 and page["next_cursor"]
        seen, cursor = [], None
        while True:
            params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
            page = c.get("/v1/identities", params=params).json()
            seen += [i["id"] for i in page["items"]]
            cursor = page["next_cursor"]
            if not cursor:
                break
        assert len(seen) == len(set(seen)) and set(enrolled.values()) <= set(seen)
        faces = c.get(f"/v1/identities/{enrolled['obama']}/faces").json()["items"]
        assert len(faces) == 1 and faces[0]["model"] == "sface:1"
        status = c.get("/v1/gallery").json()
        assert status["consistent"] and status["faces_indexed"] == status["store_faces"]


def test_similarity_of_a_face_with_itself_is_at_most_one(gateway, photos):
    # Unit vectors' dot products can round past 1 (1.0000001 was seen); the API reports cosines.
    crop = {"data": b64(photos["tom_hanks_aligned"]), "mode": "aligned"}
    with gateway.client("admin") as c:
        same = c.post("/v1/verify", json={"image": crop, "other": crop})
        assert same.status_code == 200, same.text
        assert same.json()["match"] is True and 0.999 <= same.json()["similarity"] <= 1.0
        person = c.post("/v1/identities", json={}).json()["id"]
        assert c.post(f"/v1/identities/{person}/faces", json={"images": [crop]}).status_code == 201
        found = c.post("/v1/identify", json={"image": crop, "top_k": 3})
        assert found.status_code == 200, found.text
        assert all(-1.0 <= cand["similarity"] <= 1.0 for cand in found.json()["faces"][0]["candidates"])
        assert found.json()["faces"][0]["candidates"][0]["similarity"] >= 0.999
        assert c.delete(f"/v1/identities/{person}").status_code == 204
