"""Dimensionality reducers behind one scikit-learn-like shape.

``fit(tokens) -> self`` takes a (n_tokens, C) dask or numpy array and streams it;
``transform(tokens) -> codes`` maps (..., C) to (..., D) float32; fitted attributes end in ``_``;
``state_dict()`` / ``from_state()`` persist them. PCA, random projection, h-NNE and raw DINO (the
identity) share it, so the probes do not care which one they get. Each comes with a frozen
parameter dataclass (a preset's ``reduce.<method>`` section); ``methods.py`` registers them.

Standardisation (``standardize``):

* ``train`` (default): z-score with the statistics of the fitted train tokens, fixed for every
  later batch.
* ``batch``: z-score each transformed batch with its own statistics — what the study's code does
  [QUIRK]: a token's code then depends on the other images of its batch. For parity.
* ``none``: no scaling (PCA still centres).
"""

from __future__ import annotations

import contextlib
import inspect
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any, ClassVar

import numpy as np
import torch

from .ops.hnne_map import ANN_NEIGHBOURS, HNNEMap, nearest_anchor_exact, needs_index, project
from .ops.streaming import batch_standardize, eigh_descending, moments_from_gram, safe_scale, shifted_gram

STANDARDIZE = ("train", "batch", "none")
RP_KINDS = ("gaussian", "orthogonal")


