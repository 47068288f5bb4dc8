"""The page in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by Selenium; nothing
downloads a browser) against a real ``serve`` on 127.0.0.1 whose camera plays the demo video with the trigger on.

Skipped, with the reason, when chromium, chromedriver or selenium is missing (``make test`` installs them when it
can). With ``SCREENSHOTS_DIR`` set, the desktop and phone screenshots are written there (docs/ in the README)."""
from __future__ import annotations

import io
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
from PIL import Image

from edge_retrieval.app.demo import materialise_demo
from edge_retrieval.imaging.codec import encode_jpeg
from tests.support.serve import AUTH, TOKEN, Serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - the dev extra has it
    webdriver = None

pytestmark = pytest.mark.skipif(
    webdriver is None or not CHROMIUM or not CHROMEDRIVER,
    reason="browser tests need selenium (dev extra) and Debian's chromium + chromium-driver "
           "(apt-get install chromium chromium-driver; `make test` installs them when root)")

WAIT_S = 60  # a generous bound for a busy 2-core machine
# axe-core (npm, MPL-2.0; a test tool, never shipped): `make test` installs it under .venv/axe when npm is there
AXE_JS = Path(os.environ.get("AXE_CORE_JS") or
              Path(__file__).resolve().parents[2] / ".venv/axe/node_modules/axe-core/axe.min.js")


@pytest.fixture(scope="module")
def server(tmp_path_factory, catalog_dir):
    work = tmp_path_factory.mktemp("browser")
    _, video = materialise_demo(work / "demo", seconds_per_view=1.5)
    # heartbeats every 2 s: a stream whose client went away (the refused-stream test's) frees its slot soon
    s = Serve(work, catalog_dir, camera=video, trigger=True, extra_config="sse:\n  heartbeat_s: 2.0\n")
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def driver():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    d.set_page_load_timeout(WAIT_S)
    yield d
    d.quit()


def _url(server, path: str = "/") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def _wait(driver, condition, what: str):
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(lambda d: condition(d), message=what)


