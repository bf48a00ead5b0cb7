"""STEGO's preprocessing (reference §2.1): shorter side to ``res``, centre crop ``res×res``.

Parity: like ``torchvision.transforms.Resize(res, NEAREST)`` + ``CenterCrop(res)`` on PIL images,
including torchvision's truncation of the long side and its rounding of the crop offset.
STEGO resizes RGB images with nearest neighbour too [QUIRK]; ``interpolation="bilinear"``
(antialiased) is the option, and it is part of the extraction key.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR}


def resized_size(width: int, height: int, res: int) -> tuple[int, int]:
    """(width, height) after the shorter side is scaled to ``res`` (long side truncated)."""
    if width <= height:
        return res, int(res * height / width)
    return int(res * width / height), res


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """PIL crop box of a centred ``size×size`` window (torchvision's rounding)."""
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return left, top, left + size, top + size


def resize_center_crop(img: Image.Image, res: int, interpolation: str = "nearest") -> Image.Image:
    width, height = img.size
    img = img.resize(resized_size(width, height, res), INTERPOLATIONS[interpolation])
    return img.crop(center_crop_box(*img.size, res))


def transform_image(img: Image.Image, res: int, interpolation: str = "nearest") -> np.ndarray:
    """RGB PIL image → uint8 (res, res, 3) after resize and centre crop."""
    return np.asarray(resize_center_crop(img.convert("RGB"), res, interpolation), dtype=np.uint8)


def transform_label(label: np.ndarray, res: int) -> np.ndarray:
    """Class-id map → int16 (res, res), always nearest neighbour."""
    pil = Image.fromarray(label.astype(np.int32), mode="I")
    return np.asarray(resize_center_crop(pil, res, "nearest"), dtype=np.int16)


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W), ImageNet-normalised (ToTensor + Normalize)."""
    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
