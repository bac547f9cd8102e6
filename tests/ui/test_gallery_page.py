"""The gallery web page (``/ui``) in a real headless chromium, against the real gateway and Triton (SFace).

Everything a user does goes through the page: paste a key, enroll real photos (picking faces), list, search
and page through identities with their crop thumbnails, identify, verify, delete with a confirmation. What
the screen shows is checked against the API's own answers; the page's console must stay free of errors.
"""

from __future__ import annotations

import base64
import re

import httpx
import pytest
from playwright.sync_api import expect

from .conftest import GalleryPage, open_gallery_page, start_gateway

pytestmark = pytest.mark.slow

CSP_DIRECTIVES = {  # what the page's Content-Security-Policy must say, directive by directive
    "default-src": "'self'", "script-src": "'self'", "style-src": "'self'", "img-src": "'self' blob: data:",
    "connect-src": "'self'", "object-src": "'none'", "frame-ancestors": "'none'",
}


def _csp(header: str) -> dict[str, str]:
    directives = (part.strip().split(None, 1) for part in header.split(";") if part.strip())
    return {d[0]: (d[1] if len(d) > 1 else "") for d in directives}


def _b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()



def save_screenshot(locator, path: Path) -> None:
    """The element's screenshot with every photo and crop in it blurred: the committed pictures show
    the page, not the people. (Blurred afterwards: a screenshot style would break the page's CSP.)"""
    from io import BytesIO

    from PIL import Image, ImageDraw, ImageFilter

    shot = Image.open(BytesIO(locator.screenshot())).convert("RGB")
    clean = shot.copy()
    frame = locator.bounding_box()  # after the screenshot, which may scroll the page
    scale = shot.width / frame["width"]
    for image in locator.locator("img").all():
        box = image.bounding_box() if image.is_visible() else None
        if box:
            area = tuple(round(v * scale) for v in (box["x"] - frame["x"], box["y"] - frame["y"],
                                                    box["x"] - frame["x"] + box["width"],
                                                    box["y"] - frame["y"] + box["height"]))
            shot.paste(clean.crop(area).filter(ImageFilter.GaussianBlur(radius=8 * scale)), area[:2])
    for face in locator.locator(".face-box").all():  # the boxes drawn over the photos stay visible
        box = face.bounding_box() if face.is_visible() else None
        if box:
            colour = face.evaluate("e => getComputedStyle(e).borderTopColor")
            rgb = tuple(int(v) for v in re.findall(r"\d+", colour)[:3])
            corners = [round(v * scale) for v in (box["x"] - frame["x"], box["y"] - frame["y"],
                                                  box["x"] - frame["x"] + box["width"] - 1,
                                                  box["y"] - frame["y"] + box["height"] - 1)]
            ImageDraw.Draw(shot).rectangle(corners, outline=rgb, width=max(1, round(2 * scale)))
    shot.save(path)

@pytest.fixture(scope="module")
def gallery(browser, ui_gateway) -> GalleryPage:
    gallery = open_gallery_page(browser, ui_gateway)
    gallery.use_key(ui_gateway.keys["admin"])
    yield gallery
    gallery.page.context.close()


@pytest.fixture(autouse=True)
def no_console_errors(request):
    """After each test that used the shared page: nothing on its console (errors, failed loads, CSP reports)."""
    yield
    if "gallery" in request.fixturenames:
        gallery = request.getfixturevalue("gallery")
        errors, gallery.console_errors[:] = list(gallery.console_errors), []
        assert errors == [], errors


@pytest.fixture(scope="module")
def enrolled(gallery, ui_gateway, face_photos, screenshot_dir) -> dict[str, str]:
    """Three identities enrolled through the page: Obama (two photos), Biden, and one person of a group photo."""
    page = gallery.page

    def enroll(name: str, external_id: str, photos: list[str], pick: int | None = None) -> str:
        page.fill("#enroll-name", name)
        page.fill("#enroll-external-id", external_id)
        page.set_input_files("#enroll-files", [str(face_photos[p]) for p in photos])
        gallery.ok("#detect-button")
        if pick is not None:  # a group photo: nothing is ticked for the user; tick one face
            assert page.locator(".pick-face:checked").count() == 0
            page.locator(".face-box").nth(pick).click()  # a click on the face ticks its box
            if name == "Group person":
                save_screenshot(page.locator("#enroll"), screenshot_dir / "ui-enroll.png")
        assert gallery.ok("#enroll-button").startswith("Enrolled ")
        with ui_gateway.client("identify") as c:
            found = c.get("/v1/identities", params={"external_id": external_id}).json()["items"]
        assert len(found) == 1, found
        return found[0]["id"]

    ids = {"obama": enroll("Barack Obama", "ui-obama", ["obama", "obama3"]),
           "biden": enroll("Joe Biden", "ui-biden", ["biden"]),
           "group": enroll("Group person", "ui-group", ["t1"], pick=2)}
    save_screenshot(page.locator("#identities"), screenshot_dir / "ui-identities.png")
    return ids


