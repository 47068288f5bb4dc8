// The appliance page: live view with the matched region, lookups with their query image, recent lookups,
// live status, and the catalog manager. Plain JS, no build step; it uses the same JSON API as everyone else.
// The device tells the page what happens (Server-Sent Events, GET /api/events, with the browser's automatic
// reconnect); only while that stream is unavailable does the page poll /api/status.
// Data from the device is only ever written with textContent / attributes, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_SHOWN = 20;       // lookups in the strip
const PIN_UPLOAD_MS = 15000;    // an upload's result stays on screen this long before newer lookups replace it
const NOTE_HOLD_MS = 8000;      // a note about the user's own action ("Failed: …") outlives newer camera lookups this long
const REGION_SHOW_MS = 4000;    // how long a verified match stays outlined on the live view
const CATALOG_PAGE = 24;
const SOURCES = { camera: "camera (trigger)", requested: "requested (button)", upload: "upload", cli: "command line" };
const TOKEN_KEY = "edge-retrieval-token"; // sessionStorage: gone when the tab closes; sent as a bearer header
const CUE_MIN_MS = 800;         // a camera lookup takes ~15 ms: the "looking up…" cue stays at least this long
const PUSH_GRACE_MS = 3000;     // a stream that ended reconnects within this; only then does polling start
const PUSH_RETRY_MS = 15000;    // a refused stream (503: every slot taken) is tried again this often
const POLL_MS = 1000;

let latestN = null;       // newest history number seen
let shownN = undefined;   // history number of the lookup on screen
let pinnedUntil = 0;      // > now: do not replace the lookup on screen (Infinity: the user picked one)
let historyEntries = [];
let requestedAt = 0;      // "Look up now" pressed; the cue shows until a newer lookup arrives
let cueSince = 0;         // the cue went up then (0: down)
let cueTimer = null;
let pushOpen = false;     // the event stream is open: no polling
let polling = false;
let graceTimer = null;
let synced = false;       // the page caught up with the device since the stream (re)opened

let statusAt = 0;          // when the note about the user's action was set
function setStatus(text) { $("action-status").textContent = text; statusAt = Date.now(); }
const str = (v) => String(v ?? "");

async function getJson(url, options) {
  const response = await fetch(url, options);
  let body = {};
  try { body = await response.json(); } catch (_) { /* non-JSON answer */ }
  return { ok: response.ok, status: response.status, body };
}

// --- live view: MJPEG stream, falling back to polling single frames ---------------------------
function startLiveView() {
  const img = $("live");
  const frameUrl = img.dataset.frameUrl;
  let polling = false;
  img.addEventListener("error", () => {
    if (!polling) {
      polling = true;
      $("live-note").hidden = false;
      $("live-note").textContent = "Live stream unavailable; showing single frames.";
    }
    setTimeout(() => { img.src = frameUrl + "?t=" + Date.now(); }, 3000);
  });
  img.addEventListener("load", () => {
    if (polling) {
      $("live-note").hidden = true;
      setTimeout(() => { img.src = frameUrl + "?t=" + Date.now(); }, 1000);
    }
  });
}

// --- every item of a frame: outline + label over the live view and over the query image ---------
const SVG_NS = "http://www.w3.org/2000/svg";
let itemsTimer = null;

function isQuad(q) {
  return Array.isArray(q) && q.length === 4 && q.every((p) => Array.isArray(p) && p.length === 2);
}

// Draws one polygon per item with a quad into ``svg`` and its label (text, never HTML) into ``labels``.
function drawItems(svg, labels, matches) {
  svg.replaceChildren();
  labels.replaceChildren();
  const shown = (Array.isArray(matches) ? matches : []).filter((m) => m && isQuad(m.quad));
  for (const m of shown) {
    const poly = document.createElementNS(SVG_NS, "polygon");
    poly.setAttribute("points", m.quad.map((p) => Number(p[0]) + "," + Number(p[1])).join(" "));
    poly.classList.add("item");
    svg.appendChild(poly);
    const span = document.createElement("span");
    span.textContent = str(m.label);
    span.title = str(m.id) + (Number.isInteger(m.inliers) ? " · " + m.inliers + " verified points" : "");
    const cx = m.quad.reduce((a, p) => a + Number(p[0]), 0) / 4;
    const cy = m.quad.reduce((a, p) => a + Number(p[1]), 0) / 4;
    span.style.left = (Math.min(Math.max(cx, 0), 1) * 100).toFixed(2) + "%";
    span.style.top = (Math.min(Math.max(cy, 0), 1) * 100).toFixed(2) + "%";
    labels.appendChild(span);
  }
  return shown.length;
}

