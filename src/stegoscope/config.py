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
