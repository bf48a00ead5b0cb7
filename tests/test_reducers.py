"""PCA / RP / h-NNE against scikit-learn and hand formulas; streamed equals in-memory; the
reduce stage end to end (artefacts, h-NNE derived stores, a dask.distributed cluster)."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA as SkPCA
from sklearn.preprocessing import StandardScaler
from sklearn.random_projection import GaussianRandomProjection

from conftest import ok
from stegoscope import cache_schema
from stegoscope.cache_schema import StoreLayout
from stegoscope.compute import dask_scheduler
from stegoscope.records import StoreAttrs
from stegoscope.reducers import PCA, IdentityReducer, RandomProjection
from stegoscope.stages.reduce import load_reducer


def dino_like_tokens(n_images=24, grid=(4, 5), channels=24, seed=0):
    """fp16 tokens with a decaying spectrum, and a few channels whose mean dwarfs their spread."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(channels, channels)) * np.geomspace(4, 0.05, channels)[:, None]
    offset = np.zeros(channels)
    offset[:3] = [40.0, -25.0, 60.0]
    x = rng.normal(size=(n_images, *grid, channels)) @ mixing + offset
    return x.astype(np.float16)


def make_store(path, tokens, shard=5):
    n, h, w, c = tokens.shape
    store = cache_schema.create_feature_store(path, StoreLayout(n, (h, w), c, (h * 8, w * 8), False, False, shard),
                                              StoreAttrs(key="k" * 64, stage="test"))
    for s in range(store.layout.n_shards):
        sl = store.layout.shard_slice(s)
        store.write_shard(s, {cache_schema.TOKENS: tokens[sl], cache_schema.POOLED: tokens[sl].mean((1, 2)).astype(np.float32),
                              cache_schema.IDS: np.array([str(i) for i in range(sl.start, sl.stop)])})
    store.mark_complete()
    return store


def assert_same_axes(a, b, tol=1e-4):
    """Rows equal up to sign."""
    signs = np.sign((a * b).sum(axis=1))
    np.testing.assert_allclose(a * signs[:, None], b, atol=tol)


@pytest.mark.parametrize("standardize", ["train", "none"])
def test_streamed_pca_equals_scikit_learn(tmp_path, standardize):
    tokens = dino_like_tokens()
    store = make_store(tmp_path / "s.zarr", tokens)
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    streamed = PCA(standardize=standardize).fit(store.token_matrix(images_per_chunk=3))
    in_memory = PCA(standardize=standardize).fit(flat)
    reference = SkPCA().fit(StandardScaler().fit_transform(flat) if standardize == "train" else flat)
    np.testing.assert_allclose(streamed.explained_variance_ratio_, reference.explained_variance_ratio_, atol=1e-4)
    np.testing.assert_allclose(streamed.explained_variance_ / reference.explained_variance_[0],
                               reference.explained_variance_ / reference.explained_variance_[0], atol=1e-4)
    k = 10  # the well-separated leading axes
    assert_same_axes(streamed.components_[:k], reference.components_[:k])
    np.testing.assert_allclose(streamed.components_, in_memory.components_, atol=1e-4)
    np.testing.assert_allclose(streamed.mean_, flat.mean(0), rtol=1e-6, atol=1e-4)

    codes = streamed.with_components(5).transform(tokens[:2])
    z = (tokens[:2].astype(np.float64) - flat.mean(0)) / (flat.std(0) if standardize == "train" else 1)
    expected = z @ streamed.components_[:5].T
    assert codes.shape == (2, 4, 5, 5)
    np.testing.assert_allclose(codes, expected, rtol=1e-4, atol=1e-3)


def test_batch_standardization_reproduces_the_study_quirk():
    tokens = dino_like_tokens(n_images=6)
    pca = PCA(n_components=4, standardize="batch").fit(tokens.reshape(-1, tokens.shape[-1]))
    batch = tokens[:2].astype(np.float64)
    flat = batch.reshape(-1, batch.shape[-1])
    expected = (batch - flat.mean(0)) / flat.std(0) @ pca.components_[:4].T  # StandardScaler().fit_transform(batch)
    np.testing.assert_allclose(pca.transform(tokens[:2]), expected, rtol=1e-4, atol=1e-3)
    assert not np.allclose(pca.transform(tokens[:1]), pca.transform(tokens[:2])[:1], atol=1e-3)  # depends on the batch


