"""Dense CRF refinement with STEGO's parameters (reference §10), via ``pydensecrf`` (the
maintained ``pydensecrf2`` build)."""

from __future__ import annotations

import numpy as np

MAX_ITER = 10
POS_XY_STD, POS_W = 1, 3
BI_XY_STD, BI_RGB_STD, BI_W = 67, 3, 4


def softmax(scores: np.ndarray, axis: int = 0) -> np.ndarray:
    z = scores - scores.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def dense_crf(image_rgb: np.ndarray, probs: np.ndarray, iterations: int = MAX_ITER) -> np.ndarray:
    """Refined marginals (C, H, W) of class probabilities ``probs`` (C, H, W) on a uint8 RGB image.

    The image is passed to the bilateral kernel in BGR order, as STEGO does; colour units are
    0–255, so ``srgb=3`` is a tight colour kernel.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    c, h, w = probs.shape
    if image_rgb.shape[:2] != (h, w):
        raise ValueError(f"image {image_rgb.shape[:2]} and probabilities {(h, w)} differ in size")
    bgr = np.ascontiguousarray(image_rgb[:, :, ::-1], dtype=np.uint8)
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    crf.addPairwiseGaussian(sxy=POS_XY_STD, compat=POS_W)
    crf.addPairwiseBilateral(sxy=BI_XY_STD, srgb=BI_RGB_STD, rgbim=bgr, compat=BI_W)
    q = crf.inference(iterations)
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def crf_argmax(image_and_probs: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The refined label map (H, W) of one (image, probs) pair: a picklable job for worker processes."""
    image, probs = image_and_probs
    return dense_crf(image, probs).argmax(axis=0)
