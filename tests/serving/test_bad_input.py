"""A corpus of bad requests: each gets a 4xx JSON error with a stable code, and the gateway stays healthy."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from .conftest import b64

pytestmark = pytest.mark.slow


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array, mode=mode).save(out, format="PNG") if mode else Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def _encode(img: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def _huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A tiny file whose header declares width x height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


GREY = np.full((200, 200, 3), 128, np.uint8)


@pytest.fixture(scope="module")
def corpus(photos):
    obama = photos["obama"].read_bytes()
    cmyk_blank = _encode(Image.fromarray(GREY).convert("CMYK"), "JPEG")
    grey16 = _encode(Image.fromarray(np.full((200, 200), 30000, np.uint16)), "PNG")
    gif = _encode(Image.fromarray(GREY), "GIF")
    img = lambda data, **kw: {"images": [{"data": b64(data), **kw}]}  # noqa: E731
    one = lambda data, **kw: {"image": {"data": b64(data), **kw}}  # noqa: E731
    return [
        # (name, method, path, request kwargs, status, code)
        ("empty body", "post", "/v1/embeddings", {"content": b"", "headers": {"content-type": "application/json"}},
         400, "empty_body"),
        ("malformed json", "post", "/v1/embeddings", {"content": b"{not json", "headers": {"content-type": "application/json"}},
         400, "malformed_json"),
        ("truncated jpeg", "post", "/v1/embeddings", {"json": img(obama[: len(obama) // 3])}, 422, "corrupt_image"),
        ("text as image", "post", "/v1/embeddings", {"json": img(b"hello, I am not a picture" * 10)}, 422,
         "unsupported_image"),
        ("gif", "post", "/v1/embeddings", {"json": img(gif)}, 422, "unsupported_image"),
        ("png declaring 20000x20000", "post", "/v1/embeddings", {"json": img(_huge_png())}, 422,
         "image_too_many_pixels"),
        ("1x1 image", "post", "/v1/embeddings", {"json": img(_png(np.zeros((1, 1, 3), np.uint8)))}, 422,
         "image_too_small"),
        ("no face", "post", "/v1/embeddings", {"json": img(_png(GREY))}, 422, "no_face"),
        ("cmyk without a face", "post", "/v1/embeddings", {"json": img(cmyk_blank)}, 422, "no_face"),
        ("16-bit without a face", "post", "/v1/embeddings", {"json": img(grey16)}, 422, "no_face"),
        ("wrong content type", "post", "/v1/embeddings", {"content": obama, "headers": {"content-type": "image/jpeg"}},
         415, "unsupported_media_type"),
        ("invalid base64", "post", "/v1/embeddings", {"json": {"images": [{"data": "!!!not*base64***"}]}}, 422,
         "invalid_base64"),
        ("oversize body", "post", "/v1/embeddings", {"content": b"x" * (13 * 1024 * 1024),
                                                     "headers": {"content-type": "application/json"}},
         413, "payload_too_large"),
        ("oversize image", "post", "/v1/embeddings", {"json": img(b"\xff" * (8 * 1024 * 1024 + 512 * 1024))}, 413,
         "image_too_large"),
        ("top_k 0", "post", "/v1/identify", {"json": {**one(obama), "top_k": 0}}, 422, "invalid_request"),
        ("top_k negative", "post", "/v1/identify", {"json": {**one(obama), "top_k": -3}}, 422, "invalid_request"),
        ("top_k huge", "post", "/v1/identify", {"json": {**one(obama), "top_k": 10**12}}, 422, "invalid_request"),
        ("top_k true", "post", "/v1/identify", {"json": {**one(obama), "top_k": True}}, 422, "invalid_request"),
        ("malformed json, identities", "post", "/v1/identities",
         {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "malformed_json"),
        ("unknown identity enroll", "post", "/v1/identities/idt_000000000000000000000000/faces", {"json": img(obama)},
         404, "unknown_identity"),
        ("unknown identity get", "get", "/v1/identities/idt_nobody", {}, 404, "unknown_identity"),
        ("duplicate external id", "post", "/v1/identities", {"json": {"external_id": "bad-input-dup"}}, 409,
         "duplicate_external_id"),
        ("landmarks out of the image", "post", "/v1/embeddings",
         {"json": img(obama, mode="landmarks", landmarks=[[10, 10], [50, 10], [30, 30], [15, 50], [5000, 50]])},
         422, "landmarks_out_of_image"),
        ("landmarks missing", "post", "/v1/embeddings", {"json": img(obama, mode="landmarks")}, 422,
         "landmarks_required"),
        ("four landmarks", "post", "/v1/embeddings",
         {"json": img(obama, mode="landmarks", landmarks=[[10, 10], [50, 10], [30, 30], [15, 50]])}, 422,
         "invalid_landmarks"),
        ("aligned mode, not 112x112", "post", "/v1/embeddings", {"json": img(obama, mode="aligned")}, 422,
         "not_aligned_crop"),
        # 36 megapixels declared in a few bytes: refused from the header (decoding would say corrupt_image).
        ("aligned mode, 6000x6000 header", "post", "/v1/embeddings",
         {"json": img(_huge_png(6000, 6000), mode="aligned")}, 422, "not_aligned_crop"),
        ("unknown mode", "post", "/v1/embeddings", {"json": img(obama, mode="guess")}, 422, "invalid_request"),
        ("no images", "post", "/v1/embeddings", {"json": {"images": []}}, 422, "invalid_request"),
        ("unknown field", "post", "/v1/embeddings", {"json": {"images": [], "colour": "blue"}}, 422, "invalid_request"),
        ("too many images", "post", "/v1/embeddings", {"json": {"images": [{"data": "AAAA"}] * 40}}, 422,
         "too_many_images"),
        ("verify with two targets", "post", "/v1/verify",
         {"json": {**one(obama), "other": {"data": b64(obama)}, "identity_id": "idt_x"}}, 422, "invalid_request"),
        ("verify unknown identity", "post", "/v1/verify", {"json": {**one(obama), "identity_id": "idt_nobody"}}, 404,
         "unknown_identity"),
        ("far without a threshold", "post", "/v1/verify",
         {"json": {**one(obama), "other": {"data": b64(obama)}, "far": 1e-5}}, 422, "far_not_available"),
        ("delete unknown face", "delete", "/v1/identities/{ident}/faces/999999", {}, 404, "unknown_face"),
        ("multipart without files", "post", "/v1/embeddings", {"data": {"mode": "detect"},
                                                               "files": {"unused": ("a.txt", b"x")}},
         422, "invalid_request"),
        ("multipart image as text", "post", "/v1/identify", {"data": {"image": "not a file"},
                                                             "files": {"unused": ("a.txt", b"x")}},
         422, "expected_file"),
        ("truncated multipart", "post", "/v1/embeddings",
         {"content": b"--xyz\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a\"\r\n\r\nabc",
          "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, "malformed_multipart"),
        ("multipart landmarks not json", "post", "/v1/embeddings",
         {"data": {"mode": "landmarks", "landmarks": "[[1,2],"}, "files": {"images": ("o.jpg", obama)}}, 422,
         "invalid_landmarks"),
        ("metadata too large", "post", "/v1/identities", {"json": {"metadata": {"x": "y" * 20000}}}, 422,
         "invalid_request"),
        ("page size 0", "get", "/v1/identities", {"params": {"limit": 0}}, 422, "invalid_request"),
        ("unknown route", "get", "/v1/nothing-here", {}, 404, "not_found"),
        ("wrong method", "put", "/v1/embeddings", {"json": {}}, 405, "method_not_allowed"),
    ]


def test_bad_input_corpus_gets_stable_4xx_json_errors_and_the_server_stays_healthy(gateway, corpus, photos):
    with gateway.client("admin") as c:
        ident = c.post("/v1/identities", json={"external_id": "bad-input-dup"}).json()["id"]
        assert len(corpus) >= 25
        failures = []
        for name, method, path, kwargs, status, code in corpus:
            r = c.request(method.upper(), path.format(ident=ident), **kwargs)
            try:
                body = r.json()
            except ValueError:
                body = None
            ok = r.status_code == status and isinstance(body, dict) and body.get("error", {}).get("code") == code \
                and isinstance(body["error"].get("message"), str) and body["error"]["message"]
            if not ok:
                failures.append(f"{name}: {r.status_code} {r.text[:200]}")
        assert not failures, "\n".join(failures)
        # still healthy, and still right
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        r = c.post("/v1/embeddings", json={"images": [{"data": b64(photos["obama"])}]})
        assert r.status_code == 200
    assert gateway.alive()
    log = gateway.log.read_text()
    assert "Traceback" not in log
    assert b64(photos["obama"])[:64] not in log  # no images in logs


def test_cmyk_and_16_bit_photos_are_converted_not_refused(gateway, photos):
    rgb = Image.open(photos["obama"]).convert("RGB")
    cmyk = _encode(rgb.convert("CMYK"), "JPEG")
    grey16 = _encode(Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257)), "PNG")
    rgba = _encode(rgb.convert("RGBA"), "PNG")
    webp = _encode(rgb, "WEBP")
    with gateway.client("embed") as c:
        r = c.post("/v1/embeddings", json={"images": [{"data": b64(x)} for x in (cmyk, grey16, rgba, webp)]})
        assert r.status_code == 200, r.text
        faces = r.json()["faces"]
    assert len(faces) == 4
    e = np.array([f["embedding"] for f in faces])
    assert (e @ e.T).min() > 0.5  # the same face whichever way it was encoded


def test_exif_orientation_is_honoured(gateway, photos):
    rgb = Image.open(photos["obama"]).convert("RGB")
    rotated = rgb.transpose(Image.Transpose.ROTATE_90)  # stored sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and tagged "rotate 90 clockwise to view"
    out = io.BytesIO()
    rotated.save(out, format="JPEG", exif=exif)
    with gateway.client("embed") as c:
        r = c.post("/v1/embeddings", json={"images": [{"data": b64(out.getvalue())}, {"data": b64(photos["obama"])}]})
    assert r.status_code == 200, r.text
    a, b = (np.array(f["embedding"]) for f in r.json()["faces"])
    assert a @ b > 0.8
