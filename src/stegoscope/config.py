"""Typed study presets, read from YAML (``configs/*.yaml``, ``configs/paper/*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

PACKAGE_CONFIGS = Path(__file__).parent / "configs"  # wheel installs (force-included)
REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # editable installs


class ConfigError(ValueError):
    pass


@dataclass
class SplitConfig:
    """Extraction settings of one split."""

    res: int
    store_images: bool = False
    crop: str = "none"  # "five": five-crop 0.5 of the full-resolution image (STEGO's train splits)
    flip: bool = False  # also extract the mirrored images (flip TTA at evaluation)


@dataclass
class StegoConfig:
    """The STEGO head and its training (paper Table 1 + supplementary Table 1)."""

    steps: int = 5000
    batch_size: int = 16
    dim: int = 70  # D_STEGO
    pointwise: bool = True  # pointwise centring of the feature correspondence
    zero_clamp: bool = True
    lambda_self: float = 0.67  # pos_intra_weight
    lambda_knn: float = 0.25  # pos_inter_weight
    lambda_rand: float = 0.63  # neg_inter_weight
    b_self: float = 0.08  # pos_intra_shift
    b_knn: float = 0.02  # pos_inter_shift
    b_rand: float = 0.76  # neg_inter_shift
    lr: float = 5e-4
    dropout: float = 0.1
    feature_samples: int = 11  # 11×11 sample points
    neg_samples: int = 5
    knn_neighbors: int = 7  # partner drawn from ranks 1..7


@dataclass
class ProbeConfig:
    """Linear and cluster probes (supplementary Table 1)."""

    linear_lr: float = 5e-3
    cluster_lr: float = 5e-3
    extra_clusters: int = 0
    val_every: int = 100


@dataclass
class Preset:
    """A study preset: the dataset, the backbone and how each split is extracted."""

    name: str
    dataset: str
    backbone: str
    splits: dict[str, SplitConfig]
    data_root: str | None = None
    weights: str | None = None
    seed: int = 0
    n_classes: int | None = None
    interpolation: str = "nearest"
    batch_size: int = 32
    shard_images: int = 128
    synthetic: dict[str, Any] = field(default_factory=dict)
    dims: list[int] = field(default_factory=list)  # the sweep's embedding dimensions
    methods: list[str] = field(default_factory=lambda: ["dino", "pca", "rp", "hnne", "stego"])
    stego: StegoConfig = field(default_factory=StegoConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    path: Path | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: Path | None = None) -> Preset:
        raw = dict(raw)
        extract = raw.pop("extract", {}) or {}
        splits = extract.pop("splits", None)
        if not splits:
            raise ConfigError(f"{path}: extract.splits is missing (e.g. train: {{res: 224}})")
        merged = {**raw, **extract}
        known = {f.name for f in fields(cls)} - {"splits", "path"}
        unknown = sorted(set(merged) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
        try:
            split_cfgs = {name: SplitConfig(**cfg) for name, cfg in splits.items()}
            merged["stego"] = StegoConfig(**(merged.get("stego") or {}))
            merged["probe"] = ProbeConfig(**(merged.get("probe") or {}))
            return cls(splits=split_cfgs, path=path, **merged)
        except TypeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc


def preset_candidates(name: str) -> list[Path]:
    rel = [f"{name}.yaml", f"paper/{name}.yaml"]
    return [Path(name)] + [root / r for root in (PACKAGE_CONFIGS, REPO_CONFIGS) for r in rel]


def load_preset(name_or_path: str | Path) -> Preset:
    """A preset by file path or by name (``demo``, ``directory``, ``potsdam`` …)."""
    for path in preset_candidates(str(name_or_path)):
        if path.is_file():
            with open(path) as fh:
                raw = yaml.safe_load(fh) or {}
            return Preset.from_dict(raw, path)
    raise ConfigError(f"no preset {name_or_path!r}; available: {', '.join(available_presets())}")


def available_presets() -> list[str]:
    names = set()
    for root in (PACKAGE_CONFIGS, REPO_CONFIGS):
        names.update(p.stem for p in root.glob("*.yaml"))
        names.update(p.stem for p in root.glob("paper/*.yaml"))
    return sorted(names)
