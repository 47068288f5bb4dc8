"""The command-line contract, end to end on real photos with the committed default bundle:
index build → query --json (warped camera views retrieve the right photo) → catalog add/remove."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from edge_retrieval.cli import main
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.index.reader import CatalogIndex
from tests.conftest import CATALOG, OPEN_BUNDLE, ROOT, view

# View kinds a single global descriptor handles (the harder table/occlusion views are issue 7's business
# and are measured by bench/, not asserted here).
EASY_KINDS = ("closeup", "perspective", "rotate", "lighting", "color_cast", "blur", "noise_jpeg")


@pytest.fixture(scope="module")
def built(tmp_path_factory, catalog_dir):
    """An index built by the CLI from the catalog folder plus one corrupt and one non-image file."""
    work = tmp_path_factory.mktemp("cli")
    folder = work / "catalog"
    shutil.copytree(catalog_dir, folder)
    (folder / "broken.jpg").write_bytes((folder / "rocket.jpg").read_bytes()[:2000])
    (folder / "notes.txt").write_text("not an image")
    cfg = work / "config.yaml"
    cfg.write_text(f"encoder:\n  bundle: {OPEN_BUNDLE}\nindex:\n  path: {work / 'index'}\n  search_k: 2000\n")
    return work, folder, cfg


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_retrieval", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_index_build_skips_and_reports_unreadable_files(built, capsys):
    work, folder, cfg = built
    # built, but not everything became an item: exit code 1, and each file that did not is named with its reason
    assert main(["--config", str(cfg), "index", "build", "--catalog", str(folder)]) == 1
    err = capsys.readouterr().err
    assert f"indexed {len(CATALOG)} photos of {len(CATALOG)} items" in err
    assert "skipped 1, ignored 1" in err and "skipped broken.jpg:" in err
    assert "ignored notes.txt: not an image file (looked for" in err and "exit code 1" in err


def test_any_file_name_makes_an_item_and_nothing_is_skipped_silently(tmp_path, photos, capsys):
    folder = tmp_path / "photos"
    (folder / "Küche").mkdir(parents=True)
    names = {"Chelsea (1) é.png": "chelsea", "Küche/Rocket [2].JPG": "rocket", "Moon, full!.jpeg": "moon",
             "dup (1).jpg": "coins", "dup [1].jpg": "brick", "Küche/Tür (1).jpg": "astronaut"}
    for name, photo in names.items():
        (folder / name).write_bytes(encode_jpeg(photos[photo], 92))
    (folder / ".DS_Store").write_bytes(b"\0\1")
    cfg = tmp_path / "config.yaml"
    cfg.write_text("encoder:\n  bundle: efficientnet-lite0\nindex:\n  path: index\nrecognition:\n  adapt: false\n")
    assert main(["--config", str(cfg), "index", "build", "--catalog", str(folder)]) == 1
    err = capsys.readouterr().err
    # 'dup (1)' and 'dup [1]' give one id: the first keeps it, the second is named with the reason
    assert "indexed 5 photos of 4 items" in err and "skipped dup [1].jpg: duplicate id 'dup _1_' (also dup (1).jpg)" in err
    assert "1 hidden files" in err
    with CatalogIndex.load(tmp_path / "index", expected_bundle_sha256=None) as idx:
        items = {it.id: it.label for it in idx.items}
    # ids fit the id rule; each label is the name as the user wrote it; a folder is one item of photos, its first
    # file keyed by the item's id, the other by its name
    assert items == {"Chelsea _1_ é": "Chelsea (1) é", "Küche": "Küche", "Küche#Tür _1_": "Küche",
                     "Moon_ full_": "Moon, full!", "dup _1_": "dup (1)"}


def test_query_json_warped_views_retrieve_their_photo(built, photos, tmp_path):
    work, folder, cfg = built
    paths, truth = [], []
    for i, name in enumerate(CATALOG):
        kind = EASY_KINDS[i % len(EASY_KINDS)]
        p = tmp_path / f"q_{name}_{kind}.jpg"
        p.write_bytes(encode_jpeg(view(photos, name, kind, seed=i), 90))
        paths.append(str(p))
        truth.append("space" if name == "hubble_deep_field" else name)  # a sub-folder is one item of photos
    proc = run_cli("query", *paths, "--config", str(cfg), "--json", "--top-k", "3")
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [d["query"] for d in lines] == paths
    top1 = [d["results"][0]["id"] for d in lines]
    hits = sum(t == p for t, p in zip(truth, top1))
    assert hits >= len(CATALOG) - 1, list(zip(truth, top1))  # ≥ 13/14 views of easy kinds
    first = lines[0]["results"][0]
    # inliers: verified; rank_score: what the results are ranked by; quad: where a verified match lies
    assert {"id", "label", "score", "rank_score", "confidence", "attributes"} <= set(first) <= {
        "id", "label", "score", "rank_score", "confidence", "inliers", "quad", "attributes", "photo"}
    assert 0 < first["score"] <= 1.0001
    scores = [r["score"] for r in lines[0]["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3
    assert {"decode", "encode", "search", "total"} <= set(lines[0]["timings_ms"])
    # "matches": every item named in the frame, best first; "match" is the first (one print here: one item)
    assert all(d["matches"] == ([d["match"]] if d["match"] else []) for d in lines), [d["matches"] for d in lines]


def test_query_of_a_bad_file_reports_an_error_line_and_keeps_going(built, tmp_path, photos):
    work, folder, cfg = built
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = tmp_path / "good.jpg"
    good.write_bytes(encode_jpeg(photos["chelsea"]))
    proc = run_cli("query", str(bad), str(good), "--config", str(cfg), "--json")
    assert proc.returncode == 1
    a, b = (json.loads(line) for line in proc.stdout.splitlines())
    assert a["query"] == str(bad) and "not an image" in a["error"]
    assert b["results"][0]["id"] == "chelsea"


def test_catalog_add_and_remove_round_trip(built, photos, tmp_path, capsys):
    work, folder, cfg = built
    img = tmp_path / "mug.jpg"
    img.write_bytes(encode_jpeg(photos["coffee"], 92))
    q = tmp_path / "q.jpg"
    q.write_bytes(encode_jpeg(view(photos, "coffee", "perspective", seed=5)))
    assert main(["--config", str(cfg), "catalog", "add", str(img), "--label", "Coffee mug", "--id", "kitchen/mug"]) == 0
    proc = run_cli("query", str(q), "--config", str(cfg), "--json")
    res = json.loads(proc.stdout)["results"][0]
    assert (res["id"], res["label"]) == ("kitchen/mug", "Coffee mug")
    assert main(["--config", str(cfg), "catalog", "remove", "kitchen/mug"]) == 0
    proc = run_cli("query", str(q), "--config", str(cfg), "--json")
    assert all(r["id"] != "kitchen/mug" for r in json.loads(proc.stdout)["results"])
    capsys.readouterr()
    assert main(["--config", str(cfg), "catalog", "remove", "kitchen/mug"]) == 2
    assert "not in the catalog: kitchen/mug" in capsys.readouterr().err


def test_index_built_with_another_bundle_is_refused(built, tmp_path):
    work, folder, cfg = built
    other = tmp_path / "other-bundle"
    shutil.copytree(OPEN_BUNDLE, other)
    tfl = other / "encoder.tflite"
    tfl.write_bytes(tfl.read_bytes() + b"\0")  # a different model file → a different sha256
    m = json.loads((other / "manifest.json").read_text())
    import hashlib
    m["sha256"] = hashlib.sha256(tfl.read_bytes()).hexdigest()
    (other / "manifest.json").write_text(json.dumps(m))
    proc = run_cli("query", str(folder / "rocket.jpg"), "--config", str(cfg), "--bundle", str(other))
    assert proc.returncode == 2
    assert "bundle_sha256" in proc.stderr and "rebuild" in proc.stderr


def test_bad_config_exits_2_with_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("index:\n  n_tress: 10\n")
    proc = run_cli("query", "x.jpg", "--config", str(cfg))
    assert proc.returncode == 2
    assert "unknown key 'index.n_tress'" in proc.stderr and "n_trees" in proc.stderr


def _first_frame(spec: str) -> np.ndarray:
    from edge_retrieval.capture.camera import Camera
    from edge_retrieval.core.config import CameraConfig
    with Camera(CameraConfig(source=spec, fps=50, loop=False)) as cam:
        cam.start()
        frame = cam.wait_frame(-1, timeout_s=5)
    assert frame is not None
    return np.asarray(frame.rgb)


def test_same_photo_gives_same_descriptor_through_camera_and_upload(encoder, photos, tmp_path):
    """The pixel contract: a frame from a (fake) camera and the same picture uploaded as a file give the
    same pixels and the same descriptor; swapped channels (the classic BGR bug) would not."""
    from PIL import Image

    from edge_retrieval.capture.sources import VideoWriter
    from edge_retrieval.imaging.codec import decode_image
    rgb = view(photos, "flower", "closeup", seed=1)
    h, w = rgb.shape[:2]
    # A video camera (OpenCV decodes BGR; camera_sources.py converts): same colours as the original, up to MJPG loss.
    with VideoWriter(tmp_path / "cam.avi", 10, (w, h)) as wr:
        for _ in range(3):
            wr.write(rgb)
    frame = _first_frame(str(tmp_path / "cam.avi")).astype(np.float32)
    err = np.abs(frame - rgb).mean()
    err_swapped = np.abs(frame - rgb[..., ::-1]).mean()
    assert err < 4 and err_swapped > 4 * err, (err, err_swapped)
    # A lossless camera (image folder of PNGs) vs an upload of the same PNG: identical descriptors.
    (tmp_path / "frames").mkdir()
    Image.fromarray(rgb).save(tmp_path / "frames" / "0001.png")
    from_camera = encoder.embed(_first_frame(str(tmp_path / "frames")))
    from_upload = encoder.embed(decode_image((tmp_path / "frames" / "0001.png").read_bytes()))
    assert float(from_camera @ from_upload) > 0.9999
    swapped = encoder.embed(np.ascontiguousarray(rgb[..., ::-1]))
    assert float(from_upload @ swapped) < 0.99


# --- what a new user runs into ---------------------------------------------------------------------------

def test_index_build_refuses_a_folder_without_usable_images(tmp_path, catalog_dir):
    from edge_retrieval.index.reader import index_exists
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"encoder:\n  bundle: {OPEN_BUNDLE}\nindex:\n  path: {tmp_path / 'index'}\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "rocket.jpg").write_bytes((catalog_dir / "rocket.jpg").read_bytes()[:2000])
    for folder, words in (("empty", "no images found (looked for .bmp .gif .jpeg .jpg"),
                          ("notes", "1 other files ignored"),
                          ("broken", "all 1 image files were skipped (first: rocket.jpg")):
        proc = run_cli("index", "build", "--catalog", str(tmp_path / folder), "--config", str(cfg))
        assert proc.returncode == 2, proc.stderr
        assert words in proc.stderr and "the index was not changed" in proc.stderr
    assert not index_exists(tmp_path / "index")


@pytest.mark.parametrize("value", ["0", "-1", "three"])
def test_query_top_k_must_be_a_positive_integer(value):
    proc = run_cli("query", "x.jpg", "--top-k", value)
    assert proc.returncode == 2
    assert "--top-k" in proc.stderr and ("must be ≥ 1" in proc.stderr or "not an integer" in proc.stderr)


def test_index_build_says_what_it_replaced_and_a_running_holder_keeps_that_build(tmp_path, catalog_dir, encoder,
                                                                                 photos):
    """`index build` replaces the index a running serve uses: it says so, and the server's next enrolment
    starts from the new generation on disk instead of rebuilding from the one it had loaded."""
    from edge_retrieval.catalog.build import ItemMaker
    from edge_retrieval.core.config import IndexConfig, RecognitionConfig
    from edge_retrieval.index.holder import IndexHolder
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"encoder:\n  bundle: {OPEN_BUNDLE}\nindex:\n  path: {tmp_path / 'index'}\n"
                   "recognition:\n  enrol_views: []\n")
    for name, names in (("a", ("rocket", "moon")), ("b", ("chelsea", "coins", "clock"))):
        (tmp_path / name).mkdir()
        for n in names:
            shutil.copy(catalog_dir / f"{n}.jpg", tmp_path / name)
    first = run_cli("index", "build", "--catalog", str(tmp_path / "a"), "--config", str(cfg))
    assert first.returncode == 0 and "replaced" not in first.stderr, first.stderr
    server = IndexHolder(IndexConfig(path=tmp_path / "index"), expected_bundle_sha256=encoder.sha256)
    try:
        loaded = server.current().generation
        second = run_cli("index", "build", "--catalog", str(tmp_path / "b"), "--config", str(cfg))
        assert second.returncode == 0, second.stderr
        assert f"replaced {loaded} (2 items)" in second.stderr and "within a few seconds" in second.stderr
        assert server.current().generation == loaded  # still answering from what it loaded
        mug = ItemMaker(encoder, RecognitionConfig(enrol_views=[]), 160).make(photos["coffee"], "kitchen/mug")
        server.add([mug])
        ids = sorted(it.id for it in server.current().items)
        assert ids == ["chelsea", "clock", "coins", "kitchen/mug"]
    finally:
        server.close()


def test_serve_on_a_port_in_use_exits_2_at_once_naming_web_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "config.yaml"
        cfg.write_text(f"camera:\n  source: /dev/video9\nencoder:\n  bundle: {OPEN_BUNDLE}\n"
                       f"index:\n  path: {tmp_path / 'index'}\nweb:\n  host: 127.0.0.1\n  port: {port}\n")
        t0 = time.monotonic()
        proc = run_cli("serve", "--config", str(cfg))
        elapsed_s = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    assert f"web.port {port}" in proc.stderr and "set another web.port" in proc.stderr
    assert "Traceback" not in proc.stderr and elapsed_s < 20
    assert not (tmp_path / "index").exists()  # refused before any index work


def test_a_catalog_of_ones_own_in_three_commands_never_touches_the_demo(tmp_path, photos):
    """README "Use your own catalog": init → photos into its catalog/ → serve. Everything lands beside the new
    config; an empty catalog says how to add items; `index build` with the demo's config is refused."""
    from edge_retrieval.core.config_file import load_config
    from tests.support.serve import free_port
    shop = tmp_path / "shop"
    proc = run_cli("init", str(shop), "--camera", "none")
    assert proc.returncode == 0, proc.stderr
    assert f"serve --config {shop / 'config.yaml'}" in proc.stdout
    cfg = load_config(shop / "config.yaml")
    assert cfg.index.path == shop / "var/catalog" and cfg.catalog.store == shop / "var/catalog.sqlite"
    assert cfg.history.dir == shop / "var/history" and cfg.catalog.build_from == shop / "catalog"
    assert cfg.camera.source == "none" and len(cfg.web.api_token) >= 20 and not cfg.catalog.demo
    again = run_cli("init", str(shop))
    assert again.returncode == 2 and "exists already" in again.stderr  # never overwritten

    def serve_until(marker: str) -> str:
        port = free_port()
        p = subprocess.Popen([sys.executable, "-m", "edge_retrieval", "serve", "--config", str(shop / "config.yaml"),
                              "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path, stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, text=True)
        lines = []
        try:
            for line in p.stderr:  # bounded: the process is killed below whatever happens
                lines.append(line)
                if marker in line or "Serving on" in line:
                    break
        finally:
            p.terminate()
            p.wait(timeout=30)
        return "".join(lines)

    (shop / "config.yaml").write_text((shop / "config.yaml").read_text() +
                                      f"encoder:\n  bundle: {OPEN_BUNDLE}\n")
    empty = serve_until("the catalog is empty")
    assert "the catalog is empty" in empty and f"index build --config {shop / 'config.yaml'}" in empty
    for name in ("rocket", "moon"):
        (shop / "catalog" / f"{name}.jpg").write_bytes(encode_jpeg(photos[name], 90))
    full = serve_until("index 2 items")  # the empty index is built again from catalog/ now that it has photos
    assert "index 2 items" in full and "the catalog is empty" not in full
    assert sorted(p.name for p in shop.iterdir()) == ["catalog", "config.yaml", "var"]

    demo = tmp_path / "demo.yaml"  # a config that runs the demo, as the checkout's config.yaml does
    demo.write_text(f"catalog:\n  demo: true\nindex:\n  path: {tmp_path / 'var/catalog'}\n")
    refused = run_cli("index", "build", "--config", str(demo), "--catalog", str(shop / "catalog"))
    assert refused.returncode == 2 and "runs the demo" in refused.stderr and "Use your own catalog" in refused.stderr
    assert not (tmp_path / "var").exists()  # the demo's index untouched


@pytest.mark.parametrize("command", [[], ["init"], ["serve"], ["index"], ["index", "build"], ["query"], ["catalog"],
                                     ["catalog", "add"], ["catalog", "remove"], ["catalog", "list"]])
def test_every_help_text_speaks_to_users(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0
    assert ".py" not in text and "wiring" not in text  # about what it does for you, not about the code
    if command:  # every command says what it does, in a sentence, above its options
        assert text.split("\n\n")[1].strip().endswith(".")


def test_version(capsys):
    import edge_retrieval
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"edge-retrieval {edge_retrieval.__version__}"