// The live view's outlines: every item of the newest camera lookup (the match first), for REGION_SHOW_MS, or
// until the view changes (hideItems).
function hideItems() {
  clearTimeout(itemsTimer);
  $("items").hidden = $("items-labels").hidden = true;
}

function showItems(matches) {
  hideItems();
  const n = drawItems($("items"), $("items-labels"), matches);
  $("items").hidden = $("items-labels").hidden = n === 0;
  if (n) itemsTimer = setTimeout(hideItems, REGION_SHOW_MS);
}

// The query image of the lookup on screen (an uploaded photo or a camera frame): its items outlined.
function showQueryItems(data) {
  drawItems($("query-items"), $("query-items-labels"), data.image_url ? data.matches : []);
}

function itemsText(matches) {
  const n = Array.isArray(matches) ? matches.length : 0;
  return n > 1 ? " · " + n + " items: " + matches.map((m) => str(m.label)).join(", ") : "";
}

// --- one lookup on screen: query image beside its candidates ------------------------------------
// One word a person reads (the device's: high = the match, verified by many points; medium = the match on less
// evidence; low = not the match); the numbers behind it in the tooltip.
function scoreText(c) {
  return c.confidence ? str(c.confidence) + " confidence" : "cosine " + Number(c.score).toFixed(3);
}

function scoreTitle(c) {
  const parts = ["cosine similarity " + Number(c.score).toFixed(3) + " (1 = identical)"];
  parts.push(Number.isInteger(c.inliers) ? c.inliers + " verified matching points" : "not verified");
  parts.push("ranked by " + Number(c.rank_score ?? c.score).toFixed(3) + " (cosine + a share for the points)");
  return parts.join(" · ");
}

// An item as a person reads it: its label, and its id only when that says something more.
function named(c) {
  const id = str(c.id), label = str(c.label);
  return label && (label === id || id.split("/").pop() === label) ? label : label + " (" + id + ")";
}

function card(c) {
  const li = $("card-template").content.firstElementChild.cloneNode(true);
  const thumb = li.querySelector(".thumb");
  if (c.thumbnail_url) { thumb.src = c.thumbnail_url; } else { thumb.remove(); }
  thumb.alt = str(c.label);
  li.querySelector(".label").textContent = str(c.label);
  li.querySelector(".id").textContent = str(c.id) === str(c.label) ? "" : str(c.id);  // not "rocket" twice
  const attrs = attributesText(c);
  if (attrs) {  // the item's attributes (sku, price, …), as text
    const span = document.createElement("span");
    span.className = "attrs";
    span.textContent = attrs;
    li.querySelector(".id").after(span);
  }
  return li;
}

function attributesText(c) {
  const a = c && c.attributes && typeof c.attributes === "object" ? c.attributes : {};
  return Object.entries(a).map(([k, v]) => str(k) + ": " + str(v)).join(" · ");
}

function itemUrl(id) { return "/api/catalog/" + str(id).split("/").map(encodeURIComponent).join("/"); }