def test_page_loads_without_a_key_under_a_strict_csp(ui_gateway):
    with httpx.Client(base_url=ui_gateway.url, timeout=30) as anonymous:  # no Authorization header
        redirect = anonymous.get("/ui")
        assert redirect.status_code == 307 and redirect.headers["location"] == "ui/"
        for path, media_type in (("/ui/", "text/html"), ("/ui/app.js", "text/javascript"),
                                 ("/ui/app.css", "text/css")):
            r = anonymous.get(path)
            assert r.status_code == 200 and r.headers["content-type"].startswith(media_type), path
            assert r.headers["x-content-type-options"] == "nosniff"
            csp = _csp(r.headers["content-security-policy"])
            assert {k: csp.get(k) for k in CSP_DIRECTIVES} == CSP_DIRECTIVES, csp
            assert "'unsafe-inline'" not in r.headers["content-security-policy"]
        html = anonymous.get("/ui/").text
        # No inline code for the policy to block: every script is a file, no on*= handler attributes.
        assert all('src="' in tag for tag in re.findall(r"<script[^>]*>", html))
        assert re.search(r"<script[^>]*>\s*[^<\s]", html) is None
        assert re.search(r"\son[a-z]+\s*=", html) is None
        assert anonymous.get("/ui/nothing.js").json()["error"]["code"] == "not_found"
        # The page is not part of the API document.
        assert not [p for p in anonymous.get("/openapi.json").json()["paths"] if p.startswith("/ui")]


def test_the_browser_enforces_the_policy(browser, ui_gateway):
    gallery = open_gallery_page(browser, ui_gateway)
    try:
        outcome = gallery.page.evaluate("""async () => {
            const seen = [];
            document.addEventListener("securitypolicyviolation", (e) => seen.push(e.effectiveDirective));
            const button = document.createElement("button");
            let plainString;
            try {  // Trusted Types: a plain string never reaches a script sink
                button.setAttribute("onclick", "window.inlineRan = true");
                plainString = "accepted";
            } catch (err) {
                plainString = err.name;
            }
            // Past Trusted Types (a policy of the test's own), script-src still blocks inline code.
            const policy = trustedTypes.createPolicy("test", {createScript: (s) => s});
            button.setAttribute("onclick", policy.createScript("window.inlineRan = true"));
            document.body.append(button);
            button.click();
            const script = document.createElement("script");
            script.text = policy.createScript("window.inlineRan = true");
            document.body.append(script);
            await new Promise((resolve) => setTimeout(resolve, 0));  // violation events are queued tasks
            return {plainString, seen, ran: window.inlineRan === true};
        }""")
        assert outcome["plainString"] == "TypeError"
        assert set(outcome["seen"]) >= {"require-trusted-types-for", "script-src-attr", "script-src-elem"}, outcome
        assert outcome["ran"] is False
    finally:
        gallery.page.context.close()


def test_enroll_real_photos_through_the_page(gallery, ui_gateway, enrolled):
    with ui_gateway.client("identify") as c:
        counts = {who: c.get(f"/v1/identities/{identity}").json()["face_count"] for who, identity in enrolled.items()}
    assert counts == {"obama": 2, "biden": 1, "group": 1}
    cards = gallery.page.locator("li.identity")
    assert sorted(cards.locator(".identity-name").all_inner_texts()) == ["Barack Obama", "Group person", "Joe Biden"]
    # Each card shows the identity's retained crop (an aligned 112x112 face), fetched with the key.
    sizes = gallery.page.eval_on_selector_all(
        "li.identity img.thumb", "imgs => imgs.map(i => [i.src.slice(0, 5), i.naturalWidth, i.naturalHeight])")
    assert sizes == [["blob:", 112, 112]] * 3


def test_only_the_picked_face_of_a_group_photo_is_enrolled(ui_gateway, enrolled, face_photos):
    with ui_gateway.client("admin") as c:
        detected = c.post("/v1/detect", json={"images": [{"data": _b64(face_photos["t1"]), "mode": "detect_all"}]})
        result = c.post("/v1/identify", json={"image": {"data": _b64(face_photos["t1"]), "mode": "detect_all"},
                                              "top_k": 1})
    assert detected.status_code == 200 and result.status_code == 200, (detected.text, result.text)
    boxes = [f["box"] for f in detected.json()["faces"]]
    matched = [f["box"] for f in result.json()["faces"]
               if f["match"] and f["match"]["identity_id"] == enrolled["group"]]
    assert len(boxes) == 6 and matched == [boxes[2]]  # the third face, the one ticked on the page, and no other