def test_random_projection():
    x = np.random.default_rng(0).normal(size=(50, 384)).astype(np.float32)
    a = RandomProjection(64, seed=3, standardize="none").fit(x)
    b = RandomProjection(64, seed=3, standardize="none").fit(x)
    np.testing.assert_array_equal(a.components_, b.components_)
    np.testing.assert_array_equal(a.components_, GaussianRandomProjection(64, random_state=3).fit(x.astype(np.float64)).components_)
    assert abs(a.components_.var() / (1 / 64) - 1) < 0.03 and abs(a.components_.mean()) < 3 * np.sqrt(1 / 64 / a.components_.size)
    ortho = RandomProjection(64, kind="orthogonal", seed=3, standardize="none").fit(x)
    np.testing.assert_allclose(ortho.components_ @ ortho.components_.T, np.eye(64), atol=1e-10)
    np.testing.assert_allclose(a.transform(x), x @ a.components_.T, rtol=1e-4, atol=1e-4)
    assert not np.array_equal(RandomProjection(64, seed=4, standardize="none").fit(x).components_, a.components_)


@pytest.mark.parametrize("standardize", ["train", "none", "batch"])
def test_tensor_transforms_equal_the_reference_formulas(standardize):
    """``transform_tensor`` (the GPU path, here on CPU tensors) against z @ components.T computed
    in float64 from the fitted statistics."""
    tokens = dino_like_tokens(n_images=6)
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    batch = tokens[:2].astype(np.float64)
    for reducer in (PCA(n_components=5, standardize=standardize).fit(flat), RandomProjection(7, seed=1, standardize=standardize).fit(flat)):
        if standardize == "batch":
            z = (batch - batch.reshape(-1, 24).mean(0)) / batch.reshape(-1, 24).std(0)
        elif standardize == "train":
            z = (batch - reducer.mean_) / reducer.scale_
        else:
            z = batch - reducer.mean_ if isinstance(reducer, PCA) else batch
        expected = z @ reducer.components_[: reducer.n_components].T
        codes = reducer.transform_tensor(torch.from_numpy(tokens[:2]))
        assert codes.dtype == torch.float32 and codes.shape == expected.shape
        np.testing.assert_allclose(codes.numpy(), expected, rtol=1e-4, atol=1e-3)
    identity = IdentityReducer().transform_tensor(torch.from_numpy(tokens[:2]))
    assert identity.dtype == torch.float32 and np.array_equal(identity.numpy(), tokens[:2].astype(np.float32))


def test_identity_reducer():
    x = np.arange(12, dtype=np.float16).reshape(1, 2, 2, 3)
    reducer = IdentityReducer().fit(x.reshape(-1, 3))
    assert reducer.n_components == 3 and np.array_equal(reducer.transform(x), x.astype(np.float32))


def test_pca_on_a_local_dask_cluster_equals_single_process(tmp_path):
    store = make_store(tmp_path / "s.zarr", dino_like_tokens(n_images=12))
    single = PCA().fit(store.token_matrix(images_per_chunk=2))
    with dask_scheduler("local-cluster", workers=2):
        clustered = PCA().fit(store.token_matrix(images_per_chunk=2))
    np.testing.assert_allclose(clustered.components_, single.components_, atol=1e-10)
    np.testing.assert_allclose(clustered.explained_variance_ratio_, single.explained_variance_ratio_, atol=1e-12)


# -- h-NNE stored as arrays -----------------------------------------------------------------------

@pytest.mark.parametrize("dim", [2, 4])  # 2: with hnne's per-anchor inflation; 4: without
def test_the_hnne_map_from_arrays_equals_hnne_own_transform(dim):
    from hnne import HNNE as Reference

    from stegoscope.ops.hnne_map import HNNEMap, nearest_anchor_exact, project

    rng = np.random.default_rng(0)
    fit = (rng.normal(size=(600, 12)) + rng.integers(0, 5, size=(600, 1)) * 3).astype(np.float32)
    new = (rng.normal(size=(250, 12)) * 1.5 + 4).astype(np.float32)
    model = Reference(n_components=dim, metric="cosine", random_state=0, hnne_version="v1")
    model.fit(fit)
    expected = model.transform(new.copy())
    m = HNNEMap.from_model(model)
    assert (len(m.inflation_rotations) > 0) == (dim <= 3)
    arrays = m.to_arrays("map_")
    assert all(a.dtype != object for a in arrays.values())
    np.testing.assert_array_equal(project(new, nearest_anchor_exact(new, m.anchors, "cosine"),
                                          HNNEMap.from_arrays(arrays, "map_")), expected)


