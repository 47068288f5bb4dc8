"""VLAD pooling over the last convolutional map: centroids fitted by k-means on the training images' local
descriptors, then FIXED in the graph as a soft-assignment NetVLAD head (Jégou et al. 2010; Arandjelović et al.
2016), so it exports to TFLite float32 / dynamic / int8 with plain builtins.

Per image, with x_n the descriptor at map position n:
  x_n → L2 → local PCA to ``local_dim`` (a fitted 1x1 conv; 0 = keep every channel) → L2
  a_nk = softmax_k(−α‖x_n − c_k‖²) = softmax_k(2α x_n·c_k − α‖c_k‖²)
      (‖x_n‖² − 2x_n·c_k + ‖c_k‖²: the ‖x_n‖² term is the same for every k and cancels in the softmax, so the
      assignment is one matmul + bias + SOFTMAX — int8-friendly)
  V_k = Σ_n a_nk (x_n − c_k) = m_k (μ_k − c_k), m_k = Σ_n a_nk, μ_k = Σ_n (a_nk / m_k) x_n   (one BATCH_MATMUL)
  intra-normalisation (L2 of each V_k, computed as L2 of μ_k − c_k: same direction, int8-sized ranges), weighted
  by min(m_k, 1) so a cluster with less than one descriptor's worth of weight fades out instead of becoming
  a unit vector of noise (hard VLAD's empty cluster is 0) → flatten (K·local_dim)
The build then applies its usual global L2 → PCA / whitening → L2.

α rule: the one α for which the soft weight on the nearest centroid, averaged over the training sample, is
``ASSIGN_TARGET`` (0.9) — sharp enough to act like VLAD's hard assignment, soft enough that a descriptor near a
Voronoi border does not flip between clusters under a small change of view. Found by bisection on log α.
"""
from __future__ import annotations

import logging

import keras
import numpy as np
import tensorflow as tf

from edge_retrieval.convert.errors import ConverterError
from edge_retrieval.convert.layers import L2Normalize

log = logging.getLogger(__name__)

