"""Checks that an implementation has exactly the methods of a Protocol (the web layer's Services, its fakes)."""
from __future__ import annotations

import inspect


def protocol_mismatches(protocol: type, implementation) -> list[str]:
    """Where ``implementation`` (a class or an object) differs from ``protocol``: a missing method or attribute,
    or a method whose parameters (names, kinds, defaults) are not the protocol's."""
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
