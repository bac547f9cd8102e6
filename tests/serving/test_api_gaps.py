"""Issue 14's API gaps, on real photos through the real gateway and Triton: detection without the model, retained
crops (scoped), identity lookup and search, paging an identity's faces, identify/verify by a given embedding,
and explicit OpenAPI operation ids. The store queries behind them run on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from PIL import Image

from cdface.serving.store import ModelKey, NewFace, NotFound, SQLiteStore

from .conftest import b64, start_gateway, vec

pytestmark = pytest.mark.slow

MODEL = ModelKey("face", 1)


# -- the store's queries, on both databases ------------------------------------------------------------------


def test_store_lists_identities_by_exact_external_id_and_by_case_insensitive_text(store):
    made = {key: store.create_identity(ext, name, {}) for key, ext, name in [
        ("ada", "emp-1", "Ada Lovelace"), ("alan", "emp-2", "Alan Turing"), ("grace", "EMP-3_x", "Grace Hopper"),
        ("pct", "100%", None), ("anon", None, None), ("under", "emp23", "Under Score")]}

    def listed(**kw) -> list[str]:
        return [i.id for i in store.list_identities(100, **kw)]

    def ids(*keys: str) -> list[str]:
        return sorted((made[k].id for k in keys), key=lambda i: i.encode())

    assert listed(external_id="emp-1") == ids("ada")
    assert listed(external_id="EMP-1") == []  # exact: case matters for an id
    assert listed(contains="ADA") == ids("ada")  # name, any case
    assert listed(contains="emp") == ids("ada", "alan", "grace", "under")  # external id, any case
    assert listed(contains="3_") == ids("grace")  # '_' is literal, not LIKE's one-character wildcard
    assert listed(contains="%") == ids("pct")  # '%' too
    assert listed(contains="emp", external_id="emp-2") == ids("alan")  # both narrow
    assert listed(contains="nobody") == []
    # A filtered list pages with the same cursor as the full one.
    pages, after = [], None
    while page := store.list_identities(1, after, contains="emp"):
        pages.append(page[0].id)
        after = page[0].id
    assert pages == ids("ada", "alan", "grace", "under")


def test_sqlite_text_search_folds_case_beyond_ascii(tmp_path):
    store = SQLiteStore(tmp_path / "g.db")
    olaf = store.create_identity(None, "ÖLAF Ñandú", {})
    assert [i.id for i in store.list_identities(10, contains="ölaf ñ")] == [olaf.id]
    store.close()


def test_store_pages_an_identitys_faces_and_returns_retained_crops(store):
    person, other = store.create_identity("p", None, {}), store.create_identity("o", None, {})
    faces = store.add_faces(person.id, [NewFace(vec(i), MODEL, crop=b"png-%d" % i if i % 2 == 0 else None)
                                        for i in range(5)])
    store.add_faces(other.id, [NewFace(vec(9), MODEL)])  # interleaved ids must not leak into the pages
    first = store.list_faces(person.id, 2)
    second = store.list_faces(person.id, 2, first[-1].id)
    third = store.list_faces(person.id, 2, second[-1].id)
    assert [f.id for f in first + second + third] == [f.id for f in faces]
    assert len(third) == 1 and store.list_faces(person.id, 2, third[-1].id) == []
    assert store.list_faces(person.id) == faces  # no limit: all of them, as before

    assert store.face_crop(person.id, faces[0].id) == b"png-0"
    with pytest.raises(NotFound) as no_crop:
        store.face_crop(person.id, faces[1].id)
    with pytest.raises(NotFound) as wrong_owner:
        store.face_crop(other.id, faces[0].id)
    with pytest.raises(NotFound) as nobody:
        store.face_crop("idt_nobody", faces[0].id)
    assert (no_crop.value.code, wrong_owner.value.code, nobody.value.code) == \
        ("no_retained_crop", "unknown_face", "unknown_identity")


# -- over HTTP, real photos -----------------------------------------------------------------------------------


def _img(path, **spec) -> dict:
    return {"data": b64(path), **spec}


def _error(r) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


@pytest.fixture(scope="module")
def crops_key(gateway) -> str:
    from cdface.serving.auth import create_key

    store = SQLiteStore(gateway.db)  # the gateway's own file: keys are read per request
    try:
        return create_key(store, "test-crops", ["crops"])[0]
    finally:
        store.close()


@pytest.fixture(scope="module")
def obama(gateway, photos):
    """Obama enrolled from obama.jpg with his crop retained, biden.jpg without; their ids and face ids.

    Deleted afterwards: other modules identify Obama on the same session gateway and expect their own."""
    with gateway.client("admin") as c:
        ids = {p: c.post("/v1/identities", json={"external_id": f"gaps-{p}", "name": f"Gaps {p.title()}"}).json()["id"]
               for p in ("obama", "biden")}
        kept = c.post(f"/v1/identities/{ids['obama']}/faces",
                      json={"images": [_img(photos["obama"])], "retain_crop": True})
        dropped = c.post(f"/v1/identities/{ids['biden']}/faces",
                         json={"images": [_img(photos["biden"])], "retain_crop": False})
    assert kept.status_code == 201 and dropped.status_code == 201, (kept.text, dropped.text)
    yield {"ids": ids, "obama_face": kept.json()["faces"][0]["id"], "biden_face": dropped.json()["faces"][0]["id"]}
    with gateway.client("admin") as c:
        for ident in ids.values():
            assert c.delete(f"/v1/identities/{ident}").status_code == 204


def test_detect_finds_every_face_of_the_group_photo_without_embeddings(gateway, photos):
    with gateway.client("embed") as c:
        r = c.post("/v1/detect", json={"images": [_img(photos["t1"], mode="detect_all"), _img(photos["obama"])]})
        with open(photos["obama2"], "rb") as f:
            form = c.post("/v1/detect", files=[("images", ("obama2.jpg", f, "image/jpeg"))])
    assert r.status_code == 200, r.text
    faces = r.json()["faces"]
    assert [f["image"] for f in faces] == [0] * 6 + [1]  # the six people of t1, then Obama
    for face in faces:
        assert set(face) == {"image", "box", "landmarks", "quality"}  # no embedding
        x, y, w, h = face["box"]
        assert w > 10 and h > 10 and len(face["landmarks"]) == 5 and face["quality"]["score"] > 0.5
        # The five points lie on the face (a margin for profile views, where an eye may sit on the box edge).
        assert all(x - w / 4 <= px <= x + w * 1.25 and y - h / 4 <= py <= y + h * 1.25 for px, py in face["landmarks"])
    areas = [f["box"][2] * f["box"][3] for f in faces[:6]]
    assert areas == sorted(areas, reverse=True)  # largest first
    assert form.status_code == 200 and len(form.json()["faces"]) == 1


def test_detect_refuses_bad_input_like_the_embeddings_route(gateway):
    with gateway.client("embed") as c:
        grey = io.BytesIO()
        Image.new("RGB", (200, 200), (128, 128, 128)).save(grey, format="PNG")
        assert _error(c.post("/v1/detect", json={"images": [{"data": b64(grey.getvalue())}]})) == (422, "no_face")
        assert _error(c.post("/v1/detect", json={"images": []})) == (422, "invalid_request")
        assert _error(c.post("/v1/detect", json={"images": [{"data": "!!"}]})) == (422, "invalid_base64")
    with gateway.client("identify") as c:
        assert _error(c.post("/v1/detect", json={"images": [{"data": "AAAA"}]})) == (403, "forbidden")


def test_retained_crop_downloads_as_png_with_the_crops_scope_only(gateway, photos, obama, crops_key):
    import httpx

    ident, face = obama["ids"]["obama"], obama["obama_face"]
    path = f"/v1/identities/{ident}/faces/{face}/crop"
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {crops_key}"}, timeout=60) as c:
        r = c.get(path)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png" and r.headers["cache-control"] == "no-store"
        crop = Image.open(io.BytesIO(r.content))
        assert crop.format == "PNG" and crop.size == (112, 112) and crop.mode == "RGB"
        biden = f"/v1/identities/{obama['ids']['biden']}/faces/{obama['biden_face']}/crop"
        assert _error(c.get(biden)) == (404, "no_retained_crop")
        assert _error(c.get(f"/v1/identities/{ident}/faces/{obama['biden_face']}/crop")) == (404, "unknown_face")
        assert _error(c.get(f"/v1/identities/idt_nobody/faces/{face}/crop")) == (404, "unknown_identity")
        assert _error(c.get(f"/v1/identities/{ident}")) == (403, "forbidden")  # crops is only crops
    with gateway.client("identify") as c:
        assert _error(c.get(path)) == (403, "forbidden")  # listing the gallery does not give its face images
    with gateway.client("admin") as c:
        assert c.get(path).content == r.content
        # The crop is what the face was embedded from: embedded as an aligned crop, it gives the same vector.
        from_photo = c.post("/v1/embeddings", json={"images": [_img(photos["obama"])]}).json()
        from_crop = c.post("/v1/embeddings", json={"images": [{"data": b64(r.content), "mode": "aligned"}]}).json()
    cosine = np.dot(from_photo["faces"][0]["embedding"], from_crop["faces"][0]["embedding"])
    assert cosine > 0.9999


def test_identities_by_external_id_and_by_text_compose_with_paging(gateway):
    with gateway.client("admin") as c:
        made = {}
        for ext, name in [("srch-ada-1", "Ada Lovelace"), ("srch-alan-2", "Alan Turing"),
                          ("srch-grace-3", "Grace HOPPER"), ("srch-x%_4", None)]:
            made[ext] = c.post("/v1/identities", json={"external_id": ext, "name": name}).json()["id"]
        exact = c.get("/v1/identities", params={"external_id": "srch-alan-2"}).json()
        assert [i["id"] for i in exact["items"]] == [made["srch-alan-2"]] and exact["next_cursor"] is None
        assert c.get("/v1/identities", params={"external_id": "SRCH-ALAN-2"}).json()["items"] == []
        assert [i["id"] for i in c.get("/v1/identities", params={"q": "hopper"}).json()["items"]] == \
            [made["srch-grace-3"]]
        assert [i["id"] for i in c.get("/v1/identities", params={"q": "x%_"}).json()["items"]] == [made["srch-x%_4"]]
        seen, cursor = [], None
        while True:
            page = c.get("/v1/identities", params={"q": "SRCH-", "limit": 1, **({"cursor": cursor} if cursor else {})})
            assert page.status_code == 200 and len(page.json()["items"]) <= 1
            seen += [i["id"] for i in page.json()["items"]]
            cursor = page.json()["next_cursor"]
            if cursor is None:
                break
        assert seen == sorted(made.values(), key=lambda i: i.encode())
        assert _error(c.get("/v1/identities", params={"q": ""})) == (422, "invalid_request")
        assert _error(c.get("/v1/identities", params={"external_id": "x" * 300})) == (422, "invalid_request")


def test_an_identitys_faces_page_with_a_cursor(gateway, photos):
    with gateway.client("admin") as c:
        ident = c.post("/v1/identities", json={"external_id": "paged-obama"}).json()["id"]
        enrolled = c.post(f"/v1/identities/{ident}/faces",
                          json={"images": [_img(photos[p]) for p in ("obama", "obama2", "obama3")]})
        assert enrolled.status_code == 201, enrolled.text
        first = c.get(f"/v1/identities/{ident}/faces", params={"limit": 2}).json()
        second = c.get(f"/v1/identities/{ident}/faces", params={"limit": 2, "cursor": first["next_cursor"]}).json()
        assert len(first["items"]) == 2 and first["next_cursor"] == str(first["items"][-1]["id"])
        assert len(second["items"]) == 1 and second["next_cursor"] is None
        assert [f["id"] for f in first["items"] + second["items"]] == [f["id"] for f in enrolled.json()["faces"]]
        everything = c.get(f"/v1/identities/{ident}/faces").json()  # default page holds all three
        assert len(everything["items"]) == 3 and everything["next_cursor"] is None
        assert _error(c.get(f"/v1/identities/{ident}/faces", params={"cursor": "abc"})) == (422, "invalid_request")
        assert _error(c.get(f"/v1/identities/{ident}/faces", params={"limit": 0})) == (422, "invalid_request")
        assert _error(c.get("/v1/identities/idt_nobody/faces")) == (404, "unknown_identity")
        assert c.delete(f"/v1/identities/{ident}").status_code == 204  # other modules identify Obama here too


def test_identify_and_verify_by_a_given_embedding_agree_with_the_images(gateway, photos, obama):
    ident = obama["ids"]["obama"]
    with gateway.client("admin") as c:
        vectors = c.post("/v1/embeddings", json={"images": [_img(photos["obama2"]), _img(photos["biden"])]}).json()
        obama2, biden = (f["embedding"] for f in vectors["faces"])
        by_image = c.post("/v1/identify", json={"image": _img(photos["obama2"]), "top_k": 3}).json()
        by_vector = c.post("/v1/identify", json={"embedding": obama2, "top_k": 3})
        assert by_vector.status_code == 200, by_vector.text
        body = by_vector.json()
        assert body["model"] == by_image["model"] and body["threshold"] == by_image["threshold"]
        face = body["faces"][0]
        assert len(body["faces"]) == 1 and face["box"] is None and face["landmarks"] is None
        # Other tests enroll Obama too: the same best identity as by image, and one of Obama's.
        assert face["match"]["identity_id"] == by_image["faces"][0]["match"]["identity_id"]
        assert "obama" in face["match"]["external_id"]
        assert face["candidates"][0]["similarity"] == pytest.approx(
            by_image["faces"][0]["candidates"][0]["similarity"], abs=1e-5)

        images = c.post("/v1/verify", json={"image": _img(photos["obama2"]), "other": _img(photos["biden"])}).json()
        scaled = [7.5 * x for x in obama2]  # the server normalises: the length of a given vector does not count
        given = c.post("/v1/verify", json={"embedding": scaled, "other_embedding": biden}).json()
        assert given["similarity"] == pytest.approx(images["similarity"], abs=1e-5)
        assert given["match"] is False and given["faces"] == [] and given["model"] == images["model"]
        mixed = c.post("/v1/verify", json={"image": _img(photos["obama2"]), "other_embedding": biden}).json()
        assert mixed["similarity"] == pytest.approx(images["similarity"], abs=1e-5) and len(mixed["faces"]) == 1
        same = c.post("/v1/verify", json={"embedding": obama2, "identity_id": ident}).json()
        assert same["match"] is True and same["identity_id"] == ident


def test_given_embeddings_are_checked_with_stable_codes(gateway, photos):
    size = 128  # SFace
    with gateway.client("admin") as c:
        def identify(raw: str):
            return c.post("/v1/identify", content=raw, headers={"content-type": "application/json"})

        ones = ", ".join(["1"] * (size - 1))
        assert _error(c.post("/v1/identify", json={"embedding": [0.1] * (size - 1)})) == \
            (422, "embedding_size_mismatch")
        assert _error(c.post("/v1/identify", json={"embedding": [0.1] * 512})) == (422, "embedding_size_mismatch")
        assert _error(identify(f'{{"embedding": [NaN, {ones}]}}')) == (422, "embedding_not_finite")
        assert _error(identify(f'{{"embedding": [1e400, {ones}]}}')) == (422, "embedding_not_finite")
        assert _error(c.post("/v1/identify", json={"embedding": [0.0] * size})) == (422, "embedding_zero")
        assert _error(c.post("/v1/identify", json={"embedding": [1.0] * size, "image": _img(photos["obama"])})) == \
            (422, "image_or_embedding")
        assert _error(c.post("/v1/identify", json={"top_k": 3})) == (422, "image_or_embedding")
        assert _error(c.post("/v1/verify", json={"other_embedding": [1.0] * size})) == (422, "image_or_embedding")
        assert _error(c.post("/v1/verify", json={"embedding": [1.0] * size, "other_embedding": [1.0] * 3})) == \
            (422, "embedding_size_mismatch")
        assert _error(c.post("/v1/verify", json={"embedding": [1.0] * size, "other_embedding": [1.0] * size,
                                                 "identity_id": "idt_x"})) == (422, "invalid_request")
        # Huge but finite values are fine: normalising must not overflow.
        huge = c.post("/v1/verify", json={"embedding": [1e300] * size, "other_embedding": [1.0] * size})
        assert huge.status_code == 200 and huge.json()["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert "Traceback" not in gateway.log.read_text()


def test_detection_and_given_embeddings_need_no_triton(gateway, photos, obama, tmp_path, model_repo):
    """A second gateway on the same gallery, pointed at a port where no Triton listens: detection and the
    embedding routes answer; only what needs the model is 503."""
    from cdface.devtools.triton_local import free_port

    with gateway.client("embed") as c:
        obama2 = c.post("/v1/embeddings", json={"images": [_img(photos["obama2"])]}).json()["faces"][0]["embedding"]
    offline = start_gateway(tmp_path / "no-triton", f"127.0.0.1:{free_port()}", model_repo, db=gateway.db,
                            keys=gateway.keys)
    try:
        with offline.client("admin", timeout=30) as c:
            detected = c.post("/v1/detect", json={"images": [_img(photos["t1"], mode="detect_all")]})
            assert detected.status_code == 200 and len(detected.json()["faces"]) == 6
            assert _error(c.post("/v1/embeddings", json={"images": [_img(photos["obama2"])]})) == \
                (503, "model_unavailable")
            found = c.post("/v1/identify", json={"embedding": obama2, "top_k": 1})
            assert found.status_code == 200, found.text
            assert "obama" in found.json()["faces"][0]["match"]["external_id"]
            verified = c.post("/v1/verify", json={"embedding": obama2, "identity_id": obama["ids"]["obama"]})
            assert verified.status_code == 200 and verified.json()["match"] is True
    finally:
        offline.stop()


def test_every_operation_has_an_explicit_unique_snake_case_id(gateway):
    with gateway.client(scope="") as c:
        spec = c.get("/openapi.json").json()
    ids = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            op_id = operation.get("operationId")
            assert op_id and re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", op_id), (method, path, op_id)
            # FastAPI's generated ids are name + path + method ("identify_v1_identify_post"): not those.
            assert not op_id.endswith(f"_{method}"), (method, path, op_id)
            ids.append(op_id)
    assert len(ids) == len(set(ids))
    assert {"detect", "embed", "verify", "identify", "list_identities", "list_faces", "get_face_crop"} <= set(ids)
    crop = spec["paths"]["/v1/identities/{identity_id}/faces/{face_id}/crop"]["get"]
    assert "image/png" in crop["responses"]["200"]["content"]
