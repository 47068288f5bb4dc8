"""Changes searchable without rewriting the catalog, against real ``serve`` processes: an enrolment writes no
generation, a CLI ``catalog add`` reaches a running server the same way, and ``kill -9`` in the middle of a merge
(into a base of 30,000 items, so that the merge takes seconds) loses nothing acknowledged — the old base + delta
serve after the restart, and the merge is done again."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_retrieval.catalog.store import CatalogStore
from edge_retrieval.index.reader import CatalogIndex, CatalogItem, read_current_name
from edge_retrieval.index.writer import write_index
from tests.integration.test_reliability_store import _jpeg, _top, _wait
from tests.support.serve import Serve


def _generations(index: Path) -> list[str]:
    return sorted(p.name for p in index.iterdir() if p.name.startswith("gen-"))


def _listed(serve: Serve, item_id: str) -> bool:
    status, body = serve.request("GET", f"/api/catalog?q={item_id}&limit=100")
    assert status == 200, body
    return any(it["id"] == item_id for it in body["items"])


def _index_health(serve: Serve) -> dict:
    status, body = serve.request("GET", "/api/health", headers={"Authorization": "Bearer s3cret-token"})
    assert status in (200, 503), body
    return body["index"]


def test_enrolments_from_http_and_the_cli_write_no_generation(tmp_path, small_catalog, photos):
    serve = Serve(tmp_path, small_catalog, "recognition:\n  adapt: false\n")
    try:
        serve.start()
        index = tmp_path / "index"
        gens = _generations(index)
        assert serve.upload("/api/catalog", _jpeg(photos, "coffee"), label="Mug", id="mug")[0] == 202
        _wait(lambda: _top(serve, photos, "coffee") == "mug", 30, "the enrolment to be searchable")
        assert serve.request("DELETE", "/api/catalog/moon", headers={"Authorization": "Bearer s3cret-token"})[0] == 200
        assert "moon" not in serve.catalog()
        (tmp_path / "cat.jpg").write_bytes(_jpeg(photos, "chelsea"))
        out = serve.cli("catalog", "add", str(tmp_path / "cat.jpg"), "--id", "cat", "--label", "Cat")
        assert out.returncode == 0, out.stderr
        _wait(lambda: serve.catalog().get("cat") == "Cat", 30, "the CLI enrolment to reach the server")
        assert _top(serve, photos, "chelsea") == "cat"
        listed = serve.cli("catalog", "list")
        assert listed.returncode == 0, listed.stderr
        ids = {line.split("\t")[0] for line in listed.stdout.splitlines()}
        assert {"mug", "cat", "rocket"} <= ids and "moon" not in ids  # the CLI lists the delta too
        assert _generations(index) == gens  # nothing rewritten: the changes are in the delta
        health = _index_health(serve)
        assert (health["delta_items"], health["delta_removed"], health["base_size"]) == (2, 1, 3)
        assert health["generation"] == gens[-1] and health["size"] == 4
    finally:
        serve.stop()


def _big_base(state: Path, extra: int) -> None:
    """The live generation again, with ``extra`` synthetic items beside the real ones, stamped with the store's seq
    (as a merge would make it): a merge into it writes them all again, which takes seconds."""
    index = state / "index"
    live = CatalogIndex.load(index, expected_bundle_sha256=None)
    store = CatalogStore(state / "catalog.sqlite")
    mark = (store.id, store.seq())
    store.close()
    rng = np.random.default_rng(0)

    def items():
        yield from live.stored_items()
        for k in range(extra):
            v = rng.standard_normal(live.dim).astype(np.float32)
            yield CatalogItem(f"filler/{k}", "filler", v)

    write_index(index, items(), bundle_sha256=live.bundle_sha256, n_trees=live.n_trees, dim=live.dim, store=mark)


def test_kill_9_during_a_merge_loses_nothing_and_the_old_base_and_delta_serve(tmp_path, small_catalog, photos):
    serve = Serve(tmp_path, small_catalog, "recognition:\n  adapt: false\n", index_extra="  merge_after_items: 1\n")
    index = tmp_path / "index"
    try:
        serve.start()
        assert serve.upload("/api/catalog", _jpeg(photos, "camera"), label="Camera", id="cam")[0] == 202
        _wait(lambda: _index_health(serve)["last_merge"] is not None, 60, "the first merge")
        serve.stop()
        _big_base(tmp_path, 30_000)
        serve.config.write_text(serve.config.read_text().replace("merge_after_items: 1", "merge_after_items: 3"))
        base = read_current_name(index)
        serve.start()
        for name, item_id in (("coffee", "mug"), ("chelsea", "cat")):
            assert serve.upload("/api/catalog", _jpeg(photos, name), label=name, id=item_id)[0] == 202
        assert serve.request("DELETE", "/api/catalog/moon", headers={"Authorization": "Bearer s3cret-token"})[0] == 200
        _wait(lambda: _index_health(serve)["merging"], 30, "the merge to start")
        # during the merge: an enrolment is acknowledged and searchable at once
        assert serve.upload("/api/catalog", _jpeg(photos, "astronaut"), label="Astro", id="astro")[0] == 202
        _wait(lambda: _top(serve, photos, "astronaut") == "astro", 10, "an enrolment during the merge")
        assert _index_health(serve)["merging"], "the merge ended before the kill: make the base bigger"
        serve.kill9()
        assert read_current_name(index) == base  # the merge never got to the swap
        serve.start()  # the old base + the delta from the store serve at once; the merge runs again
        assert all(_listed(serve, i) for i in ("mug", "cat", "astro", "cam")) and not _listed(serve, "moon")
        assert _top(serve, photos, "coffee") == "mug" and _top(serve, photos, "astronaut") == "astro"
        _wait(lambda: _index_health(serve)["last_merge"] is not None, 300, "the merge after the restart")
        health = _index_health(serve)
        assert health["delta_items"] + health["delta_removed"] == 0 and health["generation"] != base
        assert health["merge_error"] is None and health["size"] == 30_000 + 6  # rocket, brick, cam, mug, cat, astro
        assert not [p for p in index.iterdir() if p.name.startswith(".tmp")], "the killed merge's folder was left"
        assert _top(serve, photos, "chelsea") == "cat" and not _listed(serve, "moon") and _listed(serve, "astro")
    finally:
        serve.stop()
