"""The package's rooms hold: each room imports only the rooms its rule allows (a frame flows one way: capture →
search → outputs → web; the app wires them; the CLI calls the app), the device never imports TensorFlow, Keras,
torch or Ray, and no module grows past the size a newcomer can read. docs/architecture.md says the same in words."""
from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import ROOT
from tests.support.protocols import protocol_mismatches

PACKAGE = ROOT / "edge_retrieval"
# Which rooms each room may import (besides itself). A room not listed here is a new room: add its rule.
ALLOWED = {
    "core": set(),
    "imaging": {"core"},
    "model": {"core", "imaging"},
    "index": {"core", "model"},
    "catalog": {"core", "imaging", "model", "index"},
    "search": {"core", "imaging", "model", "index"},
    "capture": {"core", "imaging"},
    "outputs": {"core", "imaging"},
    "web": {"core", "outputs"},
    "app": {"core", "imaging", "model", "index", "catalog", "search", "capture", "outputs"},
    "cli": {"core", "imaging", "model", "index", "catalog", "search", "capture", "outputs", "app", "web"},
    "__main__": {"cli"},
    "convert": {"core", "imaging", "model"},
}
# Workstation and cluster code: the only modules allowed TensorFlow/Keras/torch (convert) or Ray (ray_build).
HEAVY_ALLOWED = ("edge_retrieval.convert", "edge_retrieval.catalog.ray_build")
MAX_LINES = 450


def _modules() -> dict[str, object]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(parts)] = path
    return out


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path) -> set[str]:
    """The edge_retrieval modules a file imports (every import is absolute in this package); ``from package
    import module`` counts as importing that module."""
    found = set()
    modules = _modules()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (write edge_retrieval.room.module)"
            if node.module and node.module.startswith("edge_retrieval"):
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                found.update(subs or [node.module])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("edge_retrieval"))
    return found


def test_every_room_has_a_rule():
    rooms = {_room(m) for m in _modules()} - {""}
    assert rooms <= set(ALLOWED), f"rooms without a rule in ALLOWED: {rooms - set(ALLOWED)}"


def test_rooms_import_only_what_their_rule_allows():
    bad = []
    for name, path in _modules().items():
        room = _room(name)
        for target in _imports(path):
            other = _room(target)
            if other and other != room and other not in ALLOWED[room]:
                bad.append(f"{name} imports {target} ({room} may import {sorted(ALLOWED[room]) or 'nothing'})")
    assert bad == []


def test_no_import_cycles_between_modules():
    graph = {name: {t for t in _imports(path) if t in _modules()} for name, path in _modules().items()}
    seen, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError("import cycle: " + " → ".join(stack[stack.index(node):] + [node]))
        if node in seen:
            return
        stack.append(node)
        for nxt in graph[node]:
            visit(nxt)
        stack.pop()
        seen.add(node)

    for node in graph:
        visit(node)


def test_no_module_is_over_the_size_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert max(sizes.values()) <= MAX_LINES, {k: v for k, v in sizes.items() if v > MAX_LINES}


def test_the_device_never_imports_tensorflow_keras_torch_or_ray():
    modules = ", ".join(m for m in _modules() if m and not m.startswith(HEAVY_ALLOWED) and not m.endswith("__main__"))
    code = (f"import sys, {modules}\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'torch', 'ray')\n"
            "               or m.startswith(('edge_retrieval.convert', 'edge_retrieval.catalog.ray_build')))\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_appliance_is_what_the_web_layer_calls():
    from edge_retrieval.app.appliance import Appliance
    from edge_retrieval.web.services import Services
    assert protocol_mismatches(Services, Appliance) == []


def test_the_architecture_page_names_every_room_and_module():
    text = (ROOT / "docs" / "architecture.md").read_text()
    missing = [room for room in ALLOWED if room not in ("__main__",) and f"`{room}" not in text]
    assert missing == [], f"docs/architecture.md does not describe {missing}"
    modules = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.glob("*/*.py")
               if p.name != "__init__.py" and p.parent.name != "convert"]
    assert [m for m in modules if f"`{m}`" not in text] == [], "docs/architecture.md: a module without its line"
