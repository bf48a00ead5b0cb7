"""Experiments, not folders: presets that declare the protocol, overrides and sweeps, results
keyed by their configuration (never averaged with another), and methods added from outside the
package through the one registry."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA as SkPCA
from sklearn.preprocessing import StandardScaler
from torch import nn

from conftest import invoke, ok, write_micro_preset
from stegoscope import cache_schema
from stegoscope import methods as registry
from stegoscope.config import ConfigError, load_preset, parse_assignment, parse_sweep
from stegoscope.heads.base import HeadParams, HeadTrainer
from stegoscope.probing import load_reducer
from stegoscope.reducers import Reducer, ReducerParams
from stegoscope.stages.figures import collect, figure3, metric_figure, table2


def manifests(cache, stage):
    return [json.loads(p.read_text()) for p in sorted((cache / "artefacts" / stage).glob("*/manifest.json"))]


def metric_of(cache, manifest, probe="linear"):
    return json.loads((cache_schema.artefact_dir(cache, manifest["stage"].replace("-", "_"), f"{manifest['method']}{manifest['code_dim']}",
                                                 manifest["key"]) / "metrics.json").read_text())["best"][f"{probe}/mIoU"]


def lines_of(ax):
    return {line.get_label(): line for line in ax.lines}


# -- presets ------------------------------------------------------------------------------------


def test_overrides_per_dim_parameters_and_sweeps_resolve_from_the_file(tmp_path):
    preset = load_preset("demo", {"stego.lambda_rand": 0.5, "stego.per_dim.4.b_rand": 0.3, "reduce.pca.max_images": 50,
                                  "batch_size": 4})
    assert preset.method_params("stego", 4).b_rand == 0.3 and preset.method_params("stego", 16).b_rand == 0.76
    assert preset.method_params("stego", 16).lambda_rand == 0.5 and preset.method_params("pca").max_images == 50
    assert preset.batch_size == 4 and preset.label() == "b_rand=0.3, batch_size=4, max_images=50, λ_rand=0.5"
    assert preset.base().method_params("stego", 16).lambda_rand == 0.63 and preset.base().label() == ""

    grid = preset.experiments({"stego.lambda_rand": (0.3, 0.5), "probe.steps": (10, 20)})
    assert [(p.method_params("stego", 16).lambda_rand, p.probe.steps) for p in grid] == [(0.3, 10), (0.3, 20), (0.5, 10), (0.5, 20)]
    assert parse_assignment("reduce.rp.kind=orthogonal") == ("reduce.rp.kind", "orthogonal")
    assert parse_sweep("stego.b_rand=0.1,0.2") == ("stego.b_rand", (0.1, 0.2))

    path = tmp_path / "per_dim.yaml"
    path.write_text(Path(load_preset("demo").path).read_text().replace("stego: {", "stego: {per_dim: {4: {lambda_rand: 0.2}}, "))
    assert load_preset(path).method_params("stego", 4).lambda_rand == 0.2

    for overrides, needle in (({"stego.lambda_rnd": 1}, "lambda_rnd"), ({"reduce.stego.dim": 3}, "stego is a head"),
                              ({"eval.crf": "sometimes"}, "crf must be one of"), ({"extract.splits.val.flip": True}, "eval.flip"),
                              ({"reduce.rp.kind": "sparse"}, "kind must be one of"), ({"methods": ["umap"]}, "unknown method 'umap'")):
        with pytest.raises(ConfigError, match=needle) as info:
            load_preset("demo", overrides)
        assert "demo.yaml" in str(info.value)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_assignment("stego.lambda_rand")


@pytest.mark.parametrize("key, value, said", [
    ("eval.flip", "no", "eval.flip: 'no' \\(str\\), expected true or false"),
    ("stego.lambda_rand", "0.5x", "stego.lambda_rand: '0.5x' \\(str\\), expected a number"),
    ("probe.steps", 10.5, "probe.steps: 10.5 \\(float\\), expected an integer"),
    ("train.group", 1, "train.group: 1 \\(int\\), expected true or false"),
    ("dims", [4, "16"], "dims: \\[4, '16'\\] \\(list\\), expected a list of integers"),
    ("seed", True, "seed: True \\(bool\\), expected an integer"),
    ("reduce.hnne.fit_tokens", "many", "reduce.hnne.fit_tokens: 'many' \\(str\\), expected an integer"),
    ("extract.splits.val.store_images", "yes please", "store_images: 'yes please' \\(str\\), expected true or false"),
])
def test_a_preset_value_of_the_wrong_type_names_the_file_the_key_the_value_and_the_type(key, value, said):
    with pytest.raises(ConfigError, match=said) as info:
        load_preset("demo", {key: value})
    assert str(info.value).startswith(str(load_preset("demo").path))


def test_a_registration_sets_its_defaults_under_the_presets_values():
    """STEGO+PriMaPs-EM is PriMaPs-EM with ``base`` from its registry line; a preset may still
    change it, to a head PriMaPs-EM can train on."""
    demo = load_preset("demo")
    assert demo.method_params("stego-primaps").base == "stego" and demo.method_params("primaps").base == ""
    assert load_preset("demo", {"stego-primaps.base": "smooseg"}).method_params("stego-primaps").base == "smooseg"
    for base in ("primaps", "pca", "nothing"):
        with pytest.raises(ConfigError, match=f"base must be .* not '{base}'"):
            load_preset("demo", {"stego-primaps.base": base})
    assert load_preset("demo").future.clusterer_methods == ("pca", "rp")  # the fitted reducers of Fig. 4


def test_preset_values_of_the_right_type_pass_as_yaml_writes_them():
    preset = load_preset("demo", {"stego.lambda_rand": 1, "eval.flip": False, "dims": (4, 16), "data_root": None})
    assert preset.method_params("stego", 4).lambda_rand == 1 and preset.dims == (4, 16) and preset.eval.flip is False


# -- results keyed by configuration --------------------------------------------------------------


def test_two_configurations_stay_side_by_side_and_seeds_average_within_one(tmp_path):
    cache = tmp_path / "c"
    base = write_micro_preset(tmp_path / "micro.yaml")
    changed = write_micro_preset(tmp_path / "changed.yaml", "changed")
    changed.write_text(changed.read_text().replace("dim: 4}", "dim: 4, lambda_rand: 0.5}"))
    ok("study", base, "--cache", cache, "--device", "cpu", "--seeds", 0, "--seeds", 1, "--no-progress")
    ok("study", changed, "--cache", cache, "--device", "cpu", "--no-progress")
    ok("figures", "--cache", cache, "--study", "micro", "--study", "changed")

    heads = manifests(cache, "train_stego")
    assert len(heads) == 3 and len({m["experiment"] for m in heads}) == 2
    seeds = {m["seed"]: metric_of(cache, m) for m in heads if m["config"]["params"]["lambda_rand"] == 0.63}
    (other,) = [metric_of(cache, m) for m in heads if m["config"]["params"]["lambda_rand"] == 0.5]

    folder = cache / "figures" / "micro+changed"
    lines = [line.split(",") for line in (folder / "results.csv").read_text().splitlines()]
    header, rows = lines[0], [dict(zip(lines[0], line)) for line in lines[1:]]
    stego = [r for r in rows if r["method"] == "stego" and r["probe"] == "linear" and r["crf"] == "no"]
    assert sorted((r["label"], r["seed"]) for r in stego) == [("", "0"), ("", "1"), ("λ_rand=0.5", "0")]
    assert len({r["experiment"] for r in stego}) == 2 and "experiment" in header

    rows, _ = collect(cache, ["micro", "changed"])
    linear = lines_of(metric_figure(rows, "mIoU").axes[0])
    np.testing.assert_allclose(linear["STEGO"].get_ydata(), [np.mean(list(seeds.values()))])  # mean of the seeds
    np.testing.assert_allclose(linear["STEGO λ_rand=0.5"].get_ydata(), [other])  # its own, not in the mean
    table = {row["method"]: row for row in table2(rows)}
    stego_row = table["STEGO (stegoscope)"]
    assert stego_row["synthetic seeds"] == 2 and stego_row["synthetic CRF"] == "yes"
    assert table["STEGO λ_rand=0.5 (stegoscope)"]["synthetic seeds"] == 1
    assert "± " in (folder / "table2.md").read_text()

    # each study alone: its own file set, only its own configuration
    ok("figures", "--cache", cache)
    alone = (cache / "figures" / "micro" / "results.csv").read_text()
    assert "λ_rand" not in alone and (cache / "figures" / "changed" / "fig4_miou_vs_dim.png").stat().st_size > 0


def test_a_changed_head_parameter_reruns_only_the_head_and_the_dry_run_says_why(tmp_path):
    cache = tmp_path / "c"
    preset = write_micro_preset(tmp_path / "micro.yaml", extra="methods: [dino, pca, stego]\n")
    ok("study", preset, "--cache", cache, "--device", "cpu", "--no-progress")
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("manifest.json")}

    dry = ok("study", preset, "--cache", cache, "--set", "stego.lambda_rand=0.3", "--dry-run")
    assert "1 stages would run" in dry and "changed: λ_rand 0.63 → 0.3" in dry
    plan = [line for line in dry.splitlines() if "│ run" in line]
    assert len(plan) == 1 and "train-stego D=4 seed 0" in plan[0]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("manifest.json")} == before  # nothing ran

    out = ok("study", preset, "--cache", cache, "--set", "stego.lambda_rand=0.3", "--no-progress")
    assert "[λ_rand=0.3]: 1 stages run, 6 cached" in out
    new = [m for m in manifests(cache, "train_stego") if m["config"]["params"]["lambda_rand"] == 0.3]
    assert len(new) == 1 and new[0]["label"] == "λ_rand=0.3"

    sweep = ok("study", preset, "--cache", cache, "--sweep", "stego.lambda_rand=0.3,0.4", "--dry-run")
    assert "[λ_rand=0.3]: 0 stages would run" in sweep and "[λ_rand=0.4]: 1 stages would run" in sweep

    rows, _ = collect(cache, ["micro"])  # the study now holds both experiments, labelled
    assert {r.label for r in rows if r.method == "stego"} == {"", "λ_rand=0.3"}
    assert {r.label for r in rows if r.method != "stego"} == {""}  # shared, unchanged results: one curve


def test_fig3_draws_the_pca_fits_the_study_declared(tmp_path):
    cache = tmp_path / "c"
    preset = write_micro_preset(tmp_path / "micro.yaml", extra="methods: [pca]\n")
    ok("study", preset, "--cache", cache, "--device", "cpu", "--no-progress")
    other = write_micro_preset(tmp_path / "other.yaml", "other", extra="methods: [pca]\n")
    ok("reduce", "--method", "pca", "--standardize", "none", "--preset", other, "--cache", cache, "--device", "cpu")

    _, fits = collect(cache, ["micro"])
    assert len(fits) == 1 and fits[0].label == ""  # the other study's unscaled fit is not micro's
    (line,) = figure3(fits).axes[0].lines
    store = cache_schema.open_feature_store(next(cache.glob("features/synthetic-train-*.zarr")))
    tokens = store[cache_schema.TOKENS][:].reshape(-1, 96).astype(np.float64)
    expected = np.cumsum(SkPCA().fit(StandardScaler().fit_transform(tokens)).explained_variance_ratio_)
    np.testing.assert_allclose(line.get_ydata(), expected, atol=1e-6)
    assert line.get_xdata()[0] == 1 / 96 and line.get_xdata()[-1] == 1.0  # k components at k/D
    assert [t.get_text() for t in figure3(fits).axes[0].get_xticklabels()] == ["D/16", "D/4", "D/2", "3D/4", "D"]

    ok("reduce", "--method", "pca", "--standardize", "none", "--preset", preset, "--cache", cache, "--device", "cpu")
    _, fits = collect(cache, ["micro"])  # an experiment of micro itself: drawn beside, labelled
    assert sorted(f.label for f in fits) == ["", "standardize=none"]


def test_import_stego_uses_the_study_val_store_or_names_the_flag(tmp_path):
    from test_import_stego import write_stego_ckpt

    cache = tmp_path / "c"
    preset = write_micro_preset(tmp_path / "micro.yaml", extra="methods: []\n")
    preset.write_text(preset.read_text().replace("eval: {val_every: 3,", "eval: {val_every: 3, flip: true,"))
    ok("extract", "--preset", preset, "--cache", cache, "--device", "cpu", "--workers", 0, "--no-progress")
    write_stego_ckpt(tmp_path / "s.ckpt", in_dim=96, n_classes=4)
    ok("import-stego", tmp_path / "s.ckpt", "--preset", preset, "--cache", cache, "--no-crf", "--no-progress")
    refused = invoke("import-stego", tmp_path / "s.ckpt", "--preset", preset, "--cache", cache, "--no-flip", "--no-crf")
    assert refused.exit_code == 2 and "--no-flip" in refused.output and "stegoscope extract" in refused.output


# -- a method from outside the package -------------------------------------------------------------


@dataclass(frozen=True)
class SliceParams(ReducerParams):
    offset: int = 0


class ChannelSlice(Reducer):
    """Codes = D consecutive token channels from ``offset``: a reducer whose fit only checks C."""

    method = "test_slice"
    seeded = False

    def __init__(self, n_components: int, offset: int = 0, standardize: str = "train"):
        self.n_components, self.offset = n_components, offset

    def fit(self, tokens):
        self.channels_ = np.asarray(tokens.shape[-1])
        return self

    def transform(self, tokens):
        return np.asarray(tokens, dtype=np.float32)[..., self.offset : self.offset + self.n_components]

    def params(self):
        return {"n_components": self.n_components, "offset": self.offset}

    def state_dict(self):
        return {"channels_": self.channels_}


@dataclass(frozen=True)
class LinearHeadParams(HeadParams):
    weight_decay: float = 0.0


class LinearHead(HeadTrainer):
    """A 1×1 convolution pulled towards the code of each image's kNN partner."""

    params_class = LinearHeadParams

    def make_head(self):
        return nn.Conv2d(self.channels, self.run.dim, 1)

    def loss(self, head, batch, generator):
        code, partner = head(batch.feats), head(batch.partner_feats)
        loss = (-torch.cosine_similarity(code.mean((2, 3)), partner.mean((2, 3))).mean()
                + self.params.weight_decay * head.weight.square().sum())
        return code, loss, {"loss/pull": loss}


