"""STEGO's segmentation head (reference §4.2) and the reader of released STEGO checkpoints."""

from __future__ import annotations

import pickle
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

_SAFE_BUILTINS = {"set", "frozenset", "dict", "list", "tuple", "int", "float", "complex", "bytes", "bytearray",
                  "slice", "range", "bool", "str", "object"}
_TRUSTED_MODULES = ("torch", "collections", "numpy", "_codecs", "copyreg")


class Unresolved:
    """Stands in for a class that is not importable here (Lightning, omegaconf, …); keeps its state."""

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


class _LenientUnpickler(pickle.Unpickler):
    """Resolves torch / numpy / collections classes; anything else becomes an inert stand-in, so
    a Lightning checkpoint loads without Lightning and without running foreign code."""

    def find_class(self, module: str, name: str):
        if module == "builtins" and name in _SAFE_BUILTINS:
            return super().find_class(module, name)
        if module.split(".")[0] in _TRUSTED_MODULES:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                pass
        return type(name, (Unresolved,), {"_module": module, "_name": name})


class _PickleModule:
    Unpickler = _LenientUnpickler
    load = staticmethod(lambda f, **kw: _LenientUnpickler(f, **kw).load())


def read_stego_checkpoint(path: Path) -> dict[str, Any]:
    """``state_dict`` and ``hyper_parameters`` of an original STEGO ``.ckpt`` (Lightning pickle)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    except Exception as exc:
        raise ValueError(f"{path}: cannot read the checkpoint ({exc})") from exc
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
