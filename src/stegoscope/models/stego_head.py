"""STEGO's segmentation head (reference §4.2) and the reader of released STEGO checkpoints."""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn


class StegoHead(nn.Module):
    """Channel dropout, then a linear 1×1 branch plus a 1×1–ReLU–1×1 branch, summed, to ``dim``.

    The two branches see independent dropout draws, as STEGO. Parameter names follow STEGO's
    ``net.cluster1`` / ``net.cluster2`` so released weights load as they are. SmooSeg's and HP's
    heads are the same shape (SmooSeg: SiLU and dropout 0.2).
    """

    def __init__(self, in_dim: int, dim: int, dropout: float = 0.1, nonlinear: bool = True, activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout)
        self.cluster1 = nn.Sequential(nn.Conv2d(in_dim, dim, 1))
        self.cluster2 = nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), activation(), nn.Conv2d(in_dim, dim, 1)) if nonlinear else None

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) backbone features → (B, dim, h, w) code (not normalised)."""
        code = self.cluster1(self.dropout(feats))
        if self.cluster2 is not None:
            code = code + self.cluster2(self.dropout(feats))
        return code


# -- released checkpoints ------------------------------------------------------------------------

class Unresolved:
    """Stands in for a settings class of a released checkpoint (omegaconf, Lightning) that is not
    imported here; keeps its constructor arguments and state, runs nothing."""

    _module = _name = ""
    args: tuple = ()
    kwargs: dict = {}
    state: Any = None

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<unresolved {self._module}.{self._name}>"


# Besides tensors and plain containers (torch's weights-only loader), the globals a released STEGO
# checkpoint (Lightning 1.4, omegaconf 2.1) names, each read into an inert stand-in. Exact names,
# no prefixes: anything else is refused before it is called.
CHECKPOINT_CLASSES = (
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata", "omegaconf.nodes.AnyNode", "omegaconf.nodes.StringNode", "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode", "omegaconf.nodes.BooleanNode", "typing.Any",
)
CHECKPOINT_DICTS = ("pytorch_lightning.utilities.parsing.AttributeDict", "lightning_fabric.utilities.data.AttributeDict",
                    "lightning.fabric.utilities.data.AttributeDict")  # dict subclasses: read as ordered dicts


def _stand_ins() -> list[tuple[type, str]]:
    out: list[tuple[type, str]] = [(OrderedDict, name) for name in CHECKPOINT_DICTS]  # the loader fills only plain dicts
    for name in CHECKPOINT_CLASSES:
        module, _, cls = name.rpartition(".")
        out.append((type(cls, (Unresolved,), {"_module": module, "_name": cls}), name))
    return out


def read_stego_checkpoint(path: Path) -> dict[str, Any]:
    """``state_dict`` and ``hyper_parameters`` of an original STEGO ``.ckpt`` (Lightning pickle),
    read by torch's weights-only loader with the stand-ins above: no code in the file runs, and
    a file that names any other global is refused, naming it."""
    try:
        with torch.serialization.safe_globals(_stand_ins()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's loader raises UnpicklingError, RuntimeError … for a bad file
        refused = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(exc), re.IGNORECASE)
        if refused:
            name = refused.group(1) if "." in refused.group(1) else f"builtins.{refused.group(1)}"  # torch drops "builtins."
            raise ValueError(f"{path}: refused: it names {name}, which a STEGO checkpoint does not hold "
                             "(only tensors, containers and Lightning/omegaconf settings are read; nothing in it was run)") from None
        text = str(exc).split("WeightsUnpickler error:")[-1]  # torch's own detail, without its advice to load unsafely
        first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"{path}: cannot read the checkpoint ({first})") from None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "net.cluster1.0.weight" not in state:
        raise ValueError(f"{path}: not a STEGO checkpoint (no state_dict with net.cluster1.*)")
    return {"state_dict": state, "hyper_parameters": ckpt.get("hyper_parameters", {})}


def find_setting(obj: Any, key: str, depth: int = 0) -> Any:
    """A value named ``key`` anywhere in a (possibly unresolved) hyper-parameter object."""
    if depth > 12:
        return None
    if isinstance(obj, dict):
        value = obj.get(key)
        if isinstance(value, Unresolved) and isinstance(value.state, dict):  # omegaconf's AnyNode
            value = value.state.get("_val")
        if value is not None and not isinstance(value, (dict, Unresolved)):
            return value
        children = list(obj.values())
    elif isinstance(obj, Unresolved):
        children = [obj.state, obj.args, obj.kwargs]
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    else:
        return None
    for child in children:
        found = find_setting(child, key, depth + 1)
        if found is not None:
            return found
    return None
