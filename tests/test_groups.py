"""Groups: the probes (and the heads) that share a train store and a batch schedule train in one
pass, and every member's artefact is bit for bit the one it gets alone."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from conftest import write_micro_preset
from stegoscope.cli import app
from stegoscope.graph import Node, run_order
from stegoscope.stages.probe import ProbeStage
from stegoscope.stages.train_head import TrainHeadStage
from stegoscope.training import RandomState
from test_reliability import crash

EXTRA = "methods: [dino, pca, rp, stego]\ndims: [2, 4]\n"
SWEEP = ["--sweep", "stego.lambda_rand=0.3,0.9"]  # STEGO heads at two D and two λ


def study(preset, cache, *args):
    out = CliRunner().invoke(app, ["study", str(preset), "--cache", str(cache), "--no-progress", *SWEEP, *args])
    assert out.exit_code == 0, out.output
    return out.output


def members(cache):
    """Every probe and head artefact: folder name → its files (metrics without their timings)."""
    out = {}
    for folder in sorted([*cache.glob("artefacts/probe/*"), *cache.glob("artefacts/train_stego/*")]):
        files = {}
        for path in sorted(folder.iterdir()):
            if path.name == "manifest.json":
                continue
            data = path.read_bytes()
            if path.name == "metrics.json":
                metrics = json.loads(data)
                metrics.pop("seconds")
                data = json.dumps(metrics).encode()
            files[path.name] = data
        out[folder.name] = files
    return out


def test_grouped_members_equal_solo_runs_and_cached_members_are_not_retrained(tmp_path, monkeypatch):
    preset = write_micro_preset(tmp_path / "micro.yaml", extra=EXTRA)
    groups = []
    for cls in (ProbeStage, TrainHeadStage):
        solo = cls.execute_group.__func__
        monkeypatch.setattr(cls, "execute_group", classmethod(lambda c, stages, force, solo=solo: groups.append(
            (c.__name__, len(stages))) or solo(c, stages, force)))
    grouped = tmp_path / "grouped"
    study(preset, grouped)
    # dino, pca ×2, rp ×2 probes in one group; STEGO at D = 2, 4 (headline) × λ 0.3, 0.9 in one
    assert ("ProbeStage", 5) in groups and ("TrainHeadStage", 4) in groups, groups
    reference = members(grouped)
    assert len(reference) == 9

    groups.clear()
    alone = tmp_path / "alone"
    shutil.copytree(grouped, alone)
    for folder in [*alone.glob("artefacts/probe/*"), *alone.glob("artefacts/train_stego/*")]:
        shutil.rmtree(folder)
    study(preset, alone, "--no-group")
    assert groups and {n for _, n in groups} == {1}
    assert members(alone) == reference

    # a cached member inside a group is skipped; the others retrain as a smaller group, unchanged
    groups.clear()
    again = tmp_path / "again"
    shutil.copytree(grouped, again)
    kept = sorted(again.glob("artefacts/probe/pca4-*"))[0]
    finished = json.loads((kept / "manifest.json").read_text())["finished"]
    for folder in [*again.glob("artefacts/probe/*"), *again.glob("artefacts/train_stego/*")]:
        if folder != kept:
            shutil.rmtree(folder)
    study(preset, again)
    assert ("ProbeStage", 4) in groups, groups
    assert json.loads((kept / "manifest.json").read_text())["finished"] == finished
    assert members(again) == reference


@pytest.mark.slow
def test_a_group_killed_while_it_saves_resumes_to_the_uninterrupted_result(tmp_path):
    preset = write_micro_preset(tmp_path / "micro.yaml", extra=EXTRA)
    reference, trace = tmp_path / "reference", tmp_path / "renames.txt"
    assert crash("trace", trace, "study", preset, "--cache", reference, "--no-progress").returncode == 0
    renames = trace.read_text().splitlines()
    manifests = [i for i, name in enumerate(renames, 1) if "/artefacts/probe/" in name and name.endswith("manifest.json")]
    assert len(manifests) == 5
    cache = tmp_path / "cache"
    killed = crash("kill", manifests[1], "study", preset, "--cache", cache, "--no-progress")  # after the first member's manifest
    assert killed.returncode == -9
    assert len(list(cache.glob("artefacts/probe/*/manifest.json"))) == 1
    assert crash("trace", tmp_path / "again.txt", "study", preset, "--cache", cache, "--no-progress").returncode == 0
    assert members(cache) == members(reference)


def test_run_order_runs_what_is_alone_first_then_each_ready_group_together():
    class Toy:
        def __init__(self, key, group=None):
            self.key, self.group = key, group

        def group_key(self):
            return self.group

    fit_a, fit_b = Node("fit a", Toy("a")), Node("fit b", Toy("b"))
    probe_a, probe_b = Node("probe a", Toy("pa", "probes"), [fit_a]), Node("probe b", Toy("pb", "probes"), [fit_b])
    raw = Node("probe raw", Toy("pr", "probes"))
    after = Node("on probe a", Toy("x"), [probe_a])
    graph = [raw, fit_a, probe_a, after, fit_b, probe_b]
    assert [[n.label for n in nodes] for nodes in run_order(graph)] == [
        ["fit a"], ["fit b"], ["probe raw", "probe a", "probe b"], ["on probe a"]]
    assert [[n.label for n in nodes] for nodes in run_order(graph, group=False)] == [[n.label] for n in graph]


def test_a_random_state_resumes_its_own_draws_whatever_runs_between():
    alone = torch.Generator().manual_seed(5)
    expected = [torch.rand(3, generator=alone) for _ in range(3)]
    state = RandomState(5)
    got = []
    for _ in range(3):
        with state.active():
            got.append(torch.rand(3))
        torch.rand(7)  # another member's draws
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_merged_optimisers_give_every_parameter_the_path_of_its_own_optimiser():
    from stegoscope.training import merged

    def members(seed):
        torch.manual_seed(seed)
        modules = [torch.nn.Linear(5, 3), torch.nn.Linear(5, 3), torch.nn.Linear(5, 2)]
        optimizers = [torch.optim.Adam(modules[0].parameters(), lr=1e-2),
                      torch.optim.Adam([{"params": [modules[1].weight], "lr": 1e-2}, {"params": [modules[1].bias], "lr": 3e-2}]),
                      torch.optim.AdamW(modules[2].parameters(), lr=1e-2, weight_decay=0.1)]
        return modules, optimizers

    x = torch.randn(7, 5)
    alone, own = members(0)
    together, theirs = members(0)
    joined = merged(theirs)
    assert [type(o) for o in joined] == [torch.optim.Adam, torch.optim.AdamW] and len(joined[0].param_groups) == 2
    for _ in range(4):
        for module, optimizer in zip(alone, own):  # each alone: zero, backward, step
            optimizer.zero_grad()
            module(x).square().sum().backward()
            optimizer.step()
        for optimizer in joined:  # the group: zero all, every backward, one update
            optimizer.zero_grad()
        for module in together:
            module(x).square().sum().backward()
        for optimizer in joined:
            optimizer.step()
    for a, b in zip(alone, together):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_step_of_a_probe_or_head_waits_on_the_host_on_cuda(tmp_path, monkeypatch):
    from stegoscope import training

    monkeypatch.setattr(training, "CHECK_SYNCS", True)  # set_sync_debug_mode("error") around every member's step
    heads = "smooseg: {steps: 6, batch_size: 4, dim: 4}\nhp: {steps: 6, batch_size: 4, dim: 4, renew_every: 3, local_positives: false}\n"
    preset = write_micro_preset(tmp_path / "micro.yaml", extra=EXTRA.replace("stego]", "stego, smooseg, hp]") + heads)
    out = CliRunner().invoke(app, ["study", str(preset), "--cache", str(tmp_path / "c"), "--no-progress", "--device", "cuda"])
    assert out.exit_code == 0, out.output