function renderResult(data) {
  const list = $("candidates");
  list.replaceChildren();
  // "match" is optional: absent = not verified yet, null = "no match", object = the match
  const hasMatch = Object.prototype.hasOwnProperty.call(data, "match");
  const match = hasMatch ? data.match : undefined;
  for (const c of data.results || []) {
    const li = card(c);
    const score = li.querySelector(".score");
    score.textContent = scoreText(c);
    score.title = scoreTitle(c);
    if (match && match.id === c.id) li.classList.add("match");
    list.appendChild(li);
  }
  list.classList.toggle("greyed", hasMatch && match === null);

  const line = $("match-line");
  line.hidden = !hasMatch;
  line.classList.toggle("no-match", match === null);
  if (hasMatch) {
    const verified = match && Number.isInteger(match.inliers) ? " · " + match.inliers + " matching points" : "";
    line.textContent = match === null ? "no match (the nearest catalog items are shown greyed)"
      : "match: " + named(match) + (match.confidence ? " · " + str(match.confidence) + " confidence" : "") + verified
        + (attributesText(match) ? " · " + attributesText(match) : "") + itemsText(data.matches);
    line.title = match ? scoreTitle(match) : "";
  }
  showQueryItems(data);

  const figure = $("query-figure");
  figure.hidden = !data.image_url;
  if (data.image_url) {
    $("query-img").src = data.image_url;
    $("query-caption").textContent = data.source === "upload" ? "your photo" : "camera frame";
  }
  if (data.timestamp == null) {
    $("result-meta").textContent = "— nothing yet";
    $("timings").textContent = "";
    return;
  }
  const when = new Date(data.timestamp * 1000).toLocaleTimeString();
  $("result-meta").textContent = "— " + (SOURCES[data.source] || str(data.source)) + " at " + when;
  const timings = data.timings_ms || {};
  const parts = Object.entries(timings).filter(([k]) => k !== "total").map(([k, ms]) => k + " " + Number(ms).toFixed(1));
  $("timings").textContent = parts.length && timings.total != null
    ? parts.join(" · ") + " · total " + Number(timings.total).toFixed(1) + " ms" : "";
}

function show(entry, pinMs) {
  shownN = entry.n;
  pinnedUntil = pinMs ? Date.now() + pinMs : 0;
  renderResult(entry);
  $("pinned-note").hidden = !pinMs;
  for (const b of document.querySelectorAll("#history-strip .hist")) {
    b.classList.toggle("selected", Number(b.dataset.n) === entry.n);
  }
}

// --- recent lookups -------------------------------------------------------------------------
function renderHistory() {
  const strip = $("history-strip");
  strip.replaceChildren();
  for (const e of historyEntries) {
    const li = $("history-template").content.firstElementChild.cloneNode(true);
    const b = li.querySelector(".hist");
    b.dataset.n = String(e.n);
    const snap = li.querySelector(".snap");
    if (e.image_url) { snap.src = e.image_url; } else { snap.remove(); }
    const m = e.match;
    snap.alt = "what lookup " + e.n + " saw";
    li.querySelector(".decision").textContent = m
      ? str(m.label) + (Array.isArray(e.matches) && e.matches.length > 1 ? " +" + (e.matches.length - 1) : "")
      : "no match";
    b.classList.add(m ? "is-match" : "is-none");
    li.querySelector(".when").textContent = (SOURCES[e.source] || str(e.source)).split(" ")[0] + " "
      + new Date(e.timestamp * 1000).toLocaleTimeString();
    b.title = "lookup #" + e.n + (m ? ": " + named(m) + " · " + str(m.confidence || "") + " confidence"
      + (Number.isInteger(m.inliers) ? " · " + m.inliers + " matching points" : "") : ": no match");
    b.addEventListener("click", () => show(e, Infinity));
    b.classList.toggle("selected", e.n === shownN);
    strip.appendChild(li);
  }
}

async function refreshHistory() {
  const { ok, body } = await getJson("/api/history?limit=" + HISTORY_SHOWN);
  if (!ok) return;
  historyEntries = body.entries || [];
  showNewest();
}

// A finished lookup told by the device (its history entry): no request needed.
function lookupFinished(entry) {
  requestedAt = 0;
  cue(false);
  if (entry.n == null) return;  // a device without a history
  latestN = Math.max(latestN ?? 0, entry.n);
  historyEntries = [entry, ...historyEntries.filter((e) => e.n !== entry.n)].slice(0, HISTORY_SHOWN);
  showNewest();
}

