"""Patch descriptors at keypoints: the device side of a Patch-CKN bundle (built by
edge_retrieval/convert/patch_ckn.py). Not wired into lookups: ORB stays the local feature of verification
(docs/benchmarks.md#patch-ckn says why); the benchmark and the tests use this module.

A patch is cut around each ORB keypoint of the downscaled image that ORB itself sees
(``local_features.downscaled``), turned to the keypoint's orientation (ORB's intensity centroid), ``support`` ×
the keypoint's size across, resampled to ``patch_px`` × ``patch_px`` grayscale uint8 — all patches of one image in one
``cv2.remap`` per pyramid level, from a level at most 2× coarser than the patch grid so resampling does not
alias. The bundle maps a batch of patches to L2-normalised float descriptors, matched by L2
(``local_features.ratio_matches``) and verified by the same homography code as ORB.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edge_retrieval.core.config import RecognitionConfig
from edge_retrieval.core.errors import BundleError
from edge_retrieval.model.bundle import PATCH_DESCRIPTOR, load_manifest, model_path
from edge_retrieval.model.encoder import interpreter_class
from edge_retrieval.model.local_features import Features, downscaled, orb_detector

BATCH = 256  # patches per invoke(): one fixed tensor shape, allocated once


def keypoint_patches(gray: np.ndarray, xy: np.ndarray, size_px: np.ndarray, angle_deg: np.ndarray,
                     patch_px: int, support: float) -> np.ndarray:
    """Patches [N, patch_px, patch_px] uint8 of the grayscale image ``gray``, centred on ``xy`` [N, 2], each
    ``support * size_px`` pixels across and rotated by ``angle_deg`` (a keypoint's orientation, so a patch of a
    rotated view looks the same). Border pixels are replicated."""
    n = len(xy)
    out = np.zeros((n, patch_px, patch_px), np.uint8)
    if n == 0:
        return out
    side = np.maximum(np.asarray(size_px, np.float32) * support, 1.0)
    # Pyramid level per patch: the largest power-of-2 reduction that keeps ≥ 1 source pixel per patch pixel.
    level = np.clip(np.floor(np.log2(np.maximum(side / patch_px, 1.0))), 0, 5).astype(int)
    grid = ((np.arange(patch_px, dtype=np.float32) - (patch_px - 1) / 2) / patch_px)  # [-0.5, 0.5)
    gu, gv = grid[None, None, :], grid[None, :, None]  # x across the patch, y down it
    theta = np.deg2rad(np.asarray(angle_deg, np.float32))
    img = gray
    for lv in range(int(level.max()) + 1):
        if lv:
            img = cv2.pyrDown(img)
        idx = np.flatnonzero(level == lv)
        if not len(idx):
            continue
        f = np.float32(2.0 ** lv)
        # the patch frame in this level's pixels (pyrDown: level coordinate = (x + 0.5) / 2^lv - 0.5)
        a = (side[idx] / f * np.cos(theta[idx]))[:, None, None]
        b = (side[idx] / f * np.sin(theta[idx]))[:, None, None]
        cx = ((xy[idx, 0] + 0.5) / f - 0.5)[:, None, None]
        cy = ((xy[idx, 1] + 0.5) / f - 0.5)[:, None, None]
        mx = (cx + a * gu - b * gv).reshape(-1, patch_px)
        my = (cy + b * gu + a * gv).reshape(-1, patch_px)
        got = cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out[idx] = got.reshape(len(idx), patch_px, patch_px)
    return out


def orb_keypoints(rgb: np.ndarray, cfg: RecognitionConfig, *, query: bool = False, compute_orb: bool = True
                  ) -> tuple[np.ndarray, list, np.ndarray | None]:
    """(the downscaled grayscale image, ORB keypoints, ORB descriptors or None) as ``local_features.extract``
    finds them; ``compute_orb=False`` only detects (what a patch descriptor needs)."""
    gray = downscaled(rgb, cfg)
    orb = orb_detector(cfg, query=query)
    try:
        if compute_orb:
            kps, desc = orb.detectAndCompute(gray, None)
        else:
            kps, desc = orb.detect(gray, None), None
    except cv2.error:  # degenerate input (a few pixels across): no keypoints
        return gray, [], None
    return gray, list(kps or []), desc


class PatchDescriber:
    """A Patch-CKN bundle on the device's TFLite runtime: patches → L2-normalised float32 descriptors."""

    def __init__(self, bundle_dir: str | Path, *, num_threads: int = 2):
        bundle_dir = Path(bundle_dir)
        self.manifest = load_manifest(bundle_dir)
        where = bundle_dir / "manifest.json"
        src = self.manifest.source
        if src.get("descriptor") != PATCH_DESCRIPTOR or not isinstance(src.get("patch"), dict):
            raise BundleError(f"{where}: not a patch descriptor bundle (field 'source.descriptor' must be "
                              f"{PATCH_DESCRIPTOR!r}, with 'source.patch')")
        self.patch_px = int(src["patch"]["patch_px"])
        self.support = float(src["patch"]["support"])
        self.dim = self.manifest.output_dim
        Interpreter, self.runtime = interpreter_class()
        try:
            self._interp = Interpreter(model_path=str(model_path(bundle_dir, self.manifest)), num_threads=num_threads)
            inp = self._interp.get_input_details()[0]
            self._interp.resize_tensor_input(inp["index"], [BATCH, self.patch_px, self.patch_px, 1])
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as e:
            raise BundleError(f"{where}: {self.runtime} cannot load its model ({e})") from None
        inp = self._interp.get_input_details()[0]
        self._in_index, self._in_dtype = inp["index"], np.dtype(inp["dtype"])
        scale, zero = inp.get("quantization", (0.0, 0))
        if self._in_dtype == np.uint8 and (abs(scale - 1.0) > 1e-6 or zero != 0):
            # patches go in as the uint8 pixels they are: only an input quantized with scale 1 / zero point 0 fits
            raise BundleError(f"{where}: a uint8 input must have scale 1 and zero point 0, not {scale} / {zero}")
        self._out_index = self._interp.get_output_details()[0]["index"]

    def describe(self, patches: np.ndarray) -> np.ndarray:
        """Descriptors [N, dim] float32 of uint8 grayscale patches [N, patch_px, patch_px], in batches of BATCH
        (the last one padded)."""
        n = len(patches)
        out = np.zeros((n, self.dim), np.float32)
        buf = np.zeros((BATCH, self.patch_px, self.patch_px, 1), self._in_dtype)
        for i in range(0, n, BATCH):
            k = min(BATCH, n - i)
            buf[:k, ..., 0] = patches[i:i + k]
            self._interp.set_tensor(self._in_index, buf)
            self._interp.invoke()
            out[i:i + k] = self._interp.get_tensor(self._out_index)[:k]
        return out

    def features(self, rgb: np.ndarray, cfg: RecognitionConfig, *, query: bool = False) -> Features:
        """Patch descriptors at the ORB keypoints ``local_features.extract`` would find (same detector, same
        downscaling), as Features with float descriptors."""
        gray, kps, _ = orb_keypoints(rgb, cfg, query=query, compute_orb=False)
        return self.features_at(gray, kps)

    def features_at(self, gray: np.ndarray, kps: list) -> Features:
        """Patch descriptors of the downscaled grayscale image ``gray`` at the given cv2 keypoints."""
        size_wh = (int(gray.shape[1]), int(gray.shape[0]))
        if not kps:
            return Features(np.zeros((0, 2), np.float32), np.zeros((0, self.dim), np.float32), size_wh)
        xy = np.array([k.pt for k in kps], np.float32).reshape(-1, 2)
        patches = keypoint_patches(gray, xy, np.array([k.size for k in kps]), np.array([k.angle for k in kps]),
                                   self.patch_px, self.support)
        return Features(xy, self.describe(patches), size_wh)