def _text(driver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def _history_size(driver) -> int:
    return len(driver.find_elements(By.CSS_SELECTOR, "#history-strip .hist"))


def _catalog_ids(driver) -> list[str]:
    # read in one script: the grid is re-rendered while the search box is typed into
    return driver.execute_script(
        "return [...document.querySelectorAll('#catalog-grid .card')].map((c) => c.dataset.id)")


def _severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _screenshot(driver, name: str) -> None:
    folder = os.environ.get("SCREENSHOTS_DIR")
    if folder:
        image = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        image.save(Path(folder) / name, "JPEG", quality=70, optimize=True)


def test_page_loads_clean_and_a_triggered_result_appears_without_reload(server, driver):
    _open_page(driver, server)
    _wait(driver, lambda d: _history_size(d) >= 1 and "camera" in _text(d, "result-meta"),
          "a camera-triggered lookup on the page")
    # the query frame is shown beside its candidates, and the candidates carry one ranked score with its why
    assert "/api/history/" in driver.find_element(By.ID, "query-img").get_attribute("src")
    score = driver.find_element(By.CSS_SELECTOR, "#candidates .score")
    assert "ranked by" in score.get_attribute("title") and "cosine" in score.get_attribute("title")
    assert "pts" not in score.text
    # one score a person reads — the same word as the CLI — with the cosine and the points in its tooltip
    assert score.text in {"high confidence", "medium confidence", "low confidence"}
    if _text(driver, "match-line").startswith("match: "):
        assert "confidence" in _text(driver, "match-line") and "(" not in _text(driver, "match-line")  # no "x (x)"
    # the status panel is fed by /api/status
    _wait(driver, lambda d: "streaming" in _text(d, "status-panel") and "MB RSS" in _text(d, "status-panel"),
          "the status panel")
    assert driver.find_element(By.ID, "camera-banner").get_attribute("hidden") is not None
    assert _severe(driver) == []


def _open_page(driver, server):
    """The device's page, loaded by this test (each test runs alone too), once it shows a lookup. The last page's
    live view and event stream are let go first: until the server next writes to them they hold two of its four
    long-lived slots (web.threads - 2), and a page loaded over a few such would be refused its live view (a 503 the
    browser logs; the page then shows single frames)."""
    driver.get("about:blank")
    _wait(driver, lambda d: _open_streams(server) == 0, "the last page's streams to close")
    driver.get_log("browser")  # what the last page logged is its test's, not this one's
    driver.get(_url(server))
    _wait(driver, lambda d: _history_size(d) >= 1, "the page with its history")


def test_look_up_now_is_labelled_requested(server, driver):
    _open_page(driver, server)
    before = _history_size(driver)
    driver.find_element(By.ID, "lookup-now").click()
    _wait(driver, lambda d: "requested" in _text(d, "result-meta"), "a 'requested' lookup")
    assert _history_size(driver) >= min(before + 1, 20)


def test_an_upload_shows_the_users_photo_and_its_result_and_the_history_grows(server, driver, photos, tmp_path):
    _open_page(driver, server)
    photo = tmp_path / "my photo.jpg"
    photo.write_bytes(encode_jpeg(photos["astronaut"], 90))
    before = _history_size(driver)
    driver.find_element(By.ID, "upload-file").send_keys(str(photo))
    driver.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    _wait(driver, lambda d: _text(d, "query-caption") == "your photo", "the uploaded photo beside its result")
    assert "upload" in _text(driver, "result-meta")
    assert "/api/history/" in driver.find_element(By.ID, "query-img").get_attribute("src")
    assert driver.find_elements(By.CSS_SELECTOR, "#candidates .card")
    assert _history_size(driver) >= min(before + 1, 20)
    status, body = server.request("GET", "/api/history?limit=5")
    assert status == 200 and any(e["source"] == "upload" for e in body["entries"])
    # an earlier lookup opens beside its candidates when clicked
    driver.find_elements(By.CSS_SELECTOR, "#history-strip .hist")[-1].click()
    assert not driver.find_element(By.ID, "pinned-note").get_attribute("hidden")
    _screenshot(driver, "page-desktop.jpg")
    assert _severe(driver) == []


def test_a_later_camera_lookup_replaces_the_note_about_the_visitors_photo(server, driver, photos, tmp_path):
    _open_page(driver, server)
    photo = tmp_path / "not a photo.jpg"
    photo.write_bytes(b"this is not a photo")
    driver.find_element(By.ID, "upload-file").send_keys(str(photo))
    driver.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    _wait(driver, lambda d: _text(d, "action-status").startswith("Failed:"), "the visitor's error, told to them")
    # …and left to read: the camera's next lookups (every 1.5 s here) do not clear it at once (NOTE_HOLD_MS, 8 s)
    seen, newest = time.monotonic(), _newest_n(driver)
    _wait(driver, lambda d: (_newest_n(d) or 0) > (newest or 0), "a camera lookup after the error")
    if time.monotonic() - seen < 4:  # well inside the hold (it counts from before the note was first seen)
        assert _text(driver, "action-status").startswith("Failed:")
    # ...and not the device's: its status panel does not show it as its last error
    _wait(driver, lambda d: "last error" in _text(d, "status-panel"), "the status panel")
    assert "not an image" not in _text(driver, "status-panel")
    good = tmp_path / "mine.jpg"
    good.write_bytes(encode_jpeg(photos["astronaut"], 90))
    driver.find_element(By.ID, "upload-file").send_keys(str(good))
    driver.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    _wait(driver, lambda d: _text(d, "action-status") == "Showing your photo's result.", "the upload's result")
    driver.find_element(By.ID, "follow-live").click()  # (else the camera's lookups come after 15 s)
    driver.find_element(By.ID, "lookup-now").click()
    _wait(driver, lambda d: "requested" in _text(d, "result-meta"), "a camera lookup after the upload")
    assert "your photo" not in _text(driver, "action-status")
    # the browser logs the refused upload's 400 itself, and nothing else
    assert all("/api/query" in e["message"] and "400" in e["message"] for e in _severe(driver))


def test_the_page_passes_an_automated_accessibility_check(server, driver):
    """axe-core's WCAG 2 A/AA rules (contrast, alt texts, labels, …) on the page with a result, the history and
    the catalog open."""
    if not AXE_JS.is_file():
        pytest.skip(f"axe-core is not installed at {AXE_JS} (npm install --prefix .venv/axe axe-core; `make test` "
                    "does it when npm is there), or set AXE_CORE_JS")
    _open_page(driver, server)
    _wait(driver, lambda d: _history_size(d) >= 1 and d.find_elements(By.CSS_SELECTOR, "#candidates .card"),
          "a lookup on the page")
    driver.find_element(By.CSS_SELECTOR, "#catalog summary").click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#catalog-grid .card"), "catalog thumbnails")
    driver.execute_script(AXE_JS.read_text())
    driver.set_script_timeout(WAIT_S)
    found = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa']}})"
        ".then((r) => done(r.violations.map((v) => ({id: v.id, help: v.help,"
        " nodes: v.nodes.slice(0, 3).map((n) => n.html)}))), (e) => done([{id: 'error', help: String(e)}]));")
    assert found == [], found
    alts = driver.execute_script("return [...document.querySelectorAll('img')].filter((i) => i.isConnected)"
                                 ".map((i) => i.getAttribute('alt'))")
    assert all(alts), alts  # every picture says what it is
    driver.execute_script("document.getElementById('catalog').open = false")  # as the next test expects it


