"""Keras layers of the descriptor heads. Each one lowers to plain TFLite builtins."""
from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="converter")
class PixelNorm(keras.layers.Layer):
    """(x - mean) / std on raw 0..255 pixels, baked into the graph so a uint8 input can be fed camera
    pixels directly (its quantization is then scale 1, zero point 0)."""

    def __init__(self, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0), bgr: bool = False, **kw):
        super().__init__(**kw)
        self.mean, self.std, self.bgr = tuple(mean), tuple(std), bgr

    def call(self, x):
        if self.bgr:  # caffe-style weights (VGG16) were trained on BGR input
            x = x[..., ::-1]
        return (x - tf.constant(self.mean, x.dtype)) / tf.constant(self.std, x.dtype)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std, "bgr": self.bgr}


@keras.saving.register_keras_serializable(package="converter")
class GeM(keras.layers.Layer):
    """Generalised-mean pooling (Radenović et al.): (mean x^p)^(1/p). p=1 is average, p→∞ is max.
    ``trainable_p`` makes p a weight (fine-tuning); otherwise it is a constant."""

    def __init__(self, p: float = 3.0, trainable_p: bool = False, eps: float = 1e-6, **kw):
        super().__init__(**kw)
        self.p_init, self.trainable_p, self.eps = float(p), bool(trainable_p), float(eps)

    def build(self, input_shape):
        self.p = self.add_weight(name="p", shape=(), initializer=keras.initializers.Constant(self.p_init),
                                 trainable=self.trainable_p)

    def call(self, x):
        x = tf.maximum(x, self.eps)
        pooled = tf.reduce_mean(tf.pow(x, self.p), axis=[1, 2])
        return tf.pow(pooled, 1.0 / self.p)

    def get_config(self):
        return {**super().get_config(), "p": self.p_init, "trainable_p": self.trainable_p, "eps": self.eps}


@keras.saving.register_keras_serializable(package="converter")
class L2Normalize(keras.layers.Layer):
    """tf.math.l2_normalize → a real L2_NORMALIZATION op. Keras UnitNormalization quantizes badly
    (norms 0.4–1.6 under int8)."""

    def call(self, x):
        return tf.math.l2_normalize(x, axis=-1)


def pooling_layer(kind: str, gem_p: float = 3.0, trainable_p: bool = False) -> keras.layers.Layer:
    """The global pooling head: ``gem`` | ``mac`` (max) | ``avg`` | ``vlad`` (the map itself: edge_retrieval.convert.vlad
    fits the VLAD head on the training images' local descriptors)."""
    if kind == "gem":
        return GeM(p=gem_p, trainable_p=trainable_p, name="gem")
    if kind == "mac":
        return keras.layers.GlobalMaxPooling2D(name="mac")
    if kind == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg")
    if kind == "vlad":
        return keras.layers.Identity(name="conv_map")
    raise ValueError(f"unknown pooling {kind!r}; allowed: gem, mac, avg, vlad")
