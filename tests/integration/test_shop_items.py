"""Items as a shop knows them: an item folder is one item of several photos, found by any of them; a labels file's
extra columns are attributes that come back with every match (CLI, API, history, export/import); an id in use is
409 unless replace; photos are added, listed and removed over HTTP and the CLI; bad input is a clear error."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from edge_retrieval.app.wiring import build_catalog
from edge_retrieval.cli import main
from edge_retrieval.imaging.codec import encode_jpeg
from tests.conftest import FAST, TOKEN, appliance_config, device_config, make_appliance, view, web_client

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _device(root, name):
    return device_config(root, name, "  max_photos_per_item: 3\n")


@pytest.fixture()
def shop(tmp_path, photos):
    """A shop's folder: a box with a front and a back (two different photos: one item), single-photo items with the
    names people give files, an item folder over the photo limit, and a labels CSV with sku and price columns."""
    folder = tmp_path / "catalog"
    (folder / "Tea box").mkdir(parents=True)
    (folder / "Tea box" / "front.jpg").write_bytes(encode_jpeg(photos["coffee"], 92))
    (folder / "Tea box" / "back (2).jpg").write_bytes(encode_jpeg(photos["chelsea"], 92))
    (folder / "Rocket (1) é.jpg").write_bytes(encode_jpeg(photos["rocket"], 92))
    (folder / "moon.jpg").write_bytes(encode_jpeg(photos["moon"], 92))
    (folder / "crowd").mkdir()
    for i, name in enumerate(("astronaut", "brick", "camera", "coins", "grace_hopper")):
        (folder / "crowd" / f"{i}.jpg").write_bytes(encode_jpeg(photos[name], 85))
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label,sku,price\nTea box,Green tea (box),T-100,4.90\nmoon,Moon poster,P-7,\n",
                      encoding="utf-8")
    return folder, labels


def _query(cfg, image, capsys) -> dict:
    capsys.readouterr()
    assert main(["--config", str(cfg), "query", "--json", str(image)]) == 0
    return json.loads(capsys.readouterr().out)


def test_an_item_folder_is_one_item_found_by_any_photo_with_its_attributes(shop, tmp_path, photos, capsys):
    folder, labels = shop
    cfg = _device(tmp_path, "a")
    assert main(["--config", str(cfg), "index", "build", "--catalog", str(folder), "--labels", str(labels)]) == 1
    err = capsys.readouterr().err
    # the item over catalog.max_photos_per_item (3) keeps 3 photos; the other two are listed, and the exit says so
    assert "crowd/3.jpg" in err and "crowd/4.jpg" in err and "max_photos_per_item" in err, err
    assert "indexed 7 photos of 4 items" in err, err  # the box's 2, the crowd's 3, two single photos
    assert main(["--config", str(cfg), "catalog", "list"]) == 0
    listed = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    assert listed == {"Tea box": "Green tea (box)", "Rocket _1_ é": "Rocket (1) é", "moon": "Moon poster",
                      "crowd": "crowd"}
    # the item's first photo is its first file by name ("back (2).jpg"); the front is a further photo
    for name, photo in (("chelsea", None), ("coffee", "front")):  # either side of the box names the box
        q = tmp_path / f"{name}.jpg"
        q.write_bytes(encode_jpeg(view(photos, name, "perspective", seed=5), 90))
        out = _query(cfg, q, capsys)
        assert out["match"] is not None and out["match"]["id"] == "Tea box", out
        assert out["match"].get("photo") == photo
        assert out["match"]["attributes"] == {"sku": "T-100", "price": "4.90"}
        assert [r["id"] for r in out["results"]].count("Tea box") == 1  # one item, not one row per photo
    capsys.readouterr()
    assert main(["--config", str(cfg), "catalog", "photos", "Tea box"]) == 0
    assert capsys.readouterr().out.splitlines() == ["(first)", "front"]


def test_photos_over_http_409_replace_and_attributes_in_history_and_export(tmp_path, encoder, photos, shop):
    folder, labels = shop
    for p in (folder / "crowd").iterdir():  # not needed here
        p.unlink()
    (folder / "crowd").rmdir()
    build_catalog(appliance_config(tmp_path, recognition=FAST), encoder, folder, labels=labels)
    app = make_appliance(tmp_path, encoder, None, recognition=FAST, index={"top_k": 3}).start()
    try:
        client = web_client(app)
        item = client.get("/api/catalog/Tea box").get_json()
        assert item["label"] == "Green tea (box)" and item["attributes"] == {"sku": "T-100", "price": "4.90"}
        assert [p["photo"] for p in item["photos"]] == ["", "front"]
        assert client.get(item["photos"][1]["thumbnail"]).status_code == 200
        listed = {it["id"]: it for it in client.get("/api/catalog").get_json()["items"]}
        assert listed["Tea box"]["photos"] == 2 and len(listed) == 3

        def post(path, **fields):
            return client.post(path, data=fields, content_type="multipart/form-data", headers=AUTH)

        jpeg = encode_jpeg(photos["astronaut"], 90)
        # an id in use: 409, nothing changed; with replace: the item anew (its other photos go)
        clash = post("/api/catalog", image=(io.BytesIO(jpeg), "a.jpg"), label="Tea", id="Tea box")
        assert clash.status_code == 409 and "replace" in clash.get_json()["error"]
        added = post("/api/catalog/Tea box/photos", image=(io.BytesIO(jpeg), "side.jpg"), photo="side")
        assert added.status_code == 202 and added.get_json()["photo"] == "side"
        assert app.catalog.wait_applied(added.get_json()["seq"], 10)
        assert [p["photo"] for p in client.get("/api/catalog/Tea box").get_json()["photos"]] == ["", "front", "side"]
        again = post("/api/catalog/Tea box/photos", image=(io.BytesIO(jpeg), "side.jpg"), photo="side")
        assert again.status_code == 409
        full = post("/api/catalog/Tea box/photos", image=(io.BytesIO(jpeg), "x.jpg"), photo="x" * 10)
        assert full.status_code == 202  # 4 photos: under the default limit of 50
        nothing = post("/api/catalog/nothing/photos", image=(io.BytesIO(jpeg), "x.jpg"))
        assert nothing.status_code == 404, nothing.get_json()
        not_image = post("/api/catalog/Tea box/photos", image=(io.BytesIO(b"%PDF-1.4 hello"), "x.pdf"))
        assert 400 <= not_image.status_code < 500
        # the astronaut is now a photo of the box: a lookup of it names the box, with the box's attributes
        q = encode_jpeg(view(photos, "astronaut", "perspective", seed=2), 90)
        found = client.post("/api/query", data={"image": (io.BytesIO(q), "q.jpg")},
                            content_type="multipart/form-data").get_json()
        assert found["match"]["id"] == "Tea box" and found["match"]["photo"] in ("side", "x" * 10), found["match"]
        assert found["match"]["attributes"]["sku"] == "T-100"
        history = client.get("/api/history").get_json()["entries"]
        assert history[0]["match"]["attributes"] == {"sku": "T-100", "price": "4.90"}
        # remove a photo; the first photo stays while others do
        gone = client.delete("/api/catalog/Tea box?photo=side", headers=AUTH)
        assert gone.status_code == 200
        assert client.delete("/api/catalog/Tea box?photo=", headers=AUTH).status_code == 409
        assert client.delete("/api/catalog/Tea box?photo=nope", headers=AUTH).status_code == 404
        # attributes: bounded, and a replace takes new ones
        big = post("/api/catalog", image=(io.BytesIO(jpeg), "a.jpg"), label="Big", id="big",
                   attributes=json.dumps({"blob": "x" * 1_000_000}))
        assert big.status_code == 413 and "form field is larger" in big.get_json()["error"]  # refused as it comes
        many = post("/api/catalog", image=(io.BytesIO(jpeg), "a.jpg"), label="Many", id="many",
                    attributes=json.dumps({f"k{i}": "x" * 900 for i in range(30)}))
        assert many.status_code == 400 and "attributes are over" in many.get_json()["error"]
        assert post("/api/catalog", image=(io.BytesIO(jpeg), "a.jpg"), label="Bad", id="bad",
                    attributes="{not json").status_code == 400
        fresh = post("/api/catalog", image=(io.BytesIO(jpeg), "a.jpg"), label="Tea", id="Tea box", replace="1",
                     attributes=json.dumps({"sku": "T-200"}))
        assert fresh.status_code == 202 and fresh.get_json()["replaced"] is True
        assert app.catalog.wait_applied(fresh.get_json()["seq"], 10)
        item = client.get("/api/catalog/Tea box").get_json()
        assert item["attributes"] == {"sku": "T-200"} and [p["photo"] for p in item["photos"]] == [""]
        assert app.catalog.holder.current().item_count == 3
    finally:
        app.stop()


def test_an_export_keeps_every_photo_and_attribute_and_imports_exactly(shop, tmp_path, capsys):
    folder, labels = shop
    a = _device(tmp_path, "a")
    main(["--config", str(a), "index", "build", "--catalog", str(folder), "--labels", str(labels)])
    archive = tmp_path / "shop.tar"
    assert main(["--config", str(a), "catalog", "export", str(archive)]) == 0
    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    by_id = {i["id"]: i for i in manifest["items"]}
    assert [p["photo"] for p in by_id["Tea box"]["photos"]] == ["", "front"]
    assert by_id["Tea box"]["attributes"] == {"sku": "T-100", "price": "4.90"}
    b = _device(tmp_path, "b")
    assert main(["--config", str(b), "catalog", "import", str(archive)]) == 0
    again = tmp_path / "again.tar"
    assert main(["--config", str(b), "catalog", "export", str(again)]) == 0
    with tarfile.open(again) as tar:
        back = json.load(tar.extractfile("manifest.json"))
    strip = lambda m: sorted((i["id"], i["label"], i["attributes"], [(p["photo"], p["sha256"]) for p in i["photos"]])
                             for i in m["items"])
    assert strip(back) == strip(manifest)
    capsys.readouterr()
    assert main(["--config", str(b), "catalog", "import", str(archive)]) == 2  # ids in use: refused whole
    assert "already in the catalog" in capsys.readouterr().err


def test_labels_files_with_more_columns_need_a_header_and_bounded_attributes(tmp_path):
    from edge_retrieval.catalog.ids import load_labels_file
    from edge_retrieval.core.errors import CatalogIndexError
    ok = tmp_path / "ok.tsv"
    ok.write_text("id\tlabel\turl\nmug\tMug\thttps://shop.example/mug\n")
    assert load_labels_file(ok) == ({"mug": "Mug"}, {"mug": {"url": "https://shop.example/mug"}})
    js = tmp_path / "l.json"
    js.write_text(json.dumps({"mug": {"label": "Mug", "sku": "M-1", "price": 3.5}, "cup": "Cup"}))
    assert load_labels_file(js) == ({"mug": "Mug", "cup": "Cup"}, {"mug": {"sku": "M-1", "price": "3.5"}})
    for name, text, why in (("wide.csv", "mug,Mug,M-1\n", "needs a header"),
                            ("big.csv", "id,label,notes\nmug,Mug," + "x" * 2000 + "\n", "line 2"),
                            ("ragged.csv", "id,label,sku\nmug,Mug,M-1,extra\n", "more columns than the header")):
        (tmp_path / name).write_text(text)
        with pytest.raises(CatalogIndexError, match=why):
            load_labels_file(tmp_path / name)


def test_enrolments_of_one_new_id_at_once_give_one_item_and_409s_and_photos_added_at_once_get_their_own_names(
        tmp_path, encoder, photos, shop):
    """Operators at two pages (or a script's threads) enrolling the same new id at the same moment: one enrolment
    wins, the others are told 409 — none silently overwrites another. Photos added to one item at once, unnamed, are
    each kept under a name of its own."""
    import threading
    folder, labels = shop
    build_catalog(appliance_config(tmp_path, recognition=FAST), encoder, folder, labels=labels)
    app = make_appliance(tmp_path, encoder, None, recognition=FAST).start()
    try:
        names = ["astronaut", "brick", "camera", "coins", "grace_hopper", "chelsea"]
        start = threading.Barrier(len(names))
        answers: dict[str, object] = {}

        def run(name: str, call) -> None:
            start.wait(10)
            try:
                answers[name] = call()
            except Exception as e:  # noqa: BLE001 - the test tells the answers apart below
                answers[name] = e

        def at_once(call_of) -> dict[str, object]:
            answers.clear()
            threads = [threading.Thread(target=run, args=(n, call_of(n))) for n in names]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            return dict(answers)

        enrolled = at_once(lambda n: lambda: app.catalog.enrol(photos[n], "new/one", n))
        won = [n for n, a in enrolled.items() if isinstance(a, dict)]
        refused = [a for a in enrolled.values() if not isinstance(a, dict)]
        assert len(won) == 1 and len(refused) == len(names) - 1, enrolled
        assert all(getattr(a, "http_status", None) == 409 for a in refused), refused
        assert app.catalog.describe("new/one")[0] == won[0]  # the winner's label: nobody wrote over it
        added = at_once(lambda n: lambda: app.catalog.add_photo(photos[n], "new/one"))
        assert all(isinstance(a, dict) for a in added.values()), added
        assert len({a["photo"] for a in added.values()}) == len(names)  # six names, none written over
        assert sorted(app.catalog.photos("new/one")) == sorted(["", *(a["photo"] for a in added.values())])
    finally:
        app.stop()