def test_identify_obama2_shows_barack_obama_above_the_threshold(gallery, ui_gateway, enrolled, face_photos,
                                                               screenshot_dir):
    page = gallery.page
    page.set_input_files("#identify-file", str(face_photos["obama2"]))
    assert gallery.ok("#identify-button") == "1 face found, 1 identified."
    assert page.inner_text("#identify-result h3") == "Face 1: Barack Obama"
    best = page.locator("#identify-result tr.candidate").first
    assert best.locator(".candidate-name").inner_text() == "Barack Obama"
    similarity = float(best.locator(".candidate-similarity").inner_text())
    threshold = float(re.search(r"Threshold ([0-9.]+)", page.inner_text("#identify-decision")).group(1))
    assert similarity > threshold
    with ui_gateway.client("identify") as c:
        api = c.post("/v1/identify", json={"image": {"data": _b64(face_photos["obama2"]), "mode": "detect_all"},
                                           "top_k": 3}).json()
    assert similarity == pytest.approx(api["faces"][0]["candidates"][0]["similarity"], abs=5e-4)
    assert threshold == pytest.approx(api["threshold"], abs=5e-4)
    # The face's box is drawn where the API found it, at the image's displayed scale.
    image, box = page.locator("#identify-result img").bounding_box(), page.locator(".face-box.match").bounding_box()
    natural_width = page.eval_on_selector("#identify-result img", "i => i.naturalWidth")
    scale = image["width"] / natural_width
    x, y, w, h = api["faces"][0]["box"]
    assert box["x"] - image["x"] == pytest.approx(x * scale, abs=2)
    assert box["y"] - image["y"] == pytest.approx(y * scale, abs=2)
    assert box["width"] == pytest.approx(w * scale, abs=2) and box["height"] == pytest.approx(h * scale, abs=2)
    save_screenshot(page.locator("#identify"), screenshot_dir / "ui-identify.png")


@pytest.mark.parametrize("first, second, verdict", [("obama", "obama2", "Same person"),
                                                    ("obama", "biden", "Not the same person")])
def test_verify_two_photos(gallery, ui_gateway, face_photos, first, second, verdict):
    page = gallery.page
    page.set_input_files("#verify-file-a", str(face_photos[first]))
    page.set_input_files("#verify-file-b", str(face_photos[second]))
    assert gallery.ok("#verify-button") == verdict + "."
    shown = page.inner_text("#verify-result")
    assert shown.startswith(verdict + ": similarity ")
    with ui_gateway.client("verify") as c:
        api = c.post("/v1/verify", json={"image": {"data": _b64(face_photos[first])},
                                         "other": {"data": _b64(face_photos[second])}}).json()
    assert float(re.search(r"similarity (-?[0-9.]+)", shown).group(1)) == pytest.approx(api["similarity"], abs=5e-4)
    assert page.locator("#verify-photos .face-box").count() == 2  # one compared face per photo


def test_search_and_pages(gallery, ui_gateway, enrolled):
    page = gallery.page
    with ui_gateway.client("enroll") as c:
        for n in range(12):  # with the three enrolled: 15 identities, two pages of 12
            assert c.post("/v1/identities", json={"name": f"Filler {n:02d}", "external_id": f"fill-{n:02d}"}
                          ).status_code == 201
    page.fill("#search", "")
    gallery.ok("#search-button")
    first_page = page.locator("li.identity .identity-name").all_inner_texts()
    assert len(first_page) == 12 and page.is_enabled("#next-page") and page.is_disabled("#prev-page")
    gallery.ok("#next-page")
    second_page = page.locator("li.identity .identity-name").all_inner_texts()
    assert len(second_page) == 3 and page.is_disabled("#next-page") and page.is_enabled("#prev-page")
    assert len(set(first_page) | set(second_page)) == 15
    gallery.ok("#prev-page")
    assert page.locator("li.identity .identity-name").all_inner_texts() == first_page
    for query, expected in (("Biden", ["Joe Biden"]), ("ui-obama", ["Barack Obama"]), ("Filler 1", ["Filler 10",
                                                                                                   "Filler 11"])):
        page.fill("#search", query)
        gallery.ok("#search-button")
        assert sorted(page.locator("li.identity .identity-name").all_inner_texts()) == expected, query
    page.fill("#search", "")
    gallery.ok("#search-button")


