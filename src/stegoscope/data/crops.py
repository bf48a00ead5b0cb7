"""Five-crop at a ratio (reference §2.2), done in memory on the full-resolution image and label.

Crop k of a source image: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right, 4 centre, each
``(int(H·ratio), int(W·ratio))`` — torchvision's ``five_crop`` order and rounding. STEGO wrote the
crops to JPEG and read them back; here they go straight into the transform (no re-encoding).
"""

from __future__ import annotations

CROP_NONE = "none"
CROP_FIVE = "five"
N_FIVE = 5


def five_crop_boxes(width: int, height: int, ratio: float = 0.5) -> list[tuple[int, int, int, int]]:
    """PIL boxes (left, top, right, bottom) of the five crops, in torchvision's order."""
    ch, cw = int(height * ratio), int(width * ratio)
    top, left = int(round((height - ch) / 2.0)), int(round((width - cw) / 2.0))
    corners = [(0, 0), (width - cw, 0), (0, height - ch), (width - cw, height - ch), (left, top)]
    return [(x, y, x + cw, y + ch) for x, y in corners]


def crops_per_image(crop: str) -> int:
    if crop == CROP_NONE:
        return 1
    if crop == CROP_FIVE:
        return N_FIVE
    raise ValueError(f"crop must be {CROP_NONE!r} or {CROP_FIVE!r}, not {crop!r}")