def one_of(name: str, value: str, choices: tuple[str, ...]) -> str:
    """``value``, if it is one of ``choices`` (else ValueError naming them)."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, not {value!r}")
    return value


@dataclass(frozen=True)
class IdentityParams:
    """Raw DINO tokens take no parameters."""


@dataclass(frozen=True)
class ReducerParams:
    """What every fitted reducer is given.

    Parameters
    ----------
    standardize : ``train`` | ``batch`` | ``none`` (module docstring).
    max_images : fit on a seeded random subset of this many train images (the study: 5000);
        None fits on all of them.
    """

    standardize: str = "train"
    max_images: int | None = None

    def __post_init__(self):
        one_of("standardize", self.standardize, STANDARDIZE)
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be a positive number of images or null, not {self.max_images}")


def _as_dask(tokens):
    import dask.array as da

    if isinstance(tokens, da.Array):
        return tokens.rechunk({1: -1})
    return da.from_array(np.asarray(tokens), chunks=(65536, -1))


_MOMENTS: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}  # by the dask name (a hash of the content) of the tokens


def _one_blas_thread_per_task(device: str, collection):
    """Under dask's threaded scheduler on the CPU, one BLAS thread in each of its threads: they are
    one per core already, and a multithreaded Gram in each oversubscribed the cores (the fit ran
    1.7× slower on 2 cores, benchmarks/pca_stream.py). Process-wide, for the scan only; the
    synchronous scheduler and dask.distributed workers keep theirs."""
    import dask.threaded
    from dask.base import get_scheduler

    if device != "cpu" or get_scheduler(collections=[collection]) is not dask.threaded.get:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def streamed_moments(tokens, device: str = "cpu") -> tuple[int, np.ndarray, np.ndarray]:
    """Exact (n, mean, population covariance) of a (n, C) token array, chunk → combine → aggregate.

    Each chunk becomes an augmented Gram matrix (``ops.streaming.shifted_gram``), dask sums them
    as a tree (so the same graph runs on a dask.distributed cluster), and the sum is turned into
    moments. Memory holds a few chunks at a time. The moments are kept for the process by the
    dask name of the tokens, a hash of what they are (:meth:`FeatureStore.token_matrix` names a
    store's by its path, key and completion): the RP fits of every D and PCA scan a store once.
    """
    x = _as_dask(tokens)
    if x.name in _MOMENTS:
        return _MOMENTS[x.name]
    c = x.shape[1]
    shift = np.asarray(x[: min(4096, x.shape[0])].astype(np.float64).mean(axis=0).compute())
    partial = x.map_blocks(
        lambda block: shifted_gram(block, shift, device)[None], new_axis=2, chunks=(1, c + 1, c + 1), dtype=np.float64
    )
    total = partial.sum(axis=0)
    with _one_blas_thread_per_task(device, total):
        gram = total.compute()
    moments = moments_from_gram(gram, shift)
    if len(_MOMENTS) >= 16:  # a few (C+1)² matrices: drop the oldest
        del _MOMENTS[next(iter(_MOMENTS))]
    _MOMENTS[x.name] = moments
    return moments


class Reducer(ABC):
    """Maps (..., C) tokens to (..., n_components) codes.

    Class attributes tell the stages how to use a reducer: ``needs_fit`` (False: the identity),
    ``serves_every_dim`` (one fit keeps every component: fitted once, truncated per D),
    ``seeded`` (the fit depends on the seed) and ``precompute_codes`` (the transform is too slow
    to run per batch, so whole stores are projected once).
    """

    method: ClassVar[str]
    needs_fit: ClassVar[bool] = True
    serves_every_dim: ClassVar[bool] = False
    seeded: ClassVar[bool] = True
    precompute_codes: ClassVar[bool] = False
    packages: ClassVar[tuple[str, ...]] = ()  # whose versions a fit's manifest records
    n_components: int | None

    @classmethod
    def by_name(cls, name: str) -> type[Reducer]:
        """The reducer class whose ``method`` is ``name`` (any subclass, wherever it is defined)."""
        todo = list(cls.__subclasses__())
        while todo:
            sub = todo.pop()
            if getattr(sub, "method", None) == name:
                return sub
            todo.extend(sub.__subclasses__())
        raise ValueError(f"no reducer class named {name!r}")

    @classmethod
    def from_params(cls, params, n_components: int | None = None, seed: int = 0, device: str = "cpu") -> Reducer:
        """A reducer from its parameter dataclass; fields the constructor does not take (such as
        ``max_images``, used by the stage that picks the images) are left out."""
        accepted = inspect.signature(cls).parameters
        given = {"n_components": n_components, "seed": seed, "device": device, **asdict(params)}
        return cls(**{k: v for k, v in given.items() if k in accepted})

    @classmethod
    def fit_info(cls) -> dict[str, Any]:
        """What besides the parameters decides a fit (library versions, fixed settings): keyed."""
        return {}

    @abstractmethod
    def fit(self, tokens) -> Reducer: ...

    @abstractmethod
    def transform(self, tokens: np.ndarray) -> np.ndarray: ...

    def transform_tensor(self, tokens: torch.Tensor) -> torch.Tensor:
        """:meth:`transform` of a tensor, on the tensor's device (float32). Reducers with a torch
        form override this; the others go through the host."""
        return torch.from_numpy(np.asarray(self.transform(tokens.cpu().numpy()), dtype=np.float32)).to(tokens.device)

    def _tensors(self, device: torch.device, *names: str) -> list[torch.Tensor]:
        """Fitted arrays as float64 tensors on ``device``, copied there once."""
        cache = self.__dict__.setdefault("_on_device", {}).setdefault(device, {})
        for name in names:
            if name not in cache:
                cache[name] = torch.as_tensor(np.asarray(getattr(self, name), dtype=np.float64), device=device)
        return [cache[name] for name in names]

    def with_components(self, n_components: int) -> Reducer:
        """The same fit returning ``n_components`` codes (reducers that serve every D)."""
        raise NotImplementedError(f"{type(self).__name__} is fitted per D")

    def params(self) -> dict[str, Any]:
        """Constructor arguments (JSON-able), stored in the manifest."""
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Fitted attributes as arrays."""
        return {}

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, np.ndarray]) -> Reducer:
        reducer = cls(**params)
        for name, value in state.items():
            setattr(reducer, name, value)
        return reducer


