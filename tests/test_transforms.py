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


@pytest.mark.parametrize("interpolation, tolerance", [("nearest", 0), ("bilinear", 1)])
def test_tensor_transform_matches_the_pil_transform(interpolation, tolerance):
    from stegoscope.data.transforms import transform_images

    rng = np.random.default_rng(0)
    sizes = [(640, 480, 224), (480, 640, 320), (33, 57, 24), (40, 32, 32), (100, 100, 224), (500, 375, 320)]
    sizes += [tuple(int(v) for v in rng.integers(8, 700, 2)) + (int(rng.integers(8, 330)),) for _ in range(40)]
    for width, height, res in sizes:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        expected = transform_image(Image.fromarray(pixels), res, interpolation).astype(int)
        got = transform_images([torch.from_numpy(pixels).permute(2, 0, 1)], res, interpolation)[0].numpy().astype(int)
        assert got.shape == expected.shape == (res, res, 3)
        assert np.abs(got - expected).max() <= tolerance, (width, height, res)


def test_images_of_mixed_sizes_keep_their_order():
    from stegoscope.data.transforms import transform_images

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for w, h in ((64, 48), (50, 70), (64, 48), (30, 30))]
    batch = transform_images([torch.from_numpy(a).permute(2, 0, 1) for a in images], 24)
    for got, pixels in zip(batch, images):
        np.testing.assert_array_equal(got.numpy(), transform_image(Image.fromarray(pixels), 24))
