"""The device's layout holds: every module imports only the stages before it (nothing upward, no cycles),
never TensorFlow, Keras, torch, Ray, the converter or the Ray builder, and no module grows past the size a newcomer can read."""
from __future__ import annotations

import ast
import subprocess
import sys

from .conftest import ROOT

# The frame path and its helpers, lowest first: a module may import only modules listed before it.
LAYERS = ("errors", "procstat", "jsonfile", "config", "results", "status", "decision", "images", "synthetic_views", "bundle",
          "encoder", "verify", "feature_store", "adapt", "items", "generation", "index", "index_writer", "index_holder",
          "store", "catalog", "build_pool", "catalog_service", "trigger", "camera_sources", "camera", "lookup",
          "metrics", "history", "mqtt_auth", "events", "push", "recorder", "camera_loop", "appliance", "demo", "wiring",
          "systemd", "web.services", "web.common", "web.hosts", "web.page", "web.stream", "web.sse", "web.api", "web",
          "__main__")
MAX_LINES = 450


def _device_modules() -> dict[str, object]:
    out = {}
    for path in sorted((ROOT / "device").rglob("*.py")):
        rel = path.relative_to(ROOT / "device").with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path) -> set[str]:
    """device modules imported by ``name`` (absolute ``device.x`` and relative ``.x`` forms)."""
    tree = ast.parse(path.read_text())
    package = name.rsplit(".", 1)[0] if (path.name != "__init__.py" and "." in name) else name
    if path.name != "__init__.py" and "." not in name:
        package = ""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [mod] if node.module else [".".join(base + [a.name]) for a in node.names]
            elif node.module and node.module.startswith("device"):
                targets = [node.module[len("device."):]] if node.module != "device" else [a.name for a in node.names]
            else:
                continue
            found.update(t for t in targets if t)
        elif isinstance(node, ast.Import):
            found.update(a.name[len("device."):] for a in node.names if a.name.startswith("device."))
    return found


def test_every_device_module_is_in_the_layer_list():
    assert set(_device_modules()) - {""} == set(LAYERS)


def test_modules_import_only_earlier_stages():
    order = {name: i for i, name in enumerate(LAYERS)}
    for name, path in _device_modules().items():
        if not name:
            continue
        for target in _imports(name, path):
            assert target in order, f"device/{name} imports unknown module {target}"
            assert order[target] < order[name], (
                f"device/{name} imports device/{target}, which comes after it in the frame path")


def test_no_device_module_is_over_the_size_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _device_modules().items()}
    assert max(sizes.values()) <= MAX_LINES, {k: v for k, v in sizes.items() if v > MAX_LINES}


def test_device_never_imports_tensorflow_keras_torch_ray_or_the_converter():
    modules = ", ".join(f"device.{m}" for m in LAYERS)
    code = (f"import sys, {modules}\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'torch', 'converter', 'ray', 'builder'))\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def protocol_mismatches(protocol: type, implementation) -> list[str]:
    """Where ``implementation`` (a class or an object) differs from ``protocol``: a missing method or attribute,
    or a method whose parameters (names, kinds, defaults) are not the protocol's."""
    import inspect
    out = []
    members = [n for n in vars(protocol) if not n.startswith("_")] + list(getattr(protocol, "__annotations__", {}))
    for name in dict.fromkeys(members):
        want = getattr(protocol, name, None)
        if not callable(want):  # a data attribute: an instance must have it
            if not isinstance(implementation, type) and not hasattr(implementation, name):
                out.append(f"no attribute {name}")
            continue
        got = getattr(implementation, name, None)
        if got is None or not callable(got):
            out.append(f"no method {name}")
            continue
        strip = lambda sig: [(p.name, p.kind, p.default) for p in sig.parameters.values() if p.name != "self"]
        if strip(inspect.signature(got)) != strip(inspect.signature(want)):
            out.append(f"{name}{inspect.signature(got)} is not {name}{inspect.signature(want)}")
    return out


def test_the_appliance_is_what_the_web_layer_calls():
    from device.appliance import Appliance
    from device.web.services import Services
    assert protocol_mismatches(Services, Appliance) == []


def _readme_modules() -> list[str]:
    """The modules of the README's table under "How a frame flows", in its order, as LAYERS names them."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## How a frame flows"):]
    section = section[:section.index("\n## ", 3)]
    out = []
    for line in section.splitlines():
        if line.startswith("| `") and line.count("|") >= 3:
            path = line.split("`")[1]
            name = path[:-len(".py")].replace("/__init__", "").replace("/", ".")
            out.append(name)
    return out


def test_the_readme_module_table_lists_every_module_in_the_layer_order():
    assert _readme_modules() == list(LAYERS)
