"""Several catalog items in one frame: each named, verified and outlined; one item alone answers as before;
bad frames get a bounded answer. Real photos pasted on a generated table, a real index, the real appliance."""
from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import yaml

from edge_retrieval.catalog.build import ItemMaker, build_index
from edge_retrieval.core.config import RecognitionConfig
from edge_retrieval.core.results import Candidate, LookupResult
from edge_retrieval.imaging.codec import encode_jpeg
from edge_retrieval.imaging.synthetic_views import textured_background
from edge_retrieval.index.reader import CatalogIndex
from edge_retrieval.model import local_features
from edge_retrieval.search import multi_item
from edge_retrieval.search.lookup import Lookup
from edge_retrieval.search.proposals import bounding_box
from tests.conftest import appliance_config, view, web_client

ENROL = RecognitionConfig(enrol_views=[0.7, 0.55], features=True)


def settings(text: str) -> RecognitionConfig:
    """The recognition section as a user writes it in config.yaml."""
    return RecognitionConfig(**(yaml.safe_load(text) or {}))


MULTI = settings("verify_top_k: 5\n")  # the defaults: multi_item on, max_items 8
SINGLE = settings("verify_top_k: 5\nmulti_item: false\n")


@pytest.fixture(scope="module")
def index(tmp_path_factory, catalog_dir, encoder):
    path = tmp_path_factory.mktemp("multi") / "index"
    build_index(catalog_dir, ItemMaker(encoder, ENROL, 160), path, n_trees=10, progress=False)
    with CatalogIndex.load(path, expected_bundle_sha256=encoder.sha256, search_k=5000, require_features=True) as idx:
        yield idx


