"""Released STEGO checkpoints: an original-format .ckpt (Lightning pickle with an unimportable
hyper-parameter class) loads without Lightning and evaluates on a val store."""

import itertools
import json
import re
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from stegoscope import cache_schema
from stegoscope.cli import app
from stegoscope.models.stego_head import StegoHead, read_stego_checkpoint


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
    # Hyper-parameters as Lightning and omegaconf save them, whose classes are not importable here.
    saved = {name: types.ModuleType(name) for name in ("omegaconf", "omegaconf.dictconfig", "pytorch_lightning",
                                                       "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing")}

    class DictConfig:
        def __init__(self, content):
            self._content = content

    class AttributeDict(dict):
        pass

    for cls, module in ((DictConfig, "omegaconf.dictconfig"), (AttributeDict, "pytorch_lightning.utilities.parsing")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(saved[module], cls.__name__, cls)
    sys.modules.update(saved)
    try:
        cfg = DictConfig({"model_type": "vit_small", "dim": dim, "dino_patch_size": 8})
        torch.save({"epoch": 3, "global_step": 7000, "pytorch-lightning_version": "1.4.9", "state_dict": state,
                    "hyper_parameters": AttributeDict(n_classes=n_classes, cfg=cfg)}, path)
    finally:
        for name in saved:
            del sys.modules[name]
    return head.eval(), state


def extracted(tmp_path, directory_dataset) -> list[str]:
    """The options of a cache holding the extracted train and val tokens of the directory dataset."""
    preset = tmp_path / "p.yaml"
    preset.write_text("name: p\ndataset: directory\nbackbone: random:vit_micro_patch8\nn_classes: 3\n"
                      "extract:\n  splits:\n    train: {res: 32}\n    val: {res: 48, store_images: true}\n")
    common = ["--preset", str(preset), "--data-root", str(directory_dataset), "--cache", str(tmp_path / "c"), "--no-progress"]
    assert CliRunner().invoke(app, ["extract", *common, "--workers", "0"]).exit_code == 0
    return common


def test_import_and_evaluate_released_checkpoint(tmp_path, directory_dataset):
    head, state = write_stego_ckpt(tmp_path / "cocostuff27_vit_base_5.ckpt")
    common = extracted(tmp_path, directory_dataset)
    runner = CliRunner()
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
    np.testing.assert_allclose(metrics["best"]["linear/Accuracy"], 100 * np.mean(linear[valid] == labels[valid]), atol=1e-6)
    best = max(np.mean(np.array(perm)[cluster[valid]] == labels[valid]) for perm in itertools.permutations(range(3)))
    np.testing.assert_allclose(metrics["best"]["cluster/Accuracy"], 100 * best, atol=1e-6)

    # the imported head is a reducer artefact that probe can use
    out = runner.invoke(app, ["probe", *common, "--reducer", str(artefact), "--steps", "5", "--no-crf"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output


def test_not_a_stego_checkpoint_is_a_clear_error(tmp_path, directory_dataset):
    torch.save({"state_dict": {"foo": torch.zeros(1)}}, tmp_path / "x.ckpt")
    import pytest

    from stegoscope.models.stego_head import read_stego_checkpoint

    with pytest.raises(ValueError, match="x.ckpt: not a STEGO checkpoint"):
        read_stego_checkpoint(tmp_path / "x.ckpt")


# -- checkpoints that try to run code ------------------------------------------------------------


class Gadget:
    """Pickles as a call of ``function(*args)``: what a hostile checkpoint holds."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def gadgets(marker, tmp_path):
    import copyreg
    import os

    import numpy.testing._private.utils as np_utils

    hub = tmp_path / "hub"
    hub.mkdir(exist_ok=True)
    (hub / "hubconf.py").write_text(f"open({str(marker)!r}, 'w')\ndef entry():\n    return 1\n")
    write = f"open({str(marker)!r}, 'w')"
    return {
        "numpy.testing._private.utils.runstring": Gadget(np_utils.runstring, write, {}),
        "builtins.eval": Gadget(eval, write),
        "builtins.exec": Gadget(exec, write),
        "builtins.getattr": Gadget(getattr, str(marker), "upper"),
        "posix.system": Gadget(os.system, f"touch {marker}"),
        "copyreg._reconstructor": Gadget(copyreg._reconstructor, Gadget, object, None),
        "torch.hub._load_local": Gadget(torch.hub._load_local, str(hub), "entry"),
        "torch.utils.cpp_extension.load_inline": Gadget(torch.utils.cpp_extension.load_inline, "x", f"// {write}"),
    }


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_checkpoint_that_names_any_other_global_is_refused_and_runs_nothing(tmp_path, zipped):
    import torch.utils.cpp_extension  # noqa: F401  (its entry point must be importable to be pickled)

    marker = tmp_path / "PWNED"
    head, state = write_stego_ckpt(tmp_path / "real.ckpt")
    for name, gadget in gadgets(marker, tmp_path).items():
        path = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": state, "hyper_parameters": {"cfg": gadget}}, path, _use_new_zipfile_serialization=zipped)
        with pytest.raises(ValueError, match=rf"{path.name}: refused: it names {re.escape(name)}") as refused:
            read_stego_checkpoint(path)
        assert "\n" not in str(refused.value)
        assert not marker.exists(), name


def test_a_settings_class_is_read_into_a_stand_in_even_where_a_module_of_its_name_runs_code(tmp_path):
    marker = tmp_path / "PWNED"
    saved = {name: types.ModuleType(name) for name in ("omegaconf", "omegaconf.dictconfig")}

    class DictConfig:
        def __setstate__(self, state):  # what a module of that name could do when imported
            open(marker, "w")

    DictConfig.__module__, DictConfig.__qualname__ = "omegaconf.dictconfig", "DictConfig"
    saved["omegaconf.dictconfig"].DictConfig = DictConfig
    cfg = DictConfig()
    cfg._content = {"dim": 3}
    head, state = write_stego_ckpt(tmp_path / "real.ckpt")
    sys.modules.update(saved)
    try:
        torch.save({"state_dict": state, "hyper_parameters": {"cfg": cfg}}, tmp_path / "x.ckpt")
        ckpt = read_stego_checkpoint(tmp_path / "x.ckpt")  # the hostile module is importable while it loads
    finally:
        for name in saved:
            del sys.modules[name]
    assert not marker.exists()
    assert (type(ckpt["hyper_parameters"]["cfg"]).__name__ == "DictConfig"
            and ckpt["hyper_parameters"]["cfg"].state == {"_content": {"dim": 3}})


def test_import_stego_refuses_a_hostile_checkpoint_with_one_line_and_writes_nothing(tmp_path, directory_dataset):
    import numpy.testing._private.utils as np_utils

    marker = tmp_path / "PWNED"
    head, state = write_stego_ckpt(tmp_path / "real.ckpt")
    torch.save({"state_dict": state, "hyper_parameters": Gadget(np_utils.runstring, f"open({str(marker)!r}, 'w')", {})},
               tmp_path / "hostile.ckpt")
    common = extracted(tmp_path, directory_dataset)
    runner = CliRunner()
    out = runner.invoke(app, ["import-stego", str(tmp_path / "hostile.ckpt"), *common, "--no-flip"], env={"COLUMNS": "300"})
    assert out.exit_code == 2 and "refused: it names numpy.testing._private.utils.runstring" in out.output, out.output
    assert not marker.exists() and not (tmp_path / "c" / "artefacts" / "import_stego").exists()
