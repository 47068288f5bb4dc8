"""The classic Keras convolutional autoencoder for CBIR: conv+pool blocks (32-64-128-256, ELU), a small
dense code, a mirrored decoder; trained unsupervised (MSE) on the catalog, optionally denoising. Only the
encoder (pixels → code) is exported."""
from __future__ import annotations

import logging

import keras
import numpy as np

from edge_retrieval.convert.layers import PixelNorm

log = logging.getLogger(__name__)
FILTERS = (32, 64, 128, 256)


def build_autoencoder(input_size: int = 64, code_size: int = 32) -> tuple[keras.Model, keras.Model]:
    """Return (autoencoder, encoder). Input is raw RGB 0..255; the code is the encoder output."""
    if input_size % 16:
        raise ValueError(f"--input-size for the autoencoder must be a multiple of 16, got {input_size}")
    inp = keras.Input((input_size, input_size, 3), name="pixels")
    x = PixelNorm((0.0,) * 3, (255.0,) * 3, name="pixel_norm")(inp)
    for f in FILTERS:
        x = keras.layers.Conv2D(f, 3, padding="same", activation="elu")(x)
        x = keras.layers.MaxPooling2D(2)(x)
    fm = input_size // 16
    code = keras.layers.Dense(code_size, name="code")(keras.layers.Flatten()(x))
    y = keras.layers.Dense(fm * fm * FILTERS[-1], activation="elu")(code)
    y = keras.layers.Reshape((fm, fm, FILTERS[-1]))(y)
    for f in reversed(FILTERS):
        y = keras.layers.UpSampling2D(2)(y)
        y = keras.layers.Conv2D(f, 3, padding="same", activation="elu")(y)
    out = keras.layers.Conv2D(3, 3, padding="same", activation="sigmoid", name="reconstruction")(y)
    return keras.Model(inp, out, name="autoencoder"), keras.Model(inp, code, name="encoder")


def train_autoencoder(ae: keras.Model, pixels: np.ndarray, *, epochs: int = 20, batch_size: int = 32,
                      denoise_std: float = 0.0, optimizer: str = "adam", patience: int = 3,
                      seed: int = 0, verbose: int = 2) -> dict:
    """Fit on raw-pixel images (N,H,W,3 float 0..255) to reconstruct x/255. ``denoise_std`` > 0 adds
    Gaussian noise (in pixel units) to the inputs only: the denoising variant. Stops early on a plateau of
    the validation loss and keeps the best weights. Returns the Keras history dict."""
    keras.utils.set_random_seed(seed)
    target = pixels / 255.0
    inputs = pixels
    if denoise_std > 0:
        rng = np.random.default_rng(seed)
        inputs = np.clip(pixels + rng.normal(0, denoise_std, pixels.shape), 0, 255).astype(np.float32)
    opt = {"adam": keras.optimizers.Adam(1e-3), "adamax": keras.optimizers.Adamax(2e-3)}[optimizer]
    ae.compile(optimizer=opt, loss="mse")
    val = 0.1 if len(pixels) >= 20 else 0.0
    monitor = "val_loss" if val else "loss"
    stop = keras.callbacks.EarlyStopping(monitor=monitor, patience=patience, restore_best_weights=True)
    hist = ae.fit(inputs, target, epochs=epochs, batch_size=batch_size, validation_split=val, shuffle=True,
                  callbacks=[stop], verbose=verbose)
    log.info("autoencoder: %d epochs, final %s %.5f", len(hist.history["loss"]), monitor,
             hist.history[monitor][-1])
    return hist.history
