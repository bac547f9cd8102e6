"""Regression tests for the gateway faults of issue 11 (items 1-4, and two of item 8), on a real gateway and Triton.

The module runs its own gateway (fresh process, fresh SQLite gallery): phantom faces came from
detectors that had not yet run, so the first requests of a new process are the ones that matter.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from cdface.serving.settings import Settings

from .conftest import b64, start_gateway

pytestmark = pytest.mark.slow


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=95, **kw)
    return out.getvalue()


def _declared_png(width: int, height: int) -> bytes:
    """A PNG of a few hundred bytes whose header declares width x height RGB pixels (all zero, zlib-compressed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compressobj(9)
    data = b"".join(rows.compress(b"\0" * (1 + 3 * width)) for _ in range(64)) + rows.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


PHANTOM = _png(np.full((8, 640, 3), 128, np.uint8))  # 640 wide, 8 high: YuNet's unsafe input size
WHITE_CROP = _png(np.full((112, 112, 3), 255, np.uint8))
GATE_DEFAULT = Settings.model_fields["min_crop_face_score"].default  # the production setting, not the tests'
OBAMA = "Barack Obama"  # the name of every identity this module enrolls from Obama's photos


@pytest.fixture(scope="module")
def gw(triton, model_repo, tmp_path_factory):
    gateway = start_gateway(tmp_path_factory.mktemp("faults"), triton.grpc_url, model_repo,
                            extra_env={"CDFACE_SERVE_MAX_REQUEST_BYTES": str(16 * 1024 * 1024),
                                       "CDFACE_SERVE_MIN_CROP_FACE_SCORE": str(GATE_DEFAULT)})
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def obama_crop(photos) -> bytes:
    """A real aligned 112x112 crop of obama.jpg, cut by the detector and alignment serving uses."""
    from cdface.core import assets
    from cdface.core.detection import Detector, extract_faces
    from cdface.core.imaging import read_image

    detector = Detector(assets.yunet_onnx(), instances=1)
    return _png(extract_faces(read_image(photos["obama"]), "detect", detector=detector)[0].crop)


def _error(r) -> str:
    return r.json()["error"]["code"]


# -- 1. phantom faces -------------------------------------------------------------------------------


def test_elongated_image_never_yields_a_phantom_face(gw, photos):
    sizes = {name: Image.open(photos[name]).size for name in ("obama", "obama2", "biden", "t1")}
    with gw.client("embed") as c:
        for i in range(50):
            r = c.post("/v1/detect", json={"images": [{"data": b64(PHANTOM), "mode": "detect"}]})
            assert (r.status_code, _error(r)) == (422, "no_face"), (i, r.text[:300])
            name = list(sizes)[i % len(sizes)]
            r = c.post("/v1/detect", files={"images": (f"{name}.jpg", photos[name].read_bytes(), "image/jpeg")},
                       data={"mode": "detect_all"})
            assert r.status_code == 200, (i, name, r.text[:300])
            faces = r.json()["faces"]
            assert faces, (i, name)
            width, height = sizes[name]
            for face in faces:  # every box and landmark finite and inside the photo
                x, y, w, h = face["box"]
                assert all(math.isfinite(v) for v in (x, y, w, h))
                assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= width + 0.1 and y + h <= height + 0.1
                assert all(0 <= px <= width and 0 <= py <= height for px, py in face["landmarks"])
                assert 0.7 <= face["quality"]["score"] <= 1.0


def test_detection_is_a_pure_function_of_its_input(yunet_onnx, photos):
    """Fresh detectors (the state that used to give phantoms) and used ones answer the same."""
    from cdface.core.detection import Detector
    from cdface.core.imaging import read_image

    phantom = np.full((8, 640, 3), 128, np.uint8)
    obama = read_image(photos["obama"])
    reference = Detector(yunet_onnx, instances=1).detect(obama)
    assert len(reference) >= 1
    for _ in range(8):
        detector = Detector(yunet_onnx, instances=1)
        for image in (phantom, phantom.transpose(1, 0, 2).copy(), np.full((8, 8, 3), 128, np.uint8)):
            # YuNet itself finds nothing (before the finite-and-inside check): its unsafe sizes are padded away
            assert len(detector._rows(np.ascontiguousarray(image[..., ::-1]), detector.score)) == 0
            assert len(detector.detect(image)) == 0
        np.testing.assert_allclose(detector.detect(obama), reference, rtol=0, atol=1e-3)


def test_detector_rows_are_finite_and_inside_the_image():
    from cdface.core.detection import _inside

    def row(x, y, w, h, score=0.9, points=None):
        pts = points if points is not None else [20, 20, 40, 20, 30, 30, 22, 40, 38, 40]
        return [x, y, w, h, *pts, score]

    rows = np.array([
        row(10, 10, 40, 40),  # a face
        row(6e32, np.nan, 0, np.inf, score=1.0),  # the phantom of issue 11
        row(-5, -5, 40, 300),  # overhangs: clipped to the image
        row(10, 10, 40, 40, points=[20, 20, 40, 20, 30, 30, 22, 40, 38, 500]),  # a landmark below the image
        row(200, 200, 40, 40),  # wholly outside
        row(10, 10, 40, 40, score=1.5),  # not a probability
    ], np.float64)
    kept = _inside(rows, 100, 100)
    assert kept.shape == (2, 15)
    np.testing.assert_allclose(kept[0, :4], [10, 10, 40, 40])
    np.testing.assert_allclose(kept[1, :4], [0, 0, 35, 100])


# -- 2. face-presence and quality gate ----------------------------------------------------------------


def test_blank_crop_is_refused_in_every_use_and_a_real_crop_accepted(gw, photos, obama_crop):
    blank = {"data": b64(WHITE_CROP), "mode": "aligned"}
    real = {"data": b64(obama_crop), "mode": "aligned"}
    with gw.client("admin") as c:
        person = c.post("/v1/identities", json={"external_id": "gate-obama", "name": OBAMA}).json()["id"]
        r = c.post(f"/v1/identities/{person}/faces", json={"images": [blank]})
        assert (r.status_code, _error(r)) == (422, "no_face_in_crop"), r.text
        r = c.post("/v1/verify", json={"image": blank, "other": real})
        assert (r.status_code, _error(r)) == (422, "no_face_in_crop"), r.text
        r = c.post("/v1/identify", json={"image": blank})
        assert (r.status_code, _error(r)) == (422, "no_face_in_crop"), r.text
        r = c.post("/v1/embeddings", json={"images": [real, blank]})
        assert (r.status_code, _error(r)) == (422, "no_face_in_crop") and "image 1" in r.text, r.text
        # (a pre-aligned crop is checked while Triton embeds it: the check still decides, and reports its score)
        r = c.post("/v1/embeddings", json={"images": [real]})
        assert r.status_code == 200 and r.json()["faces"][0]["quality"]["crop_score"] >= 0.7, r.text
        # landmarks mode: five plausible points on a blank photo align a blank crop
        points = [[38.3, 51.7], [73.5, 51.5], [56.0, 71.7], [41.5, 92.4], [70.7, 92.2]]
        r = c.post("/v1/embeddings", json={"images": [{"data": b64(_png(np.full((200, 200, 3), 255, np.uint8))),
                                                       "mode": "landmarks", "landmarks": points}]})
        assert (r.status_code, _error(r)) == (422, "no_face_in_crop"), r.text

        r = c.post(f"/v1/identities/{person}/faces", json={"images": [real]})
        assert r.status_code == 201, r.text
        assert r.json()["faces"][0]["quality"]["crop_score"] >= 0.7
        assert c.get(f"/v1/identities/{person}").json()["face_count"] == 1  # the blank was never stored
        r = c.post("/v1/verify", json={"image": real, "other": {"data": b64(photos["obama2"])}})
        assert r.status_code == 200 and r.json()["match"] is True, r.text
        r = c.post("/v1/verify", json={"image": {"data": b64(photos["obama3"])}, "identity_id": person})
        assert r.status_code == 200 and r.json()["match"] is True, r.text


def test_enrollment_refuses_a_blurred_face_that_can_still_be_embedded(gw, obama_crop):
    import cv2

    crop = np.asarray(Image.open(io.BytesIO(obama_crop)).convert("RGB"))
    blurred = {"data": b64(_png(cv2.GaussianBlur(crop, (0, 0), 3))), "mode": "aligned"}
    with gw.client("admin") as c:
        person = c.post("/v1/identities", json={"external_id": "gate-blurred"}).json()["id"]
        r = c.post(f"/v1/identities/{person}/faces", json={"images": [blurred]})
        assert (r.status_code, _error(r)) == (422, "low_quality_face"), r.text
        assert "sharpness" in r.json()["error"]["message"]
        assert c.post("/v1/embeddings", json={"images": [blurred]}).status_code == 200  # the floor is enrollment's


def test_when_the_largest_face_fails_the_check_the_next_one_that_passes_is_used(gw, photos, yunet_onnx):
    """In detect mode the largest face is embedded while it is checked; when the check refuses it, the face the
    check picks (the next largest that passes) is embedded in its place, as when the check ran first."""
    from cdface.core.detection import Detector

    turned = Image.open(photos["obama2"]).convert("RGB").transpose(Image.Transpose.ROTATE_180)
    upright = Image.open(photos["biden"]).convert("RGB")
    upright = upright.resize((upright.width // 3, upright.height // 3))
    canvas = Image.new("RGB", (turned.width + upright.width + 40, max(turned.height, upright.height)), "white")
    canvas.paste(turned, (0, 0))
    canvas.paste(upright, (turned.width + 40, 0))
    photo = {"data": b64(_jpeg(canvas))}
    with gw.client("admin") as c:
        r = c.post("/v1/identities", json={"external_id": "largest-fails-biden", "name": "Joe Biden",
                                           "images": [{"data": b64(photos["biden"])}]})
        assert r.status_code == 201, r.text
        # YuNet finds both, the upside-down face largest; the check refuses it, alone it is refused.
        rows = Detector(yunet_onnx).detect(np.asarray(canvas))
        assert len(rows) >= 2 and rows[0][0] < turned.width < rows[1][0]
        r = c.post("/v1/identify", json={"image": {"data": b64(_jpeg(turned))}})
        assert (r.status_code, _error(r)) == (422, "face_upside_down"), r.text
        r = c.post("/v1/identify", json={"image": photo, "top_k": 1})
        assert r.status_code == 200, r.text
        (face,) = r.json()["faces"]
        assert face["box"][0] > turned.width and face["match"]["name"] == "Joe Biden", r.text
        r = c.post("/v1/embeddings", json={"images": [photo]})
        assert r.status_code == 200 and r.json()["faces"][0]["box"][0] > turned.width, r.text


# -- 3. upside-down photos ------------------------------------------------------------------------------


def test_upside_down_photo_is_never_matched_to_someone_else(gw, photos):
    upright = Image.open(photos["obama2"]).convert("RGB")
    turned = _jpeg(upright.transpose(Image.Transpose.ROTATE_180))  # no EXIF: the pixels are upside down
    with gw.client("admin") as c:
        ids = {}
        for name, person in (("obama", OBAMA), ("biden", "Joe Biden")):
            r = c.post("/v1/identities", json={"external_id": f"turn-{name}", "name": person,
                                               "images": [{"data": b64(photos[name])}]})
            assert r.status_code == 201, r.text
            ids[name] = r.json()["id"]
        r = c.post("/v1/identify", json={"image": {"data": b64(turned)}, "top_k": 3})
        if r.status_code == 200:  # the other allowed outcome: identified as Obama (or not at all)
            assert all(f["match"] is None or f["match"]["name"] == OBAMA for f in r.json()["faces"]), r.text
        else:
            assert (r.status_code, _error(r)) == (422, "face_upside_down"), r.text
        r = c.post("/v1/verify", json={"image": {"data": b64(turned)}, "identity_id": ids["biden"]})
        assert r.status_code == 422 or r.json()["match"] is False, r.text

        # The same pixels with EXIF orientation 3 (rotate 180 to display) are turned upright and identified.
        exif = Image.Exif()
        exif[0x0112] = 3
        tagged = _jpeg(upright.transpose(Image.Transpose.ROTATE_180), exif=exif.tobytes())
        r = c.post("/v1/identify", json={"image": {"data": b64(tagged)}, "top_k": 1})
        assert r.status_code == 200 and r.json()["faces"][0]["match"]["name"] == OBAMA, r.text
        r = c.post("/v1/verify", json={"image": {"data": b64(tagged)}, "identity_id": ids["obama"]})
        assert r.status_code == 200 and r.json()["match"] is True, r.text


# -- 4. pixel budgets from the header ------------------------------------------------------------------


def _peak_rss_kb(pid: int) -> int:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


@pytest.mark.parametrize("mode", ["detect", "detect_all"])
def test_forty_megapixel_header_is_refused_before_decoding(gw, mode):
    bomb = _declared_png(8000, 5000)  # 40 MP: 120 MB as RGB once decoded
    assert len(bomb) < 64 * 1024
    with gw.client("embed") as c:
        c.post("/v1/detect", json={"images": [{"data": b64(PHANTOM)}]})  # the process's usual peak, first
        before = _peak_rss_kb(gw.proc.pid)
        for _ in range(4):
            r = c.post("/v1/embeddings", json={"images": [{"data": b64(bomb), "mode": mode}]})
            assert (r.status_code, _error(r)) == (422, "image_too_many_pixels"), r.text
            assert "8000x5000" in r.json()["error"]["message"]
            r = c.post("/v1/detect", files={"images": ("bomb.png", bomb, "image/png")}, data={"mode": mode})
            assert (r.status_code, _error(r)) == (422, "image_too_many_pixels"), r.text
        assert _peak_rss_kb(gw.proc.pid) - before < 60_000  # no 120 MB decode happened


# -- 8a. malformed multipart ------------------------------------------------------------------------------


def _multipart_routes(spec: dict) -> list[str]:
    routes = []
    for path, ops in spec["paths"].items():
        content = ops.get("post", {}).get("requestBody", {}).get("content", {})
        if "multipart/form-data" in content:
            routes.append(path)
    return routes


def test_broken_multipart_bodies_answer_400_malformed_multipart(gw, photos):
    photo = photos["obama"].read_bytes()
    part = (b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            b'Content-Type: image/jpeg\r\n\r\n' + photo + b'\r\n--XyZ--\r\n')
    broken = {
        "no boundary": ("multipart/form-data", part),
        "wrong boundary": ("multipart/form-data; boundary=AbC", part),
        "truncated": ("multipart/form-data; boundary=XyZ", part[: len(part) // 2]),
        "closing boundary cut": ("multipart/form-data; boundary=XyZ", part[:-9]),
    }
    with gw.client("admin") as c:
        person = c.post("/v1/identities", json={"external_id": "multipart-target"}).json()["id"]
        routes = _multipart_routes(c.get("/openapi.json").json())
        assert {"/v1/embeddings", "/v1/detect", "/v1/verify", "/v1/identify",
                "/v1/identities/{identity_id}/faces"} <= set(routes)
        for route in routes:
            path = route.replace("{identity_id}", person)
            for what, (content_type, body) in broken.items():
                r = c.post(path, content=body, headers={"content-type": content_type})
                assert (r.status_code, _error(r)) == (400, "malformed_multipart"), (route, what, r.text)
        # the well-formed body still works (one 'image' file, as identify takes it)
        r = c.post("/v1/identify", content=part, headers={"content-type": "multipart/form-data; boundary=XyZ"})
        assert r.status_code == 200, r.text
        assert gw.alive()


# -- 8b. create an identity with its faces in one transaction ----------------------------------------------


def test_identity_is_created_with_its_faces_or_not_at_all(gw, photos):
    good = {"data": b64(photos["obama"])}
    faceless = {"data": b64(_png(np.full((300, 300, 3), 128, np.uint8)))}
    with gw.client("admin") as c:
        r = c.post("/v1/identities", json={"external_id": "atomic-none", "images": [good, faceless]})
        assert (r.status_code, _error(r)) == (422, "no_face"), r.text
        assert r.json()["error"]["message"].startswith("image 1:")
        assert c.get("/v1/identities", params={"external_id": "atomic-none"}).json()["items"] == []
        # the external id is still free: nothing was created
        r = c.post("/v1/identities", json={"external_id": "atomic-none", "name": OBAMA,
                                           "images": [good, {"data": b64(photos["obama2"])}], "retain_crop": False})
        assert r.status_code == 201, r.text
        created = r.json()
        assert created["face_count"] == 2 and len(created["faces"]) == 2
        assert all(f["identity_id"] == created["id"] and not f["has_crop"] for f in created["faces"])
        listed = c.get(f"/v1/identities/{created['id']}/faces").json()["items"]
        assert [f["id"] for f in listed] == [f["id"] for f in created["faces"]]
        # searchable on return
        r = c.post("/v1/verify", json={"image": {"data": b64(photos["obama3"])}, "identity_id": created["id"]})
        assert r.status_code == 200 and r.json()["match"] is True, r.text
        # a refused duplicate external id adds no faces either
        r = c.post("/v1/identities", json={"external_id": "atomic-none", "images": [good]})
        assert (r.status_code, _error(r)) == (409, "duplicate_external_id"), r.text
        assert c.get(f"/v1/identities/{created['id']}").json()["face_count"] == 2
        # without images it is the plain create it always was
        r = c.post("/v1/identities", json={"external_id": "atomic-plain"})
        assert r.status_code == 201 and r.json()["faces"] == [] and r.json()["face_count"] == 0
