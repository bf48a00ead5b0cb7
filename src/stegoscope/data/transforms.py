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


# -- the same transform on tensors (any device: the GPU extraction path) -------------------------


def pil_nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """Source index of each output pixel of PIL's NEAREST resize along one axis.

    PIL starts at half a step and adds the step in double precision once per pixel; the
    accumulated rounding decides ties, so the same accumulation is done here (cumsum is
    sequential) instead of ``floor((i + 0.5) * step)``.
    """
    step = size_in / size_out
    positions = np.cumsum(np.concatenate([[step * 0.5], np.full(size_out - 1, step)]))
    return np.minimum(positions.astype(np.int64), size_in - 1)


def resize_center_crop_batch(images: torch.Tensor, res: int, interpolation: str = "nearest") -> torch.Tensor:
    """uint8 (B, 3, H, W) images of one size → uint8 (B, res, res, 3), on their device.

    The same geometry as :func:`transform_image` (shorter side to ``res``, torchvision's crop
    rounding). ``nearest`` picks exactly PIL's pixels; ``bilinear`` is torch's antialiased
    bilinear, within one grey level of PIL's.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, not {interpolation!r}")
    height, width = images.shape[-2:]
    new_w, new_h = resized_size(width, height, res)
    left, top, right, bottom = center_crop_box(new_w, new_h, res)
    if interpolation == "nearest":
        rows = torch.from_numpy(pil_nearest_indices(height, new_h)[top:bottom]).to(images.device)
        cols = torch.from_numpy(pil_nearest_indices(width, new_w)[left:right]).to(images.device)
        out = images.index_select(2, rows).index_select(3, cols)
    else:
        resized = torch.nn.functional.interpolate(
            images.float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
        )
        out = resized[:, :, top:bottom, left:right].round_().clamp_(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous()


def transform_images(images: list[torch.Tensor], res: int, interpolation: str = "nearest") -> torch.Tensor:
    """uint8 (3, H, W) images of any sizes → uint8 (B, res, res, 3); one call per distinct size."""
    out = torch.empty((len(images), res, res, 3), dtype=torch.uint8, device=images[0].device)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
    for members in by_size.values():
        batch = torch.stack([images[i] for i in members])
        out[members] = resize_center_crop_batch(batch, res, interpolation)
    return out