def test_an_empty_catalog_says_how_to_add_the_first_item_and_the_page_adds_it(server, driver, photos, tmp_path):
    empty = tmp_path / "catalog"
    empty.mkdir()
    s = Serve(tmp_path, empty, camera="none")
    s.start()
    try:
        driver.get(_url(s))
        banner = driver.find_element(By.ID, "empty-catalog")
        _wait(driver, lambda d: banner.is_displayed(), "the empty-catalog note")
        assert "index build" in banner.text and "Catalog" in banner.text
        assert "the catalog is empty" in _text(driver, "status-panel")  # not "built without local features"
        banner.find_element(By.TAG_NAME, "a").click()  # opens the catalog manager
        driver.find_element(By.ID, "token").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
        photo = tmp_path / "rocket.jpg"
        photo.write_bytes(encode_jpeg(photos["rocket"], 90))
        driver.find_element(By.ID, "enrol-label").send_keys("rocket")
        driver.find_element(By.ID, "enrol-file").send_keys(str(photo))
        driver.find_element(By.CSS_SELECTOR, "#enrol-form button[type=submit]").click()
        _wait(driver, lambda d: not banner.is_displayed() and "enrolled " in _text(d, "catalog-note"),
              "the note to go once the first item is in")
        # (a device without a camera answers the live view with 503: the page shows uploads only)
        assert [e for e in _severe(driver) if "stream.mjpg" not in e["message"]
                and "frame.jpg" not in e["message"]] == []
    finally:
        driver.get("about:blank")  # leave this device's page before it stops: its polls would fail meanwhile
        s.stop()
        driver.get_log("browser")  # what the page logged here is this test's, not the next one's
        driver.get(_url(server))  # the page of the other tests' device again
        _wait(driver, lambda d: _history_size(d) >= 1, "the device's page")


def test_enrol_and_delete_from_the_catalog_manager_change_the_catalog(server, driver, photos, tmp_path):
    _open_page(driver, server)
    _, before = server.request("GET", "/api/catalog?limit=1")
    driver.find_element(By.CSS_SELECTOR, "#catalog summary").click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#catalog-grid .card"), "catalog thumbnails")
    driver.find_element(By.ID, "token").send_keys(TOKEN)
    driver.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
    photo = tmp_path / "mug.jpg"
    photo.write_bytes(encode_jpeg(photos["coffee"], 90))
    driver.find_element(By.ID, "enrol-label").send_keys("browser mug")
    driver.find_element(By.ID, "enrol-id").send_keys("browser/mug")
    driver.find_element(By.ID, "enrol-file").send_keys(str(photo))
    driver.find_element(By.CSS_SELECTOR, "#enrol-form button[type=submit]").click()
    _wait(driver, lambda d: "enrolled browser/mug" in _text(d, "catalog-note"), "the enrolment to be indexed")
    _, after = server.request("GET", "/api/catalog?limit=1")
    assert after["total"] == before["total"] + 1
    # the camera's view can be enrolled too
    driver.find_element(By.ID, "enrol-label").send_keys("seen by the camera")
    driver.find_element(By.ID, "enrol-id").send_keys("browser/camera")
    driver.find_element(By.ID, "enrol-camera").click()
    _wait(driver, lambda d: "enrolled browser/camera" in _text(d, "catalog-note"), "the camera enrolment")

    driver.find_element(By.ID, "catalog-search").send_keys("browser mug")
    _wait(driver, lambda d: _catalog_ids(d) == ["browser/mug"], "the search to find the item")
    time.sleep(0.6)  # the search box waits 0.3 s after the last key before it asks: let the last answer land
    # the item's photos, and one more from the camera (a box's other side)
    driver.find_element(By.CSS_SELECTOR, "#catalog-grid .card .photos").click()
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#catalog-grid .photo-strip img"), "the item's photos")
    driver.find_element(By.CSS_SELECTOR, "#catalog-grid .photo-strip .add-photo").click()
    _wait(driver, lambda d: "added photo 2 to browser/mug" in _text(d, "catalog-note"), "a photo from the camera")
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#catalog-grid .photo-strip img")) == 2,
          "the strip to show both photos")
    assert [p["photo"] for p in server.request("GET", "/api/catalog/browser/mug")[1]["photos"]] == ["", "2"]
    button = driver.find_element(By.CSS_SELECTOR, "#catalog-grid .card .delete")
    button.click()
    button.click()  # the second click confirms
    _wait(driver, lambda d: "removed browser/mug" in _text(d, "catalog-note"), "the removal")
    time.sleep(1.2)  # the strip's refresh after the added photo (1 s) is due: it must not ask for the removed item
    _, gone = server.request("GET", "/api/catalog?q=browser")
    assert [it["id"] for it in gone["items"]] == ["browser/camera"]
    assert server.request("DELETE", "/api/catalog/browser/camera", headers=AUTH)[0] == 200
    assert _severe(driver) == []


