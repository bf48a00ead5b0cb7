"""The study graph: run, reuse, and exactly the downstream of a deleted artefact recomputed."""

import shutil

from typer.testing import CliRunner

from stegoscope import runner
from stegoscope.cli import app
from stegoscope.config import load_preset
from stegoscope.graph import node_states
from stegoscope.runner import run_graph
from stegoscope.stages.figures import collect
from stegoscope.study import StudyContext


def ran(done):
    return sum(not result.skipped for _, result in done)


def test_study_runs_once_and_recomputes_only_the_downstream_of_a_deleted_node(tmp_path):
    preset = load_preset("demo", {"methods": ["dino", "rp", "pca"], "dims": [4], "probe.steps": 10, "eval.val_every": 10,
                                  "eval.keep_predictions": "none"})
    cache = tmp_path / "c"
    ctx = StudyContext(preset, cache, device="cpu", show_progress=False)
    graph = ctx.graph()
    first = run_graph(ctx, graph)
    assert ran(first) == 7 and len(first) == 7  # extract ×2, reduce pca, reduce rp, probe ×3
    rows, _ = collect(cache, ["demo"])
    methods = {(r.method, r.dim, r.probe, r.crf) for r in rows}
    assert ("rp", 4, "cluster", "no") in methods and ("dino", 96, "linear", "yes") in methods
    assert ("pca", 4, "linear", "yes") not in methods  # the CRF only where Table 2 reports (eval.crf: table2)
    assert ran(run_graph(ctx, graph)) == 0

    rp = next(n for n in graph if n.label == "reduce rp D=4 seed 0")
    shutil.rmtree(rp.stage.output)
    states = {n.label: s for n, s in ((n, node_states(graph)[id(n)]) for n in graph)}
    assert states["reduce rp D=4 seed 0"] == "missing" and states["probe rp D=4 seed 0"] == "stale"
    assert {label for label, s in states.items() if s != "complete"} == {"reduce rp D=4 seed 0", "probe rp D=4 seed 0"}
    plan = {node.label: (action, why) for node, action, why in runner.plan(graph)}
    assert plan["reduce rp D=4 seed 0"] == ("run", "missing")
    assert plan["probe rp D=4 seed 0"] == ("run", "upstream reruns (reduce rp D=4 seed 0)")
    assert sum(action == "run" for action, _ in plan.values()) == 2
    again = run_graph(ctx, graph)
    assert ran(again) == 2 and len(again) - ran(again) == 5


