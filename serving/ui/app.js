// The cdface gallery page: plain JavaScript, no build step, no third-party code.
// It holds no data of its own: every list, crop and result comes from this gateway's /v1 API,
// called with the key the user pastes. The page is built with DOM calls only (the CSP enforces
// Trusted Types, so no HTML string is ever parsed), and names from the gallery go in as text.
"use strict";

(() => {
  const KEY_STORAGE = "cdface.apiKey";
  const PAGE_SIZE = 12;
  const TOP_K = 3;
  const $ = (id) => document.getElementById(id);

  // -- the API key: this tab only (sessionStorage), or this device when asked (localStorage) ------------

  let apiKey = localStorage.getItem(KEY_STORAGE) || sessionStorage.getItem(KEY_STORAGE) || "";

  function storeKey(key, remember) {
    localStorage.removeItem(KEY_STORAGE);
    sessionStorage.removeItem(KEY_STORAGE);
    apiKey = key;
    if (key) (remember ? localStorage : sessionStorage).setItem(KEY_STORAGE, key);
    showKeyState();
  }

  function showKeyState() {
    const remembered = localStorage.getItem(KEY_STORAGE) !== null;
    $("remember-key").checked = remembered;
    // Only the key's public id part (cdf_<id>_...) is shown, never the secret.
    const keyId = apiKey.split("_")[1] || "";
    $("key-state").textContent = apiKey
      ? `Using key ${keyId ? `cdf_${keyId}_…` : "(pasted)"}, kept ${remembered ? "on this device" : "for this tab"}.`
      : "No key: paste one to use the gallery.";
  }

  // -- calling the API --------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // Relative to the page (served at <prefix>/ui/), so the page also works behind a path prefix.
  function apiUrl(path, params) {
    const url = new URL(`../v1/${path}`, document.baseURI);
    for (const [name, value] of Object.entries(params || {})) {
      if (value !== undefined && value !== null && value !== "") url.searchParams.set(name, String(value));
    }
    return url;
  }

  async function api(method, path, { params, json, blob = false } = {}) {
    if (!apiKey) throw new ApiError(0, "no_api_key", "paste an API key first");
    const headers = { Authorization: `Bearer ${apiKey}` };
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    let response;
    try {
      response = await fetch(apiUrl(path, params), { method, headers, body, cache: "no-store" });
    } catch (err) {
      throw new ApiError(0, "network_error", "the gateway did not answer");
    }
    if (!response.ok) {
      let code = `http_${response.status}`;
      let message = response.statusText || "request failed";
      try {
        const error = (await response.json()).error;
        code = error.code;
        message = error.message;
      } catch (err) {
        // not the gateway's JSON error (a proxy's page, say): keep the HTTP status
      }
      throw new ApiError(response.status, code, message);
    }
    if (response.status === 204) return null;
    return blob ? response.blob() : response.json();
  }

  const idPath = (identityId) => `identities/${encodeURIComponent(identityId)}`;

  // -- status line and busy buttons ----------------------------------------------------------------------

  function showStatus(text, kind = "info") {
    const status = $("status");
    status.textContent = text;
    status.className = kind;
  }

  function describeError(err) {
    return err instanceof ApiError ? `${err.code}: ${err.message}` : `error: ${err.message || err}`;
  }

  // Runs one user action: its button is disabled meanwhile, and any failure lands on the status line.
  async function action(button, busyText, work) {
    button.disabled = true;
    showStatus(busyText, "busy");
    try {
      const done = await work();
      showStatus(done || "Done.", "ok");
    } catch (err) {
      showStatus(describeError(err), "error");
    } finally {
      button.disabled = false;
      refreshControls();
    }
  }

  // Buttons whose state follows the page's data, not just "busy or not".
  function refreshControls() {
    $("prev-page").disabled = listing.index === 0;
    $("next-page").disabled = !listing.nextCursor;
    const picked = enrollment.faces.filter((f) => f.checkbox.checked).length;
    $("enroll-button").disabled = picked === 0;
    $("enroll-button").textContent = picked ? `Enroll ${picked} selected face${picked === 1 ? "" : "s"}`
      : "Enroll selected faces";
  }

  // -- small DOM helpers ---------------------------------------------------------------------------------

  function el(tag, { className, text, attrs } = {}, children = []) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    for (const child of children) node.append(child);
    return node;
  }

  // blob: URLs of one part of the page, revoked when that part is redrawn (no leaked image memory).
  const objectUrls = new Map();
  function objectUrl(scope, blob) {
    const url = URL.createObjectURL(blob);
    if (!objectUrls.has(scope)) objectUrls.set(scope, []);
    objectUrls.get(scope).push(url);
    return url;
  }
  function releaseUrls(scope) {
    for (const url of objectUrls.get(scope) || []) URL.revokeObjectURL(url);
    objectUrls.delete(scope);
  }

  function readBase64(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
      reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
      reader.readAsDataURL(file);
    });
  }

  const fixed = (value, digits = 3) => (typeof value === "number" ? value.toFixed(digits) : "–");

  // A photo with a positioned box over each face (box = [x, y, width, height] in the photo's pixels,
  // placed in percent so the boxes follow the image when the page is resized).
  async function photoWithBoxes(scope, file, faces, { caption, boxClass, onBoxClick } = {}) {
    const img = el("img", { attrs: { alt: caption || file.name } });
    img.src = objectUrl(scope, file);
    await img.decode();
    const frame = el("div", { className: "frame" }, [img]);
    const boxes = faces.map((face, index) => {
      const box = el("div", { className: `face-box ${boxClass ? boxClass(face) : ""}`,
                             attrs: { "data-face": String(index + 1), title: `face ${index + 1}` } },
                     [el("span", { className: "face-label", text: String(index + 1) })]);
      if (face.box) {
        const [x, y, w, h] = face.box;
        box.style.left = `${(100 * x) / img.naturalWidth}%`;
        box.style.top = `${(100 * y) / img.naturalHeight}%`;
        box.style.width = `${(100 * w) / img.naturalWidth}%`;
        box.style.height = `${(100 * h) / img.naturalHeight}%`;
        frame.append(box);
      }
      if (onBoxClick) box.addEventListener("click", () => onBoxClick(index));
      return box;
    });
    const figure = el("figure", { className: "photo" }, [frame]);
    if (caption) figure.append(el("figcaption", { text: caption }));
    return { figure, boxes };
  }

  function qualityText(quality) {
    return `score ${fixed(quality.score, 2)}, size ${fixed(quality.face_size, 0)} px, ` +
           `sharpness ${fixed(quality.sharpness, 0)}`;
  }

  // -- identities: a page at a time (cursor paging), searched by name or external id ---------------------

  const listing = { cursors: [null], index: 0, query: "", nextCursor: null };

  async function loadIdentities() {
    const page = await api("GET", "identities", {
      params: { limit: PAGE_SIZE, cursor: listing.cursors[listing.index], q: listing.query } });
    if (page.items.length === 0 && listing.index > 0) {  // the last item of a later page was deleted
      listing.cursors.pop();
      listing.index -= 1;
      return loadIdentities();
    }
    listing.nextCursor = page.next_cursor;
    releaseUrls("thumbnails");
    $("identity-list").replaceChildren(...page.items.map(identityCard));
    $("identity-empty").hidden = page.items.length > 0;
    $("page-label").textContent = `page ${listing.index + 1}`;
    await Promise.all(page.items.map((identity) => loadThumbnail(identity)));
    return `${page.items.length} identit${page.items.length === 1 ? "y" : "ies"} on page ${listing.index + 1}.`;
  }

  function identityCard(identity) {
    const thumb = el("img", { className: "thumb", attrs: { alt: `face of ${identity.name || identity.id}` } });
    const remove = el("button", { className: "danger delete-identity", text: "Delete", attrs: { type: "button" } });
    remove.addEventListener("click", () => deleteIdentity(identity, remove));
    return el("li", { className: "card identity", attrs: { "data-identity-id": identity.id } }, [
      el("div", { className: "thumb-slot" }, [thumb]),
      el("div", { className: "identity-name", text: identity.name || "(no name)" }),
      el("div", { className: "identity-external-id muted", text: identity.external_id || "" }),
      el("div", { className: "identity-faces muted",
                  text: `${identity.face_count} face${identity.face_count === 1 ? "" : "s"}` }),
      remove,
    ]);
  }

  // The first retained crop of the identity, fetched with the key and shown through a blob: URL.
  async function loadThumbnail(identity) {
    const card = document.querySelector(`li[data-identity-id="${CSS.escape(identity.id)}"]`);
    const thumb = card && card.querySelector("img.thumb");
    if (!thumb || identity.face_count === 0) return;
    try {
      const faces = await api("GET", `${idPath(identity.id)}/faces`, { params: { limit: 20 } });
      const face = faces.items.find((f) => f.has_crop);
      if (!face) {
        card.classList.add("no-thumb");
        return;
      }
      const crop = await api("GET", `${idPath(identity.id)}/faces/${face.id}/crop`, { blob: true });
      thumb.src = objectUrl("thumbnails", crop);
      thumb.classList.add("loaded");
    } catch (err) {
      // One missing thumbnail (a key without the crops scope, a face deleted meanwhile) is not the page's error.
      card.classList.add("no-thumb");
      thumb.title = describeError(err);
    }
  }

  function confirmDelete(text) {
    const dialog = $("confirm-delete");
    $("confirm-delete-text").textContent = text;
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "delete"), { once: true });
      dialog.showModal();
      $("confirm-delete-cancel").focus();  // the safe choice is the default one
    });
  }

  async function deleteIdentity(identity, button) {
    const who = identity.name || identity.external_id || identity.id;
    const faces = `${identity.face_count} face${identity.face_count === 1 ? "" : "s"}`;
    if (!(await confirmDelete(`Delete ${who} and their ${faces}? This cannot be undone.`))) {
      showStatus("Nothing deleted.");
      return;
    }
    await action(button, `Deleting ${who}…`, async () => {
      await api("DELETE", idPath(identity.id));
      await loadIdentities();
      return `Deleted ${who}.`;
    });
  }

  // -- enrollment: detect faces in several photos, pick some, create the identity and enroll them ---------

  const enrollment = { images: [], faces: [] };  // base64 per photo; detected faces with their checkbox

  async function detectForEnrollment() {
    const files = Array.from($("enroll-files").files);
    if (files.length === 0) throw new ApiError(0, "no_photo", "choose one or more photos first");
    enrollment.images = await Promise.all(files.map(readBase64));
    const found = await api("POST", "detect", {
      json: { images: enrollment.images.map((data) => ({ data, mode: "detect_all" })) } });
    releaseUrls("enroll");
    enrollment.faces = [];
    const figures = [];
    for (const [imageIndex, file] of files.entries()) {
      const faces = found.faces.filter((f) => f.image === imageIndex);
      const checkboxes = faces.map(() => el("input", { className: "pick-face", attrs: { type: "checkbox" } }));
      const { figure, boxes } = await photoWithBoxes("enroll", file, faces, {
        caption: `${file.name}: ${faces.length} face${faces.length === 1 ? "" : "s"}`,
        onBoxClick: (i) => checkboxes[i].click(),  // a click on the face ticks it too
      });
      const choices = el("ul", { className: "face-choices" });
      faces.forEach((face, i) => {
        // A photo with one face is most likely of the person; in a group photo the user picks.
        const checkbox = checkboxes[i];
        checkbox.checked = faces.length === 1;
        boxes[i].classList.toggle("picked", checkbox.checked);
        checkbox.addEventListener("change", () => {
          boxes[i].classList.toggle("picked", checkbox.checked);
          refreshControls();
        });
        choices.append(el("li", {}, [el("label", {}, [checkbox, ` face ${i + 1}: ${qualityText(face.quality)}`])]));
        enrollment.faces.push({ image: imageIndex, landmarks: face.landmarks, checkbox });
      });
      figure.append(choices);
      figures.push(figure);
    }
    $("enroll-photos").replaceChildren(...figures);
    refreshControls();
    return `${found.faces.length} face${found.faces.length === 1 ? "" : "s"} found in ${files.length} ` +
           `photo${files.length === 1 ? "" : "s"}: tick the ones to enroll.`;
  }

  async function enrollPicked() {
    const picked = enrollment.faces.filter((f) => f.checkbox.checked);
    const name = $("enroll-name").value.trim();
    const externalId = $("enroll-external-id").value.trim();
    if (!name && !externalId) throw new ApiError(0, "no_name", "give a name or an external id");
    if (picked.length === 0) throw new ApiError(0, "no_face", "tick at least one face");
    const created = await api("POST", "identities", {
      json: { ...(name ? { name } : {}), ...(externalId ? { external_id: externalId } : {}) } });
    // Each picked face goes with its own detected landmarks, so exactly that face of the photo is enrolled.
    const images = picked.map((f) => ({ data: enrollment.images[f.image], mode: "landmarks",
                                        landmarks: f.landmarks }));
    let enrolled;
    try {
      enrolled = await api("POST", `${idPath(created.id)}/faces`, { json: { images } });
    } catch (err) {
      // The faces are enrolled in one transaction: none were, so take back the identity just created
      // (a key without the delete scope cannot: then say so, rather than leave an empty identity unmentioned).
      const kept = await api("DELETE", idPath(created.id)).then(() => false, () => true);
      if (kept) err.message += ` (identity ${created.id} was created and has no faces)`;
      throw err;
    }
    releaseUrls("enroll");
    $("enroll-form").reset();
    $("enroll-photos").replaceChildren();
    enrollment.images = [];
    enrollment.faces = [];
    refreshControls();
    listing.cursors = [null];
    listing.index = 0;
    await loadIdentities();
    return `Enrolled ${enrolled.faces.length} face${enrolled.faces.length === 1 ? "" : "s"} of ${name || externalId}.`;
  }

  // -- identify: every face of a photo against the gallery ---------------------------------------------

  function candidateRows(candidates, threshold) {
    return candidates.map((c) => el("tr", { className: c.match ? "candidate match" : "candidate" }, [
      el("td", { className: "candidate-name", text: c.name || "(no name)" }),
      el("td", { className: "candidate-external-id", text: c.external_id || "" }),
      el("td", { className: "candidate-similarity", text: fixed(c.similarity) }),
      el("td", { className: "candidate-decision",
                 text: c.match ? `match (> ${fixed(threshold)})` : `below ${fixed(threshold)}` }),
    ]));
  }

  async function identifyPhoto() {
    const file = $("identify-file").files[0];
    if (!file) throw new ApiError(0, "no_photo", "choose a photo first");
    const result = await api("POST", "identify", {
      json: { image: { data: await readBase64(file), mode: "detect_all" }, top_k: TOP_K } });
    releaseUrls("identify");
    const { figure } = await photoWithBoxes("identify", file, result.faces, {
      caption: file.name, boxClass: (face) => (face.match ? "match" : "no-match") });
    const perFace = result.faces.map((face, i) => el("div", { className: "face-result" }, [
      el("h3", { text: `Face ${i + 1}: ${face.match ? face.match.name || face.match.external_id || face.match.identity_id
                                                    : "no match"}` }),
      face.candidates.length
        ? el("table", { className: "candidates" }, [
          el("thead", {}, [el("tr", {}, ["name", "external id", "similarity", "decision"].map(
            (h) => el("th", { text: h })))]),
          el("tbody", {}, candidateRows(face.candidates, result.threshold))])
        : el("p", { className: "muted", text: "The gallery is empty." }),
    ]));
    $("identify-decision").textContent = `Threshold ${fixed(result.threshold)} (${result.threshold_source}` +
      `${result.far ? `, FAR ${result.far}` : ""}): a candidate above it is a match.`;
    $("identify-result").replaceChildren(figure, ...perFace);
    const matched = result.faces.filter((f) => f.match).length;
    return `${result.faces.length} face${result.faces.length === 1 ? "" : "s"} found, ${matched} identified.`;
  }

  // -- verify: the largest face of one photo against the largest of another --------------------------------

  async function verifyPhotos() {
    const files = [$("verify-file-a").files[0], $("verify-file-b").files[0]];
    if (!files[0] || !files[1]) throw new ApiError(0, "no_photo", "choose two photos first");
    const [first, second] = await Promise.all(files.map(readBase64));
    const result = await api("POST", "verify", {
      json: { image: { data: first, mode: "detect" }, other: { data: second, mode: "detect" } } });
    releaseUrls("verify");
    const figures = [];
    for (const [index, file] of files.entries()) {
      const faces = result.faces.filter((f) => f.image === index);
      const { figure } = await photoWithBoxes("verify", file, faces, {
        caption: file.name, boxClass: () => (result.match ? "match" : "no-match") });
      figures.push(figure);
    }
    $("verify-photos").replaceChildren(...figures);
    const verdict = result.match ? "Same person" : "Not the same person";
    const verifyResult = $("verify-result");
    verifyResult.className = result.match ? "verdict match" : "verdict no-match";
    verifyResult.textContent = `${verdict}: similarity ${fixed(result.similarity)} ` +
      `${result.match ? ">" : "≤"} threshold ${fixed(result.threshold)} (${result.threshold_source}).`;
    return verdict + ".";
  }

  // -- wiring --------------------------------------------------------------------------------------------

  function start() {
    showKeyState();
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("api-key").value.trim();
      if (!key) {
        showStatus("no_api_key: paste an API key first", "error");
        return;
      }
      storeKey(key, $("remember-key").checked);
      $("api-key").value = "";
      action($("use-key"), "Loading identities…", loadIdentities);
    });
    $("forget-key").addEventListener("click", () => {
      storeKey("", false);
      releaseUrls("thumbnails");
      $("identity-list").replaceChildren();
      showStatus("Key forgotten.");
    });
    $("remember-key").addEventListener("change", () => {
      if (apiKey) storeKey(apiKey, $("remember-key").checked);
    });
    $("search-form").addEventListener("submit", (event) => {
      event.preventDefault();
      listing.query = $("search").value.trim();
      listing.cursors = [null];
      listing.index = 0;
      action($("search-button"), "Searching…", loadIdentities);
    });
    $("reload").addEventListener("click", () => action($("reload"), "Loading identities…", loadIdentities));
    $("next-page").addEventListener("click", () => {
      listing.cursors.push(listing.nextCursor);
      listing.index += 1;
      action($("next-page"), "Loading identities…", loadIdentities);
    });
    $("prev-page").addEventListener("click", () => {
      listing.cursors.pop();
      listing.index -= 1;
      action($("prev-page"), "Loading identities…", loadIdentities);
    });
    $("detect-button").addEventListener("click", () => action($("detect-button"), "Detecting faces…",
                                                              detectForEnrollment));
    $("enroll-form").addEventListener("submit", (event) => {
      event.preventDefault();
      action($("enroll-button"), "Enrolling…", enrollPicked);
    });
    $("identify-form").addEventListener("submit", (event) => {
      event.preventDefault();
      action($("identify-button"), "Identifying…", identifyPhoto);
    });
    $("verify-form").addEventListener("submit", (event) => {
      event.preventDefault();
      action($("verify-button"), "Verifying…", verifyPhotos);
    });
    $("confirm-delete-ok").addEventListener("click", () => $("confirm-delete").close("delete"));
    $("confirm-delete-cancel").addEventListener("click", () => $("confirm-delete").close("cancel"));
    if (apiKey) action($("reload"), "Loading identities…", loadIdentities);
  }

  start();
})();
