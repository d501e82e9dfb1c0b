"""Shape geometry and rasterisation: outlines relative to the tight-box corner, and coverage.

`rasterize` gives 5x5 supersampled coverage; the mask is the pixels at least half covered.
"""

from __future__ import annotations

import math

import numpy as np

from model_export.data.world.vocabulary import STAR_INNER_RATIO, SUPERSAMPLE


def shape_extent(shape: str, s: float) -> tuple[float, float]:
    """(width, height) of a shape of side `s`: the size of its exact (continuous) tight box."""
    if shape == "hexagon":
        return s, math.sqrt(3.0) / 2.0 * s
    if shape == "star":
        radius = s / (2.0 * math.cos(math.radians(18.0)))
        return s, radius * (1.0 + math.cos(math.radians(36.0)))
    return s, s


def shape_vertices(shape: str, s: float) -> np.ndarray | None:
    """(K, 2) outline vertices (x, y), relative to the top-left of the shape's tight box.

    y grows downwards (image coordinates). Returns None for the circle, which is tested exactly.
    """
    if shape == "circle":
        return None
    if shape == "square":
        pts = [(0, 0), (s, 0), (s, s), (0, s)]
    elif shape == "triangle":
        pts = [(0, s), (s, s), (s / 2, 0)]
    elif shape == "diamond":
        pts = [(s / 2, 0), (s, s / 2), (s / 2, s), (0, s / 2)]
    elif shape == "hexagon":
        h = math.sqrt(3.0) / 2.0 * s
        pts = [(0, h / 2), (s / 4, 0), (3 * s / 4, 0), (s, h / 2), (3 * s / 4, h), (s / 4, h)]
    elif shape == "star":
        radius = s / (2.0 * math.cos(math.radians(18.0)))
        # Apex up: the first outer point is straight above the centre, which sits R below the top.
        angles = np.radians(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, radius, STAR_INNER_RATIO * radius)
        return np.stack([s / 2 + radii * np.cos(angles), radius + radii * np.sin(angles)], axis=1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(pts, dtype=np.float64)


def _inside(shape: str, s: float, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Point-in-shape test on a grid: px (1, M) and py (N, 1) sample coordinates -> (N, M) bool.

    Shape coordinates are relative to the tight-box corner. Polygons use the even-odd crossing
    rule edge by edge; a row's crossing point depends on y only, so each edge costs one (N, M)
    comparison, which keeps a 200 px star at 5x5 supersampling to a few milliseconds.
    """
    if shape == "circle":
        r = s / 2.0
        return (px - r) ** 2 + (py - r) ** 2 <= r * r
    verts = shape_vertices(shape, s)
    assert verts is not None  # only the circle has no outline, and it returned above
    inside = np.zeros((py.shape[0], px.shape[1]), dtype=bool)
    for (xa, ya), (xb, yb) in zip(verts, np.roll(verts, -1, axis=0), strict=True):
        if ya == yb:
            continue  # horizontal edges never cross a horizontal ray
        crosses = (ya > py) != (yb > py)  # (N, 1): the ray at this y meets the edge
        x_cross = xa + (py - ya) * (xb - xa) / (yb - ya)  # (N, 1)
        inside ^= crosses & (px < x_cross)
    return inside


def rasterize(
    shape: str, s: float, offset: tuple[float, float], patch: tuple[int, int]
) -> np.ndarray:
    """Coverage in [0, 1] of a shape whose tight-box corner sits at `offset` (x, y) in a patch.

    patch: (height, width) in pixels; pixel (i, j) covers [j, j+1) x [i, i+1). Coverage is the
    fraction of SUPERSAMPLE^2 stratified points inside the shape, which estimates the covered area:
    the mask rule "at least half covered" is `coverage >= 0.5`. The point count per axis is odd so
    that the middle column / row of points sits on the pixel centre line: an axis-aligned edge
    then covers >= half the points exactly when it covers >= half the pixel (with 4 x 4 points a
    square came out s + 1 wide a quarter of the time). Returns float32 (height, width).
    """
    h, w = patch
    n = SUPERSAMPLE
    steps = (np.arange(n) + 0.5) / n
    xs = (np.arange(w)[:, None] + steps[None, :]).reshape(1, w * n) - offset[0]
    ys = (np.arange(h)[:, None] + steps[None, :]).reshape(h * n, 1) - offset[1]
    inside = _inside(shape, s, xs, ys).view(np.uint8)  # (h*n, w*n), 0 / 1
    # Sum the n x n blocks with strided slice adds: numpy reductions over a short trailing axis
    # are ~20x slower, and this is the hottest loop of the renderer.
    rows = inside.reshape(h, n, w * n)  # (h*n, w*n) -> (h, n, w*n)
    per_row = rows[:, 0].astype(np.float32)
    for k in range(1, n):
        per_row += rows[:, k]  # (h, w*n)
    counts = per_row[:, 0::n].copy()
    for k in range(1, n):
        counts += per_row[:, k::n]  # (h, w)
    return counts / (n * n)


def tight_box(mask: np.ndarray) -> list[int]:
    """[x_min, y_min, x_max + 1, y_max + 1] of a non-empty bool mask."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]