function showNewest() {
  const newest = historyEntries[0];
  if (newest && Date.now() > pinnedUntil && newest.n !== shownN) {
    // "Showing your photo's result." and the like are over; an error the user has not had time to read stays
    if (shownN !== undefined && Date.now() - statusAt > NOTE_HOLD_MS) setStatus("");
    show(newest, 0);
    // a newer lookup without a verified region (no match, another item, an upload) ends the outline at once
    showItems(newest.source !== "upload" ? newest.matches : []);
  }
  renderHistory();
}

// --- live status ----------------------------------------------------------------------------
function statusRow(name, value, bad) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = value;
  if (bad) dd.classList.add("bad");
  $("status-panel").append(dt, dd);
}

function renderStatus(s) {
  $("status-panel").replaceChildren();
  const cam = s.camera || {};
  const state = str(cam.state || "absent");
  const lost = !["streaming", "absent"].includes(state);
  statusRow("camera", state + (cam.fps ? " · " + Number(cam.fps).toFixed(1) + " fps" : ""), lost);
  const t = s.trigger || {};
  if (t.enabled && t.armed) hideItems();  // the view changed since the last lookup: the item moved or left
  statusRow("trigger", !t.enabled ? "off (button and uploads only)"
    : (t.armed ? "armed: waiting for a still view" : "waiting for a change")
      + (t.sharpness != null ? " · sharpness " + Number(t.sharpness).toFixed(0) : ""));
  statusRow("lookups", String(s.lookups_per_min ?? 0) + " in the last minute");
  const err = s.last_error;
  statusRow("last error", err ? str(err.message) + " (" + new Date(err.timestamp * 1000).toLocaleTimeString() + ")"
    : "none", !!err);
  const p = s.process || {};
  statusRow("process", (p.cpu_percent != null ? Number(p.cpu_percent).toFixed(0) + " % CPU" : "CPU ?") + " · "
    + (p.rss_mb != null ? Number(p.rss_mb).toFixed(0) + " MB RSS" : "RSS ?"));
  const idx = s.index || {};
  statusRow("index", str(idx.size) + " items · " + str(idx.generation));
  const empty = idx.size === 0;
  $("empty-catalog").hidden = !empty;
  const v = s.verification || {};
  statusRow("verification", v.enabled ? "on (top " + str(v.top_k) + ", ≥ " + str(v.accept_inliers) + " points)"
    : "off: " + (empty ? "the catalog is empty" : str(v.why)));

  const banner = $("camera-banner");
  banner.hidden = !lost;
  if (lost) banner.textContent = "Camera lost (" + state + ")" + (cam.last_error ? ": " + str(cam.last_error) : "")
    + ". The device keeps trying; uploads still work.";
  const badge = $("camera-badge");
  badge.textContent = "camera: " + state;
  badge.className = "badge " + (state === "streaming" ? "good" : state === "absent" ? "unknown" : "bad");

  cue(s.looking_up || (requestedAt && Date.now() - requestedAt < 5000));
  const n = s.latest ? s.latest.n : null;
  if (n != null && n !== latestN) {  // a lookup this page was not told of (polling, or while reconnecting)
    if (pushOpen && synced) {  // its lookup_finished may be right behind this status: give it a second
      setTimeout(() => { if ((latestN ?? 0) < n) { latestN = n; refreshHistory(); } }, 1000);
    } else {
      latestN = n;
      requestedAt = 0;
      cue(false);
      refreshHistory();
    }
  }
  synced = pushOpen;
}

// The "looking up…" cue: up at once, down no sooner than CUE_MIN_MS after it went up.
function cue(on) {
  clearTimeout(cueTimer);
  if (on) {
    if (!cueSince) cueSince = Date.now();
    $("cue").hidden = false;
    return;
  }
  const left = cueSince ? CUE_MIN_MS - (Date.now() - cueSince) : 0;
  if (left > 0) { cueTimer = setTimeout(() => cue(false), left); return; }
  cueSince = 0;
  $("cue").hidden = true;
}

