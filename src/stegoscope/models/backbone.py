"""Frozen DINO and DINOv2 ViT backbones (timm modules) and the feature STEGO uses.

Feature = output of the last block after the final LayerNorm, CLS (and register) tokens dropped,
shaped (B, h, w, C) with h = H / patch, w = W / patch (reference §4.1). Positional embeddings are
interpolated bicubically DINO-style (with its +0.1 trick, which DINOv2 keeps) for inputs other than
the pretraining size (224 px for DINO, 518 px for DINOv2). DINOv2 has patch 14: resolutions must be
multiples of 14 (224 → 16×16 tokens, 322 → 23×23); its ``reg4`` variants carry 4 register tokens.

Weights come from one of three places, and their identity is part of the extraction key:

* ``--weights PATH``: an official DINO or DINOv2 ``.pth`` (plain state dict, or a training
  checkpoint whose ``teacher`` entry carries ``module.`` / ``backbone.`` prefixes), or a timm state
  dict (``.pth``, ``.bin`` or ``.safetensors``); identity = sha256 of the file.
* nothing: timm's hub copy of the weights (``timm/vit_small_patch8_224.dino`` …), downloaded
  by ``huggingface_hub`` where the machine is online; identity = sha256 of the file.
* ``random:<arch>``: seeded random initialisation, NOT pretrained; identity = arch + seed.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

RANDOM_PREFIX = "random:"


class BackboneError(ValueError):
    """A backbone cannot be built or its weights cannot be loaded."""


@dataclass(frozen=True)
class BackboneSpec:
    """One architecture: its timm pretrained tag and the official file name."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    timm_name: str | None = None  # None: no pretrained weights exist (random only)
    dino_file: str | None = None  # the official file (dl.fbaipublicfiles.com/dino[v2]/<stem>/<file>)
    registers: int = 0  # DINOv2's register tokens

    @property
    def dino_url(self) -> str | None:
        if self.dino_file is None:
            return None
        if self.dino_file.startswith("dinov2_"):
            return f"https://dl.fbaipublicfiles.com/dinov2/{self.dino_file.removesuffix('_pretrain.pth')}/{self.dino_file}"
        stem = self.dino_file.removesuffix(".pth")
        return f"https://dl.fbaipublicfiles.com/dino/{stem}/{self.dino_file}"


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        # timm's ViT-S/8 tag holds the 800-epoch DINO weights; STEGO and the study load the 300-epoch
        # file named here, so pass it with --weights for exact parity.
        BackboneSpec("vit_small_patch8", 384, 12, 6, 8, "vit_small_patch8_224.dino", "dino_deitsmall8_300ep_pretrain.pth"),
        BackboneSpec("vit_small_patch16", 384, 12, 6, 16, "vit_small_patch16_224.dino", "dino_deitsmall16_pretrain.pth"),
        BackboneSpec("vit_base_patch8", 768, 12, 12, 8, "vit_base_patch8_224.dino", "dino_vitbase8_pretrain.pth"),
        BackboneSpec("vit_base_patch16", 768, 12, 12, 16, "vit_base_patch16_224.dino", "dino_vitbase16_pretrain.pth"),
        # DINOv2 (LVD-142M): patch 14, layer scale; the reg4 variants add 4 register tokens.
        BackboneSpec("vit_small_patch14_dinov2", 384, 12, 6, 14, "vit_small_patch14_dinov2.lvd142m", "dinov2_vits14_pretrain.pth"),
        BackboneSpec("vit_base_patch14_dinov2", 768, 12, 12, 14, "vit_base_patch14_dinov2.lvd142m", "dinov2_vitb14_pretrain.pth"),
        BackboneSpec("vit_small_patch14_reg4_dinov2", 384, 12, 6, 14, "vit_small_patch14_reg4_dinov2.lvd142m",
                     "dinov2_vits14_reg4_pretrain.pth", registers=4),
        BackboneSpec("vit_base_patch14_reg4_dinov2", 768, 12, 12, 14, "vit_base_patch14_reg4_dinov2.lvd142m",
                     "dinov2_vitb14_reg4_pretrain.pth", registers=4),
        # A small ViT with patch 8 for CPU demos and tests: random weights only.
        BackboneSpec("vit_micro_patch8", 96, 4, 3, 8),
    )
}

