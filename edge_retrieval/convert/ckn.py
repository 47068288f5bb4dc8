"""Convolutional Kernel Network layers (Mairal et al., NIPS 2014; Patch-CKN: Paulin et al., ICCV 2015) and the
unsupervised fit of a layer's filters. Every layer lowers to plain TFLite builtins (CONV_2D, DEPTHWISE_CONV_2D,
MUL, ADD, SQRT, EXP, DIV).

A CKN layer maps each s×s sub-patch x of its input map (a vector of s·s·C values) to
    φ_l(x) = ‖x‖ · √η_l · exp(−‖x/‖x‖ − w_l‖² / σ²),   l = 1..L
so that Σ_l φ_l(x) φ_l(x') ≈ ‖x‖‖x'‖ exp(−‖x/‖x‖ − x'/‖x'‖‖² / (2σ²)), a Gaussian kernel on the normalised
sub-patches. The filters w_l and weights η_l ≥ 0 are fitted **without labels**: spherical k-means gives the
start, non-negative least squares the first η, then SGD (Adam) on random pairs of training sub-patches minimises
Σ (k(x, x') − Σ_l η_l e(x, w_l) e(x', w_l))². Each layer is followed by Gaussian pooling with subsampling.

The gradient-map input layer (the paper's best input for retrieval) needs no fit: with u = ∇I/‖∇I‖ and
directions w_j = (cos 2πj/n, sin 2πj/n), φ_j = ‖∇I‖ · exp(−‖u − w_j‖² / σ₁²) — a smooth orientation histogram.
"""
from __future__ import annotations

import logging
import math

import keras
import numpy as np
import tensorflow as tf

log = logging.getLogger(__name__)

EPS_NORM2 = 1e-4  # added to ‖x‖² so a flat sub-patch divides by a small number, not 0


def _gaussian_taps(stride: int) -> np.ndarray:
    """A normalised 1-D Gaussian of σ = stride/√2 over 2·stride+1 taps (Paulin et al.: β = subsampling/√2)."""
    r = np.arange(2 * stride + 1, dtype=np.float64) - stride
    g = np.exp(-(r ** 2) / (2 * (stride / math.sqrt(2)) ** 2))
    return (g / g.sum()).astype(np.float32)


@keras.saving.register_keras_serializable(package="converter")
class GradientMap(keras.layers.Layer):
    """Grayscale 0..255 [B, P, P, 1] → [B, P−2, P−2, n]: the CKN gradient-map layer (valid central differences,
    so the patch border adds no false edge)."""

    def __init__(self, orientations: int = 12, **kw):
        super().__init__(**kw)
        self.orientations = int(orientations)
        a = 2 * np.pi * np.arange(self.orientations) / self.orientations
        self.directions = np.stack([np.cos(a), np.sin(a)]).astype(np.float32)  # [2, n]
        # σ₁ = the distance between neighbouring directions: a gradient between two of them feeds both
        self.sigma2 = float(2 - 2 * np.cos(2 * np.pi / self.orientations))

    def call(self, x):
        kern = np.zeros((3, 3, 1, 2), np.float32)
        kern[1, 0, 0, 0], kern[1, 2, 0, 0] = -0.5 / 255, 0.5 / 255   # d/dx
        kern[0, 1, 0, 1], kern[2, 1, 0, 1] = -0.5 / 255, 0.5 / 255   # d/dy
        g = tf.nn.conv2d(x, tf.constant(kern), 1, "VALID")
        rho = tf.sqrt(tf.reduce_sum(g * g, axis=-1, keepdims=True) + 1e-6)
        cos = tf.nn.conv2d(g, tf.constant(self.directions[None, None]), 1, "VALID") / rho
        return rho * tf.exp((cos - 1.0) * (2.0 / self.sigma2))

    def get_config(self):
        return {**super().get_config(), "orientations": self.orientations}


