"""STEGO's loss against a straightforward implementation, kNN, and head training from the cache."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from stegoscope.cli import app
from stegoscope.ops.correlation_loss import CorrelationLoss, sample, sample_partners, super_perm, super_perms
from stegoscope.ops.knn import knn_blocked, knn_tree


def reference_loss(feats, feats_pos, code, code_pos, coords1, coords2, perms, lam, shift, pointwise, zero_clamp):
    """§5 written out: per image, every pair of sample points, explicit loops for the negatives."""
    def samp(t, c):  # bilinear, align_corners=True, border; the original permutes the grid axes
        return F.grid_sample(t, c.permute(0, 2, 1, 3), padding_mode="border", align_corners=True).flatten(2)  # (B, C, P)

    def unit(t):
        return t / t.norm(dim=1, keepdim=True).clamp_min(1e-10)

    def term(f1, f2, c1, c2, b, global_mean=None):
        fd = torch.einsum("bcp,bcq->bpq", unit(f1), unit(f2)).double()  # every point pair
        if pointwise:  # centre per query point, re-add the mean over the whole batch of the term
            fd = fd - fd.mean(dim=2, keepdim=True) + (fd.mean() if global_mean is None else global_mean)
        cd = torch.einsum("bcp,bcq->bpq", unit(c1), unit(c2)).double()
        cd = cd.clamp(min=0) if zero_clamp else cd.clamp(min=-9999)
        return (-cd * (fd - b)).mean()

    f1, c1 = samp(feats, coords1), samp(code, coords1)
    self_l = term(f1, f1, c1, c1, shift["self"])
    knn_l = term(f1, samp(feats_pos, coords2), c1, samp(code_pos, coords2), shift["knn"])
    negs = []
    for perm in perms:  # explicit loop over images and their negative partner
        pairs = []
        for i in range(feats.shape[0]):
            j = int(perm[i])
            pairs.append((i, samp(feats[j : j + 1], coords2[i : i + 1]), samp(code[j : j + 1], coords2[i : i + 1])))
        draw_mean = torch.stack([torch.einsum("bcp,bcq->bpq", unit(f1[i : i + 1]), unit(fn)).double().mean() for i, fn, _ in pairs]).mean()
        for i, fn, cn in pairs:
            negs.append(term(f1[i : i + 1], fn, c1[i : i + 1], cn, shift["rand"], draw_mean))
    rand_l = torch.stack(negs).mean()
    return lam["self"] * self_l + lam["knn"] * knn_l + lam["rand"] * rand_l, (self_l, knn_l, rand_l)


@pytest.mark.parametrize("pointwise,zero_clamp", [(True, True), (False, True), (True, False), (False, False)])
def test_loss_equals_straightforward_formulas(pointwise, zero_clamp):
    g = torch.Generator().manual_seed(0)
    b, c, d, h = 4, 12, 5, 7
    feats, feats_pos = torch.randn(b, c, h, h, generator=g), torch.randn(b, c, h, h, generator=g)
    code, code_pos = torch.randn(b, d, h, h, generator=g), torch.randn(b, d, h, h, generator=g)
    coords1, coords2 = torch.rand(b, 3, 3, 2, generator=g) * 2 - 1, torch.rand(b, 3, 3, 2, generator=g) * 2 - 1
    perms = [super_perm(b, g) for _ in range(5)]
    lam, shift = {"self": 0.67, "knn": 0.25, "rand": 0.63}, {"self": 0.08, "knn": 0.02, "rand": 0.76}
    loss = CorrelationLoss(lam["self"], lam["knn"], lam["rand"], shift["self"], shift["knn"], shift["rand"],
                           pointwise=pointwise, zero_clamp=zero_clamp, feature_samples=3, neg_samples=5)
    out = loss(feats, feats_pos, code, code_pos, coords1, coords2, perms)
    expected, (self_l, knn_l, rand_l) = reference_loss(feats, feats_pos, code, code_pos, coords1, coords2, perms, lam, shift,
                                                       pointwise, zero_clamp)
    for got, want in ((out["self"], self_l), (out["knn"], knn_l), (out["rand"], rand_l), (out["total"], expected)):
        assert abs(got.item() - want.item()) < 1e-6


def test_paper_centring_drops_the_global_mean():
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(2, 6, 5, 5, generator=g) for _ in range(4)]
    kw = dict(lambda_self=1, lambda_knn=0, lambda_rand=0, b_self=0, b_knn=0, b_rand=0, feature_samples=4, neg_samples=1)
    coords = torch.rand(2, 4, 4, 2, generator=g) * 2 - 1
    a = CorrelationLoss(**kw)(*x, coords, coords, [torch.tensor([1, 0])])
    b = CorrelationLoss(**kw, readd_global_mean=False)(*x, coords, coords, [torch.tensor([1, 0])])
    assert not torch.isclose(a["self"], b["self"])


def test_partners_sampled_in_one_kernel_equal_sampling_each_permuted_map():
    g = torch.Generator().manual_seed(2)
    maps, coords = torch.randn(5, 3, 6, 7, generator=g), torch.rand(5, 4, 4, 2, generator=g) * 2 - 1
    perms = super_perms(3, 5, g)
    expected = torch.stack([sample(maps[p], coords) for p in perms])
    torch.testing.assert_close(sample_partners(maps, coords, perms), expected, rtol=0, atol=1e-6)


def test_super_perm_has_no_fixed_points():
    g = torch.Generator().manual_seed(0)
    for size in (2, 3, 8):
        for _ in range(50):
            assert not (super_perm(size, g) == torch.arange(size)).any()


def test_knn_on_hand_made_descriptors_and_blocked_equals_dense():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0]], dtype=np.float32)
    nns = knn_blocked(x, k=3, block=2)
    assert nns[:, 0].tolist() == [0, 1, 2, 3, 4]  # rank 0: itself
    assert nns[0, 1] == 1 and nns[1, 1] == 0 and nns[2, 1] == 3 and nns[3, 1] == 2
    assert nns[4, 1] in (2, 3) and nns[0, 2] == 3
    rng = np.random.default_rng(0)
    many = rng.normal(size=(300, 16)).astype(np.float32)
    dense = np.argsort(-(many / np.linalg.norm(many, axis=1, keepdims=True)) @ (many / np.linalg.norm(many, axis=1, keepdims=True)).T,
                       axis=1)[:, :30]
    np.testing.assert_array_equal(knn_blocked(many, 30, block=7), dense)
    np.testing.assert_array_equal(knn_tree(many, 30, block=7, split_every=3), dense)  # dask tasks, a tree of merges


def test_knn_stage_gives_the_same_neighbours_on_threads_and_on_a_local_cluster(tmp_path):
    """The kNN stage as dask tasks (a task per block of similarities, a tree merge of the top-k),
    on the threaded scheduler and on two worker processes, against a float64 brute force."""
    from conftest import write_micro_preset
    from stegoscope import cache_schema

    preset, cache = str(write_micro_preset(tmp_path / "micro.yaml")), str(tmp_path / "c")
    runner = CliRunner()
    assert runner.invoke(app, ["extract", "--preset", preset, "--cache", cache, "--workers", "0", "--no-progress"]).exit_code == 0
    found = {}
    for scheduler in ("threads", "local-cluster"):
        out = runner.invoke(app, ["knn", "--preset", preset, "--cache", cache, "--k", "5", "--block", "4", "--force",
                                  "--device", "cpu", "--scheduler", scheduler])
        assert out.exit_code == 0, out.output
        (artefact,) = (tmp_path / "c" / "artefacts" / "knn").iterdir()
        found[scheduler] = np.load(artefact / cache_schema.PAYLOAD)[cache_schema.NNS]
    train = next(p for p in cache_schema.list_feature_stores(tmp_path / "c") if "-train-" in p.name)
    pooled = cache_schema.open_complete_store(train)[cache_schema.POOLED][:].astype(np.float64)
    unit = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    expected = np.argsort(-(unit @ unit.T), axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(found["threads"], expected)
    np.testing.assert_array_equal(found["local-cluster"], expected)


def test_knn_memory_is_bounded_by_the_block():
    code = (
        "import resource, numpy as np; from stegoscope.ops.knn import knn_blocked, knn_tree\n"
        "x = np.random.default_rng(0).normal(size=(24000, 32)).astype(np.float32)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "knn_blocked(x, 30, block=256)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1e6)\n"
    )
    grown_gb = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown_gb < 0.5  # a dense 24000 × 24000 float32 matrix alone would be 2.3 GB


def test_train_stego_from_cache_on_demo(tmp_path):
    runner = CliRunner()
    cache = str(tmp_path / "c")
    assert runner.invoke(app, ["extract", "--preset", "demo", "--cache", cache, "--workers", "0", "--no-progress"]).exit_code == 0
    out = runner.invoke(app, ["train-stego", "--preset", "demo", "--cache", cache, "--steps", "60", "--no-progress"])
    assert out.exit_code == 0, out.output
    artefact = next((tmp_path / "c" / "artefacts" / "train_stego").glob("stego16-*"))
    rows = [json.loads(line) for line in (artefact / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 10, 20, 30, 40, 50, 60]
    assert np.mean([r["loss/total"] for r in rows[-2:]]) < np.mean([r["loss/total"] for r in rows[:2]])
    assert all(k in rows[0] for k in ("loss/self", "loss/knn", "loss/rand", "cd/self", "cd/knn", "cd/rand"))
    metrics = json.loads((artefact / "metrics.json").read_text())
    assert metrics["best"] == max(metrics["history"], key=lambda r: r["cluster/mIoU"])
    assert metrics["best_crf"]["step"] == metrics["best"]["step"]
    probe = runner.invoke(app, ["probe", "--preset", "demo", "--cache", cache, "--reducer", str(artefact), "--steps", "10",
                                "--no-progress", "--crf-workers", "1"], env={"COLUMNS": "200"})
    assert probe.exit_code == 0, probe.output
    assert "cluster (best)" in probe.output