class _Standardized(Reducer):
    """Shared standardisation: train statistics (``mean_``, ``scale_``), batch, or none."""

    def __init__(self, standardize: str = "train"):
        self.standardize = one_of("standardize", standardize, STANDARDIZE)

    def standardized(self, tokens: np.ndarray) -> np.ndarray:
        """The tokens as the fit saw them: standardised as it was (not centred when ``standardize``
        is ``none``). h-NNE's anchors live in this space (the hierarchy stage's nearest anchors)."""
        return self._standardized(tokens, center_when_none=False)

    def _standardized(self, tokens: np.ndarray, center_when_none: bool) -> np.ndarray:
        x = np.asarray(tokens, dtype=np.float32)
        if self.standardize == "batch":
            return batch_standardize(x)
        if self.standardize == "train":
            return ((x - self.mean_) / self.scale_).astype(np.float32)
        return (x - self.mean_).astype(np.float32) if center_when_none else x

    def _project_tensor(self, tokens: torch.Tensor, components: torch.Tensor, center_when_none: bool) -> torch.Tensor:
        """Standardised tokens (float64, then float32 as the host path) times ``components.T``."""
        if self.standardize == "batch":  # [QUIRK] per-batch statistics: the host path computes them
            return Reducer.transform_tensor(self, tokens)
        mean, scale = self._tensors(tokens.device, "mean_", "scale_")
        x = tokens.double()
        if self.standardize == "train":
            x = (x - mean) / scale
        elif center_when_none:
            x = x - mean
        return x.float() @ components.T.float()


