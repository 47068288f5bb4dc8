// The appliance page: live view, latest lookup, "Look up now", photo upload, health line.
// Plain JS, no build step. Data from the device is only ever written with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
let shownTimestamp = undefined; // timestamp of the result on screen
let pinnedUntil = 0;            // an upload's result stays on screen a while before camera results replace it

function setStatus(text) { $("action-status").textContent = text; }

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

// --- results --------------------------------------------------------------------------------
function renderResult(data) {
  const list = $("candidates");
  list.replaceChildren();
  const template = $("card-template");
  // "match" is optional: absent = not verified yet, null = verified "no match", object = the match
  const hasMatch = Object.prototype.hasOwnProperty.call(data, "match");
  const match = hasMatch ? data.match : undefined;
  for (const c of data.results || []) {
    const card = template.content.firstElementChild.cloneNode(true);
    const thumb = card.querySelector(".thumb");
    if (c.thumbnail_url) { thumb.src = c.thumbnail_url; } else { thumb.remove(); }
    thumb.alt = String(c.label ?? "");
    card.querySelector(".label").textContent = String(c.label ?? "");
    card.querySelector(".id").textContent = String(c.id ?? "");
    card.querySelector(".score").textContent = (Number(c.score) * 100).toFixed(1) + " %"
      + (Number.isInteger(c.inliers) ? " · " + c.inliers + " pts" : "");
    if (match && match.id === c.id) card.classList.add("match");
    list.appendChild(card);
  }
  list.classList.toggle("greyed", hasMatch && match === null);

  const line = $("match-line");
  line.hidden = !hasMatch;
  line.classList.toggle("no-match", match === null);
  if (hasMatch) {
    const verified = match && Number.isInteger(match.inliers)
      ? " · verified · " + match.inliers + " matching points" : "";
    line.textContent = match === null ? "no match (nearest candidates shown greyed out)"
      : "match: " + String(match.label ?? "") + " (" + String(match.id ?? "") + ")" + verified;
  }

  if (data.timestamp == null) {
    $("result-meta").textContent = "— nothing yet";
    $("timings").textContent = "";
    return;
  }
  const when = new Date(data.timestamp * 1000).toLocaleTimeString();
  $("result-meta").textContent = "— " + String(data.source ?? "") + " at " + when;
  const timings = data.timings_ms || {};
  const parts = [];
  let total = 0;
  for (const [stage, ms] of Object.entries(timings)) {
    if (stage === "total") continue;
    parts.push(stage + " " + Number(ms).toFixed(1));
    total += Number(ms);
  }
  if (timings.total != null) total = Number(timings.total);
  $("timings").textContent = parts.length
    ? parts.join(" · ") + " · total " + total.toFixed(1) + " ms" : "";
}

async function pollLatest() {
  try {
    const { ok, body } = await getJson("/api/results/latest");
    if (ok && Date.now() > pinnedUntil && body.timestamp !== shownTimestamp) {
      shownTimestamp = body.timestamp;
      renderResult(body);
    }
  } catch (_) { /* device restarting: try again next tick */ }
  setTimeout(pollLatest, 1000);
}

// --- health ---------------------------------------------------------------------------------
function formatUptime(s) {
  s = Math.floor(Number(s) || 0);
  const d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m";
}

async function pollHealth() {
  const badge = $("camera-badge");
  try {
    const { body } = await getJson("/api/health");
    const camera = body.camera || {};
    const state = String(camera.state ?? (body.camera ? "unknown" : "absent"));
    badge.textContent = "camera: " + state;
    badge.className = "badge " + (["running", "ok", "streaming"].includes(state) ? "good"
      : ["absent", "disabled", "none"].includes(state) ? "unknown" : "bad");
    const bits = [];
    if (body.bundle) bits.push("model " + String(body.bundle.name ?? "?") +
      (body.bundle.quantization ? " (" + String(body.bundle.quantization) + ")" : ""));
    if (body.index) bits.push("index " + String(body.index.size ?? "?") + " items" +
      (body.index.generation != null ? ", gen " + String(body.index.generation) : ""));
    if (body.uptime_s != null) bits.push("up " + formatUptime(body.uptime_s));
    bits.push(body.ok ? "healthy" : "NOT healthy");
    $("health-line").textContent = bits.join(" · ");
  } catch (_) {
    badge.textContent = "device unreachable";
    badge.className = "badge bad";
  }
  setTimeout(pollHealth, 2000);
}

// --- actions --------------------------------------------------------------------------------
async function lookupNow() {
  setStatus("Looking up…");
  try {
    const { ok, body } = await getJson("/api/lookup", { method: "POST" });
    pinnedUntil = 0;
    setStatus(ok ? "Lookup requested." : "Failed: " + String(body.error ?? "error"));
  } catch (_) { setStatus("Device unreachable."); }
}

async function upload(event) {
  event.preventDefault();
  const form = event.target;
  if (!$("upload-file").files.length) { setStatus("Choose a photo first."); return; }
  setStatus("Searching…");
  try {
    const { ok, body } = await getJson(form.action, { method: "POST", body: new FormData(form) });
    if (!ok) { setStatus("Failed: " + String(body.error ?? "error")); return; }
    pinnedUntil = Date.now() + 15000;
    shownTimestamp = body.timestamp;
    renderResult(body);
    setStatus("Showing your photo's result.");
  } catch (_) { setStatus("Device unreachable."); }
}

// --- catalog list (paged, loaded when opened) -------------------------------------------------
let catalogOffset = 0;
async function loadCatalogPage() {
  const { ok, body } = await getJson("/api/catalog?limit=50&offset=" + catalogOffset);
  if (!ok) return;
  $("catalog-total").textContent = "(" + String(body.total) + ")";
  for (const item of body.items) {
    const li = document.createElement("li");
    li.textContent = String(item.label ?? "") + " — " + String(item.id ?? "");
    $("catalog-list").appendChild(li);
  }
  catalogOffset += body.items.length;
  $("catalog-more").hidden = catalogOffset >= body.total;
}

document.addEventListener("DOMContentLoaded", () => {
  startLiveView();
  $("lookup-now").addEventListener("click", lookupNow);
  $("upload-form").addEventListener("submit", upload);
  $("catalog").addEventListener("toggle", (e) => {
    if (e.target.open && catalogOffset === 0) loadCatalogPage();
  });
  $("catalog-more").addEventListener("click", loadCatalogPage);
  pollLatest();
  pollHealth();
});
