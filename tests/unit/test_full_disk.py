"""A disk that fills during a rebuild is an error, never a SIGBUS: Annoy's trees are built in memory and written
with write() (ENOSPC → DiskFullError), or — too large for memory — built on disk in a child process whose death
the caller reports. Nothing half-written is left, the live generation stays, the process lives on. Run on a real
20 MB tmpfs (needs root and mount(8); skipped with the reason otherwise)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def tmpfs(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a tmpfs needs root and mount(8)")
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a 20 MB tmpfs here: {out.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


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
