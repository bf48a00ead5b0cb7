"""The study graph: run, reuse, and exactly the downstream of a deleted artefact recomputed."""

import shutil

from typer.testing import CliRunner

from stegoscope.cli import app
from stegoscope.config import load_preset
from stegoscope.study import node_states, run_study, study_graph


def test_study_runs_once_and_recomputes_only_the_downstream_of_a_deleted_node(tmp_path, monkeypatch):
    preset = load_preset("demo")
    preset.methods, preset.dims = ["dino", "rp", "pca"], [4]
    preset.stego.steps, preset.probe.val_every = 10, 10
    cache = tmp_path / "c"
    first = run_study(preset, cache, device="cpu")
    assert first["ran"] == 7 and first["cached"] == 0  # extract ×2, reduce pca, reduce rp, probe ×3
    methods = {(r["method"], r["dim"], r["probe"], r["crf"]) for r in first["rows"]}
    assert ("rp", 4, "cluster", "no") in methods and ("dino", 96, "linear", "yes") in methods
    header = first["results"].read_text().splitlines()[0]
    assert header == "dataset,method,dim,probe,crf,seed,step,mIoU,Accuracy,key"
    assert run_study(preset, cache, device="cpu")["ran"] == 0

    graph, whole = study_graph(preset, cache)
    rp = next(n for n in graph if n.label == "reduce rp D=4 seed 0")
    shutil.rmtree(rp.stage.output)
    states = {n.label: s for n, s in ((n, node_states(graph)[id(n)]) for n in graph)}
    assert states["reduce rp D=4 seed 0"] == "missing" and states["probe rp D=4 seed 0"] == "stale"
    assert {label for label, s in states.items() if s != "complete"} == {"reduce rp D=4 seed 0", "probe rp D=4 seed 0"}
    again = run_study(preset, cache, device="cpu")
    assert again["ran"] == 2 and again["cached"] == 5


def test_status_of_a_fresh_cache_lists_the_extractions(tmp_path):
    out = CliRunner().invoke(app, ["status", "--preset", "demo", "--cache", str(tmp_path / "c")], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    assert out.output.count("missing") == 2 and "extract" in out.output


def test_official_weights_folder_is_used_by_every_command(tmp_path, monkeypatch):
    import torch

    from stegoscope.models.backbone import build_backbone
    from stegoscope.study import feature_stages
    from fixtures import write_potsdam

    folder = tmp_path / "weights"
    folder.mkdir()
    torch.save(build_backbone("random:vit_small_patch8").vit.state_dict(), folder / "dino_deitsmall8_300ep_pretrain.pth")
    monkeypatch.setenv("STEGOSCOPE_WEIGHTS", str(folder))
    stages = feature_stages(load_preset("potsdam"), tmp_path / "c", write_potsdam(tmp_path / "d"))
    assert all(s.p.weights == str(folder / "dino_deitsmall8_300ep_pretrain.pth") for s in stages)
    assert stages[0].weights["source"] == "file"
