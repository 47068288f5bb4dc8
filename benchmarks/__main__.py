"""Run the benchmarks:  python -m benchmarks [speed|annoy|quality|category|calibrate|adapt|reliability|fleet|cost|ops|scale|multi_item|incremental|three_d|background|catalog_size|patch_ckn|tilt_cost|all]

No subcommand runs speed + annoy (what ``make bench`` runs). Each bench is a module with ``main(argv)``,
imported only when asked for; quality / category are skipped with a note when their module is absent.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys

BENCHES = {"speed": "benchmarks.speed", "annoy": "benchmarks.annoy_recall", "quality": "benchmarks.quality",
           "category": "benchmarks.category", "calibrate": "benchmarks.recognition",
           "reliability": "benchmarks.reliability", "fleet": "benchmarks.fleet", "adapt": "benchmarks.adapt",
           "cost": "benchmarks.cost", "ops": "benchmarks.ops", "three_d": "benchmarks.three_d",
           "scale": "benchmarks.scale", "multi_item": "benchmarks.multi_item", "incremental": "benchmarks.incremental",
           "background": "benchmarks.background", "catalog_size": "benchmarks.catalog_size",
           "patch_ckn": "benchmarks.patch_ckn", "tilt_cost": "benchmarks.tilt_cost"}
DEFAULT = ("speed", "annoy")


def run(name: str, argv: list[str]) -> int:
    """Import bench ``name`` lazily and run its ``main(argv)``; 0 when its module is absent."""
    module = BENCHES[name]
    if importlib.util.find_spec(module) is None:
        print(f"== {name}: {module} is not there; skipped", flush=True)
        return 0
    print(f"== {name} ({module})", flush=True)
    return int(importlib.import_module(module).main(argv) or 0)


def main(argv: list[str]) -> int:
    """Dispatch; extra arguments go to a single named bench."""
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    name, rest = (argv[0], argv[1:]) if argv else ("default", [])
    if name not in (*BENCHES, "all", "default"):
        print(f"unknown bench {name!r}; allowed: {', '.join(BENCHES)}, all", file=sys.stderr)
        return 2
    if name in BENCHES:
        return run(name, rest)
    if rest:
        print(f"arguments are passed only to a single bench, not to {name!r}", file=sys.stderr)
        return 2
    names = BENCHES if name == "all" else DEFAULT
    failed = [n for n in names if run(n, []) != 0]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
