"""Descriptors of image files through edge_retrieval.model.encoder.Encoder, written to .npz, and the cosine between two such
files: how benchmarks/arm64.sh compares an arm64 (QEMU) install with this machine's.

  python -m benchmarks.descriptors encode OUT.npz --bundle edge_retrieval/bundles/efficientnet-lite0 IMAGE...
  python -m benchmarks.descriptors compare A.npz B.npz     # prints one JSON line: mean/min cosine per image
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

from edge_retrieval.core.config import DEFAULT_BUNDLE


def encode(out: Path, bundle: Path, images: list[Path]) -> dict:
    """Embed each image (decoded as the CLI decodes it) and save names, descriptors and the runtime used."""
    from edge_retrieval.imaging.codec import read_image
    from edge_retrieval.model.encoder import Encoder
    with Encoder.from_bundle(bundle, num_threads=2) as enc:
        vecs = np.stack([enc.embed(read_image(p)) for p in images])
        runtime = enc.info().runtime
    meta = {"machine": platform.machine(), "python": platform.python_version(), "numpy": np.__version__,
            "runtime": str(runtime)}
    np.savez(out, names=np.array([p.name for p in images]), vectors=vecs, meta=json.dumps(meta))
    return meta


def compare(a: Path, b: Path) -> dict:
    """Cosine between the descriptors of the same image names in two .npz files."""
    fa, fb = np.load(a), np.load(b)
    pos = {n: i for i, n in enumerate(fb["names"].tolist())}
    names = [n for n in fa["names"].tolist() if n in pos]
    va = fa["vectors"][[fa["names"].tolist().index(n) for n in names]]
    vb = fb["vectors"][[pos[n] for n in names]]
    cos = np.sum(va * vb, axis=1) / (np.linalg.norm(va, axis=1) * np.linalg.norm(vb, axis=1))
    return {"images": len(names), "cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5),
            "worst": names[int(cos.argmin())], "a": json.loads(str(fa["meta"])), "b": json.loads(str(fb["meta"]))}


def main(argv: list[str]) -> int:
    """CLI of the two commands above."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.descriptors")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("encode")
    e.add_argument("out", type=Path)
    e.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    e.add_argument("images", nargs="+", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "encode":
        print(json.dumps(encode(args.out, args.bundle, args.images)))
    else:
        print(json.dumps(compare(args.a, args.b)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