function unreachable() {
  $("camera-badge").textContent = "device unreachable";
  $("camera-badge").className = "badge bad";
}

async function pollStatus() {
  if (pushOpen) { polling = false; return; }  // the stream tells us now
  try {
    const { ok, body } = await getJson("/api/status");
    if (ok) renderStatus(body);
  } catch (_) { unreachable(); }
  setTimeout(pollStatus, POLL_MS);
}

function startPolling() {
  document.body.dataset.updates = "polling";
  if (!polling) { polling = true; pollStatus(); }
}

// --- server push: GET /api/events -------------------------------------------------------------
function startPush() {
  if (!window.EventSource) { startPolling(); return; }
  const events = new EventSource("/api/events");
  const data = (handler) => (e) => { try { handler(JSON.parse(e.data)); } catch (_) { /* a bad event */ } };
  events.addEventListener("open", () => {
    pushOpen = true;
    synced = false;
    clearTimeout(graceTimer);
    document.body.dataset.updates = "push";
  });
  events.addEventListener("error", () => {
    pushOpen = false;
    clearTimeout(graceTimer);
    if (events.readyState === EventSource.CLOSED) {  // refused (503) or not a stream: the browser gives up
      events.close();
      startPolling();
      setTimeout(startPush, PUSH_RETRY_MS);
    } else {  // the stream ended (sse.stream_max_s) or broke: the browser reconnects by itself
      graceTimer = setTimeout(() => { if (!pushOpen) startPolling(); }, PUSH_GRACE_MS);
    }
  });
  events.addEventListener("status", data(renderStatus));
  events.addEventListener("lookup_started", data((d) => {
    if (d.source !== "upload") { cue(true); hideItems(); }  // a new view is being looked up: the old outline is over
  }));
  events.addEventListener("lookup_finished", data(lookupFinished));
  events.addEventListener("catalog_changed", () => { if ($("catalog").open) loadCatalog(true); });
}

function formatUptime(s) {
  s = Math.floor(Number(s) || 0);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m";
}

async function pollHealth() {
  try {
    const { body } = await getJson("/api/health");
    const bits = [];
    if (body.bundle) bits.push("model " + str(body.bundle.name || "?") +
      (body.bundle.quantization ? " (" + str(body.bundle.quantization) + ")" : ""));
    if (body.uptime_s != null) bits.push("up " + formatUptime(body.uptime_s));
    bits.push(body.ok ? "healthy" : "NOT healthy");
    $("health-line").textContent = bits.join(" · ");
  } catch (_) { /* the status poll shows "unreachable" */ }
  setTimeout(pollHealth, 10000);
}

// --- actions --------------------------------------------------------------------------------
async function lookupNow() {
  setStatus("Looking up…");
  try {
    const { ok, body } = await getJson("/api/lookup", { method: "POST" });
    pinnedUntil = 0;
    $("pinned-note").hidden = true;
    requestedAt = ok ? Date.now() : 0;
    cue(ok);
    setStatus(ok ? "Lookup requested." : "Failed: " + str(body.error || "error"));
  } catch (_) { setStatus("Device unreachable."); }
}

async function upload(event) {
  event.preventDefault();
  const form = event.target;
  if (!$("upload-file").files.length) { setStatus("Choose a photo first."); return; }
  setStatus("Searching…");
  try {
    const { ok, body } = await getJson(form.action, { method: "POST", body: new FormData(form) });
    if (!ok) { setStatus("Failed: " + str(body.error || "error")); return; }
    pinnedUntil = Date.now() + PIN_UPLOAD_MS;
    await refreshHistory();
    const mine = historyEntries.find((e) => e.source === "upload" && e.timestamp === body.timestamp);
    show(mine || body, PIN_UPLOAD_MS);
    setStatus("Showing your photo's result.");
  } catch (_) { setStatus("Device unreachable."); }
}

// --- catalog manager ------------------------------------------------------------------------
let catalogOffset = 0;
let catalogTotal = 0;
let searchTimer = null;

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
function authHeaders() { return token() ? { Authorization: "Bearer " + token() } : {}; }
function catalogNote(text) { $("catalog-note").textContent = text; }