ASSIGN_TARGET = 0.9          # mean soft weight on the nearest centroid (the α rule above)
POSITIONS_PER_IMAGE = 64     # local descriptors sampled per training image for the PCA and k-means
CLUSTERS_RANGE = (2, 256)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _sq_dist(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """‖x_n − c_k‖² for every pair, [N, K]."""
    return np.maximum((x ** 2).sum(1)[:, None] - 2.0 * x @ c.T + (c ** 2).sum(1)[None, :], 0.0)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def alpha_for(local: np.ndarray, centroids: np.ndarray, target: float = ASSIGN_TARGET) -> float:
    """The α at which the mean soft weight on the nearest centroid over ``local`` [N, D] equals ``target``."""
    d = _sq_dist(local, centroids)
    d = d - d.min(axis=1, keepdims=True)  # distances relative to the nearest: softmax is shift-invariant
    lo, hi = -6.0, 8.0                    # log10 α: weight ≈ 1/K at the low end, ≈ 1 at the high end
    for _ in range(60):
        mid = (lo + hi) / 2
        if _softmax(-(10 ** mid) * d).max(axis=1).mean() < target:
            lo = mid
        else:
            hi = mid
    return float(10 ** ((lo + hi) / 2))


def vlad_hard(local: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """The classic hard-assignment VLAD of one image's local descriptors [N, D] (numpy reference): residual
    sums to the nearest centroid, intra-normalised per cluster, flattened, globally L2-normalised → [K·D]."""
    nearest = _sq_dist(local, centroids).argmin(axis=1)
    v = np.zeros_like(centroids, dtype=np.float64)
    for k in range(len(centroids)):
        members = local[nearest == k]
        if len(members):
            v[k] = (members - centroids[k]).sum(axis=0)
    return _unit(_unit(v).reshape(-1)).astype(np.float32)


@keras.saving.register_keras_serializable(package="converter")
class VladPool(keras.layers.Layer):
    """Soft-assignment VLAD with fixed ``centroids`` [K, D] and sharpness ``alpha`` on a map [B, H, W, D] of
    L2-normalised local descriptors → intra-normalised, mass-gated [B, K·D] (no global L2: the build adds it).
    Ops: FULLY_CONNECTED, SOFTMAX, LOG_SOFTMAX, SUM, BATCH_MATMUL, SUB, L2_NORMALIZATION, MINIMUM, MUL."""

    def __init__(self, centroids, alpha: float, **kw):
        super().__init__(**kw)
        self.centroids = np.asarray(centroids, np.float32)
        self.alpha = float(alpha)

    def call(self, x):
        k, d = self.centroids.shape
        n = int(x.shape[1]) * int(x.shape[2])
        logits = tf.matmul(tf.reshape(x, [-1, d]), tf.constant(2.0 * self.alpha * self.centroids.T)) + tf.constant(
            -self.alpha * (self.centroids ** 2).sum(1))
        mass = tf.reduce_sum(tf.reshape(tf.nn.softmax(logits, axis=-1), [-1, n, k]), axis=1)        # [B, K]
        # Each cluster's share of its assignment over the positions, a_nk / Σ_n a_nk, as a softmax over n of
        # log a_nk: no DIV, whose int8 kernel fails on a quantized-zero mass.
        share = tf.nn.softmax(tf.reshape(tf.nn.log_softmax(logits, axis=-1), [-1, n, k]), axis=1)
        mean = tf.matmul(share, tf.reshape(x, [-1, n, d]), transpose_a=True)                      # [B, K, D]
        # V_k = mass_k (mean_k − c_k), so intra-normalising (mean_k − c_k) gives the same unit vector while
        # keeping the int8 ranges small ([-2, 2] instead of the sums' [-N, N]). The gate min(mass_k, 1) stops
        # a cluster that holds less than one descriptor's worth of weight from being blown up to a full unit
        # vector of rounding noise; with a hard assignment it is exactly VLAD's "empty cluster = 0".
        unit = tf.math.l2_normalize(mean - tf.constant(self.centroids), axis=-1)
        gated = unit * tf.expand_dims(tf.minimum(mass, 1.0), -1)
        return tf.reshape(gated, [-1, k * d])

    def get_config(self):
        return {**super().get_config(), "centroids": self.centroids.tolist(), "alpha": self.alpha}


def _local_pca(local: np.ndarray, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    from sklearn.decomposition import PCA
    pca = PCA(n_components=dim, random_state=seed).fit(local)
    kernel = pca.components_.T.astype(np.float32)
    return kernel, (-pca.mean_ @ kernel).astype(np.float32), float(pca.explained_variance_ratio_.sum())


def sample_local_descriptors(fmap_model: keras.Model, pixels: np.ndarray, per_image: int, seed: int,
                             chunk: int = 64) -> np.ndarray:
    """L2-normalised local descriptors of the feature maps of ``pixels``, ≤ ``per_image`` random positions
    each (all of them when the map is smaller). Predicted in chunks so a large training set never holds
    every map at once."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(0, len(pixels), chunk):
        maps = fmap_model.predict(pixels[i:i + chunk], batch_size=16, verbose=0)
        b, h, w, c = maps.shape
        maps = maps.reshape(b, h * w, c)
        for m in maps:
            take = rng.permutation(h * w)[:per_image]
            out.append(m[take])
    return _unit(np.concatenate(out).astype(np.float32))


def fit_vlad_head(fmap_model: keras.Model, pixels: np.ndarray, clusters: int, local_dim: int,
                  seed: int = 0) -> tuple[keras.Model, dict]:
    """Fit the local PCA, the k-means centroids and α on the training ``pixels`` and put the VLAD head on top
    of ``fmap_model`` (raw pixels → conv map). Returns (pixels → intra-normalised VLAD, manifest facts)."""
    from sklearn.cluster import KMeans
    lo, hi = CLUSTERS_RANGE
    if not lo <= clusters <= hi:
        raise ConverterError(f"--clusters {clusters}: allowed {lo}–{hi} (16–64 is the useful range)")
    channels = int(fmap_model.output.shape[-1])
    if local_dim > channels:
        raise ConverterError(f"--vlad-local-dim {local_dim} is larger than the feature map ({channels} channels)")
    local = sample_local_descriptors(fmap_model, pixels, POSITIONS_PER_IMAGE, seed)
    need = max(clusters * 10, local_dim + 1)  # ≥ 10 descriptors per centroid, and enough for the local PCA
    if len(local) < need:
        raise ConverterError(f"--clusters {clusters} (--vlad-local-dim {local_dim}) needs at least {need} local "
                             f"descriptors, got {len(local)} (give more --train-images or raise --views-per-image)")
    info = {"pooling": "vlad", "clusters": clusters, "vlad_local_dim": local_dim or channels,
            "vlad_fitted_on": int(len(local))}
    x = L2Normalize(name="vlad_l2_in")(fmap_model.output)
    pca = None
    if local_dim:
        kernel, bias, explained = _local_pca(local, local_dim, seed)
        local = _unit(local @ kernel + bias)
        pca = keras.layers.Conv2D(local_dim, 1, name="vlad_local_pca")
        x = L2Normalize(name="vlad_local")(pca(x))
        pca.set_weights([kernel[None, None], bias])
        info["vlad_local_pca_explained_variance"] = round(explained, 4)
    else:
        local_dim = channels
    log.info("k-means: %d centroids on %d local descriptors (%d-d)", clusters, len(local), local_dim)
    km = KMeans(n_clusters=clusters, n_init=3, random_state=seed).fit(local)
    centroids = km.cluster_centers_.astype(np.float32)
    alpha = alpha_for(local, centroids)
    info.update(vlad_alpha=round(alpha, 4), vlad_alpha_rule=f"mean soft weight on the nearest centroid = "
                f"{ASSIGN_TARGET} on the training sample")
    out = VladPool(centroids, alpha, name="vlad")(x)
    return keras.Model(fmap_model.input, out, name=f"{fmap_model.name}_vlad"), info