def _hnne_rebuilt_through_npz():
    import io

    from stegoscope.reducers import HNNE

    tokens = dino_like_tokens(n_images=24).reshape(-1, 24)
    fitted = HNNE(n_components=3, fit_tokens=400, seed=1).fit(tokens)
    buffer = io.BytesIO()
    np.savez(buffer, **fitted.state_dict())
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as payload:
        return tokens, fitted, HNNE.from_state(fitted.params(), {key: payload[key] for key in payload.files})


def test_an_hnne_fit_round_trips_through_npz():
    from stegoscope.reducers import HNNE

    tokens, fitted, rebuilt = _hnne_rebuilt_through_npz()
    np.testing.assert_array_equal(rebuilt.transform(tokens[:100]), fitted.transform(tokens[:100]))
    with pytest.raises(ValueError, match="never read"):
        HNNE.from_state(fitted.params(), {"mean_": fitted.mean_, "scale_": fitted.scale_, "model_": np.zeros(3, np.uint8)})


@pytest.mark.slow  # pynndescent compiles its index builder on first use (about a minute here)
def test_the_hnne_index_path_finds_the_anchors_of_the_exact_path(monkeypatch):
    import stegoscope.reducers as reducers

    tokens, _, rebuilt = _hnne_rebuilt_through_npz()
    z = rebuilt.standardized(tokens[:100])
    monkeypatch.setattr(reducers, "needs_index", lambda n_points, n_anchors: True)  # as hnne above 400e6 pairs
    agree = rebuilt._nearest(z) == reducers.nearest_anchor_exact(z, rebuilt.map_.anchors, "cosine")
    assert agree.mean() >= 0.98


# -- the reduce stage through the CLI -----------------------------------------------------------


def test_reduce_stage_artefacts_reuse_and_hnne_projection(tmp_path, directory_dataset):
    cache = str(tmp_path / "c")
    common = ["--preset", "directory", "--data-root", str(directory_dataset), "--cache", cache, "--no-progress"]
    ok("extract", *common, "--backbone", "random:vit_micro_patch8", "--n-classes", "3", "--train-res", "32",
         "--val-res", "48", "--workers", "0")
    # reduce reads the same preset options: the extraction key needs the same backbone
    preset = tmp_path / "p.yaml"
    preset.write_text(
        "name: p\ndataset: directory\nbackbone: random:vit_micro_patch8\nn_classes: 3\n"
        "extract:\n  splits:\n    train: {res: 32}\n    val: {res: 48, store_images: true}\n"
    )
    common = ["--preset", str(preset), "--data-root", str(directory_dataset), "--cache", cache, "--no-progress"]
    out = ok("reduce", *common, "--method", "pca")
    artefact = next((tmp_path / "c" / "artefacts" / "reduce").glob("pca-*"))
    pca = load_reducer(artefact, n_components=7)
    assert pca.transform(np.zeros((1, 96), np.float16)).shape == (1, 7) and len(pca.explained_variance_ratio_) == 96
    assert "cached" in ok("reduce", *common, "--method", "pca")
    assert "cached" not in ok("reduce", *common, "--method", "pca", "--standardize", "none")

    out = ok("reduce", *common, "--method", "hnne", "--dim", "4", "--fit-tokens", "300")
    derived = sorted((tmp_path / "c" / "derived").glob("*.zarr"))
    assert len(derived) == 2 and out.count("done") == 3
    for path in derived:
        codes = cache_schema.open_feature_store(path)
        source = cache_schema.open_feature_store(codes.attrs.source_store)
        assert codes.complete and codes[cache_schema.TOKENS].shape == source[cache_schema.TOKENS].shape[:3] + (4,)
        assert np.isfinite(codes[cache_schema.TOKENS][:]).all() and codes.ids == source.ids
    again = ok("reduce", *common, "--method", "hnne", "--dim", "4", "--fit-tokens", "300")
    assert again.count("cached") == 3  # the fit and both derived stores are reused


