"""Synthetic camera views of solid objects: a box whose faces are photos, or a can (a many-sided prism) with a
photo wrapped round it, or a toy castle (towers of several heights), seen by a pinhole camera from a chosen side (turned about the vertical axis, from above),
under a chosen light, on a textured table.

Why: a flat print seen from anywhere is one homography away from its catalog photo; a solid seen from another side
is not (two or three faces of a box each with its own homography, a label curving round a can, the many walls
of a castle at many depths hiding one another differently, some of it turned away). The 3-D benchmark (benchmarks/three_d.py) and the verification tests (tests/unit/test_verify.py) rate
verification on these.

API: ``box(faces, size)`` (front, right, back, left, top photos; width, height, depth), ``can(label, sides,
height)`` and ``castle(photo, rng)`` make a ``Solid``; ``Viewpoint(yaw_deg, elevation_deg, ...)``; ``render(solid, view, rng, out_hw)`` → an
RGB uint8 frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from edge_retrieval.imaging.synthetic_views import VGA_HW, textured_background


@dataclass(frozen=True)
class Face:
    """One flat face: its corners in the world (tl, tr, br, bl seen from outside, upright; y up), its outward
    normal, and the photo painted on it."""

    corners: np.ndarray
    normal: np.ndarray
    pixels: np.ndarray


@dataclass(frozen=True)
class Solid:
    """A solid made of flat faces; they are painted far to near (exact for a convex solid, close enough for
    towers standing apart)."""

    faces: tuple[Face, ...]

    @property
    def extent(self) -> float:
        """Half the largest distance of a corner from the centre."""
        return float(max(np.abs(f.corners).max() for f in self.faces))


@dataclass(frozen=True)
class Viewpoint:
    """Where the camera stands: turned ``yaw_deg`` about the vertical axis (0 = facing the front, 90 = the right
    side), ``elevation_deg`` above the solid's centre, the solid spanning ``span`` of the frame's short side, the
    light from ``light_deg`` (about the vertical axis) with ``gain`` times the usual brightness."""

    yaw_deg: float
    elevation_deg: float = 20.0
    span: float = 0.6
    light_deg: float = 30.0
    gain: float = 1.0


def box(faces: tuple[np.ndarray, ...], size: tuple[float, float, float] = (1.0, 1.0, 1.0),
        centre: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Solid:
    """A box (width x, height y, depth z) with a photo on each of its front, right, back, left and top faces."""
    w, h, d = (s / 2 for s in size)
    quads = (([[-w, h, d], [w, h, d], [w, -h, d], [-w, -h, d]], [0, 0, 1]),
             ([[w, h, d], [w, h, -d], [w, -h, -d], [w, -h, d]], [1, 0, 0]),
             ([[w, h, -d], [-w, h, -d], [-w, -h, -d], [w, -h, -d]], [0, 0, -1]),
             ([[-w, h, -d], [-w, h, d], [-w, -h, d], [-w, -h, -d]], [-1, 0, 0]),
             ([[-w, h, -d], [w, h, -d], [w, h, d], [-w, h, d]], [0, 1, 0]))
    return Solid(tuple(Face(np.float64(c) + centre, np.float64(n), px) for (c, n), px in zip(quads, faces)))


def castle(photo: np.ndarray, rng: np.random.Generator, towers: int = 5) -> Solid:
    """A toy castle: ``towers`` boxes of several heights standing apart on a 1.4 x 1.4 ground, each face a
    different random crop of ``photo``; seen from another side its walls lie at many depths (no one homography)."""
    h, w = photo.shape[:2]

    def crop() -> np.ndarray:
        f = rng.uniform(0.3, 0.5)
        ch, cw = int(h * f), int(w * f)
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return cv2.resize(photo[y0:y0 + ch, x0:x0 + cw], (160, 160), interpolation=cv2.INTER_AREA)

    faces: list[Face] = []
    cells = rng.permutation([(x, z) for x in (-0.45, 0.0, 0.45) for z in (-0.45, 0.0, 0.45)])[:towers]
    for x, z in cells:
        tw, td, th = rng.uniform(0.28, 0.4), rng.uniform(0.28, 0.4), rng.uniform(0.4, 1.4)
        faces += box(tuple(crop() for _ in range(5)), (tw, th, td), (float(x), th / 2 - 0.7, float(z))).faces
    return Solid(tuple(faces))


def can(label: np.ndarray, sides: int = 16, height: float = 1.2) -> Solid:
    """A can of radius 0.5: ``label`` wrapped once round its ``sides`` flat strips (its left edge at the front)."""
    h, w = label.shape[:2]
    faces = []
    for i in range(sides):
        a0, a1 = 2 * np.pi * i / sides, 2 * np.pi * (i + 1) / sides
        p0, p1 = 0.5 * np.array([np.sin(a0), np.cos(a0)]), 0.5 * np.array([np.sin(a1), np.cos(a1)])
        corners = np.float64([[p0[0], height / 2, p0[1]], [p1[0], height / 2, p1[1]],
                              [p1[0], -height / 2, p1[1]], [p0[0], -height / 2, p0[1]]])
        mid = (a0 + a1) / 2
        strip = np.ascontiguousarray(label[:, i * w // sides:(i + 1) * w // sides])
        faces.append(Face(corners, np.float64([np.sin(mid), 0, np.cos(mid)]), strip))
    return Solid(tuple(faces))


def _camera(view: Viewpoint, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """(camera centre, 3x3 world → camera rotation; camera x right, y down, z forward), looking at the origin."""
    yaw, el = np.deg2rad(view.yaw_deg), np.deg2rad(view.elevation_deg)
    centre = radius * np.array([np.sin(yaw) * np.cos(el), np.sin(el), np.cos(yaw) * np.cos(el)])
    forward = -centre / np.linalg.norm(centre)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return centre, np.stack([right, -up, forward])


def project(solid: Solid, view: Viewpoint, out_hw: tuple[int, int] = VGA_HW,
            offset_px: tuple[float, float] = (0.0, 0.0)) -> list[tuple[Face, np.ndarray]]:
    """The faces of ``solid`` turned to the camera at ``view``, each with its corners in frame pixels."""
    oh, ow = out_hw
    extent = solid.extent
    radius = 8.0 * extent  # a moderate perspective: the far edges look ~15 % shorter
    centre, rot = _camera(view, radius)
    focal = view.span * min(oh, ow) * (radius - extent) / (2 * extent * 1.1)
    out = []
    far_first = sorted(solid.faces, key=lambda f: -float(np.linalg.norm(f.corners.mean(axis=0) - centre)))
    for face in far_first:
        if face.normal @ (centre - face.corners.mean(axis=0)) <= 1e-6:
            continue
        cam = (face.corners - centre) @ rot.T
        xy = focal * cam[:, :2] / cam[:, 2:3] + np.array([ow / 2 + offset_px[0], oh / 2 + offset_px[1]])
        out.append((face, xy.astype(np.float32)))
    return out


def render(solid: Solid, view: Viewpoint, rng: np.random.Generator, out_hw: tuple[int, int] = VGA_HW,
           background: np.ndarray | None = None) -> np.ndarray:
    """One RGB uint8 camera frame of ``solid`` from ``view`` on ``background`` (a textured table when None),
    placed a little off-centre at random, each face shaded by its angle to the light, with sensor noise."""
    oh, ow = out_hw
    frame = (textured_background(oh, ow, rng) if background is None else background).copy()
    offset = (rng.uniform(-0.08, 0.08) * ow, rng.uniform(-0.06, 0.06) * oh)
    light = np.deg2rad(view.light_deg)
    to_light = np.array([np.sin(light), 0.8, np.cos(light)])
    to_light /= np.linalg.norm(to_light)
    for face, quad in project(solid, view, out_hw, offset):
        shade = view.gain * (0.55 + 0.5 * max(0.0, float(face.normal @ to_light)))
        lit = np.clip(face.pixels.astype(np.float32) * shade, 0, 255).astype(np.uint8)
        h, w = lit.shape[:2]
        m = cv2.getPerspectiveTransform(np.float32([[0, 0], [w, 0], [w, h], [0, h]]), quad)
        frame = cv2.warpPerspective(lit, m, (ow, oh), dst=frame, flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_TRANSPARENT)
    noisy = frame.astype(np.float32) + rng.normal(0, 2.5, frame.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)
