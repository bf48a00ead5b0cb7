"""h-NNE's map of new points (``hnne.HNNE.transform``, hnne 2.0.1, legacy v1 fit) as arrays in,
arrays out, so a fitted h-NNE is stored as the arrays below and never as a pickled object.

A new point goes to its nearest finest-level anchor (in the fit space), is projected by the fit's
standard scaler and PCA, spread around its anchor (for D ≤ 3: the per-anchor normalisations
"inflation" of the anchor's partition, the norm capped at 3), then placed relative to the
anchor's projected position, scaled from its points' radius to the anchor's radius. The order
and dtypes of the arithmetic are hnne's and scikit-learn's, so the result is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

ANN_PAIR_LIMIT = 400e6  # hnne: above this many (point, anchor) pairs, an approximate index (NNDescent)
ANN_NEIGHBOURS = 30
MAX_NORM = 3.0  # hnne: an inflated point may reach this many stds of its anchor's partition


@dataclass(frozen=True)
class HNNEMap:
    """What ``transform`` reads of a fitted h-NNE (K anchors, C input channels, D outputs, T
    inflation rounds; the ``inflation_*`` arrays are empty unless D ≤ 3)."""

    anchors: np.ndarray  # (K, C) finest-level centroids in the fit space
    scaler_mean: np.ndarray  # (C,) the fit's StandardScaler
    scaler_scale: np.ndarray  # (C,)
    pca_mean: np.ndarray  # (C,) the fit's PCA (no whitening)
    pca_components: np.ndarray  # (D, C)
    inflation_rotations: np.ndarray  # (T, D, D)
    inflation_means: np.ndarray  # (T, 2, K, D): before and after each rotation
    inflation_stds: np.ndarray  # (T, 2, K, D)
    anchor_positions: np.ndarray  # (K, D) projected anchors
    anchor_radii: np.ndarray  # (K,)
    point_means: np.ndarray  # (K, D) mean of each anchor's projected points
    point_max_radii: np.ndarray  # (K,)

    @classmethod
    def from_model(cls, model) -> HNNEMap:
        """The arrays of a fitted ``hnne.HNNE`` (v1); refuses what this map does not reproduce."""
        h, p = model.hierarchy_parameters, model.projection_parameters
        if p.pca is None or p.pca.whiten or not (p.scaler.with_mean and p.scaler.with_std):
            raise ValueError("only h-NNE fits with a PCA preliminary embedding (unwhitened) and a standard scaler are stored")
        d, k = p.pca.components_.shape[0], len(h.lowest_level_centroids)
        rounds = p.inflation_params_list[-1] if d <= 3 and p.inflation_params_list else []
        dtype = p.pca.components_.dtype
        empty = np.zeros((0, 2, k, d), dtype=dtype)
        return cls(
            anchors=h.lowest_level_centroids, scaler_mean=p.scaler.mean_, scaler_scale=p.scaler.scale_,
            pca_mean=p.pca.mean_, pca_components=p.pca.components_,
            inflation_rotations=np.array([rot for rot, _, _ in rounds]).reshape(len(rounds), d, d),
            inflation_means=np.array([[m1, m2] for _, (m1, _), (m2, _) in rounds]) if rounds else empty,
            inflation_stds=np.array([[s1, s2] for _, (_, s1), (_, s2) in rounds]) if rounds else empty,
            anchor_positions=p.projected_centroids[-2], anchor_radii=p.projected_centroid_radii[-1],
            point_means=p.points_means[-1], point_max_radii=p.points_max_radii[-1],
        )

    def to_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {prefix + f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], prefix: str) -> HNNEMap:
        missing = [prefix + f.name for f in fields(cls) if prefix + f.name not in arrays]
        if missing:
            raise ValueError(f"an h-NNE state without {', '.join(missing)}")
        return cls(**{f.name: arrays[prefix + f.name] for f in fields(cls)})


def nearest_anchor_exact(points: np.ndarray, anchors: np.ndarray, metric: str) -> np.ndarray:
    from sklearn.metrics import pairwise_distances

    return np.argmin(pairwise_distances(points, anchors, metric=metric), axis=1)


def needs_index(n_points: int, n_anchors: int) -> bool:
    """Whether hnne looks anchors up in an approximate (NNDescent) index rather than exactly."""
    return n_anchors * n_points > ANN_PAIR_LIMIT


def project(points: np.ndarray, nearest: np.ndarray, m: HNNEMap) -> np.ndarray:
    """(N, C) float points and their nearest anchors → (N, D) h-NNE coordinates."""
    x = points.copy()
    x -= m.scaler_mean.astype(x.dtype)  # StandardScaler.transform, in place on the input's dtype
    x /= m.scaler_scale.astype(x.dtype)
    x = x @ m.pca_components.T  # PCA.transform: centred after the projection
    x -= m.pca_mean.reshape(1, -1) @ m.pca_components.T
    if len(m.inflation_rotations):
        for rot, (m1, m2), (s1, s2) in zip(m.inflation_rotations, m.inflation_means, m.inflation_stds):
            x = (x - m1[nearest]) / s1[nearest]
            x = np.dot(x, rot)
            x = (x - m2[nearest]) / s2[nearest]
            x = np.dot(x, np.linalg.inv(rot))
        norms = np.linalg.norm(x, axis=-1)
        x = np.where(np.expand_dims(norms > MAX_NORM, -1), MAX_NORM * x / np.expand_dims(norms, -1), x)
    max_radii = np.expand_dims(m.point_max_radii[nearest], -1)
    radii = np.expand_dims(m.anchor_radii[nearest], -1)
    normalized = (x - m.point_means[nearest]) / max_radii
    return m.anchor_positions[nearest] + normalized * radii