def table_frame(photos, names: list[str], seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A 480×640 table with each photo pasted in its own cell of a 2×2 grid (a little tilted); the frame and
    each photo's true corners (fractions of the frame)."""
    rng = np.random.default_rng(seed)
    frame = textured_background(480, 640, rng)
    quads = {}
    for (name, (cx, cy)) in zip(names, [(160, 120), (480, 120), (160, 360), (480, 360)]):
        img = photos[name]
        h, w = img.shape[:2]
        s = 200 / max(h, w)
        half = np.float32([[-w, -h], [w, -h], [w, h], [-w, h]]) * s / 2
        dst = half + rng.uniform(-8, 8, size=(4, 2)).astype(np.float32) + np.float32([cx, cy])
        m = cv2.getPerspectiveTransform(np.float32([[0, 0], [w, 0], [w, h], [0, h]]), dst)
        frame = cv2.warpPerspective(img, m, (640, 480), dst=frame, borderMode=cv2.BORDER_TRANSPARENT)
        quads[name] = dst / np.float32([640, 480])
    return frame, quads


def iou(a, b) -> float:
    pa, pb = np.asarray(a, np.float32), np.asarray(b, np.float32)
    inter, _ = cv2.intersectConvexConvex(pa, pb)
    return float(inter / (cv2.contourArea(pa) + cv2.contourArea(pb) - inter))


def test_every_item_on_the_table_is_named_and_outlined(encoder, index, photos):
    names = ["rocket", "astronaut", "immunohistochemistry", "camera"]
    frame, quads = table_frame(photos, names, seed=7)
    result = Lookup(encoder, index, MULTI, top_k=5).lookup_rgb(frame)
    found = {m.id: m for m in result.matches}
    assert set(found) == set(names)
    assert result.match == result.matches[0]
    for name, m in found.items():
        assert m.inliers >= 8 and iou(m.quad, quads[name]) >= 0.5, name
    body = result.to_json()
    assert [m["id"] for m in body["matches"]] == [m.id for m in result.matches]
    assert body["match"] == body["matches"][0] and all(len(m["quad"]) == 4 for m in body["matches"])


def test_max_items_and_the_switch_bound_the_answer(encoder, index, photos):
    frame, _ = table_frame(photos, ["rocket", "astronaut", "immunohistochemistry", "camera"], seed=7)
    two = Lookup(encoder, index, settings("verify_top_k: 5\nmax_items: 2\n"), top_k=5).lookup_rgb(frame)
    assert len(two.matches) == 2
    off = Lookup(encoder, index, SINGLE, top_k=5).lookup_rgb(frame)
    assert len(off.matches) == 1 and off.matches[0] == off.match


def test_one_item_alone_answers_as_without_the_search(encoder, index, photos):
    """The single-item decision, ranking and outline are those of a lookup that names one item."""
    for name, kind, seed in (("rocket", "table", 11), ("chelsea", "closeup", 12), ("coins", "table_occluded", 13)):
        frame = view(photos, name, kind, seed)
        multi = Lookup(encoder, index, MULTI, top_k=5).lookup_rgb(frame)
        single = Lookup(encoder, index, SINGLE, top_k=5).lookup_rgb(frame)
        assert multi.match == single.match and multi.results == single.results
        assert [m.id for m in multi.matches] == [single.match.id], name


@pytest.mark.parametrize("kind", ["black", "chessboard", "tiny_items"])
def test_bad_frames_get_a_bounded_answer(encoder, index, photos, kind, monkeypatch):
    """No more than max_items, and no more verifications than the lookup's own plus multi_verify_max."""
    if kind == "black":
        frame = np.zeros((480, 640, 3), np.uint8)
    elif kind == "chessboard":
        frame = (((np.indices((480, 640)) // 20).sum(axis=0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, 2)
    else:  # dozens of tiny prints of catalog photos
        frame = textured_background(480, 640, np.random.default_rng(3))
        names = list(photos)
        for i in range(48):
            tile = cv2.resize(photos[names[i % len(names)]], (60, 45), interpolation=cv2.INTER_AREA)
            y, x = 10 + (i // 8) * 78, 8 + (i % 8) * 79
            frame[y:y + 45, x:x + 60] = tile
    calls = []
    real = local_features.match_homography

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(local_features, "match_homography", counting)
    monkeypatch.setattr(multi_item, "match_homography", counting)
    rc = settings("verify_top_k: 5\nmax_items: 3\nmulti_verify_max: 10\n")
    result = Lookup(encoder, index, rc, top_k=5).lookup_rgb(frame)
    assert len(result.matches) <= 3
    assert len(calls) <= rc.verify_top_k + rc.multi_verify_max


def test_matches_survive_json_and_old_entries_read_as_one(encoder):
    a = Candidate("a", "A", 0.8, 30, 0.9, ((0.1, 0.1), (0.4, 0.1), (0.4, 0.4), (0.1, 0.4)))
    b = Candidate("b", "B", 0.6, 12, 0.7, ((0.5, 0.5), (0.9, 0.5), (0.9, 0.9), (0.5, 0.9)))
    result = LookupResult([a, b], {"total": 3.0}, source="upload", match=a, matches=[a, b])
    back = LookupResult.from_json(result.to_json())
    assert back.matches == [a, b] and back.match == a
    old = result.to_json()
    del old["matches"]  # a history entry written before matches existed
    assert LookupResult.from_json(old).matches == [a]
    assert LookupResult([a], {}, match=None).matches == []


def test_api_query_and_history_carry_every_item(tmp_path, catalog_dir, encoder, photos):
    """POST /api/query answers ``matches``; the history keeps them across a restart; the CSV lists them."""
    from tests.conftest import make_appliance
    names = ["rocket", "astronaut", "immunohistochemistry"]
    frame, _ = table_frame(photos, names, seed=9)
    app = make_appliance(tmp_path, encoder, catalog_dir, recognition=MULTI.model_copy(update={"adapt": False}),
                         index={"top_k": 3}).start()
    try:
        client = web_client(app)
        r = client.post("/api/query", data={"image": (io.BytesIO(encode_jpeg(frame, 92)), "table.jpg")})
        assert r.status_code == 200
        body = r.get_json()
        assert {m["id"] for m in body["matches"]} == set(names)
        assert body["match"]["id"] == body["matches"][0]["id"]
        assert all(m["thumbnail_url"] for m in body["matches"])
        listed = client.get("/api/history").get_json()["entries"][0]
        assert [m["id"] for m in listed["matches"]] == [m["id"] for m in body["matches"]]
        csv_text = client.get("/api/history.csv").get_data(as_text=True)
        assert " ".join(m["id"] for m in body["matches"]) in csv_text
    finally:
        app.stop()
    from edge_retrieval.outputs.history import History
    kept = History(appliance_config(tmp_path).history)
    try:
        assert [m.id for m in kept.entries()[0].result.matches] == [m["id"] for m in body["matches"]]
    finally:
        kept.close()


def counted(monkeypatch, encoder) -> dict[str, int]:
    """Calls from here on of the encoder's region encode, of verification and of the outline search (the real
    functions run)."""
    calls = {"embed_batch": 0, "match_homography": 0, "print_quads": 0}

    def counting(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(encoder, "embed_batch", counting("embed_batch", encoder.embed_batch))
    verify = counting("match_homography", local_features.match_homography)
    monkeypatch.setattr(local_features, "match_homography", verify)
    monkeypatch.setattr(multi_item, "match_homography", verify)
    monkeypatch.setattr(multi_item, "print_quads", counting("print_quads", multi_item.print_quads))
    return calls


def test_a_frame_of_one_item_ends_the_search_without_more_work(encoder, index, photos, monkeypatch):
    """Where the item found holds (nearly) every keypoint of the frame, or was named by the whole frame's cosine
    alone (a plain print filling the view), nothing more is encoded, verified or looked for than a one-item lookup
    does; where keypoints are left (four prints), the search looks further."""
    calls = counted(monkeypatch, encoder)
    for name, kind, seed in (("rocket", "table", 11), ("clock", "table", 13)):
        frame = view(photos, name, kind, seed)
        work = dict(calls)
        single = Lookup(encoder, index, SINGLE, top_k=5).lookup_rgb(frame)
        alone = {k: v - work[k] for k, v in calls.items()}
        work = dict(calls)
        multi = Lookup(encoder, index, MULTI, top_k=5).lookup_rgb(frame)
        assert multi.matches == [single.match] and single.match.id == name
        assert {k: v - work[k] for k, v in calls.items()} == alone, name
        keypoints = local_features.extract(frame, MULTI, query=True)
        if single.match.quad is None:  # the two cases this test is about
            assert single.match.inliers < 8 and len(keypoints) >= multi_item.MIN_REST_KEYPOINTS, name
        else:
            assert len(multi_item.without(keypoints, [single.match.quad])) < multi_item.MIN_REST_KEYPOINTS, name
    four, _ = table_frame(photos, ["rocket", "astronaut", "immunohistochemistry", "camera"], seed=7)
    work = dict(calls)
    assert len(Lookup(encoder, index, MULTI, top_k=5).lookup_rgb(four).matches) == 4
    assert calls["embed_batch"] > work["embed_batch"] and calls["print_quads"] == work["print_quads"] + 1


def test_a_plain_print_seen_whole_in_a_found_outline_is_named_on_a_smaller_lead(encoder, index):
    """A plain item (too few ORB keypoints to ever verify) is named by its cosine: in a found outline, where the
    print is seen whole and flat, on a lead of ``MIN_OUTLINE_SCORE_LEAD`` over the next item (another crop of the
    same photo leads by less); in a quadrant only on ``MIN_SCORE_LEAD``; nowhere on less, nor under accept_score."""
    more = multi_item.MoreItems(MULTI, index, encoder.embed_batch, 8, 0.5, lambda item, verified: True)
    assert more._plain("clock") and not more._plain("rocket")
    first = Candidate("rocket", "rocket", 0.9, 40, quad=((0.05, 0.05), (0.3, 0.05), (0.3, 0.3), (0.05, 0.3)))
    outline = np.array([[0.6, 0.6], [0.9, 0.62], [0.88, 0.9], [0.58, 0.88]])
    box = bounding_box(outline)
    lead = (multi_item.MIN_OUTLINE_SCORE_LEAD + multi_item.MIN_SCORE_LEAD) / 2

    def named(second_score: float, where, shapes, top_score: float = 0.6) -> list[Candidate]:
        top = [Candidate("clock", "clock", top_score), Candidate("coins", "coins", second_score)]
        return more._by_score({where: top}, shapes, [first], [first.quad])

    found = named(0.6 - lead, box, {box: outline})
    assert [c.id for c in found] == ["clock"] and found[0].inliers is None
    assert iou(found[0].quad, outline) > 0.99
    assert named(0.6 - lead, multi_item.CROPS[3], {}) == []  # a quadrant: a sibling crop may lead there
    assert [c.id for c in named(0.59 - multi_item.MIN_SCORE_LEAD, multi_item.CROPS[3], {})] == ["clock"]
    assert named(0.6 - multi_item.MIN_OUTLINE_SCORE_LEAD / 2, box, {box: outline}) == []
    assert named(0.45 - lead, box, {box: outline}, top_score=0.45) == []