ALIASES = {
    "dino_vits8": "vit_small_patch8", "dino_vits16": "vit_small_patch16",
    "dino_vitb8": "vit_base_patch8", "dino_vitb16": "vit_base_patch16",
    "dinov2_vits14": "vit_small_patch14_dinov2", "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2", "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
    **{spec.timm_name: name for name, spec in BACKBONES.items() if spec.timm_name},
    **{spec.timm_name.removesuffix(".dino"): name for name, spec in BACKBONES.items() if spec.timm_name},
}


def parse_backbone(name: str) -> tuple[BackboneSpec, bool]:
    """``vit_small_patch8`` / ``dino_vits8`` / ``vit_small_patch8_224.dino`` / ``random:<arch>``
    → (spec, random)."""
    random = name.startswith(RANDOM_PREFIX)
    arch = name.removeprefix(RANDOM_PREFIX)
    arch = ALIASES.get(arch, arch)
    if arch not in BACKBONES:
        known = ", ".join(sorted(BACKBONES))
        raise BackboneError(f"unknown backbone {name!r}; choose one of {known} (prefix random: for random weights)")
    spec = BACKBONES[arch]
    if not random and spec.timm_name is None:
        raise BackboneError(f"{arch} has no pretrained weights; use --backbone random:{arch}")
    return spec, random


