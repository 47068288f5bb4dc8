"""Catalog adaptation: learned whitening (Lw, Radenović et al.) fitted at index build on the catalog's own
synthetic camera views, stored in the index generation and applied in numpy to every catalog and query vector.

Why: the bundle's descriptor was whitened on generic photos; what separates "the same print, seen by the camera"
from "another item of this catalog" depends on the catalog. Lw whitens by the covariance of the differences
between a view and its original (the directions camera effects move a descriptor along count less), then
rotates by the PCA of the whitened descriptors and keeps ``dim`` of them. Measured on the camera-view benchmark:
docs/benchmarks.md.

A generation stores its projection in ``projection.npz`` beside its vectors (edge_retrieval/index/generation.py);
``vectors.npy`` keeps the bundle's own descriptors, so an enrolment rebuild re-projects them with the stored
projection and a full ``index build`` refits it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_retrieval.core.config import RecognitionConfig
from edge_retrieval.imaging.synthetic_views import camera_view

# The kinds a catalog print meets in front of the camera (closeup adds nothing over the original).
ADAPT_KINDS = ("table", "table_occluded", "perspective", "occluded", "rotate", "zoom", "lighting", "blur",
               "color_cast", "noise_jpeg")
# Views are made at QVGA: the encoder sees 224 px anyway, and a VGA view costs ~3x as much to make.
VIEW_HW = (240, 320)
MIN_ITEMS = 2  # a projection needs more than one item to tell items apart


@dataclass(frozen=True)
class Projection:
    """A fitted Lw projection: ``apply(x) = L2((x - mean) @ matrix.T)``."""

    mean: np.ndarray      # float32 [d_in]
    matrix: np.ndarray    # float32 [dim, d_in]
    fit_items: int        # catalog items whose views it was fitted on
    views_per_item: int
    bundle_sha256: str

    @property
    def in_dim(self) -> int:
        """The bundle's descriptor size."""
        return int(self.matrix.shape[1])

    @property
    def dim(self) -> int:
        """The projected descriptor size (what the Annoy index holds)."""
        return int(self.matrix.shape[0])

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Project descriptors [N, d_in] (or one [d_in]) and L2-normalise: float32 [N, dim] (or [dim])."""
        x = np.asarray(vectors, dtype=np.float32)
        y = (x - self.mean) @ self.matrix.T
        norm = np.linalg.norm(y, axis=-1, keepdims=True)
        return (y / np.maximum(norm, 1e-12)).astype(np.float32)

    def describe(self) -> dict:
        """What /api/health shows about it."""
        return {"enabled": True, "method": "learned whitening (Lw)", "in_dim": self.in_dim, "dim": self.dim,
                "fit_items": self.fit_items, "views_per_item": self.views_per_item}


def fit_lw(originals: np.ndarray, views: np.ndarray, dim: int, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, matrix [dim, d]) of learned whitening from descriptors of ``originals`` [N, d] and their
    ``views`` [N, V, d]. The difference covariance is shrunk toward its mean variance by ``shrinkage`` (a
    small catalog has fewer differences than dimensions: unshrunk, whitening blows up noise directions)."""
    x0 = np.asarray(originals, np.float64)
    xv = np.asarray(views, np.float64)
    n, v, d = xv.shape
    diff = (xv - x0[:, None, :]).reshape(-1, d)
    cs = diff.T @ diff / len(diff)
    cs = (1 - shrinkage) * cs + shrinkage * (np.trace(cs) / d) * np.eye(d)
    w, u = np.linalg.eigh(cs)
    whiten = (u / np.sqrt(np.maximum(w, 1e-12 * w.max()))) @ u.T  # C_S^-1/2
    allx = np.concatenate([x0, xv.reshape(-1, d)])
    mean = allx.mean(axis=0)
    z = (allx - mean) @ whiten.T
    _, _, vt = np.linalg.svd(z, full_matrices=False)  # rows: principal directions, largest first
    rot = vt
    if len(vt) < d:  # fewer descriptors than dims: complete the basis (QR keeps vt's rows first, up to sign)
        rot = np.linalg.qr(np.concatenate([vt, np.eye(d)]).T)[0].T
    matrix = rot[:min(dim, d)] @ whiten
    return mean.astype(np.float32), matrix.astype(np.float32)


def adaptation_views(rgb: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """``n`` synthetic camera views of one catalog image (kinds cycle through ADAPT_KINDS from a per-item
    offset, so a small catalog still sees every kind), deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    start = int(rng.integers(len(ADAPT_KINDS)))
    return [camera_view(rgb, ADAPT_KINDS[(start + k) % len(ADAPT_KINDS)], rng, VIEW_HW) for k in range(n)]


def view_descriptors(embed: Callable[[np.ndarray], np.ndarray], rgb: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Descriptors [n, d] of the ``n`` :func:`adaptation_views` of one catalog image (``embed``: the encoder's)."""
    return np.stack([embed(v) for v in adaptation_views(rgb, n, seed)])


class AdaptationFit:
    """Collects, during an index build, the descriptors of a sample of catalog items and of their synthetic
    views, then fits the Projection. ``sample(n_items)`` picks which rows to use (≤ ``adapt_max_items``)."""

    def __init__(self, embed: Callable[[np.ndarray], np.ndarray], recognition: RecognitionConfig,
                 bundle_sha256: str, bundle_dim: int):
        """``embed`` is the encoder's (RGB uint8 → L2-normalised float32 descriptor)."""
        self.embed = embed
        self.rc = recognition
        self.bundle_sha256 = bundle_sha256
        self.dim = min(recognition.adapt_dim, bundle_dim)
        self._originals: list[np.ndarray] = []
        self._views: list[np.ndarray] = []

    def sample(self, n_items: int, seed: int = 0) -> set[int]:
        """Rows of an ``n_items`` catalog to make views of (all, or a seeded sample of adapt_max_items)."""
        if n_items <= self.rc.adapt_max_items:
            return set(range(n_items))
        return set(np.random.default_rng(seed).choice(n_items, self.rc.adapt_max_items, replace=False).tolist())

    def add(self, rgb: np.ndarray, original: np.ndarray, seed: int) -> None:
        """Views of one sampled catalog image (``original``: its descriptor, already computed)."""
        self.add_views(original, view_descriptors(self.embed, rgb, self.rc.adapt_views, seed))

    def add_views(self, original: np.ndarray, views: np.ndarray) -> None:
        """One sampled item whose view descriptors [adapt_views, d] were made elsewhere (a build worker)."""
        self._originals.append(np.asarray(original, np.float32))
        self._views.append(np.asarray(views, np.float32))

    def fit(self) -> Projection | None:
        """The Projection, or None when fewer than ``MIN_ITEMS`` items were seen (nothing to adapt to)."""
        if len(self._originals) < MIN_ITEMS:
            return None
        mean, matrix = fit_lw(np.stack(self._originals), np.stack(self._views), self.dim, self.rc.adapt_shrinkage)
        return Projection(mean, matrix, len(self._originals), self.rc.adapt_views, self.bundle_sha256)
