"""A disk that fills during a rebuild is an error, never a SIGBUS: Annoy's trees are built in memory and written
with write() (ENOSPC → DiskFullError), or — too large for memory — built on disk in a child process whose death
the caller reports. Nothing half-written is left, the live generation stays, the process lives on. Run on a real
20 MB tmpfs (needs root and mount(8); skipped with the reason otherwise)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


BUILD = """
import os, sys
import numpy as np
from edge_retrieval.core.errors import ApplianceError
from edge_retrieval.index import ann_build
from edge_retrieval.index.reader import CatalogItem
from edge_retrieval.index.writer import write_index
root, mode = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(0)
if mode == "small":
    write_index(root, [CatalogItem("a", "a", rng.normal(size=64).astype(np.float32))], bundle_sha256="c" * 64,
                n_trees=2)
    sys.exit(0)
if mode == "child":  # too large for memory, and the disk fills after the free-space check said yes
    ann_build.IN_MEMORY_MAX_BYTES = -1
    ann_build.estimate_ann_bytes = lambda *a: 0
st = os.statvfs(root)
with open(os.path.join(root, "filler"), "wb") as f:  # leave 3 MB: room for vectors.npy (1 MB), not the trees
    f.write(b"\\0" * (st.f_bavail * st.f_frsize - 3_000_000))
items = [CatalogItem(f"i{k}", "x", v) for k, v in enumerate(rng.normal(size=(2000, 256)).astype(np.float32))]
try:
    write_index(root, items, bundle_sha256="c" * 64, n_trees=2)
except ApplianceError as e:
    print(type(e).__name__, e)
    sys.exit(5)
"""


def _run(root: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(BUILD), str(root), mode], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("mode", ["in_memory", "child"])
def test_a_disk_filling_during_a_rebuild_is_an_error_never_a_sigbus(tmpfs, mode):
    root = tmpfs / "index"
    assert _run(root, "small").returncode == 0
    live = os.readlink(root / "current")
    done = _run(root, mode)
    assert done.returncode == 5, (done.returncode, done.stdout, done.stderr[-2000:])  # -7 was the SIGBUS
    assert ("DiskFullError" if mode == "in_memory" else "signal 7") in done.stdout, done.stdout
    assert os.readlink(root / "current") == live
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp")], "something half-written was left"


def _fill(disk: Path) -> Path:
    st = os.statvfs(disk)
    filler = disk / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (st.f_bavail * st.f_frsize))
    return filler


def _config(disk: Path):
    from edge_retrieval.core.config_file import load_config
    (disk.parent / "config.yaml").write_text(f"catalog:\n  store: {disk / 'catalog.sqlite'}\n"
                                             f"history:\n  dir: {disk / 'history'}\n")
    return load_config(disk.parent / "config.yaml")


def test_a_start_on_a_full_disk_reads_the_store_and_writes_again_when_space_is_back(tmpfs):
    from edge_retrieval.catalog.store import CatalogStore
    from edge_retrieval.core.errors import DiskFullError
    path = _config(tmpfs).catalog.store
    store = CatalogStore(path)
    store.put("a", "A", b"jpeg" * 100)
    store.close()  # a clean stop: no WAL left, and SQLite must create one to open the store normally
    filler = _fill(tmpfs)
    store = CatalogStore(path)  # was: StoreError "disk I/O error", exit 2
    assert store.read_only and "full" in store.read_only and store.seq() == 1 and store.get("a").label == "A"
    with pytest.raises(DiskFullError):
        store.put("b", "B", b"jpeg")
    filler.unlink()
    assert store.put("b", "B", b"jpeg") == 2 and store.read_only is None
    store.close()
    assert CatalogStore(path).seq() == 2


@pytest.mark.parametrize("stop", ["clean", "kill9"])
def test_history_numbering_goes_on_after_a_start_on_a_full_disk(tmpfs, stop):
    config = _config(tmpfs).history
    script = textwrap.dedent(f"""
        import os
        import numpy as np
        from edge_retrieval.core.config_file import load_config
        from edge_retrieval.core.results import LookupResult
        from edge_retrieval.outputs.history import History
        history = History(load_config({str(tmpfs.parent / 'config.yaml')!r}).history)
        for _ in range(3):
            history.record(LookupResult(results=[], timings_ms={{"total": 1.0}}, source="upload"),
                           np.full((64, 64, 3), 120, np.uint8))
        if {stop!r} == "kill9":
            os._exit(9)  # the WAL holds the entries
        history.close()
    """)
    subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                   timeout=120, check=False)
    _fill(tmpfs)
    from edge_retrieval.core.results import LookupResult
    from edge_retrieval.outputs.history import History
    history = History(config)
    assert sorted(e.n for e in history.entries()) == [1, 2, 3]  # still listed
    assert history.image(3) is not None  # the kept snapshots are still served
    entry = history.record(LookupResult(results=[], timings_ms={"total": 1.0}, source="upload"))
    assert entry.n == 4  # never back to 1: old image links keep pointing at their own photos
    assert not list(config.dir.glob("*.unreadable-*")), "an intact history.sqlite was moved aside"
    history.close()


def test_a_serve_stopped_cleanly_starts_on_a_full_disk_and_serves_what_it_has(tmp_path, tmpfs, small_catalog, photos):
    """The round-three failure: SIGTERM, the disk fills, a start → exit 2 "disk I/O error". Now it serves."""
    from edge_retrieval.imaging.codec import encode_jpeg
    from tests.support.serve import AUTH, Serve
    serve = Serve(tmp_path, small_catalog, "recognition:\n  adapt: false\n", state=tmpfs,
                  catalog_extra="  min_free_mb: 1\n  retry_s: 0.5\n")
    try:
        serve.start()
        assert serve.upload("/api/catalog", encode_jpeg(photos["coffee"]), label="Mug", id="mug")[0] == 202
        for _ in range(600):  # until the rebuild made it live (each request waits on the server)
            if "mug" in serve.catalog():
                break
        serve.stop()
        filler = _fill(tmpfs)
        serve.start()
        status, health = serve.request("GET", "/api/health", headers=AUTH)
        assert status in (200, 503) and "full" in (health["enrolled"]["store_read_only"] or ""), health
        assert {"mug", "moon", "rocket", "brick"} <= set(serve.catalog())
        assert serve.upload("/api/query", encode_jpeg(photos["coffee"]))[0] == 200
        assert serve.upload("/api/catalog", encode_jpeg(photos["chelsea"]), label="Cat", id="cat")[0] == 507
        filler.unlink()
        assert serve.upload("/api/catalog", encode_jpeg(photos["chelsea"]), label="Cat", id="cat")[0] == 202
    finally:
        serve.stop()