def create_vit(spec: BackboneSpec) -> nn.Module:
    """The timm VisionTransformer of an architecture, without a classification head."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if spec.timm_name is not None:
        vit = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
    else:
        vit = VisionTransformer(
            img_size=224, patch_size=spec.patch_size, embed_dim=spec.embed_dim, depth=spec.depth,
            num_heads=spec.num_heads, mlp_ratio=4.0, qkv_bias=True, num_classes=0,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
    vit.patch_embed.strict_img_size = False  # any size divisible by the patch
    return vit


class DinoBackbone(nn.Module):
    """A frozen DINO ViT returning the last block's normalised patch tokens as (B, h, w, C)."""

    def __init__(self, spec: BackboneSpec, vit: nn.Module):
        super().__init__()
        self.spec = spec
        self.vit = vit.eval()
        for p in self.vit.parameters():
            p.requires_grad_(False)

    @property
    def patch_size(self) -> int:
        return self.spec.patch_size

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    def patch_pos_embed(self, rows: int, cols: int) -> torch.Tensor:
        """The patches' positional embedding for a rows × cols grid: DINO's (and DINOv2's)
        interpolation, bicubic with ``scale_factor=(rows + 0.1) / sqrt(N)``."""
        pos_embed = self.vit.pos_embed[:, 0 if self.vit.no_embed_class else 1 :]  # without the CLS position
        n, dim = pos_embed.shape[1:]
        side = math.sqrt(n)
        if n == rows * cols and rows == cols:
            return pos_embed
        grid = pos_embed.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
        # The +0.1 avoids floating-point truncation to one patch too few (DINO issue #8).
        grid = nn.functional.interpolate(
            grid.float(), scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic"
        ).to(pos_embed.dtype)
        if grid.shape[-2:] != (rows, cols):
            raise RuntimeError(f"positional embedding interpolated to {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
        return grid.permute(0, 2, 3, 1).reshape(1, -1, dim)

    def forward(self, x: torch.Tensor, attention: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, h, w, C) tokens of images (B, 3, H, W); with ``attention`` also the last block's
        pre-softmax attention logits q·kᵀ·scale (B, heads, T, T), float32, T = prefix + h·w
        (HP's local positives are made from them)."""
        b, _, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input {height}x{width} is not divisible by the patch size {p}")
        rows, cols = height // p, width // p
        vit = self.vit
        cls = vit.cls_token if vit.no_embed_class else vit.cls_token + vit.pos_embed[:, :1]
        prefix = [cls.expand(b, -1, -1)] + ([vit.reg_token.expand(b, -1, -1)] if vit.reg_token is not None else [])
        tokens = vit.patch_embed(x) + self.patch_pos_embed(rows, cols)  # (B, N, C)
        tokens = torch.cat([*prefix, tokens], dim=1)
        logits = None
        for i, block in enumerate(vit.blocks):
            if attention and i == len(vit.blocks) - 1:
                logits = attention_logits(block, tokens)
            tokens = block(tokens)
        tokens = vit.norm(tokens)
        patches = tokens[:, vit.num_prefix_tokens :].reshape(b, rows, cols, -1)
        return (patches, logits) if attention else patches


def attention_logits(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A timm ViT block's pre-softmax attention logits (B, heads, T, T) for its input tokens,
    computed as its attention does (fused attention never materialises them), in float32."""
    attn = block.attn
    b, n, _ = tokens.shape
    heads = attn.num_heads
    qkv = attn.qkv(block.norm1(tokens)).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return (q.float() * attn.scale) @ k.float().transpose(-2, -1)


# -- weights ------------------------------------------------------------------------------------


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The backbone state dict inside an official DINO or timm checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            # DINO training checkpoints pickle their argparse Namespace beside the tensors.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneError(f"{path}: cannot read weights ({exc})") from exc
    if not isinstance(obj, dict):
        raise BackboneError(f"{path}: expected a state dict, found {type(obj).__name__}")
    for entry in ("teacher", "state_dict", "model"):
        if entry in obj and isinstance(obj[entry], dict):
            obj = obj[entry]
            break
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in ("module.", "backbone."):
            key = key.removeprefix(prefix)
        state[key] = value
    return _from_official_dinov2(state)


def _from_official_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official DINOv2 state dict in timm's layout (others are returned as they are): the
    mask token dropped; with registers, ``register_tokens`` → ``reg_token`` and the CLS position
    folded into the CLS token (timm's register models keep no position for prefix tokens)."""
    if "mask_token" not in state and "register_tokens" not in state:
        return state
    state = {k: v for k, v in state.items() if k != "mask_token"}
    if "register_tokens" in state:
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    return state


def load_weights(vit: nn.Module, path: Path) -> None:
    """Load a checkpoint strictly on the backbone's own keys (heads and extras are ignored)."""
    state = read_checkpoint(path)
    own = vit.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise BackboneError(
            f"{path}: {len(missing)} backbone weights missing (e.g. {missing[:3]}); "
            "is this a DINO ViT checkpoint of the chosen --backbone?"
        )
    wrong = [k for k in own if state[k].shape != own[k].shape]
    if wrong:
        k = wrong[0]
        raise BackboneError(
            f"{path}: weight {k} has shape {tuple(state[k].shape)}, the backbone expects {tuple(own[k].shape)}; "
            "does --backbone match the checkpoint?"
        )
    vit.load_state_dict({k: state[k] for k in own}, strict=True)


def hub_weights_file(spec: BackboneSpec, download: bool = True) -> Path:
    """timm's hub copy of the DINO weights (downloaded once by huggingface_hub; with
    ``download=False`` only a copy already on this machine, without touching the network)."""
    from huggingface_hub import hf_hub_download

    repo = f"timm/{spec.timm_name}"
    try:
        return Path(hf_hub_download(repo, "model.safetensors", local_files_only=not download))
    except Exception as exc:  # offline, no cache, hub unreachable: all end here
        where = "from the hub" if download else "on this machine (this command does not download them; `extract` does)"
        raise BackboneError(
            f"cannot get the pretrained weights of {spec.name} {where} ({repo}: {type(exc).__name__}). "
            f"Pass --weights PATH with the official DINO file ({spec.dino_url}) or a timm state dict, or set "
            f"STEGOSCOPE_WEIGHTS to the folder holding it, or use --backbone random:{spec.name} for random weights (NOT pretrained)."
        ) from exc


def weights_identity(name: str, weights: Path | None, seed: int, file_hash, download: bool = True) -> dict[str, Any]:
    """What identifies the weights in the cache key, without building the model.

    ``file_hash(path)`` returns a file's sha256 (memoised by the caller); ``download``: whether
    timm's hub copy may be downloaded to hash it.
    """
    spec, random = parse_backbone(name)
    if random:
        if weights is not None:
            raise BackboneError("--weights and a random: backbone exclude each other")
        # timm's init code decides random weights; its version is part of their identity.
        return {"arch": spec.name, "source": "random", "seed": seed, "timm": metadata.version("timm")}
    path = Path(weights) if weights is not None else hub_weights_file(spec, download)
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found")
    return {"arch": spec.name, "source": "file" if weights is not None else "hub", "sha256": file_hash(path)}


def build_backbone(name: str, weights: Path | None = None, seed: int = 0) -> DinoBackbone:
    """A frozen DINO backbone in eval mode with its weights loaded (or seeded random ones)."""
    spec, random = parse_backbone(name)
    if random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vit = create_vit(spec)
    else:
        vit = create_vit(spec)
        load_weights(vit, Path(weights) if weights is not None else hub_weights_file(spec))
    return DinoBackbone(spec, vit)
