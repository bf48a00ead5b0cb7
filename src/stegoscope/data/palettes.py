"""Class colours for label maps: each dataset's conventional palette; ignored pixels are black.

- Cityscapes-27: the official colours of labelIds 7..33 (cityscapesScripts' ``labels.py``), the
  map STEGO draws Cityscapes with (its 28th entry, black, is what ``-1`` indexes there).
- COCO-Stuff-27: the PASCAL VOC bit-shift colour map, from its entry 1. STEGO indexes it from
  entry 0, which is black, so its plots draw class 0 like an ignored pixel; starting at 1 keeps
  every class visible against the ignored black.
- Potsdam-3: the ISPRS benchmark's colours of the class each merged class is named after
  (impervious surfaces white, building blue, tree green).
- Anything else (``directory``, ``synthetic``): :func:`distinct` colours (golden-ratio hues).
"""

from __future__ import annotations

import colorsys

import numpy as np

IGNORED = (0, 0, 0)

CITYSCAPES_27 = (
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 153), (250, 170, 30), (220, 220, 0),
    (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 0, 90), (0, 0, 110), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

POTSDAM_3 = ((255, 255, 255), (0, 0, 255), (0, 255, 0))


def voc_colormap(n: int = 512) -> np.ndarray:
    """(n, 3) uint8: the PASCAL VOC colour map (entry i spreads the bits of i over R, G, B from
    the most significant bit down, three bits per round)."""
    index = np.arange(n)
    cmap = np.zeros((n, 3), np.int64)
    for shift in range(7, -1, -1):
        for channel in range(3):
            cmap[:, channel] |= ((index >> channel) & 1) << shift
        index = index >> 3
    return cmap.astype(np.uint8)


def distinct(n: int) -> np.ndarray:
    """(n, 3) uint8 colours whose hues step by the golden ratio (neighbouring classes far apart
    on the colour wheel), never black."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb(h, 0.65, 0.95)] for h in hues], np.uint8).reshape(n, 3)


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids → (H, W, 3) uint8 colours: class k gets ``palette[k]``; ignored pixels
    (negative, or not a class of the palette) are black."""
    palette = np.asarray(palette, np.uint8)
    labels = np.asarray(labels)
    valid = (labels >= 0) & (labels < len(palette))
    out = np.zeros((*labels.shape, 3), np.uint8)
    out[valid] = palette[labels[valid]]
    return out


COCOSTUFF_27 = tuple(tuple(int(c) for c in rgb) for rgb in voc_colormap(28)[1:])