def test_a_phone_sized_viewport_has_no_horizontal_scroll(server, driver):
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    try:
        _open_page(driver, server)
        _wait(driver, lambda d: _history_size(d) >= 1 and d.find_elements(By.CSS_SELECTOR, "#status-panel dd"),
              "the page to fill in")
        summary = driver.find_element(By.CSS_SELECTOR, "#catalog summary")
        # at the foot of a phone screen, and the panels above it still fill in: bring it to the middle first
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", summary)
        summary.click()
        _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#catalog-grid .card"), "catalog thumbnails")
        time.sleep(0.5)
        width, inner = driver.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width <= inner, f"the page is {width} px wide in a {inner} px viewport"
        driver.execute_script("window.scrollTo(0, 0)")
        _screenshot(driver, "page-phone.jpg")
        assert _severe(driver) == []
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


# Recorded in the page from its first script on: every fetch() URL, and each time the cue goes up or down with
# the newest lookup number on the strip at that moment.
_RECORDER = """
window.__fetches = [];
const realFetch = window.fetch.bind(window);
window.fetch = (url, options) => { window.__fetches.push(String(url)); return realFetch(url, options); };
window.__cue = [];
document.addEventListener("DOMContentLoaded", () => {
  const cue = document.getElementById("cue");
  new MutationObserver(() => {
    const top = document.querySelector("#history-strip .hist");
    window.__cue.push({ shown: !cue.hidden, newest: top ? Number(top.dataset.n) : null });
  }).observe(cue, { attributes: true, attributeFilter: ["hidden"] });
});
"""


def _open_streams(server) -> float:
    """Live views + event streams open on the server now (from /metrics)."""
    import urllib.request
    with urllib.request.urlopen(_url(server, "/metrics"), timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(("appliance_http_streams_open ", "appliance_http_event_streams_open ")))


def _newest_n(driver) -> int | None:
    return driver.execute_script(
        "const b = document.querySelector('#history-strip .hist'); return b ? Number(b.dataset.n) : null")


def _fetched(driver, path: str) -> int:
    return driver.execute_script("return window.__fetches.filter((u) => u.startsWith(arguments[0])).length", path)


@pytest.fixture()
def recorded(driver):
    script = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": _RECORDER})
    yield driver
    driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})