def test_a_reducer_and_a_head_registered_from_a_test_file_run_through_study_and_figures(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.METHODS, "slice", registry.Method("slice", registry.REDUCER, SliceParams, ChannelSlice, "Slice", "x"))
    monkeypatch.setitem(registry.METHODS, "linhead", registry.Method("linhead", registry.HEAD, LinearHeadParams, LinearHead, "LinHead"))
    cache = tmp_path / "c"
    preset = write_micro_preset(tmp_path / "toys.yaml", "toys", extra="methods: [dino, slice, linhead]\ndims: [4, 8]\n"
                                "reduce: {slice: {offset: 2}}\nlinhead: {steps: 4, batch_size: 4, dim: 8, weight_decay: 0.01}\n")
    out = ok("study", preset, "--cache", cache, "--device", "cpu", "--no-progress")
    assert "10 stages run, 0 cached" in out  # extract ×2, a DINO probe, slice fit + probe ×2, kNN, linhead ×2
    ok("figures", "--cache", cache, "--study", "toys")

    rows, _ = collect(cache, ["toys"])
    assert {(r.method, r.dim) for r in rows} == {("dino", 96), ("slice", 4), ("slice", 8), ("linhead", 4), ("linhead", 8)}
    linear = lines_of(metric_figure(rows, "mIoU").axes[0])
    assert {"DINO", "Slice", "LinHead"} <= set(linear)
    np.testing.assert_array_equal(linear["LinHead"].get_xdata(), [4, 8])
    assert [row["method"] for row in table2(rows) if "stegoscope" in row["method"]] == ["DINO (stegoscope)"]
    assert not [r for r in rows if r.method == "linhead" and r.crf == "yes"]  # not in Table 2: no CRF (eval.crf: table2)

    (fit,) = [p for p in (cache / "artefacts" / "reduce").iterdir() if p.name.startswith("slice4-")]
    x = np.random.default_rng(0).normal(size=(2, 3, 3, 96)).astype(np.float32)
    np.testing.assert_array_equal(load_reducer(fit, 4).transform(x), x[..., 2:6])
    (head,) = (cache / "artefacts" / "train_linhead").glob("linhead8-*")
    log = [json.loads(line) for line in (head / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and "loss/pull" in log[0]
    exported = load_reducer(head)  # the base's export: the head module itself
    module = exported.module_
    expected = torch.einsum("dc,nhwc->nhwd", module.weight[:, :, 0, 0], torch.from_numpy(x)) + module.bias
    np.testing.assert_allclose(exported.transform(x), expected.detach().numpy(), rtol=1e-5, atol=1e-5)
    probe = ok("probe", "--reducer", head, "--preset", preset, "--cache", cache, "--device", "cpu", "--no-progress")
    assert "cluster (best)" in probe
