"""Outlines of prints found from a frame's edges (edge_retrieval/search/proposals.py)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_retrieval.search.proposals import print_quads

CORNERS = np.float32([[200, 120], [440, 140], [430, 360], [190, 340]])  # tl, tr, br, bl in a 640×480 frame


def plain_print(gap_px: int) -> np.ndarray:
    """A plain light-grey print on a darker table; over ``gap_px`` of its lower edge the print fades into the
    table (a shadow, a print as light as the table there), so its edge is not closed."""
    frame = np.full((480, 640, 3), 90, np.float32)
    cv2.fillConvexPoly(frame, np.int32(CORNERS), (170, 170, 170))
    x0 = 300 - gap_px // 2
    for y in range(300, 380):
        t = np.clip((y - 310) / 50.0, 0.0, 1.0)
        frame[y, x0:x0 + gap_px] = 170 * (1 - t) + 90 * t
    noise = np.random.default_rng(0).normal(0, 2, frame.shape)
    return np.clip(frame + noise, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("gap_px", [0, 60])
def test_a_print_is_outlined_even_where_its_edge_has_a_gap(gap_px):
    """The outline is the convex hull of the print's edge: an edge broken over a stretch (its contour then a thin
    open line of next to no area) still outlines the whole print."""
    found = print_quads(plain_print(gap_px))
    assert len(found) == 1
    assert np.abs(found[0] - CORNERS / np.float32([640, 480])).max() < 0.01
