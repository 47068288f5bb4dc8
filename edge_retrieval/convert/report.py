"""How much did export/quantization change the descriptors and the rankings? Compared on held-out real
images and camera-like views of them, through the device's own Encoder (the runtime the device uses)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from edge_retrieval.imaging.synthetic_views import VIEW_KINDS, camera_view
from edge_retrieval.model.bundle import InputSpec, prepare_pixels
from edge_retrieval.model.encoder import Encoder

REPORT_VIEW_KINDS = ("closeup", "perspective", "lighting", "blur", "table")


def _views(images: list[np.ndarray], seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed + 7)
    views, owner = [], []
    for i, img in enumerate(images):
        for kind in REPORT_VIEW_KINDS:
            views.append(camera_view(img, kind, rng, out_hw=(360, 480)))
            owner.append(i)
    return views, np.asarray(owner)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def compare(ref_db: np.ndarray, ref_q: np.ndarray, new_db: np.ndarray, new_q: np.ndarray,
            owner: np.ndarray) -> dict:
    """Descriptor cosine (reference vs new, per image), top-1/top-5 neighbour agreement of the queries
    against the database, and recall@1 of each (a view should find its own original)."""
    cos = np.concatenate([(ref_db * new_db).sum(1), (ref_q * new_q).sum(1)])
    ref_rank = np.argsort(-(ref_q @ ref_db.T), axis=1)
    new_rank = np.argsort(-(new_q @ new_db.T), axis=1)
    k = min(5, ref_db.shape[0])
    top5 = np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ref_rank, new_rank)])
    return {
        "cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5),
        "top1_agreement": round(float(np.mean(ref_rank[:, 0] == new_rank[:, 0])), 4),
        "top5_agreement": round(float(top5), 4),
        "recall_at_1_reference": round(float(np.mean(ref_rank[:, 0] == owner)), 4),
        "recall_at_1": round(float(np.mean(new_rank[:, 0] == owner)), 4),
        "images": int(ref_db.shape[0]), "views": int(ref_q.shape[0]),
    }


def invoke_latency_ms(bundle: Path, num_threads: int, runs: int = 30) -> float:
    """Median bare ``invoke()`` time of the bundle on the device runtime, on the input a VGA camera frame gives
    (the fixed input size, or 224 x 299 for a short side of 224)."""
    enc = Encoder.from_bundle(bundle, num_threads=num_threads)
    rgb = np.zeros((480, 640, 3), np.uint8)
    x = enc.preprocess(rgb)
    enc.invoke(x)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        enc.invoke(x)
        times.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(times), 3)


def encode_all(encoder: Encoder, images: list[np.ndarray]) -> np.ndarray:
    """Descriptors of RGB images through the device encoder."""
    return np.stack([encoder.embed(img) for img in images])


def quantization_report(model, bundle: Path, heldout, seed: int = 0) -> dict:
    """Float Keras ``model`` vs the bundle's TFLite on held-out images (+ their camera views)."""
    enc = Encoder.from_bundle(bundle, num_threads=2)
    spec = InputSpec(height=enc.manifest.input.height, width=enc.manifest.input.width, dtype="float32")
    images = heldout.images
    views, owner = _views(images, seed)

    def keras_desc(imgs):
        x = np.concatenate([prepare_pixels(i, spec) for i in imgs])
        return _unit(model.predict(x, batch_size=16, verbose=0))

    rep = compare(keras_desc(images), keras_desc(views), encode_all(enc, images), encode_all(enc, views), owner)
    rep.update(reference="float Keras model", bundle=str(bundle), quantization=enc.manifest.quantization,
               size_bytes=(bundle / enc.manifest.model_file).stat().st_size,
               invoke_ms_1_thread=invoke_latency_ms(bundle, 1), invoke_ms_2_threads=invoke_latency_ms(bundle, 2),
               runtime=enc.runtime, view_kinds=list(REPORT_VIEW_KINDS))
    return rep


def compare_bundles(reference: Path, bundle: Path, heldout, seed: int = 0) -> dict:
    """The same report with another bundle (e.g. the float32 export) as the reference."""
    ref, new = Encoder.from_bundle(reference), Encoder.from_bundle(bundle)
    views, owner = _views(heldout.images, seed)
    rep = compare(encode_all(ref, heldout.images), encode_all(ref, views),
                  encode_all(new, heldout.images), encode_all(new, views), owner)
    rep.update(reference=str(reference), bundle=str(bundle), quantization=new.manifest.quantization,
               size_bytes=(bundle / new.manifest.model_file).stat().st_size,
               invoke_ms_1_thread=invoke_latency_ms(bundle, 1), invoke_ms_2_threads=invoke_latency_ms(bundle, 2),
               runtime=new.runtime)
    return rep


assert set(REPORT_VIEW_KINDS) <= set(VIEW_KINDS)