@keras.saving.register_keras_serializable(package="converter")
class GaussianPool(keras.layers.Layer):
    """Gaussian pooling with subsampling ``stride`` ('same' padding), as two 1-D depthwise convolutions: along the
    rows at every position, then along the columns at the strided positions (TensorFlow's CPU kernel wants equal
    strides). The same result as one 2-D Gaussian at about a third of its time on ai-edge-litert (9×9, stride 4)."""

    def __init__(self, stride: int, **kw):
        super().__init__(**kw)
        self.stride = int(stride)

    def call(self, x):
        s, c, w = self.stride, int(x.shape[-1]), int(x.shape[2])
        taps = _gaussian_taps(s)
        rows = np.repeat(taps.reshape(1, -1, 1, 1), c, axis=2)
        cols = np.repeat(taps.reshape(-1, 1, 1, 1), c, axis=2)
        x = tf.nn.depthwise_conv2d(x, tf.constant(rows), [1, 1, 1, 1], "SAME")
        # The 2-D 'same' window over the width would be centred at first_x + k·s; the second pass (1 tap wide)
        # samples at 0, s, 2s, …: start the columns at first_x so both grids agree.
        out = -(-w // s)
        first_x = s - max((out - 1) * s + 2 * s + 1 - w, 0) // 2
        return tf.nn.depthwise_conv2d(x[:, :, first_x:, :], tf.constant(cols), [1, s, s, 1], "SAME")

    def get_config(self):
        return {**super().get_config(), "stride": self.stride}


@keras.saving.register_keras_serializable(package="converter")
class CKNLayer(keras.layers.Layer):
    """φ_l(x) = ‖x‖ √η_l exp((2 x·w_l/‖x‖ − 1 − ‖w_l‖²)/σ²) for every s×s sub-patch x ('same' padding) with
    fixed ``filters`` [s, s, C, L], ``eta`` [L], ``sigma``."""

    def __init__(self, filters, eta, sigma: float, **kw):
        super().__init__(**kw)
        self.filters = np.asarray(filters, np.float32)
        self.eta = np.asarray(eta, np.float32)
        self.sigma = float(sigma)

    def call(self, x):
        s, _, c, n = self.filters.shape
        w2 = (self.filters.reshape(-1, n) ** 2).sum(0)
        xw = tf.nn.conv2d(x, tf.constant(self.filters), 1, "SAME")
        norm = tf.sqrt(tf.nn.conv2d(x * x, tf.ones((s, s, c, 1)), 1, "SAME") + EPS_NORM2)
        inv_s2 = 1.0 / self.sigma ** 2
        z = xw * (2.0 * inv_s2) / norm + tf.constant(-(1.0 + w2) * inv_s2)
        return norm * tf.exp(z) * tf.constant(np.sqrt(self.eta))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters.tolist(), "eta": self.eta.tolist(),
                "sigma": self.sigma}


def subpatches(maps: np.ndarray, size: int, per_map: int, rng: np.random.Generator) -> np.ndarray:
    """Random ``size``×``size`` sub-patches of maps [N, H, W, C] ('same' zero padding, as CKNLayer), flattened
    in the order of a conv kernel [s, s, C] → [M, s·s·C]."""
    n, h, w, c = maps.shape
    p = size // 2
    padded = np.pad(maps, ((0, 0), (p, size - 1 - p), (p, size - 1 - p), (0, 0)))
    take = min(per_map, h * w)
    out = np.empty((n * take, size * size * c), np.float32)
    for i in range(n):
        pos = rng.choice(h * w, take, replace=False)
        for j, q in enumerate(pos):
            y, x = divmod(int(q), w)
            out[i * take + j] = padded[i, y:y + size, x:x + size].reshape(-1)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _emb(v: np.ndarray, w: np.ndarray, sigma: float) -> np.ndarray:
    """exp(−‖v − w_l‖²/σ²) for unit rows v [M, D] and filters w [L, D] → [M, L]."""
    return np.exp(-(1.0 - 2.0 * v @ w.T + (w ** 2).sum(1)[None]) / sigma ** 2)


def _approx_error(xa, xb, w, eta, sigma) -> float:
    """Relative squared error of the kernel approximation on pairs of unit vectors."""
    k = np.exp(-((xa - xb) ** 2).sum(1) / (2 * sigma ** 2))
    approx = (_emb(xa, w, sigma) * _emb(xb, w, sigma)) @ eta
    return float(((k - approx) ** 2).sum() / (k ** 2).sum())