def test_a_released_stego_head_as_a_reducer_equals_the_module_on_host_and_tensor_paths():
    from stegoscope.models.stego_head import StegoHead
    from stegoscope.reducers import StegoHeadReducer

    torch.manual_seed(0)
    head = StegoHead(24, 6).eval()
    tokens = dino_like_tokens(n_images=2).astype(np.float32)
    with torch.no_grad():
        expected = head(torch.from_numpy(tokens).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    reducer = StegoHeadReducer.from_head(head)
    np.testing.assert_allclose(reducer.transform(tokens), expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(reducer.transform_tensor(torch.from_numpy(tokens)).numpy(), expected, rtol=1e-4, atol=1e-3)


def test_one_scan_of_a_store_serves_the_fits_of_every_dim(tmp_path, monkeypatch):
    from stegoscope import reducers

    store = make_store(tmp_path / "s.zarr", dino_like_tokens())
    scans = []
    real = reducers.shifted_gram
    monkeypatch.setattr(reducers, "shifted_gram", lambda *a: scans.append(1) or real(*a))
    first = RandomProjection(4, seed=0).fit(store.token_matrix())
    n_chunks = len(scans)
    second = RandomProjection(8, seed=0).fit(store.token_matrix())
    pca = PCA().fit(store.token_matrix())
    assert len(scans) == n_chunks > 0  # the store's tokens were scanned once
    np.testing.assert_array_equal(first.mean_, second.mean_)
    flat = dino_like_tokens().reshape(-1, 24).astype(np.float64)
    np.testing.assert_allclose(pca.mean_, flat.mean(0), rtol=1e-6, atol=1e-4)
    RandomProjection(4, seed=0).fit(store.token_matrix(np.array([0, 2, 5])))  # other images: scanned afresh
    assert len(scans) > n_chunks


def test_projection_shards_are_dask_tasks_with_the_same_codes_on_threads_and_a_local_cluster(tmp_path, directory_dataset):
    """`project` (h-NNE's codes of whole stores) runs a task per shard that reads and writes by path."""
    from stegoscope.cli import _context
    from stegoscope.compute import dask_scheduler
    from stegoscope.pipeline import run_stage

    preset = tmp_path / "p.yaml"
    preset.write_text("name: p\ndataset: directory\nbackbone: random:vit_micro_patch8\nn_classes: 3\n"
                      "extract:\n  shard_images: 2\n  splits:\n    train: {res: 32}\n    val: {res: 32}\n")
    ctx = _context(str(preset), tmp_path / "c", directory_dataset, workers=0, show_progress=False)
    run_stage(ctx.extract("train"))
    train, _ = ctx.projections("pca", None)  # PCA stands in for h-NNE: any fit projects alike
    run_stage(train.fit)
    codes = {}
    for scheduler in ("threads", "local-cluster"):
        with dask_scheduler(scheduler):
            run_stage(train, force=True)
        codes[scheduler] = cache_schema.open_complete_store(train.output)[cache_schema.TOKENS][:]
    source = cache_schema.open_complete_store(ctx.extract("train").output)[cache_schema.TOKENS][:]
    expected = load_reducer(train.fit.output).transform(source)
    assert cache_schema.open_complete_store(train.output).layout.n_shards == 3
    np.testing.assert_allclose(codes["threads"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(codes["local-cluster"], codes["threads"])


def test_the_moments_scan_runs_one_blas_thread_per_dask_thread_on_the_cpu_and_restores_it(monkeypatch):
    from threadpoolctl import threadpool_info

    from stegoscope import reducers

    blas = lambda: sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")  # noqa: E731
    before, seen = blas(), []
    real = reducers.shifted_gram
    monkeypatch.setattr(reducers, "shifted_gram", lambda block, *a: seen.append((len(block), blas())) or real(block, *a))
    reducers.streamed_moments(np.random.default_rng(0).normal(size=(300, 5)), device="cpu")
    scanned = [threads for rows, threads in seen if rows]  # dask may first call it on an empty block (its meta)
    assert scanned and all(threads == [1] * len(before) for threads in scanned)
    assert blas() == before