def test_delete_asks_first_and_then_removes(gallery, ui_gateway, enrolled, face_photos):
    page = gallery.page
    page.fill("#search", "Biden")
    gallery.ok("#search-button")
    card = page.locator(f'li.identity[data-identity-id="{enrolled["biden"]}"]')
    card.locator(".delete-identity").click()
    dialog = page.locator("#confirm-delete")
    assert dialog.is_visible() and dialog.inner_text().startswith("Delete Joe Biden and their 1 face?")
    page.click("#confirm-delete-cancel")
    assert not dialog.is_visible() and card.count() == 1
    with ui_gateway.client("identify") as c:
        assert c.get(f"/v1/identities/{enrolled['biden']}").status_code == 200
    card.locator(".delete-identity").click()
    page.click("#confirm-delete-ok")
    expect(page.locator("#status")).to_have_text("Deleted Joe Biden.")
    assert card.count() == 0 and page.is_visible("#identity-empty")
    with ui_gateway.client("identify") as c:
        gone = c.get(f"/v1/identities/{enrolled['biden']}")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "unknown_identity"
        # Erased from search too: Biden's own photo no longer finds him.
        found = c.post("/v1/identify", json={"image": {"data": _b64(face_photos["biden"])}, "top_k": 20})
    assert found.status_code == 200, found.text
    assert enrolled["biden"] not in {c["identity_id"] for c in found.json()["faces"][0]["candidates"]}


def test_errors_are_shown_as_code_and_message(browser, ui_gateway, face_photos, tmp_path):
    gallery = open_gallery_page(browser, ui_gateway)
    page = gallery.page
    try:
        assert gallery.act("#use-key") == "no_api_key: paste an API key first"
        assert gallery.use_key("cdf_nothere_secret").startswith("invalid_api_key: ")
        gallery.use_key(ui_gateway.keys["admin"], remember=True)
        assert page.evaluate("() => [localStorage.length, sessionStorage.length]") == [1, 0]
        page.reload()  # a kept key is used at once: the list loads without pasting it again
        expect(page.locator("#status")).to_have_class("ok")
        with ui_gateway.client("identify") as c:
            listed = c.get("/v1/identities", params={"limit": 12}).json()["items"]
        assert page.locator("li.identity").count() == len(listed)
        assert page.inner_text("#key-state").startswith(f"Using key cdf_{ui_gateway.keys['admin'].split('_')[1]}_")
        not_a_photo = tmp_path / "notes.jpg"
        not_a_photo.write_text("not an image")
        page.set_input_files("#identify-file", str(not_a_photo))
        assert gallery.act("#identify-button").startswith("unsupported_image: ")
        # A key without the enroll scope: the gateway's refusal is shown, the page does not break.
        gallery.use_key(ui_gateway.keys["identify"])
        assert page.evaluate("() => [localStorage.length, sessionStorage.length]") == [0, 1]
        page.fill("#enroll-name", "Nobody")
        page.set_input_files("#enroll-files", str(face_photos["obama"]))
        assert gallery.act("#detect-button").startswith("forbidden: ")
        # The only console entries are the browser's notes of those refused requests (401, 403, 422).
        assert gallery.console_errors and all(re.search(r"status of (401|403|422)", e) for e in gallery.console_errors)
    finally:
        page.context.close()


def test_a_failed_enrollment_leaves_no_empty_identity(browser, triton, model_repo, face_photos, tmp_path):
    # A gateway that takes at most 2 images a request: detection of one photo passes, enrolling 3 faces does not.
    gw = start_gateway(tmp_path / "gw", triton.grpc_url, model_repo, extra_env={"CDFACE_SERVE_MAX_IMAGES": "2"})
    gallery = open_gallery_page(browser, gw)
    page = gallery.page
    try:
        gallery.use_key(gw.keys["admin"])
        page.fill("#enroll-name", "Three faces")
        page.fill("#enroll-external-id", "ui-three")
        page.set_input_files("#enroll-files", str(face_photos["t1"]))
        gallery.ok("#detect-button")
        for face in range(3):
            page.locator(".face-box").nth(face).click()
        assert page.inner_text("#enroll-button") == "Enroll 3 selected faces"
        assert gallery.act("#enroll-button").startswith("too_many_images: ")
        with gw.client("identify") as c:  # the identity created for the faces was taken back
            assert c.get("/v1/identities", params={"external_id": "ui-three"}).json()["items"] == []
            assert c.get("/v1/identities").json()["items"] == []
        assert page.locator("li.identity").count() == 0
    finally:
        page.context.close()
        gw.stop()