function showTokenState() {
  $("token-forget").hidden = !token();
  $("token").placeholder = token() ? "token set for this tab" : "web.api_token";
}

// told (catalog_changed): the grid is not redrawn under a user who is confirming a delete
const confirming = () => document.querySelector("#catalog-grid .delete[data-armed='1']") !== null;

async function loadCatalog(told = false) {
  if (told && confirming()) return;
  const q = $("catalog-search").value.trim();
  const url = "/api/catalog?limit=" + CATALOG_PAGE + "&offset=" + catalogOffset + (q ? "&q=" + encodeURIComponent(q) : "");
  const { ok, body } = await getJson(url);
  if (!ok) { catalogNote("Cannot load the catalog: " + str(body.error)); return; }
  if (told && confirming()) return;
  catalogTotal = body.total;
  $("catalog-total").textContent = "(" + str(body.total) + (q ? " found" : "") + ")";
  const grid = $("catalog-grid");
  grid.replaceChildren();
  for (const item of body.items) {
    const li = card({ ...item, thumbnail_url: itemUrl(item.id) + "/thumb.jpg" });
    li.dataset.id = item.id;
    const del = document.createElement("button");
    del.type = "button";
    del.className = "secondary delete";
    del.textContent = "Delete";
    del.addEventListener("click", () => removeItem(item.id, del));
    const photos = document.createElement("button");  // the item's photos, and one more from the camera
    photos.type = "button";
    photos.className = "secondary photos";
    photos.textContent = (item.photos > 1 ? item.photos + " photos" : "1 photo") + " …";
    photos.addEventListener("click", () => showPhotos(item.id, li));
    li.querySelector(".score").replaceWith(photos, del);
    grid.appendChild(li);
    if (openPhotos.has(item.id)) showPhotos(item.id, li);
  }
  const pages = Math.max(1, Math.ceil(body.total / CATALOG_PAGE));
  $("catalog-page").textContent = "page " + (Math.floor(catalogOffset / CATALOG_PAGE) + 1) + " of " + pages;
  $("catalog-prev").disabled = catalogOffset === 0;
  $("catalog-next").disabled = catalogOffset + CATALOG_PAGE >= body.total;
}

// An item's photos under its card, and "Add a photo from the camera" (a box's other side). The strips stay open
// when the grid is drawn again (a catalog change redraws it).
const openPhotos = new Set();
const cardOf = (id) => [...document.querySelectorAll("#catalog-grid .card")].find((c) => c.dataset.id === id);

async function showPhotos(id, li) {
  openPhotos.add(id);
  const { ok, body } = await getJson(itemUrl(id));
  if (!ok) { openPhotos.delete(id); catalogNote("Cannot load " + id + ": " + str(body.error)); return; }
  let strip = li.querySelector(".photo-strip");
  if (!strip) { strip = document.createElement("div"); strip.className = "photo-strip"; li.appendChild(strip); }
  strip.replaceChildren();
  for (const p of body.photos) {
    const img = document.createElement("img");
    img.src = str(p.thumbnail);
    img.alt = str(body.label) + (p.photo ? " — " + str(p.photo) : "");
    img.title = p.photo ? str(p.photo) : "first photo";
    strip.appendChild(img);
  }
  const add = document.createElement("button");
  add.type = "button";
  add.className = "secondary add-photo";
  add.textContent = "Add a photo from the camera";
  add.addEventListener("click", () => addPhotoFromCamera(id, li));
  strip.appendChild(add);
}

async function addPhotoFromCamera(id, li) {
  if (!token()) { catalogNote("Enter the API token first."); return; }
  catalogNote("adding a photo to " + id + "…");
  const { ok, body } = await getJson(itemUrl(id) + "/photos", { method: "POST",
    headers: { ...authHeaders(), "Content-Type": "application/json" }, body: "{}" });
  if (!ok) { catalogNote("Failed: " + str(body.error || "error")); return; }
  catalogNote("added photo " + str(body.photo) + " to " + id + ".");
  // drawn again once indexed, unless the strip was closed meanwhile (the item removed: no request for what is gone)
  setTimeout(() => { if (openPhotos.has(id)) showPhotos(id, cardOf(id) || li); }, 1000);
}

