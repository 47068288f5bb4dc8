"""`catalog export` / `catalog import`: a whole catalog in one archive — a backup, a restore, a move to another
device — that round-trips exactly, and an import that is all or nothing: a truncated, tampered or foreign file,
or ids the catalog already has, change nothing."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from edge_retrieval.catalog.store import CatalogStore
from edge_retrieval.cli import main
from edge_retrieval.imaging.codec import encode_jpeg
from tests.conftest import device_config, view


def _device(root, name):
    return device_config(root, name)


def _cli(cfg, *args) -> int:
    return main(["--config", str(cfg), *args])


def _listing(cfg, capsys) -> dict[str, str]:
    capsys.readouterr()
    assert _cli(cfg, "catalog", "list") == 0
    return dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())


def _manifest(path) -> dict:
    with tarfile.open(path) as tar:
        return json.load(tar.extractfile("manifest.json"))


@pytest.fixture()
def exported(tmp_path, photos, capsys):
    """Device A: a folder build (a JPEG and a PNG, kept byte for byte), an enrolment and a removal; its export."""
    from PIL import Image
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "Rocket (1).jpg").write_bytes(encode_jpeg(photos["rocket"], 92))
    (folder / "moon.jpg").write_bytes(encode_jpeg(photos["moon"], 92))
    buf = io.BytesIO()
    Image.fromarray(photos["coins"]).save(buf, format="PNG")
    (folder / "coins.png").write_bytes(buf.getvalue())
    a = _device(tmp_path, "a")
    assert _cli(a, "index", "build", "--catalog", str(folder)) == 0
    chelsea = tmp_path / "Chelsea é.jpg"
    chelsea.write_bytes(encode_jpeg(photos["chelsea"], 90))
    assert _cli(a, "catalog", "add", str(chelsea)) == 0
    assert _cli(a, "catalog", "remove", "moon") == 0
    archive = tmp_path / "shop.tar"
    assert _cli(a, "catalog", "export", str(archive)) == 0
    return a, archive, folder


def test_an_export_imported_on_another_device_round_trips_exactly(exported, tmp_path, photos, capsys):
    a, archive, folder = exported
    items_a = _listing(a, capsys)
    assert items_a == {"Rocket _1_": "Rocket (1)", "coins": "coins", "Chelsea é": "Chelsea é"}
    manifest = _manifest(archive)
    with tarfile.open(archive) as tar:  # the folder's PNG travels as it was, byte for byte
        coins = next(i for i in manifest["items"] if i["id"] == "coins")["photos"][0]["file"]
        assert tar.extractfile(coins).read() == (folder / "coins.png").read_bytes()
    b = _device(tmp_path, "b")
    assert _cli(b, "catalog", "import", str(archive)) == 0
    assert _listing(b, capsys) == items_a
    again = tmp_path / "again.tar"
    assert _cli(b, "catalog", "export", str(again)) == 0
    strip = lambda m: sorted((i["id"], i["label"], i["attributes"], [p["sha256"] for p in i["photos"]])
                             for i in m["items"])
    assert strip(_manifest(again)) == strip(manifest)
    # and the imported items are recognised on device B
    q = tmp_path / "q.jpg"
    q.write_bytes(encode_jpeg(view(photos, "chelsea", "perspective", seed=3), 90))
    capsys.readouterr()
    assert _cli(b, "query", "--json", str(q)) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["match"] is not None and out["match"]["id"] == "Chelsea é", out


def _store_seq(cfg) -> int:
    store = CatalogStore(cfg.parent / "var" / "catalog.sqlite")
    try:
        return store.seq()
    finally:
        store.close()


def test_an_import_is_all_or_nothing(exported, tmp_path, capsys):
    a, archive, _ = exported
    b = _device(tmp_path, "b")
    assert _cli(b, "catalog", "import", str(archive)) == 0
    before, seq = _listing(b, capsys), _store_seq(b)

    data = archive.read_bytes()
    bad = {"truncated.tar": data[: len(data) // 2],  # cut inside a photo (the tail is only padding)
           "not-an-archive.tar": b"hello, I am a text file\n" * 100}
    tampered = io.BytesIO()  # a photo whose bytes no longer match the manifest
    with tarfile.open(archive) as src, tarfile.open(fileobj=tampered, mode="w") as dst:
        for info in src:
            body = src.extractfile(info).read()
            if info.name.startswith("photos/") and not bad.get("done"):
                body = body[:-10] + b"0123456789"
                bad["done"] = b""
            dst.addfile(info, io.BytesIO(body))
    bad.pop("done")
    bad["tampered.tar"] = tampered.getvalue()
    for name, body in bad.items():
        (tmp_path / name).write_bytes(body)
        capsys.readouterr()
        assert _cli(b, "catalog", "import", "--replace", str(tmp_path / name)) == 2, name
        err = capsys.readouterr().err
        assert {"truncated.tar": "truncated", "not-an-archive.tar": "not a readable archive",
                "tampered.tar": "does not match its size and sha256"}[name] in err, err
    # ids the catalog already has: refused unless --replace
    assert _cli(b, "catalog", "import", str(archive)) == 2
    assert "already in the catalog" in capsys.readouterr().err
    assert _listing(b, capsys) == before and _store_seq(b) == seq  # nothing half-imported, nothing written
    assert _cli(b, "catalog", "import", "--replace", str(archive)) == 0
    assert _listing(b, capsys) == before and _store_seq(b) == seq + len(before)
