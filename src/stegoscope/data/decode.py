"""Pixels on the compute device: the extraction path that decodes JPEGs where the model runs.

DataLoader workers only read a JPEG's bytes (and decode, crop and resize labels, which stay on
the CPU); the main process decodes the batch on the device (``torchvision.io.decode_jpeg``:
nvJPEG on CUDA, libjpeg-turbo on the CPU), crops and resizes there, and hands the pixels to
the model without a round trip through host memory. Images that are not plain JPEG files
(PNG, Potsdam's .mat, a JPEG nvJPEG rejects) are decoded by the dataset's reader instead.
The geometry is the CPU path's (:mod:`.transforms`), so ``nearest`` gives the same pixels.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

from .base import MAX_PIXELS, SegmentationDataset, require_file
from .crops import five_crop_boxes
from .transforms import transform_images

JPEG_MAGIC = b"\xff\xd8\xff"


def encoded_jpeg(dataset: SegmentationDataset, index: int) -> torch.Tensor | None:
    """The bytes of a sample's image file when it is a JPEG that the default reader would open."""
    if type(dataset).read_image is not SegmentationDataset.read_image:
        return None  # a reader of its own (e.g. Potsdam's .mat): let it decode
    path = require_file(dataset.paths(index)[0], f"image of sample {dataset.ids[index]!r}")
    data = path.read_bytes()
    if data[:3] != JPEG_MAGIC:
        return None
    try:
        with Image.open(io.BytesIO(data)) as header:  # the header only: a bomb is refused by the reader, not decoded here
            too_large = header.width * header.height > MAX_PIXELS
    except Exception:  # not a JPEG PIL can read: the dataset's reader names the file
        return None
    return None if too_large else torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 RGB on ``device`` per JPEG; None where the decoder refuses one."""
    if not encoded:
        return []
    with warnings.catch_warnings():  # torchvision >= 0.29 points to TorchCodec; 0.2x still decodes
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg
    def decode(data):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    # [measured] torchvision's batched nvJPEG decode (0.26, H200) runs outside the current stream's
    # order: without these two barriers the first image of a batch now and then came out as another
    # image's pixels (benchmarks/gpu_ranks.py: 1-2 of 1024 images per run differed between two
    # identical runs; none with them, none with --decode cpu).
    barrier = torch.cuda.synchronize if device.type == "cuda" else (lambda device: None)
    barrier(device)
    try:
        return list(decode(encoded))
    except RuntimeError:  # one bad or unsupported file fails the batch: find it
        out = []
        for data in encoded:
            try:
                out.append(decode(data))
            except RuntimeError:
                out.append(None)
        return out
    finally:
        barrier(device)


def device_pixels(
    batch: dict, dataset: SegmentationDataset, res: int, interpolation: str, crop_ratio: float, device: torch.device
) -> torch.Tensor:
    """uint8 (B, res, res, 3) on ``device`` from a batch of :class:`ExtractionDataset` (device mode)."""
    jpegs = [i for i, data in enumerate(batch["jpeg"]) if data is not None]
    decoded = dict(zip(jpegs, _decode_jpegs([batch["jpeg"][i] for i in jpegs], device)))
    images = []
    for i, source in enumerate(batch["source"]):
        image = decoded.get(i)
        if image is None:
            fallback = batch["image"][i]
            if fallback is None:  # a JPEG the device decoder refused: the reader decides
                fallback = torch.from_numpy(np.asarray(dataset.image(source))).permute(2, 0, 1)
            image = fallback.to(device, non_blocking=True)
        height, width = image.shape[-2:]
        if batch["label_shape"][i] is not None:
            dataset.check_label_size(source, batch["label_shape"][i], (width, height))
        crop = batch["crop"][i]
        if crop is not None:
            left, top, right, bottom = five_crop_boxes(width, height, crop_ratio)[crop]
            image = image[:, top:bottom, left:right]
        images.append(image)
    return transform_images(images, res, interpolation)