async function catalogHas(id) {
  const { ok, body } = await getJson("/api/catalog?limit=50&q=" + encodeURIComponent(id));
  return ok && body.items.some((it) => it.id === id);
}

// The enrolment is queued (202): the index is rebuilt in the background; say so until the item is listed.
async function waitIndexed(id) {
  for (let i = 0; i < 120; i++) {
    catalogNote("indexing " + id + "…");
    if (await catalogHas(id)) { catalogNote("enrolled " + id + "."); loadCatalog(); return; }
    await new Promise((r) => setTimeout(r, 1000));
  }
  catalogNote("still indexing " + id + "; see the status panel for errors.");
}

async function sendEnrol(url, options) {
  if (!token()) { catalogNote("Enter the API token first."); return; }
  catalogNote("Sending…");
  try {
    const { ok, body } = await getJson(url, { method: "POST", ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
    if (!ok) { catalogNote("Failed: " + str(body.error || "error")); return; }
    $("enrol-label").value = "";
    $("enrol-id").value = "";
    $("enrol-file").value = "";
    waitIndexed(str(body.id));
  } catch (_) { catalogNote("Device unreachable."); }
}

function enrolUpload(event) {
  event.preventDefault();
  if (!$("enrol-file").files.length) { catalogNote("Choose a photo, or enrol what the camera sees."); return; }
  sendEnrol(event.target.action, { body: new FormData(event.target) });
}

function enrolCamera() {
  const label = $("enrol-label").value.trim();
  if (!label) { catalogNote("Give it a label first."); return; }
  sendEnrol("/api/catalog/camera", { headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ label, id: $("enrol-id").value.trim() }) });
}

async function removeItem(id, button) {
  if (!token()) { catalogNote("Enter the API token first."); return; }
  if (button.dataset.armed !== "1") {  // a second click confirms: no modal dialog
    button.dataset.armed = "1";
    button.textContent = "Sure? Delete";
    return;
  }
  button.disabled = true;
  openPhotos.delete(id);  // a redraw or a pending refresh does not ask for the photos of an item being removed
  catalogNote("removing " + id + "…");
  const { ok, body } = await getJson(itemUrl(id), { method: "DELETE", headers: authHeaders() });
  catalogNote(ok ? "removed " + id + "." : "Failed: " + str(body.error || "error"));
  loadCatalog();
}

function startCatalog() {
  $("catalog").addEventListener("toggle", (e) => { if (e.target.open) loadCatalog(); });
  document.querySelector("#empty-catalog a").addEventListener("click", () => { $("catalog").open = true; });
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const value = $("token").value.trim();
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    showTokenState();
    catalogNote(value ? "Token kept for this tab." : "");
  });
  $("token-forget").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); showTokenState(); });
  $("enrol-form").addEventListener("submit", enrolUpload);
  $("enrol-camera").addEventListener("click", enrolCamera);
  $("catalog-search").addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => { catalogOffset = 0; loadCatalog(); }, 300);
  });
  $("catalog-prev").addEventListener("click", () => { catalogOffset = Math.max(0, catalogOffset - CATALOG_PAGE); loadCatalog(); });
  $("catalog-next").addEventListener("click", () => {
    if (catalogOffset + CATALOG_PAGE < catalogTotal) { catalogOffset += CATALOG_PAGE; loadCatalog(); }
  });
  showTokenState();
}

document.addEventListener("DOMContentLoaded", () => {
  startLiveView();
  $("lookup-now").addEventListener("click", lookupNow);
  $("upload-form").addEventListener("submit", upload);
  $("follow-live").addEventListener("click", () => {
    pinnedUntil = 0;
    if (historyEntries[0]) show(historyEntries[0], 0);
  });
  startCatalog();
  startPush();
  pollHealth();
});
