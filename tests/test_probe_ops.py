"""Metrics on hand-built confusions, both k-means probes, and the dense CRF."""

import os

import numpy as np
import pytest
import torch

from stegoscope.ops.crf import dense_crf, softmax
from stegoscope.ops.kmeans import ClusterLookup, EuclideanLookup, FixedCentroids, lloyd_kmeans
from stegoscope.ops.metrics import SegmentationMetrics, confusion


def reference_scores(preds, target, n, hungarian):
    """Straightforward re-implementation of the reference definitions (loops, brute force)."""
    import itertools

    keep = (target >= 0) & (target < n) & (preds >= 0) & (preds < n)
    p, t = preds[keep], target[keep]
    if hungarian:  # brute-force the best permutation (small n)
        best = max(itertools.permutations(range(n)), key=lambda perm: sum((np.array(perm)[p] == t)))
        p = np.array(best)[p]
    ious = []
    for k in range(n):
        inter, union = np.sum((p == k) & (t == k)), np.sum((p == k) | (t == k))
        if union:
            ious.append(inter / union)
    return 100 * np.mean(ious), 100 * np.mean(p == t)


def test_permuted_clustering_scores_100_after_hungarian():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 4, size=(3, 10, 10))
    perm = np.array([2, 0, 3, 1])
    m = SegmentationMetrics(4, hungarian=True)
    m.update(perm[target[:2]], target[:2])  # chunk by chunk
    m.update(perm[target[2:]], target[2:])
    out = m.compute()
    assert out["mIoU"] == 100 and out["Accuracy"] == 100
    assert [out["assignment"][perm[k]] for k in range(4)] == [0, 1, 2, 3]
    assert SegmentationMetrics(4).merge(m).compute()["Accuracy"] < 100  # linear: no matching


def test_absent_class_skipped_and_ignore_pixels_dont_count():
    target = np.array([0, 0, 1, 1, -1, 7, 2])
    preds = np.array([0, 1, 1, 1, 0, 0, 2])
    m = SegmentationMetrics(4)
    m.update(preds, target)
    out = m.compute()
    # class 3 is absent from prediction and truth: skipped; -1 and 7 are ignored
    iou = [1 / 2, 2 / 3, 1.0]
    np.testing.assert_allclose(out["mIoU"], 100 * np.mean(iou))
    np.testing.assert_allclose(out["Accuracy"], 100 * 4 / 5)
    assert np.isnan(out["per_class_iou"][3])
    np.testing.assert_allclose(out["per_class_precision"][:3], [100, 200 / 3, 100])
    np.testing.assert_allclose(out["per_class_recall"][:3], [50, 100, 100])


def test_metrics_equal_a_straightforward_reimplementation():
    rng = np.random.default_rng(1)
    for trial in range(5):
        target = rng.integers(-1, 5, size=400)
        preds = rng.integers(0, 4, size=400)
        for hungarian in (False, True):
            m = SegmentationMetrics(4, hungarian=hungarian)
            m.update(preds, target)
            out = m.compute()
            miou, acc = reference_scores(preds, target, 4, hungarian)
            np.testing.assert_allclose([out["mIoU"], out["Accuracy"]], [miou, acc], rtol=1e-12)


def test_extra_clusters_dropped_by_default_counted_as_errors_on_request():
    target = np.array([0, 0, 1, 1, 1, 1])
    preds = np.array([0, 0, 1, 1, 2, 2])  # cluster 2 is an extra cluster (K = 2 + 1)
    parity = SegmentationMetrics(2, extra_clusters=1, hungarian=True)
    parity.update(preds, target)
    assert parity.compute()["Accuracy"] == 100  # extra-cluster pixels silently excluded [QUIRK]
    strict = SegmentationMetrics(2, extra_clusters=1, hungarian=True, extra_as_errors=True)
    strict.update(preds, target)
    out = strict.compute()
    np.testing.assert_allclose(out["Accuracy"], 100 * 4 / 6)
    np.testing.assert_allclose(out["per_class_iou"], [100, 50])
    assert confusion(preds, target, 2, 3).sum() == 4 and confusion(preds, target, 2, 3, extra_as_errors=True).sum() == 6


