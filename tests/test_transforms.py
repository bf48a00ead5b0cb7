"""STEGO's transform (resize shorter side, centre crop) against torchvision's own classes."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from stegoscope.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, transform_image, transform_label


@pytest.mark.parametrize("size", [(40, 32), (32, 40), (37, 53), (64, 64), (101, 31)])
@pytest.mark.parametrize("res", [16, 24])
def test_image_transform_matches_torchvision(size, res):
    rng = np.random.default_rng(sum(size) + res)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    for interp, tv_interp in (("nearest", T.InterpolationMode.NEAREST), ("bilinear", T.InterpolationMode.BILINEAR)):
        reference = T.Compose([T.Resize(res, tv_interp, antialias=True), T.CenterCrop(res)])(img)
        np.testing.assert_array_equal(transform_image(img, res, interp), np.asarray(reference))


def test_label_transform_is_nearest_and_keeps_values():
    rng = np.random.default_rng(1)
    label = rng.integers(-1, 27, (45, 70))
    reference = T.Compose([T.Resize(24, T.InterpolationMode.NEAREST), T.CenterCrop(24)])(
        Image.fromarray(label.astype(np.int32), mode="I")
    )
    out = transform_label(label, 24)
    assert out.dtype == np.int16 and out.shape == (24, 24)
    np.testing.assert_array_equal(out, np.asarray(reference))
    assert set(np.unique(out)) <= set(np.unique(label))


def test_normalize_is_totensor_then_imagenet():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    expected = torch.stack([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(p)) for p in pixels])
    torch.testing.assert_close(normalize(torch.from_numpy(pixels)), expected)
