"""The successors of STEGO trained from the cache: every head runs from the cache alone (the
backbone is never built), HP's attention weights at extraction, and the heads' quirks (HP's EMA,
pools and clipping; PriMaPs-EM's initialisation, EMA schedule and EM step)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import write_micro_preset
from stegoscope import cache_schema
from stegoscope.cli import app
from stegoscope.heads.base import HeadRun, TokenBatch
from stegoscope.heads.hp import HPParams, HPTrainer
from stegoscope.heads.primaps import PrimapsParams, PrimapsTrainer
from stegoscope.models import backbone as backbone_module
from stegoscope.models.backbone import attention_logits, build_backbone
from stegoscope.ops.hidden_positives import attention_neighbour_weights

HEADS = """smooseg: {steps: 6, batch_size: 4, dim: 4}
hp: {steps: 6, batch_size: 4, dim: 4, pool_size: 8, renew_every: 3, warmup: 2}
primaps: {steps: 6, batch_size: 4, init_images: 8}
stego-primaps: {steps: 6, batch_size: 4}
cause-mlp: &cause {steps: 4, probe_steps: 2, batch_size: 4, dim: 4, clusters: 8, mediator_steps: 3, window: 2,
                   projection_dim: 32, hidden: 32, bank_size: 4}
cause-tr: *cause
"""


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A cache with the preset's train (with attention weights and images) and val stores."""
    root = tmp_path_factory.mktemp("succ")
    preset = write_micro_preset(root / "succ.yaml", "succ", HEADS, train="{res: 32, attention: true, store_images: true}")
    result = CliRunner().invoke(app, ["extract", "--preset", str(preset), "--cache", str(root / "c"), "--workers", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    return preset, root / "c"


@pytest.mark.parametrize("head", ["smooseg", "hp", "primaps", "stego-primaps", "cause-mlp", "cause-tr"])
def test_each_successor_trains_from_the_cache_without_building_the_backbone(extracted, monkeypatch, head):
    preset, cache = extracted

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was built during head training")

    monkeypatch.setattr(backbone_module.DinoBackbone, "__init__", refuse)
    monkeypatch.setattr(backbone_module, "build_backbone", refuse)
    result = CliRunner().invoke(app, ["study", str(preset), "--cache", str(cache), "--only", head, "--set", "eval.crf=none",
                                      "--no-progress"])
    assert result.exit_code == 0, result.output
    folder = "train_" + head.replace("-", "_")
    (artefact,) = (cache / "artefacts" / folder).iterdir()
    metrics = json.loads((artefact / cache_schema.METRICS).read_text())
    assert [row["step"] for row in metrics["history"]] == [3, 6]  # CAUSE: 4 head steps + 2 probe steps
    assert 0 <= metrics["best"]["cluster/mIoU"] <= 100 and 0 <= metrics["best"]["linear/mIoU"] <= 100
    manifest = json.loads((artefact / cache_schema.MANIFEST).read_text())
    expected_dim = {"primaps": 96, "stego-primaps": 4}.get(head, 4)  # PriMaPs-EM: the tokens' width, or STEGO's D
    assert manifest["code_dim"] == expected_dim


def test_attention_logits_reproduce_the_blocks_attention():
    """softmax(logits) · v, projected, is what the block's own attention computes."""
    backbone = build_backbone("random:vit_micro_patch8")
    block = backbone.vit.blocks[-1]
    x = torch.randn(2, 1 + 16, backbone.embed_dim)
    logits = attention_logits(block, x)
    attn = block.attn
    v = attn.qkv(block.norm1(x)).reshape(2, 17, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[2]
    out = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 17, -1))
    assert torch.allclose(out, attn(block.norm1(x)), atol=1e-5)


def test_extraction_stores_hps_neighbour_weights_of_the_last_attention(extracted):
    _, cache = extracted
    train = next(p for p in cache_schema.list_feature_stores(cache) if "train" in p.name)
    store = cache_schema.open_complete_store(train)
    weights = store[cache_schema.ATTENTION][:]
    assert weights.shape == (16, 4, 4, 9) and weights.dtype == np.float16
    backbone = build_backbone("random:vit_micro_patch8")
    images = torch.from_numpy(store[cache_schema.IMAGES][:2]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    _, logits = backbone((images - mean) / std, attention=True)
    expected = attention_neighbour_weights(logits, (4, 4), prefix=1)
    assert np.allclose(weights[:2], expected.numpy(), atol=2e-3)
    assert (weights[:, 0, 0, [0, 1, 2, 3, 6]] == 0).all()  # a corner patch has no neighbours up or left


class _Batches:
    """Train batches of fixed tokens, as TokenBatches gives them (rows → (tokens, labels))."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.device = tokens, torch.device("cpu")

    def __len__(self) -> int:
        return len(self.tokens)

    def __call__(self, rows):
        return self.tokens[torch.as_tensor(np.asarray(rows))], torch.zeros(len(rows), 8, 8, dtype=torch.long)


def test_hp_updates_its_ema_before_the_step_keeps_the_token_pool_and_renews_the_code_pool():
    torch.manual_seed(0)
    trainer = HPTrainer(HPParams(steps=10, batch_size=2, pool_size=4, renew_every=2, warmup=0, ema=0.5, local_positives=False),
                        HeadRun(n_classes=2, dim=3), channels=5)
    head = trainer.make_head()
    data = _Batches(torch.randn(6, 5, 2, 2))
    trainer.begin(head, data, torch.Generator().manual_seed(0))
    assert trainer.pool_feats.shape == (4, 5) and trainer.pool_codes.shape == (4, 3)
    assert torch.allclose(trainer.pool_feats.norm(dim=1), torch.ones(4))
    with torch.no_grad():
        for p in head.head.parameters():
            p.add_(1.0)  # the live head moves away from its EMA copy
    live = [p.detach().clone() for p in head.head.parameters()]
    before = [p.detach().clone() for p in head.ema_head.parameters()]
    batch = TokenBatch(np.arange(2), data.tokens[:2], torch.zeros(2, 8, 8, dtype=torch.long), None)
    _, loss, logged = trainer.loss(head, batch, torch.Generator().manual_seed(0))
    for ema, old, new in zip(head.ema_head.parameters(), before, live):
        assert torch.allclose(ema, 0.5 * old + 0.5 * new)  # in the step, before the optimiser
    loss.backward()
    assert all(p.grad is None for p in head.ema_head.parameters())
    for p in head.head.parameters():
        p.grad = torch.full_like(p, 100.0)
    trainer.after_backward(head)
    assert torch.sqrt(sum(p.grad.square().sum() for p in head.head.parameters())) <= 10.0 + 1e-4  # clipped to grad_clip
    tokens_pool, codes_pool = trainer.pool_feats, trainer.pool_codes
    trainer.after_step(head, 1)
    assert trainer.pool_codes is codes_pool  # not renewed at step 1
    trainer.after_step(head, 2)
    assert trainer.pool_feats is tokens_pool and trainer.pool_codes is not codes_pool  # renewed every 2 steps, tokens never


def test_primaps_initialises_from_the_principal_directions_then_cosine_kmeans():
    torch.manual_seed(0)
    tokens = torch.randn(8, 4, 3, 3) * torch.tensor([5.0, 2.0, 1.0, 0.5])[None, :, None, None] + 1.0
    trainer = PrimapsTrainer(PrimapsParams(batch_size=4, init_images=8, init_epochs=0), HeadRun(n_classes=2, dim=4), channels=4)
    head = trainer.make_head()
    trainer.begin(head, _Batches(tokens), torch.Generator().manual_seed(0))
    x = tokens.permute(0, 2, 3, 1).reshape(-1, 4).double().numpy()
    values, vectors = np.linalg.eigh(np.cov(x.T, bias=True))
    top = vectors[:, ::-1][:, :2].T
    top *= np.sign(top[np.arange(2), np.abs(top).argmax(1)])[:, None]  # largest component positive
    assert np.allclose(head.v.detach().numpy(), top, atol=1e-5)
    assert torch.equal(head.g.detach(), torch.ones(2)) and torch.equal(head.teacher_v, head.v.detach())


def test_primaps_em_step_and_ema_schedule():
    trainer = PrimapsTrainer(PrimapsParams(ema_every=2, init_epochs=0), HeadRun(n_classes=2, dim=2), channels=2)
    head = trainer.make_head()
    with torch.no_grad():
        head.v.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        head.teacher_v.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # one image, 2×2 tokens = 2×2 pixels: the teacher says class 0 at three pixels, 1 at one
    feats = torch.tensor([[[2.0, 2.0], [2.0, 0.0]], [[0.0, 1.0], [0.0, 3.0]]])[None]
    ids = torch.tensor([[[1, 1], [1, 1]]], dtype=torch.uint8)  # one mask over the whole image
    batch = TokenBatch(np.arange(1), feats, torch.zeros(1, 2, 2, dtype=torch.long), None, {"mask_ids": ids})
    _, loss, _ = trainer.loss(head, batch, torch.Generator())
    logits = torch.einsum("bdhw,kd->bkhw", feats, head.weight().detach())  # at label size already
    weight = (1 - logits.softmax(1).mean(dim=(0, 2, 3))) ** 2
    # the mask's majority: 0
    expected = F.cross_entropy(logits, torch.zeros(1, 2, 2, dtype=torch.long), weight=weight, reduction="none").mean()
    assert abs(loss.item() - expected.item()) < 1e-6
    # EMA: θ_M is untouched until the original's global_step reaches ema_every, then copied (the 1st and 2nd updates)
    with torch.no_grad():
        head.v.add_(1.0)
    teacher = head.teacher_v.clone()
    at = lambda step: trainer.loss(head, dataclasses.replace(batch, step=step), torch.Generator())  # noqa: E731
    at(2)  # global_step 1: no update
    assert torch.equal(head.teacher_v, teacher)
    at(3)  # global_step 2: update 1, a hard copy
    assert torch.allclose(head.teacher_v, head.v.detach())
    with torch.no_grad():
        head.v.add_(1.0)
    at(5)  # update 2: a copy again (the original's second call copies, then averages with itself)
    assert torch.allclose(head.teacher_v, head.v.detach())
    before = head.teacher_v.clone()
    with torch.no_grad():
        head.v.add_(3.0)
    at(7)  # update 3: d = min(1 − 1/3, 0.98)
    assert torch.allclose(head.teacher_v, 2 / 3 * before + 1 / 3 * head.v.detach())


def test_mask_proposals_are_written_by_chunk_and_a_rerun_computes_only_the_missing_ones(extracted, monkeypatch):
    from stegoscope.cli import _context
    from stegoscope.pipeline import run_stage
    from stegoscope.stages import primaps_masks

    preset, cache = extracted
    monkeypatch.setattr(primaps_masks, "CHUNK", 4)  # 16 train images: 4 chunks
    ctx = _context(str(preset), cache, crf_workers=0, show_progress=False)
    params = ctx.preset.method_params("primaps")
    stage = ctx.primaps_masks(ctx.extract("train"), params.threshold, params.coverage, params.gain)
    run_stage(stage, force=True)
    chunks = sorted(stage.output.glob("mask_ids-*.npy"))
    lazy = cache_schema.load_mask_ids(stage.output)
    ids = np.asarray(lazy)
    assert len(chunks) == 4 and ids.shape == (16, 32, 32) and ids.dtype == np.uint8
    np.testing.assert_array_equal(lazy[[13, 2, 5, 5]], ids[[13, 2, 5, 5]])  # rows across chunks, in any order
    assert (ids != 255).any()  # proposals were found
    before = {p.name: p.stat().st_mtime_ns for p in chunks}
    chunks[2].unlink()  # as if killed before its chunk was written
    (stage.output / cache_schema.MANIFEST).unlink()
    run_stage(stage)
    after = {p.name: p.stat().st_mtime_ns for p in sorted(stage.output.glob("mask_ids-*.npy"))}
    assert after.keys() == before.keys()
    assert [name for name in after if after[name] != before[name]] == [chunks[2].name]  # only the missing chunk again
    np.testing.assert_array_equal(np.asarray(cache_schema.load_mask_ids(stage.output)), ids)


def test_cause_clusterbook_is_one_stage_shared_by_both_heads_lowers_the_modularity_loss_and_is_checked_on_read(extracted):
    from stegoscope.cli import _context
    from stegoscope.heads.cause import CLUSTERBOOK, load_clusterbook
    from stegoscope.ops.cause import init_clusterbook, modularity_loss
    from stegoscope.pipeline import run_stage
    from stegoscope.probing import TokenBatches
    from stegoscope.stages.cause_mediator import CauseMediatorStage

    preset, cache = extracted
    ctx = _context(str(preset), cache, crf_workers=0, show_progress=False)
    train = ctx.extract("train")
    mlp, tr = ctx.preset.method_params("cause-mlp"), ctx.preset.method_params("cause-tr")
    assert ctx.cause_mediator(train, mlp).key == ctx.cause_mediator(train, tr).key  # one clusterbook for both heads
    stage = CauseMediatorStage(cache, train, clusters=8, steps=30, batch_size=8, lr=mlp.mediator_lr, temperature=0.1, window=2,
                               seed=3, device="cpu", show_progress=False)
    assert not run_stage(stage).skipped and run_stage(stage).skipped  # keyed: a rerun is skipped
    tokens = TokenBatches(cache_schema.open_complete_store(train.output), torch.device("cpu"), 1e9)(np.arange(16))[0]
    sequence = tokens.flatten(2).transpose(1, 2)
    book = load_clusterbook(stage.output, 8, sequence.shape[-1])
    initial = init_clusterbook(8, sequence.shape[-1], torch.Generator().manual_seed(3))
    assert not torch.equal(book, initial)  # stored raw (CAUSE-TR reads the raw vectors), after training
    assert modularity_loss(sequence, book, 0.1) < modularity_loss(sequence, initial, 0.1)  # on every token, not the sample
    np.savez(stage.output / cache_schema.PAYLOAD, **{CLUSTERBOOK: np.full((8, sequence.shape[-1]), np.nan, np.float32)})
    with pytest.raises(Exception, match=str(stage.output)):
        load_clusterbook(stage.output, 8, sequence.shape[-1])


def test_results_of_a_head_trained_on_labels_say_so_in_the_results_and_table2(extracted):
    preset, cache = extracted
    common = ["--cache", str(cache), "--set", "eval.crf=none", "--no-progress"]
    for sets in ([], ["--set", "cause-mlp.label_leak=true"]):
        result = CliRunner().invoke(app, ["study", str(preset), "--only", "cause-mlp", *common, *sets])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["figures", "--cache", str(cache), "--study", "succ"])
    assert result.exit_code == 0, result.output
    rows = (cache / "studies" / "succ" / "results.csv").read_text().splitlines()
    leaked = [row for row in rows if ",cause-mlp," in row and "uses labels" in row]
    clean = [row for row in rows if ",cause-mlp," in row and "uses labels" not in row]
    assert leaked and clean  # with the leak on, and the preset's own (off)
    table = next((cache / "figures").rglob("table2.md")).read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines() if "CAUSE-MLP" in line] == [
        "CAUSE-MLP (stegoscope)", "CAUSE-MLP label_leak=True, uses labels (stegoscope)"]


def test_a_split_fraction_keeps_a_fixed_seeded_subset_of_the_rows_unchanged(tmp_path):
    from stegoscope.cli import _context
    from stegoscope.pipeline import run_stage

    preset = write_micro_preset(tmp_path / "frac.yaml", "frac")
    text = preset.read_text().replace("    val:", "    part: {split: train, res: 32, fraction: 0.25, fraction_seed: 4}\n    val:")
    preset.write_text(text)
    ctx = _context(str(preset), tmp_path / "c", crf_workers=0, show_progress=False)
    whole, part = ctx.extract("train"), ctx.extract("part")
    for stage in (whole, part):
        run_stage(stage)
    full, subset = (cache_schema.open_complete_store(s.output) for s in (whole, part))
    kept = np.sort(np.random.default_rng(4).permutation(16)[:4])  # 16 train images, no crops: a quarter
    assert subset.ids == [full.ids[i] for i in kept]
    np.testing.assert_array_equal(np.asarray(subset["tokens"][:]), np.asarray(full["tokens"][:])[kept])
    assert "fraction" not in whole.params()  # keyed only when below 1: the keys of stores made before stay valid