def test_one_images_scores_count_its_present_classes_and_its_labelled_pixels_only():
    from stegoscope.ops.metrics import image_scores

    target = np.array([[0, 0, 1], [1, -1, 3]])  # classes 0 and 1 present (3 is not a class of 3), one ignored
    pred = np.array([[0, 1, 1], [-1, 2, 0]])  # −1: an unmatched cluster
    # labelled pixels: (0,0) 0→0 ✓, (0,1) 0→1 ✗, (0,2) 1→1 ✓, (1,0) 1→−1 ✗
    # IoU(0) = 1 / |{(0,0), (0,1)}| = 1/2; IoU(1) = 1 / |{(0,1), (0,2), (1,0)}| = 1/3; class 2, predicted only on
    # an ignored pixel, is not present
    miou, accuracy = image_scores(pred, target, n_classes=3)
    assert miou == pytest.approx((1 / 2 + 1 / 3) / 2 * 100) and accuracy == pytest.approx(50.0)
    assert all(np.isnan(image_scores(pred, np.full_like(target, -1), 3)))


def test_confusion_of_tensors_is_counted_where_they_are():
    target = torch.tensor([[0, 0, 1], [1, -1, 1]])
    preds = torch.tensor([[0, 1, 1], [2, 0, 1]])  # cluster 2 is an extra cluster; -1 an unlabelled pixel
    expected = np.array([[1, 0], [1, 2], [0, 0]])  # rows = prediction, columns = truth; the extra row dropped [QUIRK]
    np.testing.assert_array_equal(confusion(preds, target, 2, 3), expected)
    np.testing.assert_array_equal(confusion(preds, target, 2, 3, extra_as_errors=True), expected + [[0, 0], [0, 0], [0, 1]])
    np.testing.assert_array_equal(confusion(preds.numpy(), target.numpy(), 2, 3), expected)


def blobs(seed=0, k=4, n=300, d=8):
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(d, d)))[0][:k]  # orthonormal directions
    labels = rng.integers(0, k, n)
    x = centres[labels] * rng.uniform(0.5, 3, (n, 1)) + 0.05 * rng.normal(size=(n, d))
    return x.astype(np.float32), labels


def agreement(assign, labels, k):
    m = SegmentationMetrics(k, hungarian=True)
    m.update(assign, labels)
    return m.compute()["Accuracy"]


def test_learnable_cosine_kmeans_recovers_clusters():
    """STEGO's probe (randn centroids, hard assignment, Adam 5e-3). A centroid that never wins
    gets no gradient, so some initialisations leave one dead and merge two clusters — a property
    of the original probe; most seeds recover the clusters exactly."""
    x, labels = blobs()
    codes = torch.from_numpy(x).T.reshape(1, 8, 1, -1)
    probes = []
    for seed in range(6):
        torch.manual_seed(seed)
        probes.append(ClusterLookup(8, 4))
    # One Adam over the six probes on the sum of their losses: each probe's gradient and Adam's
    # (element-wise) update are exactly those of its own run, in one sixth of the steps.
    opt = torch.optim.Adam([p for probe in probes for p in probe.parameters()], lr=5e-3)
    first = None
    for _ in range(1500):
        losses, probs = zip(*(probe(codes, None) for probe in probes))
        first = torch.stack(losses).detach() if first is None else first
        opt.zero_grad()
        sum(losses).backward()
        opt.step()
    assert torch.all(torch.stack(losses) < first) and all(torch.all(p.sum(1) == 1) for p in probs)  # hard one-hot assignment
    recovered = sum(agreement(probe.scores(codes).argmax(1).ravel().numpy(), labels, 4) == 100 for probe in probes)
    assert recovered >= 3


def test_spherical_lloyd_kmeans_recovers_clusters():
    x, labels = blobs(seed=2)
    c = lloyd_kmeans(x, 4, seed=0, spherical=True)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1, rtol=1e-6)
    assert agreement(np.argmax(x @ c.T, 1), labels, 4) > 99


def gaussian_blobs(seed=3, k=4, n=400, d=8):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    return (rng.normal(size=(k, d))[labels] * 5 + 0.3 * rng.normal(size=(n, d))).astype(np.float32), labels