def test_a_camera_lookup_is_pushed_without_a_poll_and_the_cue_shows_while_it_runs(server, recorded):
    driver = recorded
    _open_page(driver, server)
    _wait(driver, lambda d: d.execute_script("return document.body.dataset.updates") == "push", "the event stream")
    _wait(driver, lambda d: _newest_n(d) is not None, "the recent lookups")  # one /api/history at the start
    # counted from here: the stream is open and the page caught up
    polls, history_fetches = _fetched(driver, "/api/status"), _fetched(driver, "/api/history")
    # the record starts with the cue as it is now: a lookup may already be running (the cue up, its result not in);
    # the newest lookup it starts from is read in the same script (one landing between two reads would be missed)
    first = driver.execute_script("const cue = document.getElementById('cue');"
                                  "const top = document.querySelector('#history-strip .hist');"
                                  "window.__cue = [{shown: !cue.hidden, newest: top ? Number(top.dataset.n) : null}];"
                                  "return window.__cue[0].newest")
    _wait(driver, lambda d: (_newest_n(d) or 0) > first, "a camera-triggered lookup pushed to the page")
    newest = _newest_n(driver)
    _, body = server.request("GET", "/api/history?limit=50")
    assert next(e for e in body["entries"] if e["n"] == newest)["source"] in ("camera", "requested")
    assert _fetched(driver, "/api/status") == polls, "the page polled the status"
    assert _fetched(driver, "/api/history") == history_fetches, "the page asked for the lookup it was told of"
    cue = driver.execute_script("return window.__cue")
    # the cue went up while the strip's newest lookup was still an older one: before the result came
    assert any(c["shown"] and (c["newest"] or 0) < newest for c in cue), cue
    _wait(driver, lambda d: d.find_element(By.ID, "cue").get_attribute("hidden") is not None, "the cue to go down")
    assert _severe(driver) == []


def test_when_the_event_stream_is_refused_the_page_updates_by_polling(server, recorded):
    driver = recorded
    driver.get("about:blank")  # the last page's live view and stream go; wait until their slots are free
    _wait(driver, lambda d: _open_streams(server) == 0, "the last page's streams to close")
    held = []
    try:
        # take every long-lived slot (web.threads - 2: live views and event streams share them)
        for _ in range(16):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            s.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = s.recv(4096)
            held.append(s)
            if head.startswith(b"HTTP/1.1 503"):
                break
        else:
            raise AssertionError("the event streams were never refused")
        driver.get(_url(server))
        _wait(driver, lambda d: d.execute_script("return document.body.dataset.updates") == "polling",
              "the page to fall back to polling")
        _wait(driver, lambda d: _newest_n(d) is not None, "the recent lookups")
        first = _newest_n(driver)
        _wait(driver, lambda d: (_newest_n(d) or 0) > first, "a camera lookup shown by polling")
        assert _fetched(driver, "/api/status") >= 1 and "streaming" in _text(driver, "status-panel")
    finally:
        for s in held:
            s.close()
    driver.get_log("browser")  # the refused stream and live view were logged as failed loads: expected here


def test_every_item_of_an_uploaded_photo_is_outlined_with_its_label(server, driver, photos, tmp_path):
    """Three catalog photos on a table: the uploaded photo shows three outlines, each with its item's label."""
    from tests.unit.test_multi_item import table_frame
    names = ["rocket", "astronaut", "immunohistochemistry"]
    frame, _ = table_frame(photos, names, seed=9)
    photo = tmp_path / "table.jpg"
    photo.write_bytes(encode_jpeg(frame, 92))
    if not driver.find_elements(By.ID, "upload-file"):  # alone: open the page (in the file, it is open)
        driver.get(_url(server))
    driver.find_element(By.ID, "upload-file").send_keys(str(photo))
    driver.find_element(By.CSS_SELECTOR, "#upload-form button[type=submit]").click()
    # read in one script, while the upload is on screen (a busy machine's camera lookups replace it after 15 s)
    shown = "return [document.getElementById('query-caption').textContent, " \
            "document.querySelectorAll('#query-items polygon').length, " \
            "[...document.querySelectorAll('#query-items-labels span')].map((s) => s.textContent)]"
    caption, outlines, labels = _wait(driver, lambda d: (lambda r: r if r[0] == "your photo" and r[1] == 3 else None)(
        d.execute_script(shown)), "three outlines over the uploaded photo")
    status, body = server.request("GET", "/api/history?limit=20")
    entry = next(e for e in body["entries"] if e["source"] == "upload")  # the camera goes on looking up meanwhile
    assert status == 200 and {m["id"] for m in entry["matches"]} == set(names)
    assert sorted(labels) == sorted(m["label"] for m in entry["matches"])
    assert "3 items" in _text(driver, "match-line")
    _screenshot(driver, "page-several-items.jpg")
    # the tests before may leave every stream slot taken (503: the page falls back to frames and polling)
    assert [e for e in _severe(driver) if "status of 503" not in e["message"]] == []
