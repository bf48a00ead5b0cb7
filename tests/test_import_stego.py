"""Released STEGO checkpoints: an original-format .ckpt (Lightning pickle with an unimportable
hyper-parameter class) loads without Lightning and evaluates on a val store."""

import itertools
import json
import sys
import types

import numpy as np
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from stegoscope import cache_schema
from stegoscope.cli import app
from stegoscope.models.stego_head import StegoHead


def write_stego_ckpt(path, in_dim=96, dim=6, n_classes=3, seed=0):
    torch.manual_seed(seed)
    head = StegoHead(in_dim, dim)
    state = {f"net.{k}": v for k, v in head.state_dict().items()}
    state |= {
        "net.model.cls_token": torch.zeros(1, 1, in_dim),  # the ViT rides along in real checkpoints
        "cluster_probe.clusters": torch.randn(n_classes, dim),
        "train_cluster_probe.clusters": torch.randn(n_classes, dim),
        "linear_probe.weight": torch.randn(n_classes, dim, 1, 1), "linear_probe.bias": torch.randn(n_classes),
        "decoder.weight": torch.randn(in_dim, dim, 1, 1), "decoder.bias": torch.zeros(in_dim),
    }
    # A hyper-parameter object whose class will not be importable when the checkpoint is read.
    module = types.ModuleType("fake_omegaconf")

    class DictConfig:
        def __init__(self, content):
            self._content = content

    DictConfig.__module__, DictConfig.__qualname__ = "fake_omegaconf", "DictConfig"
    module.DictConfig = DictConfig
    sys.modules["fake_omegaconf"] = module
    try:
        cfg = DictConfig({"model_type": "vit_small", "dim": dim, "dino_patch_size": 8})
        torch.save({"epoch": 3, "global_step": 7000, "pytorch-lightning_version": "1.4.9", "state_dict": state,
                    "hyper_parameters": {"n_classes": n_classes, "cfg": cfg}}, path)
    finally:
        del sys.modules["fake_omegaconf"]
    return head.eval(), state


def test_import_and_evaluate_released_checkpoint(tmp_path, directory_dataset):
    head, state = write_stego_ckpt(tmp_path / "cocostuff27_vit_base_5.ckpt")
    preset = tmp_path / "p.yaml"
    preset.write_text("name: p\ndataset: directory\nbackbone: random:vit_micro_patch8\nn_classes: 3\n"
                      "extract:\n  splits:\n    train: {res: 32}\n    val: {res: 48, store_images: true}\n")
    common = ["--preset", str(preset), "--data-root", str(directory_dataset), "--cache", str(tmp_path / "c"), "--no-progress"]
    runner = CliRunner()
    assert runner.invoke(app, ["extract", *common, "--workers", "0"]).exit_code == 0
    result = runner.invoke(app, ["import-stego", str(tmp_path / "cocostuff27_vit_base_5.ckpt"), *common, "--no-flip",
                                 "--crf-workers", "1"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "linear" in result.output and "cluster" in result.output and "yes" in result.output
    artefact = next((tmp_path / "c" / "artefacts" / "import_stego").glob("cocostuff27_vit_base_5-*"))
    metrics = json.loads((artefact / "metrics.json").read_text())
    assert metrics["checkpoint"]["model_type"] == "vit_small" and metrics["checkpoint"]["dim"] == 6

    # independent expectation: upsample the head's code first, then the probes (STEGO's order)
    val = next(cache_schema.open_feature_store(p) for p in cache_schema.list_feature_stores(tmp_path / "c") if "-val-" in p.name)
    tokens = torch.from_numpy(val[cache_schema.TOKENS][:].astype(np.float32)).permute(0, 3, 1, 2)
    labels = val[cache_schema.LABELS][:]
    with torch.no_grad():
        code = F.interpolate(head(tokens), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        linear = F.conv2d(code, state["linear_probe.weight"], state["linear_probe.bias"]).argmax(1).numpy()
        cos = torch.einsum("bchw,kc->bkhw", F.normalize(code, dim=1), F.normalize(state["cluster_probe.clusters"], dim=1))
        cluster = cos.argmax(1).numpy()
    valid = (labels >= 0) & (labels < 3)
    np.testing.assert_allclose(metrics["no_crf"]["linear/Accuracy"], 100 * np.mean(linear[valid] == labels[valid]), atol=1e-6)
    best = max(np.mean(np.array(perm)[cluster[valid]] == labels[valid]) for perm in itertools.permutations(range(3)))
    np.testing.assert_allclose(metrics["no_crf"]["cluster/Accuracy"], 100 * best, atol=1e-6)

    # the imported head is a reducer artefact that probe can use
    out = runner.invoke(app, ["probe", *common, "--reducer", str(artefact), "--steps", "5", "--no-crf"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output


def test_not_a_stego_checkpoint_is_a_clear_error(tmp_path, directory_dataset):
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, tmp_path / "x.ckpt")
    from stegoscope.models.stego_head import read_stego_checkpoint
    import pytest

    with pytest.raises(ValueError, match="x.ckpt: not a STEGO checkpoint"):
        read_stego_checkpoint(tmp_path / "x.ckpt")
