"""A cached virtualenv with only tflite-runtime 2.14 and numpy<2: what a device that has no ai-edge-litert runs.
Built once (minutes) and reused; a test that cannot build it is skipped with the reason."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CACHE = Path(os.environ.get("EDGE_RETRIEVAL_CACHE", Path.home() / ".cache" / "edge-retrieval"))
VENV = CACHE / "tflite-rt-venv"
REQUIREMENTS = ("tflite-runtime==2.14.0", "numpy<2")

def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _works(python: Path) -> bool:
    if not python.exists():
        return False
    check = "import numpy, tflite_runtime.interpreter; assert int(numpy.__version__.split('.')[0]) < 2"
    return subprocess.run([str(python), "-c", check], capture_output=True, timeout=120).returncode == 0


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def tflite_runtime_python() -> Path:
    """The python of a cached virtualenv with only tflite-runtime 2.14 and numpy<2."""
    if sys.version_info >= (3, 12):
        pytest.skip("tflite-runtime 2.14 has wheels for Python ≤ 3.11 only")
    python = _venv_python(VENV)
    if _works(python):
        return python
    base = getattr(sys, "_base_executable", None) or shutil.which("python3.11") or sys.executable
    # Build beside the cache entry and rename at the end, so a concurrent run never sees half a venv.
    tmp = VENV.with_name(f"{VENV.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run([base, "-m", "venv", str(tmp)], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            pytest.skip(f"cannot create a virtualenv for tflite-runtime: {_last_line(r.stderr + r.stdout)}")
        r = subprocess.run([str(_venv_python(tmp)), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                            *REQUIREMENTS], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.skip(f"cannot install {' '.join(REQUIREMENTS)}: {_last_line(r.stderr + r.stdout)}")
        if not _works(_venv_python(tmp)):
            pytest.skip("tflite-runtime installed but does not import (numpy<2 missing?)")
        shutil.rmtree(VENV, ignore_errors=True)
        os.replace(tmp, VENV)
    except subprocess.TimeoutExpired as e:
        pytest.skip(f"installing tflite-runtime timed out after {e.timeout} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert _works(python)
    return python