class IdentityReducer(Reducer):
    """Raw DINO tokens: the codes are the tokens themselves."""

    method = "identity"
    needs_fit = False
    seeded = False

    def __init__(self, n_components: int | None = None):
        self.n_components = n_components

    def fit(self, tokens) -> IdentityReducer:
        self.n_components = tokens.shape[-1]
        return self

    def transform(self, tokens: np.ndarray) -> np.ndarray:
        return np.asarray(tokens, dtype=np.float32)

    def transform_tensor(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens.float()


@dataclass(frozen=True)
class PCAParams(ReducerParams):
    """PCA: one exact fit keeps every component and serves every D."""


class PCA(_Standardized):
    """Exact PCA from a streamed mean and covariance (float64), eigendecomposed once.

    One fit keeps every component, so it serves every D: ``with_components(D)``.

    Parameters
    ----------
    n_components : number of components ``transform`` returns (None: all).
    standardize : ``train`` | ``batch`` | ``none`` (module docstring). With ``train`` or
        ``batch`` the eigendecomposition is of the correlation matrix (PCA of z-scored tokens,
        as the study's ``StandardScaler`` + ``PCA``); with ``none``, of the covariance.
    device : ``cpu`` or ``cuda`` for the per-chunk products.

    Attributes
    ----------
    mean_, scale_ : (C,) train mean and standard deviation.
    components_ : (C, C) principal axes as rows, by decreasing variance.
    explained_variance_ : (C,) variances along the axes (ddof=1, as scikit-learn).
    explained_variance_ratio_ : (C,) their share of the total.
    n_samples_ : number of tokens fitted.
    """

    method = "pca"
    serves_every_dim = True
    seeded = False  # the seed only picks the images of a max_images subset

    def __init__(self, n_components: int | None = None, standardize: str = "train", device: str = "cpu"):
        super().__init__(standardize)
        self.n_components = n_components
        self.device = device

    def fit(self, tokens) -> PCA:
        n, mean, cov = streamed_moments(tokens, self.device)
        self.n_samples_, self.mean_ = n, mean
        self.scale_ = safe_scale(np.diag(cov))
        matrix = cov / np.outer(self.scale_, self.scale_) if self.standardize != "none" else cov
        values, self.components_ = eigh_descending(matrix)
        self.explained_variance_ = values * n / max(n - 1, 1)
        self.explained_variance_ratio_ = values / values.sum()
        return self

    def with_components(self, n_components: int) -> PCA:
        """The same fit, returning ``n_components`` codes."""
        if not 0 < n_components <= len(self.components_):
            raise ValueError(f"n_components must be in 1..{len(self.components_)}, not {n_components}")
        other = PCA.from_state(self.params() | {"n_components": n_components}, self.state_dict())
        return other

    def transform(self, tokens: np.ndarray) -> np.ndarray:
        d = self.n_components or len(self.components_)
        z = self._standardized(tokens, center_when_none=True)
        return z @ self.components_[:d].T.astype(np.float32)

    def transform_tensor(self, tokens: torch.Tensor) -> torch.Tensor:
        d = self.n_components or len(self.components_)
        return self._project_tensor(tokens, self._tensors(tokens.device, "components_")[0][:d], center_when_none=True)

    def params(self) -> dict[str, Any]:
        return {"n_components": self.n_components, "standardize": self.standardize}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {
            "mean_": self.mean_, "scale_": self.scale_, "components_": self.components_,
            "explained_variance_": self.explained_variance_, "explained_variance_ratio_": self.explained_variance_ratio_,
            "n_samples_": np.asarray(self.n_samples_),
        }


@dataclass(frozen=True)
class RPParams(ReducerParams):
    """Random projection: ``kind`` gaussian (the study's code) or orthogonal (the paper's text)."""

    kind: str = "gaussian"

    def __post_init__(self):
        super().__post_init__()
        one_of("kind", self.kind, RP_KINDS)


class RandomProjection(_Standardized):
    """Seeded random projection to ``n_components`` dimensions.

    ``kind="gaussian"``: entries N(0, 1/D), the matrix scikit-learn's
    ``GaussianRandomProjection(n_components=D, random_state=seed)`` draws (the study's code).
    ``kind="orthogonal"``: the same draw with orthonormalised columns (QR), as the paper's text
    describes.

    Attributes
    ----------
    components_ : (D, C) projection matrix; codes = standardised tokens @ components_.T.
    mean_, scale_ : (C,) train statistics (``standardize="train"``).
    """

    method = "rp"

    def __init__(self, n_components: int, kind: str = "gaussian", seed: int = 0, standardize: str = "train", device: str = "cpu"):
        super().__init__(standardize)
        one_of("kind", kind, RP_KINDS)
        self.n_components, self.kind, self.seed, self.device = n_components, kind, seed, device

    def fit(self, tokens) -> RandomProjection:
        c = tokens.shape[-1]
        if self.standardize == "train":
            _, self.mean_, cov = streamed_moments(tokens, self.device)
            self.scale_ = safe_scale(np.diag(cov))
        else:
            self.mean_, self.scale_ = np.zeros(c), np.ones(c)
        rng = np.random.RandomState(self.seed)  # scikit-learn's generator, for parity with its draw
        gaussian = rng.normal(0.0, 1.0 / np.sqrt(self.n_components), size=(self.n_components, c))
        if self.kind == "orthogonal":
            q, r = np.linalg.qr(gaussian.T)
            gaussian = (q * np.sign(np.diag(r))).T
        self.components_ = gaussian
        return self

    def transform(self, tokens: np.ndarray) -> np.ndarray:
        z = self._standardized(tokens, center_when_none=False)
        return z @ self.components_.T.astype(np.float32)

    def transform_tensor(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._project_tensor(tokens, self._tensors(tokens.device, "components_")[0], center_when_none=False)

    def params(self) -> dict[str, Any]:
        return {"n_components": self.n_components, "kind": self.kind, "seed": self.seed, "standardize": self.standardize}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"mean_": self.mean_, "scale_": self.scale_, "components_": self.components_}


def hnne_version() -> str:
    return metadata.version("hnne")


@dataclass(frozen=True)
class HNNEParams(ReducerParams):
    """h-NNE: fitted on a seeded sample of ``fit_tokens`` tokens; ``radius`` and
    ``ann_threshold`` at hnne 0.1.x's defaults (the paper's)."""

    fit_tokens: int = 1_000_000
    radius: float = 0.4
    ann_threshold: int = 40_000

    def __post_init__(self):
        super().__post_init__()
        if self.fit_tokens < 2:
            raise ValueError(f"fit_tokens must be at least 2, not {self.fit_tokens}")


class HNNE(_Standardized):
    """h-NNE (the ``hnne`` package, legacy ``v1`` algorithm as in the paper), cosine metric,
    fitted on a seeded sample of ``fit_tokens`` tokens.

    Its transform is expensive (nearest finest-level anchor, then a piecewise-affine map), so the
    study projects whole stores once; see ``stages/reduce.py``. The fit keeps only the arrays that
    map reads (:class:`~stegoscope.ops.hnne_map.HNNEMap`) and the hierarchy's levels, so its
    artefact is arrays, never a pickled ``hnne.HNNE``.

    Attributes
    ----------
    map_ : the fitted map of new points (anchors, scaler, PCA, inflation, placement).
    anchor_levels_ : (K, L) each finest-level anchor's cluster at every level of the hierarchy.
    level_sizes_ : (L,) clusters per level.
    mean_, scale_ : statistics of the fit sample (``standardize="train"``).
    """

    method = "hnne"
    packages = ("hnne",)
    precompute_codes = True
    state_format = "arrays"  # part of the fit's key: fits stored as a pickled hnne.HNNE are refitted

    def __init__(
        self, n_components: int, fit_tokens: int = 1_000_000, seed: int = 0, standardize: str = "train",
        radius: float = 0.4, ann_threshold: int = 40_000,
    ):
        super().__init__(standardize)
        self.n_components, self.fit_tokens, self.seed = n_components, fit_tokens, seed
        self.radius, self.ann_threshold = radius, ann_threshold

    def fit(self, tokens) -> HNNE:
        from hnne import HNNE as _HNNE

        x = _as_dask(tokens)
        n = x.shape[0]
        rows = np.sort(np.random.default_rng(self.seed).choice(n, size=min(self.fit_tokens, n), replace=False))
        sample = np.asarray(x[rows].compute(), dtype=np.float32)
        self.mean_ = sample.mean(axis=0, dtype=np.float64)
        self.scale_ = safe_scale(sample.var(axis=0, dtype=np.float64))
        z = batch_standardize(sample) if self.standardize != "none" else sample
        # Parity settings: hnne 0.1.x defaults (radius 0.4, ann_threshold 40000) and its v1 algorithm.
        version = {"hnne_version": "v1"} if int(hnne_version().split(".")[0]) >= 2 else {}
        model = _HNNE(
            n_components=self.n_components, metric="cosine", radius=self.radius, ann_threshold=self.ann_threshold,
            random_state=self.seed, **version,
        )
        model.fit(z)
        self.map_ = HNNEMap.from_model(model)
        partitions = np.asarray(model.hierarchy_parameters.partitions)
        first_member = np.unique(partitions[:, 0], return_index=True)[1]  # anchor i is cluster i of the finest level
        self.anchor_levels_ = partitions[first_member].astype(np.int64)
        self.level_sizes_ = np.array([len(np.unique(level)) for level in partitions.T], dtype=np.int64)
        return self

    def transform(self, tokens: np.ndarray) -> np.ndarray:
        x = np.asarray(tokens)
        z = self._standardized(x, center_when_none=False).reshape(-1, x.shape[-1])
        return np.asarray(project(z, self._nearest(z), self.map_), dtype=np.float32).reshape(*x.shape[:-1], self.n_components)

    def _nearest(self, z: np.ndarray) -> np.ndarray:
        """Each point's nearest anchor (cosine), through an approximate index where hnne uses one
        (built once per reducer, as hnne caches it)."""
        if not needs_index(len(z), len(self.map_.anchors)):
            return nearest_anchor_exact(z, self.map_.anchors, "cosine")
        if getattr(self, "_anchor_index", None) is None:
            from pynndescent import NNDescent  # the index and settings hnne's transform uses

            self._anchor_index = NNDescent(self.map_.anchors, n_neighbors=ANN_NEIGHBOURS, metric="cosine")
            self._anchor_index.prepare()
        return self._anchor_index.query(z, k=ANN_NEIGHBOURS)[0][:, 0]

    @classmethod
    def fit_info(cls) -> dict[str, Any]:
        return {"hnne": hnne_version(), "algorithm": "v1", "metric": "cosine", "state": cls.state_format}

    def params(self) -> dict[str, Any]:
        return {
            "n_components": self.n_components, "fit_tokens": self.fit_tokens, "seed": self.seed,
            "standardize": self.standardize, "radius": self.radius, "ann_threshold": self.ann_threshold,
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"mean_": self.mean_, "scale_": self.scale_, "anchor_levels_": self.anchor_levels_,
                "level_sizes_": self.level_sizes_, **self.map_.to_arrays("map_")}

    @classmethod
    def from_state(cls, params: dict[str, Any], state: dict[str, np.ndarray]) -> HNNE:
        if "model_" in state:
            raise ValueError("an h-NNE fit stored by an earlier version (a pickled hnne.HNNE, which is never read); "
                             "refit it: rerun the command that made it (its key has changed, so a study refits it)")
        reducer = cls(**params)
        reducer.mean_, reducer.scale_ = state["mean_"], state["scale_"]
        reducer.anchor_levels_, reducer.level_sizes_ = state["anchor_levels_"], state["level_sizes_"]
        reducer.map_ = HNNEMap.from_arrays(state, "map_")
        return reducer


class StegoHeadReducer(Reducer):
    """A trained STEGO head (eval mode: no dropout) as a reducer: tokens → code.

    Attributes
    ----------
    w1_, b1_ : linear branch (D, C), (D,).   w2a_, b2a_, w2b_, b2b_ : the 1×1–ReLU–1×1 branch.
    """

    method = "stego"
    needs_fit = False

    def __init__(self, n_components: int | None = None):
        self.n_components = n_components

    def fit(self, tokens) -> StegoHeadReducer:
        raise NotImplementedError("a STEGO head is trained by `stegoscope train-stego` or imported by `import-stego`")

    @classmethod
    def from_head(cls, head) -> StegoHeadReducer:
        conv = lambda m: (m.weight.detach().double().numpy()[:, :, 0, 0], m.bias.detach().double().numpy())  # noqa: E731
        reducer = cls(head.cluster1[0].out_channels)
        reducer.w1_, reducer.b1_ = conv(head.cluster1[0])
        if head.cluster2 is not None:
            (reducer.w2a_, reducer.b2a_), (reducer.w2b_, reducer.b2b_) = conv(head.cluster2[0]), conv(head.cluster2[2])
        return reducer

    def transform(self, tokens: np.ndarray) -> np.ndarray:
        x = np.asarray(tokens, dtype=np.float32)
        code = x @ self.w1_.T.astype(np.float32) + self.b1_.astype(np.float32)
        if hasattr(self, "w2a_"):
            hidden = np.maximum(x @ self.w2a_.T.astype(np.float32) + self.b2a_.astype(np.float32), 0)
            code += hidden @ self.w2b_.T.astype(np.float32) + self.b2b_.astype(np.float32)
        return code

    def transform_tensor(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.float()
        branch = lambda *names: [t.float() for t in self._tensors(x.device, *names)]  # noqa: E731
        w1, b1 = branch("w1_", "b1_")
        code = x @ w1.T + b1
        if hasattr(self, "w2a_"):
            w2a, b2a, w2b, b2b = branch("w2a_", "b2a_", "w2b_", "b2b_")
            code += (x @ w2a.T + b2a).clamp_min(0) @ w2b.T + b2b
        return code

    def params(self) -> dict[str, Any]:
        return {"n_components": self.n_components}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in vars(self).items() if k.endswith("_")}