def test_status_of_a_fresh_cache_lists_the_whole_graph(tmp_path):
    out = CliRunner().invoke(app, ["status", "--preset", "demo", "--cache", str(tmp_path / "c")], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    graph = StudyContext(load_preset("demo"), tmp_path / "c").graph()  # known before anything ran
    assert out.output.count("missing") == len(graph) > 2
    for label in ("extract train", "reduce pca", "probe hnne D=16 seed 0", "train-stego D=16 seed 0"):
        assert label in out.output


def test_official_weights_folder_is_used_by_every_command(tmp_path, monkeypatch):
    import torch

    from fixtures import write_potsdam
    from stegoscope.models.backbone import build_backbone

    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(build_backbone("random:vit_small_patch8").vit.state_dict(), folder / "dino_deitsmall8_300ep_pretrain.pth")
    monkeypatch.setenv("STEGOSCOPE_WEIGHTS", str(folder))
    ctx = StudyContext(load_preset("potsdam"), tmp_path / "c", write_potsdam(tmp_path / "d"))
    stages = [ctx.extract(split) for split in ("train", "val")]
    assert all(s.p.weights == str(folder / "dino_deitsmall8_300ep_pretrain.pth") for s in stages)
    assert stages[0].weights["source"] == "file"


def test_status_never_downloads_weights(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from fixtures import write_potsdam

    def hub(repo, filename, local_files_only=False, **kwargs):
        assert local_files_only, "status tried to download"  # offline this retried the hub for 20 s
        raise LocalEntryNotFoundError("not in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    monkeypatch.delenv("STEGOSCOPE_WEIGHTS", raising=False)
    out = CliRunner().invoke(app, ["status", "--preset", "potsdam", "--data-root", str(write_potsdam(tmp_path / "d")),
                                   "--cache", str(tmp_path / "c")], env={"COLUMNS": "200"})
    assert out.exit_code == 2 and "does not download" in out.output and "--weights" in out.output, out.output


def test_the_number_of_classes_comes_from_the_dataset_and_preset_without_opening_a_file(tmp_path):
    from stegoscope.config import load_preset
    from stegoscope.study import StudyContext

    nowhere = tmp_path / "no-such-data"
    assert StudyContext(load_preset("cityscapes"), tmp_path / "c", nowhere).n_classes == 27
    assert StudyContext(load_preset("potsdam"), tmp_path / "c", nowhere).n_classes == 3
    ctx = StudyContext(load_preset("directory", {"n_classes": 5, "probe.steps": 7}), tmp_path / "c", nowhere)
    assert ctx.n_classes == 5 and ctx.base.n_classes == 5  # the base keeps what the data is, not the experiment's change
    assert ctx.base.preset.probe.steps != 7
    assert not nowhere.exists()
    # its graph's nodes say which experiment declared them: the overrides' hash, as the study record names it
    import hashlib
    import json

    expected = hashlib.sha256(json.dumps({"n_classes": 5, "probe.steps": 7}, sort_keys=True, separators=(",", ":")).encode())
    graph = ctx.graph_of([ctx.probe("dino")])
    assert {node.experiment for node in graph} == {expected.hexdigest()[:12]}
    assert {node.experiment for node in ctx.base.graph_of([ctx.base.probe("dino")])} == {"base"}


def test_a_stage_defined_in_a_test_file_runs_in_a_study_with_one_registry_line(tmp_path, monkeypatch):
    """A toy stage (the mean token norm of the train store) needs its own class and one line in
    the command table; the graph, runner, record, skip-when-cached and error hints come free."""
    import numpy as np
    import pytest

    from stegoscope import cache_schema
    from stegoscope.pipeline import Stage, artefact_state, load_npz, read_manifest
    from stegoscope.runner import recorded_keys

    class TokenNorms(Stage):
        name, version = "token-norms", 1

        def __init__(self, cache_root, train):
            super().__init__(cache_root)
            self.train = train

        def params(self):
            return {}

        def upstream(self):
            return {"train": self.train}

        @property
        def output(self):
            return cache_schema.artefact_dir(self.cache_root, self.name, "norms", self.key)

        def state(self):
            return artefact_state(self.output)

        def execute(self, force):
            store = cache_schema.open_complete_store(self.train.output)
            tokens = store[cache_schema.TOKENS][:].astype(np.float64)
            self.publish(0.0, {cache_schema.PAYLOAD: {"mean_norm": np.linalg.norm(tokens, axis=-1).mean().reshape(1)}})

    monkeypatch.setitem(cache_schema.COMMANDS, "token-norms", "study")  # its one registry line
    ctx = StudyContext(load_preset("demo"), tmp_path / "c", device="cpu", show_progress=False)
    toy = TokenNorms(ctx.cache_root, ctx.extract("train"))
    graph = ctx.graph_of([toy])
    assert [n.label for n in graph] == ["extract train", "token-norms"] and ran(run_graph(ctx, graph)) == 2
    tokens = cache_schema.open_complete_store(ctx.extract("train").output)[cache_schema.TOKENS][:].astype(np.float64)
    expected = np.sqrt((tokens**2).sum(-1)).mean()  # by hand
    np.testing.assert_allclose(load_npz(toy.output)["mean_norm"], [expected], rtol=1e-12)
    assert ran(run_graph(ctx, graph)) == 0 and toy.key in recorded_keys(ctx.cache_root)  # cached; `gc` keeps it
    (toy.output / cache_schema.PAYLOAD).write_bytes(b"x")
    with pytest.raises(cache_schema.StoreError, match=r"rerun the `stegoscope study` command that made it"):
        read_manifest(toy.output)


def test_every_shipped_preset_loads_and_its_heads_read_splits_it_declares():
    from stegoscope.config import available_presets

    names = available_presets()
    assert {"demo", "cocostuff27", "cityscapes", "potsdam", "cocostuff27_dinov2", "cityscapes_dinov2"} <= set(names)
    for name in names:
        preset = load_preset(name)
        for method, params in preset.heads.items():
            for split in (getattr(params, "train_split", "train"), getattr(params, "mediator_split", "train")):
                assert split in preset.splits, f"{name}: {method} reads split {split!r}, not declared"
