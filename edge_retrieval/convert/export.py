"""Keras → TFLite in four flavours. Every flavour must load on ai-edge-litert and on tflite-runtime 2.14."""
from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterable

import numpy as np
import tensorflow as tf

from edge_retrieval.model.bundle import QUANTIZATIONS as MODES

log = logging.getLogger(__name__)


def to_tflite(model, mode: str, calibration: Iterable[np.ndarray] | None = None) -> bytes:
    """Convert ``model`` (float raw-pixel input [1,H,W,3]) to TFLite bytes.

    ``int8``: full-integer with a uint8 image input (scale 1 / zero point 0, so the device feeds camera
    pixels as they are) and a float32 output; ``calibration`` yields real images as float batches
    [1,H,W,3] exactly as the device prepares them. Ops TFLite cannot quantize (GeM's POW) stay float."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; allowed: {', '.join(MODES)}")
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    # tflite-runtime 2.14 cannot load FULLY_CONNECTED v12 (per-channel dense) from TF 2.21: keep dense
    # layers per-tensor so Pi/Jetson images that only have tflite-runtime load our bundles.
    conv._experimental_disable_per_channel_quantization_for_dense_layers = True
    if mode == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif mode == "dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif mode == "int8":
        if calibration is None:
            raise ValueError("int8 needs calibration images (real photos, never random noise)")
        batches = [np.asarray(b, np.float32) for b in calibration]
        if not batches:
            raise ValueError("int8 needs at least one calibration image")
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([b] for b in batches)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        conv.inference_input_type = tf.uint8
        conv.inference_output_type = tf.float32
    # Keras' export prints a long signature listing on stdout; keep the CLI's output readable.
    with contextlib.redirect_stdout(io.StringIO()):
        return bytes(conv.convert())
