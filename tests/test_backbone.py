"""DINO backbones: the feature layout against a forward written out by hand, checkpoint formats,
positional-embedding interpolation and the offline error."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from stegoscope.models.backbone import BackboneError, build_backbone, parse_backbone


def layer_norm(x, w, b, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def hand_forward(sd, x, depth, heads, patch):
    """The DINO ViT feature by formulas: patch conv, CLS + pos, blocks, final norm, drop CLS."""
    b, _, height, width = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(b, -1, -1), t], 1) + sd["pos_embed"]
    dim = t.shape[-1]
    hd = dim // heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = layer_norm(t, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        qkv = (h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).reshape(b, -1, 3, heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (b, n, heads, hd)
        attn = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(hd), dim=-1)
        o = torch.einsum("bhnm,bmhd->bnhd", attn, v).reshape(b, -1, dim)
        t = t + o @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        h = layer_norm(t, sd[p + "norm2.weight"], sd[p + "norm2.bias"])
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        t = t + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    t = layer_norm(t, sd["norm.weight"], sd["norm.bias"])
    return t[:, 1:].reshape(b, height // patch, width // patch, dim)


def test_token_layout_matches_hand_written_forward():
    backbone = build_backbone("random:vit_micro_patch8", seed=3)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = backbone(x)
        expected = hand_forward(backbone.vit.state_dict(), x, depth=4, heads=3, patch=8)
    assert out.shape == (2, 28, 28, 96)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_pos_embed_interpolation_is_dino_style():
    backbone = build_backbone("random:vit_micro_patch8", seed=0)
    pos = backbone.vit.pos_embed.detach()
    torch.testing.assert_close(backbone.patch_pos_embed(28, 28), pos[:, 1:], atol=0, rtol=0)  # 224: untouched
    out = backbone.patch_pos_embed(40, 40)
    # DINO's code: bicubic by scale factor (w0 + 0.1) / sqrt(N); the CLS position stays as it is
    grid = pos[:, 1:].reshape(1, 28, 28, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, scale_factor=(40.1 / 28, 40.1 / 28), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 1600, -1)
    torch.testing.assert_close(out, expected)
    with torch.no_grad():
        assert backbone(torch.zeros(1, 3, 320, 240)).shape == (1, 40, 30, 96)
    with pytest.raises(ValueError, match="not divisible"):
        backbone(torch.zeros(1, 3, 100, 100))


def _official_checkpoints(tmp_path, state):
    plain = tmp_path / "dino_deitsmall8_300ep_pretrain.pth"
    torch.save(state, plain)
    head = {"head.mlp.0.weight": torch.zeros(4, 384), "head.last_layer.weight_g": torch.ones(4, 1)}
    training = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "student": {f"module.backbone.{k}": v + 1 for k, v in state.items()} | {f"module.{k}": v for k, v in head.items()},
            "teacher": {f"module.backbone.{k}": v for k, v in state.items()} | {f"module.{k}": v for k, v in head.items()},
            "optimizer": {}, "epoch": 300, "args": argparse.Namespace(arch="vit_small", patch_size=8),
        },
        training,
    )
    timm_file = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(timm_file))
    return [plain, training, timm_file]


def test_official_checkpoint_formats_load_identically(tmp_path):
    reference = build_backbone("random:vit_small_patch8", seed=7)
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x)
    for path in _official_checkpoints(tmp_path, reference.vit.state_dict()):
        loaded = build_backbone("vit_small_patch8", weights=path)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), expected, atol=0, rtol=0, msg=f"{path.name}")
    other = build_backbone("vit_small_patch8", weights=tmp_path / "checkpoint.pth")
    assert not torch.equal(other.vit.pos_embed, reference.vit.pos_embed + 1)  # teacher, not student


def test_wrong_checkpoint_is_a_clear_error(tmp_path):
    state = build_backbone("random:vit_micro_patch8").vit.state_dict()
    path = tmp_path / "micro.pth"
    torch.save(state, path)
    with pytest.raises(BackboneError, match="micro.pth"):
        build_backbone("vit_small_patch8", weights=path)
    with pytest.raises(BackboneError, match="not found"):
        build_backbone("vit_small_patch8", weights=tmp_path / "absent.pth")


def test_offline_without_weights_names_the_ways_out():
    with pytest.raises(BackboneError) as info:
        build_backbone("vit_base_patch8")
    assert "--weights" in str(info.value) and "random:vit_base_patch8" in str(info.value)


def test_backbone_names():
    assert parse_backbone("dino_vits8")[0].name == "vit_small_patch8"
    assert parse_backbone("vit_base_patch16_224.dino")[0].embed_dim == 768
    assert parse_backbone("random:vit_base_patch8") == (parse_backbone("vit_base_patch8")[0], True)
    with pytest.raises(BackboneError, match="unknown backbone"):
        parse_backbone("resnet50")
    with pytest.raises(BackboneError, match="random:vit_micro_patch8"):
        parse_backbone("vit_micro_patch8")


@pytest.mark.parametrize("arch", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_dinov2_official_and_timm_files_load_strictly_and_give_timms_tokens(tmp_path, arch):
    import timm

    spec, _ = parse_backbone(arch)
    torch.manual_seed(0)
    reference = timm.create_model(spec.timm_name, pretrained=False, num_classes=0).eval()  # timm's own model and forward
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    # the official layout (facebookresearch/dinov2's .pth): a mask token, and with registers the CLS
    # position inside pos_embed and the registers as register_tokens
    official = {k: v for k, v in state.items() if k != "reg_token"} | {"mask_token": torch.zeros(1, spec.embed_dim)}
    if spec.registers:
        cls_position = torch.randn(1, 1, spec.embed_dim)
        official |= {"pos_embed": torch.cat([cls_position, state["pos_embed"]], 1), "cls_token": state["cls_token"] - cls_position,
                     "register_tokens": state["reg_token"]}
    torch.save(official, tmp_path / spec.dino_file)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(1))  # DINOv2's own size: 37 × 37 patches
    with torch.no_grad():
        expected = reference.forward_features(x)[:, reference.num_prefix_tokens :].reshape(1, 37, 37, -1)
        for path in (tmp_path / spec.dino_file, tmp_path / "model.safetensors"):
            loaded = build_backbone(arch, weights=path)
            torch.testing.assert_close(loaded(x), expected, msg=path.name)
        assert loaded(x[:, :, :224, :322]).shape == (1, 16, 23, spec.embed_dim)  # patch 14: 224 → 16, 322 → 23
    assert spec.dino_url == f"https://dl.fbaipublicfiles.com/dinov2/{spec.dino_file.removesuffix('_pretrain.pth')}/{spec.dino_file}"