def test_euclidean_kmeans_lloyd_learnable_and_fixed_recover_planted_clusters():
    x, labels = gaussian_blobs()
    c = lloyd_kmeans(x, 4, seed=0)
    nearest = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    assert agreement(nearest, labels, 4) == 100
    for k in range(4):  # a fixed point of Lloyd's step: each centroid is the mean of its points
        np.testing.assert_allclose(c[k], x[nearest == k].mean(0), atol=1e-4)
    codes = torch.from_numpy(x.T.reshape(1, 8, 20, 20))  # the points as a (1, D, h, w) code map
    for metric in ("euclidean", "cosine"):  # a fixed probe's argmax is the nearest centroid by its metric
        scores = FixedCentroids(torch.from_numpy(c), metric).scores(codes).reshape(4, -1).argmax(0).numpy()
        unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
        expected = nearest if metric == "euclidean" else (unit(x) @ unit(c).T).argmax(1)
        np.testing.assert_array_equal(scores, expected)
    # the learnable probe, started at one point of each blob, descends to Lloyd's optimum
    probe = EuclideanLookup(8, 4)
    with torch.no_grad():
        probe.clusters.copy_(torch.from_numpy(x[[np.flatnonzero(labels == k)[0] for k in range(4)]]))
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(400):
        loss, probs = probe(codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
    lloyd_loss = ((x - c[nearest]) ** 2).sum(1).mean()
    np.testing.assert_allclose(loss.item(), lloyd_loss, rtol=0.02)
    assert agreement(probe.scores(codes).argmax(1).ravel().numpy(), labels, 4) == 100 and torch.all(probs.sum(1) == 1)


def test_crf_snaps_a_blurred_map_to_colour_edges():
    h, w = 40, 60
    image = np.zeros((h, w, 3), np.uint8)
    image[:, 30:] = (230, 40, 40)  # sharp vertical edge at x = 30
    image[:, :30] = (30, 60, 200)
    truth = (np.arange(w) >= 30).astype(int)[None].repeat(h, 0)
    xs = np.arange(w)[None].repeat(h, 0).astype(np.float32)
    logit = (xs - 26) / 6 + np.random.default_rng(0).normal(0, 0.6, (h, w))  # blurred, shifted, noisy
    probs = softmax(np.stack([-logit, logit]))
    before = np.mean(probs.argmax(0) == truth)
    after = np.mean(dense_crf(image, probs).argmax(0) == truth)
    assert before < 0.95 and after > before and after > 0.98


def test_crf_pool_gives_the_in_process_labels_and_a_hung_pool_stops_with_a_message():
    from stegoscope.probing import CRFError, CRFPool

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(3)]
    probs = [softmax(rng.normal(size=(3, 24, 24))) for _ in range(3)]
    expected = [dense_crf(image, p).argmax(0) for image, p in zip(images, probs)]
    pool = CRFPool(workers=2)
    try:
        for got, want in zip(pool.map(images, probs), expected):
            np.testing.assert_array_equal(got, want)
        started = [pool.pids.get() for _ in range(2) if not pool.pids.empty()]
    finally:
        pool.close()
    assert started
    for pid in started:  # closed means gone: a worker left starting would find its queue's semaphore unlinked
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    for got, want in zip(CRFPool(workers=0).map(images, probs), expected):
        np.testing.assert_array_equal(got, want)
    hung = CRFPool(workers=1, timeout=1e-4)  # every image "hangs": the first pool and its replacement time out
    with pytest.raises(CRFError, match="failed twice .*took over 0.0001 s.*--crf-workers 0"):
        hung.map(images, probs)
    assert hung.pool is None  # killed, not left behind


def test_three_mappings_of_over_clustering_on_a_hand_made_confusion():
    # 3 clusters for 2 classes; rows = cluster, columns = true class (pixel counts)
    stats = {0: [5, 0], 1: [3, 1], 2: [0, 4]}
    preds = np.concatenate([np.full(sum(c), k) for k, c in stats.items()])
    target = np.concatenate([np.repeat([0, 1], c) for c in stats.values()])
    metrics = SegmentationMetrics(2, extra_clusters=1, hungarian=True)
    metrics.update(preds, target)
    modes = metrics.compute_modes()
    # drop [QUIRK]: cluster 2 (≥ K) dropped before matching; 0→0, 1→1 → 6 of 9 pixels right
    np.testing.assert_allclose(modes["drop"]["Accuracy"], 100 * 6 / 9)
    assert modes["drop"] == metrics.compute()  # the configured (parity) mode
    # errors: Hungarian over all clusters picks 0→0, 2→1; cluster 1's 4 pixels are misses → 9 of 13
    np.testing.assert_allclose(modes["errors"]["Accuracy"], 100 * 9 / 13)
    np.testing.assert_allclose(modes["errors"]["per_class_iou"], [100 * 5 / 8, 100 * 4 / 5])
    # many-to-one: 0→0, 1→0, 2→1 → 12 of 13; IoU 8/9 and 4/5 — here majority and Hungarian differ
    assert modes["many_to_one"]["assignment"] == [0, 0, 1] and modes["errors"]["assignment"] == [0, -1, 1]
    np.testing.assert_allclose(modes["many_to_one"]["Accuracy"], 100 * 12 / 13)
    np.testing.assert_allclose(modes["many_to_one"]["mIoU"], 100 * (8 / 9 + 4 / 5) / 2)
