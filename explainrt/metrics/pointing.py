"""The pointing game (Zhang et al., ECCV 2016) and the energy-based pointing game (Score-CAM, Wang et al. 2020).

Boxes are ``[x0, y0, x1, y1]`` in map pixels, x1 and y1 exclusive (a box covers columns
x0..x1-1 and rows y0..y1-1), one per image.

- Pointing game: a hit when the map's maximum (the first one in row-major order) lies within
  ``tolerance`` pixels of the box (Zhang et al. use 15 px), i.e. its Euclidean distance to the box
  is at most ``tolerance``; the score is the fraction of hits.
- Energy-based pointing game: the share of the map's energy (sum of its non-negative values) that
  lies inside the box; 0 for an all-zero map.
"""

from __future__ import annotations

import numpy as np

from explainrt.errors import InvalidInputError

POINTING_TOLERANCE = 15


def check_boxes(maps: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maps [N, H, W] float and boxes [N, 4] int, validated against each other."""
    maps = np.asarray(maps, dtype=np.float64)
    boxes = np.asarray(boxes)
    if maps.ndim != 3 or maps.shape[0] == 0:
        raise InvalidInputError(f"maps must have shape [N, H, W] with N >= 1, got {maps.shape}")
    if boxes.shape != (maps.shape[0], 4):
        raise InvalidInputError(f"boxes must have shape [N, 4] = [{maps.shape[0]}, 4] (x0, y0, x1, y1), got {boxes.shape}")
    if boxes.dtype.kind not in "iu":
        raise InvalidInputError(f"boxes must be integer pixel coordinates, got {boxes.dtype}")
    height, width = maps.shape[1:]
    bad = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width) | (boxes[:, 3] > height) | \
          (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise InvalidInputError(f"box {boxes[index].tolist()} of image {index} is empty or outside the "
                                f"{width}x{height} map (need 0 <= x0 < x1 <= {width}, 0 <= y0 < y1 <= {height})")
    return maps, boxes.astype(np.int64)


def pointing_game(maps: np.ndarray, boxes: np.ndarray, tolerance: float = POINTING_TOLERANCE) -> np.ndarray:
    """Per image, whether the map's maximum lies within ``tolerance`` pixels of its box: bool [N]."""
    if not np.isfinite(tolerance) or tolerance < 0:
        raise InvalidInputError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    maps, boxes = check_boxes(maps, boxes)
    rows, cols = np.unravel_index(maps.reshape(maps.shape[0], -1).argmax(axis=1), maps.shape[1:])
    # distance from the pixel to the nearest pixel of the box, per axis
    dx = np.maximum(np.maximum(boxes[:, 0] - cols, cols - (boxes[:, 2] - 1)), 0)
    dy = np.maximum(np.maximum(boxes[:, 1] - rows, rows - (boxes[:, 3] - 1)), 0)
    return np.hypot(dx, dy) <= tolerance


def energy_pointing_game(maps: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Per image, the share of the map's non-negative energy inside its box: float [N] in [0, 1]."""
    maps, boxes = check_boxes(maps, boxes)
    energy = np.maximum(maps, 0)
    rows = np.arange(maps.shape[1])[None, :, None]
    cols = np.arange(maps.shape[2])[None, None, :]
    inside = ((rows >= boxes[:, 1, None, None]) & (rows < boxes[:, 3, None, None])
              & (cols >= boxes[:, 0, None, None]) & (cols < boxes[:, 2, None, None]))
    total = energy.sum(axis=(1, 2))
    return np.divide((energy * inside).sum(axis=(1, 2)), total, out=np.zeros_like(total), where=total > 0)