def fit_ckn_layer(x: np.ndarray, filters: int, *, pairs: int, batch: int = 1024, lr: float = 0.01,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray, float, dict]:
    """Fit one CKN layer on sub-patches ``x`` [M, D] (not normalised): returns (w [L, D], η [L], σ, facts).
    σ is the 0.1 quantile of the distances between random pairs of normalised sub-patches (Mairal et al.);
    sub-patches with a norm under a tenth of the median (flat image regions) are left out of the fit."""
    from scipy.optimize import nnls
    from sklearn.cluster import KMeans
    rng = np.random.default_rng(seed)
    norms = np.linalg.norm(x, axis=1)
    xs = _unit(x[norms > 0.1 * np.median(norms)]).astype(np.float32)
    m = len(xs)
    if m < max(10 * filters, 1000):
        from edge_retrieval.convert.errors import ConverterError
        raise ConverterError(f"a CKN layer of {filters} filters needs ≥ {max(10 * filters, 1000)} textured "
                             f"sub-patches, got {m} (give more --train-images or raise --patches-per-image)")
    ia, ib = rng.integers(0, m, 20000), rng.integers(0, m, 20000)
    sigma = float(np.quantile(np.linalg.norm(xs[ia] - xs[ib], axis=1), 0.1))
    km = KMeans(n_clusters=filters, n_init=1, random_state=seed).fit(xs[rng.permutation(m)[:50000]])
    w0 = _unit(km.cluster_centers_).astype(np.float32)
    # First η: non-negative least squares of the kernel on 4,000 pairs, the filters fixed.
    va, vb = rng.integers(0, m, 4000), rng.integers(0, m, 4000)
    ea, eb = _emb(xs[va], w0, sigma), _emb(xs[vb], w0, sigma)
    k = np.exp(-((xs[va] - xs[vb]) ** 2).sum(1) / (2 * sigma ** 2))
    eta0 = np.maximum(nnls((ea * eb).astype(np.float64), k.astype(np.float64))[0], 1e-6)
    ta, tb = rng.integers(0, m, 4000), rng.integers(0, m, 4000)  # pairs to rate the fit on, not trained on
    before = _approx_error(xs[ta], xs[tb], w0, eta0, sigma)

    w = tf.Variable(w0)
    log_eta = tf.Variable(np.log(eta0).astype(np.float32))
    opt = keras.optimizers.Adam(learning_rate=lr)
    data = tf.constant(xs)
    inv = 1.0 / sigma ** 2

    @tf.function
    def step(ia, ib):
        with tf.GradientTape() as tape:
            a, b = tf.gather(data, ia), tf.gather(data, ib)
            target = tf.exp(-tf.reduce_sum((a - b) ** 2, 1) * (0.5 * inv))
            w2 = tf.reduce_sum(w * w, 1)

            def emb(v):  # exp(−‖v − w_l‖²/σ²) for unit v: ‖v‖² = 1
                return tf.exp(-(1.0 - 2.0 * tf.matmul(v, w, transpose_b=True) + w2) * inv)

            approx = tf.reduce_sum(emb(a) * emb(b) * tf.exp(log_eta), 1)
            loss = tf.reduce_mean((target - approx) ** 2)
        opt.apply_gradients(zip(tape.gradient(loss, [w, log_eta]), [w, log_eta]))
        return loss

    steps = max(1, pairs // batch)
    for i in range(steps):
        loss = step(tf.constant(rng.integers(0, m, batch)), tf.constant(rng.integers(0, m, batch)))
        if i % 500 == 0:
            log.info("CKN layer: step %d/%d, loss %.3g", i, steps, float(loss))
    wf, etaf = w.numpy(), np.exp(log_eta.numpy())
    after = _approx_error(xs[ta], xs[tb], wf, etaf, sigma)
    facts = {"filters": filters, "sigma": round(sigma, 4), "fitted_on_subpatches": m, "sgd_steps": steps,
             "pairs": steps * batch, "kernel_rel_error_kmeans_nnls": round(before, 4),
             "kernel_rel_error_sgd": round(after, 4)}
    log.info("CKN layer: relative kernel error %.4f after k-means + NNLS, %.4f after SGD", before, after)
    return wf, etaf, sigma, facts
