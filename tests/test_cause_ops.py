"""CAUSE's pure math (``ops/cause.py``) against the spec (``successors/cause.md`` §1, §2.1, §3.1–3.3,
§7): plain loop references written from the spec text, hand-computed values and gradchecks."""

import math

import pytest
import torch
import torch.nn.functional as F

from stegoscope.ops.cause import (
    ConceptBank,
    bank_entries,
    bank_init,
    bank_update,
    concept_index,
    concept_infonce,
    device_generator,
    draw_bank_keys,
    draw_grid_order,
    dropout_mask,
    grid_sample,
    init_cluster_probe,
    init_clusterbook,
    modularity_loss,
)

D = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit(*xs: float) -> torch.Tensor:
    v = torch.tensor(xs, dtype=D)
    return v / v.norm()


# --- grid sub-sampling (§1) ----------------------------------------------------------------------

def grid_reference(x, h, w, order, window=4):
    """Window by window, in raster order of windows, straight from §1."""
    b = x.shape[0]
    nh, nw = h // window, w // window
    out = []
    for bi in range(b):
        rows = []
        for i in range(nh):
            for j in range(nw):
                o = int(order[bi * nh * nw + i * nw + j])
                rows.append(x[bi, (window * i + o // window) * w + (window * j + o % window)])
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("h, w, window", [(8, 12, 4), (23, 23, 4), (7, 10, 3)])
def test_grid_sample_matches_the_loop_reference(h, w, window):
    b, c = 2, 3
    x = torch.randn(b, h * w, c, generator=gen(1))
    order = draw_grid_order(b, h, w, gen(2), window)
    assert order.shape == (b * (h // window) * (w // window),) and order.dtype == torch.int64
    assert 0 <= order.min() and order.max() < window * window
    got = grid_sample(x, h, w, order, window)
    assert got.shape == (b, (h // window) * (w // window), c)
    assert torch.equal(got, grid_reference(x, h, w, order, window))


def test_grid_sample_one_window_by_hand():
    # 8×8 grid, 2×2 windows of 4×4; window (1, 0) with o = 5 → row 4 + 5//4 = 5, col 0 + 5%4 = 1 → index 41.
    x = torch.arange(64, dtype=torch.float32).view(1, 64, 1)
    order = torch.tensor([0, 15, 5, 6])
    got = grid_sample(x, 8, 8, order).flatten().tolist()
    assert got == [0.0, 3 * 8 + 7, 5 * 8 + 1, 5 * 8 + 6]  # (0,1)+15: row 3 col 7; (1,1)+6: row 4+1, col 4+2


def test_grid_sample_never_reaches_the_border_of_a_23_grid():
    # [QUIRK] 23×23 → 5×5 windows; every offset of every window stays in rows/cols 0–19.
    h = w = 23
    x = torch.arange(h * w, dtype=torch.float32).view(1, h * w, 1)
    seen = set()
    for o in range(16):
        got = grid_sample(x, h, w, torch.full((25,), o))
        seen.update(int(t) for t in got.flatten())
    assert len(seen) == 400
    assert max(t // w for t in seen) == 19 and max(t % w for t in seen) == 19


def test_draw_grid_order_is_reproducible_from_the_generator():
    a, b = draw_grid_order(3, 40, 40, gen(7)), draw_grid_order(3, 40, 40, gen(7))
    assert torch.equal(a, b) and a.shape == (300,)
    assert not torch.equal(a, draw_grid_order(3, 40, 40, gen(8)))
    assert set(a.tolist()) == set(range(16))  # 300 draws of 16 values: all appear


# --- concept assignment (§2.1) -------------------------------------------------------------------

def test_concept_index_is_the_cosine_argmax_not_the_dot_product():
    book = torch.tensor([[10.0, 10.0], [1.0, 0.0], [0.0, -0.1]])  # raw, very different norms
    x = torch.tensor([[[3.0, 0.2], [1.0, 1.2]], [[0.1, -5.0], [-1.0, -1.0]]])
    expected = torch.tensor([[1, 0], [2, 2]])  # dot products would pick entry 0 for the first token
    got = concept_index(x, book)
    assert got.dtype == torch.int64 and torch.equal(got, expected)


# --- modularity (§3.1) ---------------------------------------------------------------------------

def modularity_reference(x, c, tau):
    """Explicit loops over images, i, j, k from §3.1."""
    traces = []
    for xb in x:
        n = xb.shape[0]
        xh = [xb[i] / xb[i].norm() for i in range(n)]
        ch = [ck / ck.norm() for ck in c]
        a = [[max(0.0, float(xh[i] @ xh[j])) if i != j else 0.0 for j in range(n)] for i in range(n)]
        d = [sum(row) for row in a]
        e = sum(d)
        m = [[max(0.0, float(xh[i] @ ck)) for ck in ch] for i in range(n)]
        trace = 0.0
        for i in range(n):
            for j in range(n):
                w_ij = a[i][j] - d[i] * d[j] / e
                delta_ji = max(math.tanh(m[j][k] * m[i][k] / tau) for k in range(len(ch)))
                trace += w_ij * delta_ji
        traces.append(trace / e)
    return -sum(traces) / len(traces)


def test_modularity_by_hand_two_tokens():
    # x1 = e0, x2 = (1,1)/√2 (a = cos = 1/√2), one centroid e0: A = [[0,a],[a,0]], d = (a,a), e = 2a,
    # W = A − a/2, M = (1, a), Δ = tanh(10·M_i M_j): trace = (−tanh 10 + 2 tanh(10a) − tanh 5)/4.
    x = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]], dtype=D)
    c = torch.tensor([[2.0, 0.0]], dtype=D)
    a = 1 / math.sqrt(2)
    expected = (math.tanh(10) + math.tanh(5) - 2 * math.tanh(10 * a)) / 4
    assert modularity_loss(x, c, 0.1).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("b, n, k, c", [(2, 5, 4, 3), (1, 3, 7, 2)])
def test_modularity_matches_the_loop_reference(b, n, k, c):
    x = torch.randn(b, n, c, generator=gen(3), dtype=D)
    cent = torch.randn(k, c, generator=gen(4), dtype=D)
    for tau in (0.1, 0.5):
        assert modularity_loss(x, cent, tau).item() == pytest.approx(modularity_reference(x, cent, tau), abs=1e-10)


def test_modularity_chunked_max_equals_the_one_shot_max(monkeypatch):
    import stegoscope.ops.cause as cause

    x = torch.randn(2, 6, 4, generator=gen(5), dtype=D)
    cent = torch.randn(9, 4, generator=gen(6), dtype=D, requires_grad=True)
    whole = modularity_loss(x, cent)
    (g_whole,) = torch.autograd.grad(whole, cent)
    monkeypatch.setattr(cause, "_PRODUCT_BUDGET", 2 * 6 * 6 * 2)  # chunks of 2 of the 9 centroids
    chunked = modularity_loss(x, cent)
    (g_chunked,) = torch.autograd.grad(chunked, cent)
    assert chunked.item() == pytest.approx(whole.item(), abs=1e-14)
    torch.testing.assert_close(g_chunked, g_whole, rtol=0, atol=1e-14)


def test_modularity_gradient_reaches_only_the_centroids():
    x = torch.randn(2, 5, 3, generator=gen(7), dtype=D, requires_grad=True)
    cent = torch.randn(4, 3, generator=gen(8), dtype=D, requires_grad=True)
    modularity_loss(x, cent).backward()
    assert x.grad is None
    assert cent.grad is not None and cent.grad.abs().sum() > 0


def test_modularity_gradcheck_wrt_the_centroids():
    x = torch.randn(2, 4, 3, generator=gen(9), dtype=D)
    cent = torch.randn(3, 3, generator=gen(10), dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: modularity_loss(x, c, 0.3), (cent,))


# --- concept-wise InfoNCE (§3.2) -----------------------------------------------------------------

def infonce_reference(z, zbar, v, bank_z=None, bank_v=None, bank_valid=None, tau=0.07, pos=0.3, neg=0.1, count_empty=True):
    """Loop over images, anchors and pairs, §3.2; returns (loss, n_empty) as floats."""
    b, n, _ = z.shape
    zh = [F.normalize(r, dim=0) for r in z.reshape(b * n, -1)]
    zbh = [F.normalize(r, dim=0) for r in zbar.reshape(b * n, -1)]
    vs = list(v.reshape(b * n, -1))
    have_bank = bank_z is not None and bool(bank_valid.any())
    if have_bank:
        keep = [m for m in range(bank_z.shape[0]) if bank_valid[m]]
        bkeys = [F.normalize(bank_z[m], dim=0) for m in keep]
        bvs = [bank_v[m] for m in keep]

    def term(rows, keys, kvs, self_pair):
        total, count = 0.0, 0
        for i in rows:
            cand = []
            for j, (kj, vj) in enumerate(zip(keys, kvs)):
                if self_pair and j == i:
                    continue
                g = float(vs[i] @ vj)
                s = float(zh[i] @ kj) / tau
                cand.append((g > pos, g < neg, s))
            lse = math.log(sum(math.exp(s) for p, q, s in cand if p or q)) if any(p or q for p, q, _ in cand) else None
            for p, _, s in cand:
                if p:
                    total += -s + lse
                    count += 1
        return (total / count, True) if count else (0.0, False)

    terms, has = [], []
    for a in range(b):
        rows = range(a * n, (a + 1) * n)
        t, h = term(rows, zbh, vs, True)
        terms.append(t)
        has.append(h)
        if have_bank:
            t, h = term(rows, bkeys, bvs, False)
            terms.append(t)
            has.append(h)
    divisor = len(terms) if count_empty else max(1, sum(has))
    return sum(terms) / divisor, len(terms) - sum(has)


def concept_set():
    """Five unit concept vectors with cosines on both sides of the thresholds: c0·c1 = 0.2 and
    c1·c2 = 0.12 (ignored), c0·c2 = 0.6 and c2·c3 ≈ 0.8 (positive), c0·c3 = 0 and c1·c3 = −0.05
    (negative), c4 = −c0."""
    c0 = unit(1, 0, 0)
    c1 = torch.tensor([0.2, math.sqrt(1 - 0.04), 0.0], dtype=D)
    c2 = torch.tensor([0.6, 0.0, 0.8], dtype=D)
    y = -0.05 / math.sqrt(1 - 0.04)
    c3 = torch.tensor([0.0, y, math.sqrt(1 - y * y)], dtype=D)
    return torch.stack([c0, c1, c2, c3, -c0])


def random_case(seed, b=3, n=4, p=5, m=6):
    g = gen(seed)
    book = concept_set()
    z = torch.randn(b, n, p, generator=g, dtype=D)
    zbar = torch.randn(b, n, p, generator=g, dtype=D)
    v = book[torch.randint(0, len(book), (b, n), generator=g)]
    bank_z = torch.randn(m, p, generator=g, dtype=D)
    bank_v = book[torch.randint(0, len(book), (m,), generator=g)]
    valid = torch.rand(m, generator=g) < 0.6
    valid[0] = True
    return z, zbar, v, bank_z, bank_v, valid


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("count_empty", [True, False])
def test_infonce_matches_the_loop_reference_with_and_without_bank(seed, count_empty):
    z, zbar, v, bank_z, bank_v, valid = random_case(seed)
    loss, empty = concept_infonce(z, zbar, v, temperature=0.2, count_empty=count_empty)
    ref, ref_empty = infonce_reference(z, zbar, v, tau=0.2, count_empty=count_empty)
    assert loss.item() == pytest.approx(ref, abs=1e-10) and empty.item() == ref_empty
    loss, empty = concept_infonce(z, zbar, v, bank_z, bank_v, valid, temperature=0.2, count_empty=count_empty)
    ref, ref_empty = infonce_reference(z, zbar, v, bank_z, bank_v, valid, tau=0.2, count_empty=count_empty)
    assert loss.item() == pytest.approx(ref, abs=1e-10) and empty.item() == ref_empty
    assert loss.shape == () and empty.shape == ()


def test_infonce_by_hand_the_self_pair_is_excluded_and_in_between_pairs_ignored():
    # One image: tokens 0, 1 of concept c0, token 2 of c3 (cos 0: a negative), token 3 of c1
    # (cos 0.2 with c0, 0.05 with c3: ignored by 0 and 1, negative of 2). ẑ = ẑ̄ = e0, e1, e2, e3 so S = I/τ.
    # Anchor 0: Pos {1}, Neg {2} → ℓ01 = −0 + log(e⁰ + e⁰) = log 2; anchor 1 likewise; anchors 2, 3: no
    # positives (the self pair does not count). Loss = T = (2 log 2)/2 = log 2. With the self pair as a
    # positive, anchor 0 would add ℓ00 = −1/τ + log(e^{1/τ} + 2) ≠ 0.
    book = concept_set()
    v = book[torch.tensor([[0, 0, 3, 1]])]
    z = torch.eye(4, dtype=D)[None].clone().requires_grad_(True)
    zbar = torch.eye(4, dtype=D)[None] * 3.0  # un-normalised on purpose
    loss, empty = concept_infonce(z, zbar, v, temperature=0.5)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert empty.item() == 0
    loss.backward()
    assert torch.equal(z.grad[0, 3], torch.zeros(4, dtype=D))  # token 3 only has ignored pairs and no positive


def test_infonce_pairs_between_the_thresholds_do_not_change_the_loss():
    # One image: tokens 0, 1 of c0, token 2 of c1 (cos 0.2 with c0: ignored; no positive of its own),
    # token 3 of c3 (negative of everyone). Token 2's key is in neither Pos nor Neg of any anchor with
    # positives: moving it changes nothing, while moving the negative's key does.
    book = concept_set()
    v = book[torch.tensor([[0, 0, 1, 3]])]
    z = torch.randn(1, 4, 5, generator=gen(11), dtype=D, requires_grad=True)
    zbar = torch.randn(1, 4, 5, generator=gen(12), dtype=D)
    base, _ = concept_infonce(z, zbar, v)
    moved = zbar.clone()
    moved[0, 2] = torch.randn(5, generator=gen(13), dtype=D)
    assert concept_infonce(z, moved, v)[0].item() == pytest.approx(base.item(), abs=1e-12)
    moved = zbar.clone()
    moved[0, 3] = torch.randn(5, generator=gen(14), dtype=D)
    assert concept_infonce(z, moved, v)[0].item() != pytest.approx(base.item(), abs=1e-6)
    assert base.item() == pytest.approx(infonce_reference(z.detach(), zbar, v)[0], abs=1e-12)
    base.backward()
    assert torch.equal(z.grad[0, 2:], torch.zeros(2, 5, dtype=D))  # anchors without positives get no gradient


def test_infonce_gradient_reaches_only_z():
    z, zbar, v, bank_z, bank_v, valid = random_case(4)
    z.requires_grad_(True)
    others = [t.requires_grad_(True) for t in (zbar, v, bank_z, bank_v)]
    loss, _ = concept_infonce(z, zbar, v, bank_z, bank_v, valid)
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(t.grad is None for t in others)


def test_infonce_gradcheck_wrt_z():
    z, zbar, v, bank_z, bank_v, valid = random_case(5, b=2, n=3, p=4, m=5)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: concept_infonce(t, zbar, v, temperature=0.5)[0], (z,))
    assert torch.autograd.gradcheck(lambda t: concept_infonce(t, zbar, v, bank_z, bank_v, valid, temperature=0.5)[0], (z,))


def test_an_image_without_positives_counts_in_the_divisor_unless_fixed():
    # [QUIRK] Image 1's concepts c1, c3, c4 are pairwise ≤ 0.1 and ≤ 0.2 with image 0's c0 and with the
    # valid bank entries (c0): both of its terms (in-batch, bank) have no positives. Image 0 has both.
    book = concept_set()
    v = book[torch.tensor([[0, 0, 0], [1, 3, 4]])]
    z = torch.randn(2, 3, 4, generator=gen(13), dtype=D, requires_grad=True)
    zbar = torch.randn(2, 3, 4, generator=gen(14), dtype=D)
    bank_z = torch.randn(3, 4, generator=gen(15), dtype=D)
    bank_v = book[torch.tensor([0, 2, 0])]
    valid = torch.tensor([True, False, True])  # the c2 entry (a positive of c3) is not valid
    loss, empty = concept_infonce(z, zbar, v, bank_z, bank_v, valid)
    assert torch.isfinite(loss) and empty.item() == 2
    ref, ref_empty = infonce_reference(z.detach(), zbar, v, bank_z, bank_v, valid)
    assert loss.item() == pytest.approx(ref, abs=1e-10) and ref_empty == 2
    loss.backward()
    assert torch.isfinite(z.grad).all()
    assert torch.equal(z.grad[1], torch.zeros(3, 4, dtype=D))  # the empty terms contribute no gradient
    # the divisor: 2B = 4 terms when faithful, the 2 non-empty ones when fixed
    fixed, _ = concept_infonce(z.detach(), zbar, v, bank_z, bank_v, valid, count_empty=False)
    assert fixed.item() == pytest.approx(2 * loss.item(), abs=1e-12)
    no_bank, empty = concept_infonce(z.detach(), zbar, v)
    no_bank_fixed, _ = concept_infonce(z.detach(), zbar, v, count_empty=False)
    assert empty.item() == 1 and no_bank_fixed.item() == pytest.approx(2 * no_bank.item(), abs=1e-12)


def test_an_all_invalid_bank_is_the_same_as_no_bank():
    z, zbar, v, bank_z, bank_v, _ = random_case(6)
    for count_empty in (True, False):
        none = concept_infonce(z, zbar, v, count_empty=count_empty)
        invalid = concept_infonce(z, zbar, v, bank_z, bank_v, torch.zeros(bank_z.shape[0], dtype=torch.bool), count_empty=count_empty)
        empty = concept_infonce(z, zbar, v, bank_z[:0], bank_v[:0], torch.zeros(0, dtype=torch.bool), count_empty=count_empty)
        for got in (invalid, empty):
            assert torch.equal(got[0], none[0]) and torch.equal(got[1], none[1])
    # and a valid slot does change the loss (the device-side rule is not stuck on "no bank")
    valid = torch.zeros(bank_z.shape[0], dtype=torch.bool)
    valid[0] = True
    bank_v = bank_v.clone()
    bank_v[0] = v[0, 0]
    assert concept_infonce(z, zbar, v, bank_z, bank_v, valid)[0].item() != pytest.approx(concept_infonce(z, zbar, v)[0].item())


# --- the bank (§3.3) -----------------------------------------------------------------------------

def bank_reference_update(queues, concepts, zbar, keys, q):
    """A list of Python lists per concept, oldest first; §3.3 with the permutation given by the keys."""
    for k in sorted(set(concepts.tolist())):
        rows = [i for i in range(len(concepts)) if int(concepts[i]) == k]  # raster order
        rows = sorted(rows, key=lambda i: int(keys[i]))  # the per-concept permutation
        queues[k].extend(zbar[i] for i in rows[: len(rows) // 2])
        del queues[k][: max(0, len(queues[k]) - q)]


def ring_in_time_order(bank: ConceptBank, k: int) -> list:
    q = bank.z.shape[1]
    c = int(bank.count[k])
    return [bank.z[k, j % q] for j in range(max(0, c - q), c)]


def test_bank_update_matches_the_list_reference_over_several_updates():
    kk, q, p = 5, 3, 2
    bank = bank_init(kk, q, p)
    queues = [[] for _ in range(kk)]
    g = gen(16)
    updates = [
        torch.tensor([0, 0, 1, 2, 2, 2, 2, 4]),  # concept 1 and 4: singletons, dropped
        torch.tensor([2] * 9 + [0, 0, 0, 3, 3]),  # concept 2: 4 appended in one update > Q: only the newest 3 written
        torch.tensor([3, 0, 3, 0, 2, 2]),
        torch.tensor([4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0]),
    ]
    for step, concepts in enumerate(updates):
        zbar = torch.randn(len(concepts), p, generator=g)
        keys = draw_bank_keys(len(concepts), g)
        assert sorted(keys.tolist()) == list(range(len(concepts)))
        before = ConceptBank(bank.z.clone(), bank.count.clone())
        new = bank_update(bank, concepts, zbar, keys)
        assert torch.equal(bank.z, before.z) and torch.equal(bank.count, before.count)  # the input is untouched
        bank_reference_update(queues, concepts, zbar, keys, q)
        bank = new
        for k in range(kk):
            got = ring_in_time_order(bank, k)
            assert len(got) == len(queues[k]), (step, k)
            for a, b in zip(got, queues[k]):
                assert torch.equal(a, b), (step, k)
    assert bank.count.tolist() == [1 + 1 + 1 + 3, 0, 2 + 4 + 1, 1 + 1, 2]
    assert len(queues[1]) == 0


def test_bank_entries_validity_and_concepts():
    kk, q, p = 3, 4, 2
    book = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 4.0], [1.0, 1.0, 0.0]])
    bank = ConceptBank(torch.randn(kk, q, p, generator=gen(17)), torch.tensor([0, 2, 9]))
    z, concepts, valid = bank_entries(bank, book)
    assert z.shape == (kk * q, p) and concepts.shape == (kk * q, 3) and valid.dtype == torch.bool
    assert valid.tolist() == [False] * 4 + [True, True, False, False] + [True] * 4  # slot i valid iff i < min(count, Q)
    for k in range(kk):
        for i in range(q):
            assert torch.equal(z[k * q + i], bank.z[k, i])
            torch.testing.assert_close(concepts[k * q + i], book[k] / book[k].norm())


def test_bank_entries_of_an_updated_bank_hold_the_reference_entries():
    kk, q, p = 4, 3, 3
    g = gen(18)
    book = torch.randn(kk, 5, generator=g)
    bank, queues = bank_init(kk, q, p), [[] for _ in range(kk)]
    for _ in range(3):
        concepts = torch.randint(0, kk, (10,), generator=g)
        zbar, keys = torch.randn(10, p, generator=g), draw_bank_keys(10, g)
        bank = bank_update(bank, concepts, zbar, keys)
        bank_reference_update(queues, concepts, zbar, keys, q)
    z, concepts, valid = bank_entries(bank, book)
    got = sorted((tuple(r.tolist()), tuple(c.tolist())) for r, c, ok in zip(z, concepts, valid) if ok)
    expected = sorted((tuple(r.tolist()), tuple(F.normalize(book[k], dim=0).tolist())) for k in range(kk) for r in queues[k])
    assert got == expected


# --- draws (§7) ----------------------------------------------------------------------------------

def test_dropout_mask_scale_rate_and_reproducibility():
    a = dropout_mask((4, 50, 25), 0.1, gen(19))
    assert a.dtype == torch.float32 and a.shape == (4, 50, 25)
    assert torch.all((a == 0) | torch.isclose(a, torch.tensor(1 / 0.9)))
    assert abs((a > 0).float().mean().item() - 0.9) < 0.02
    assert torch.equal(a, dropout_mask((4, 50, 25), 0.1, gen(19)))
    assert not torch.equal(a, dropout_mask((4, 50, 25), 0.1, gen(20)))
    assert torch.equal(dropout_mask((3, 7), 0.0, gen(21)), torch.ones(3, 7))


def test_inits_are_uniform_in_their_ranges_and_seeded():
    book = init_clusterbook(64, 32, gen(22))
    assert book.shape == (64, 32) and book.dtype == torch.float32
    assert book.abs().max() <= 1 / 64 and book.min() < -0.9 / 64 and book.max() > 0.9 / 64
    assert torch.equal(book, init_clusterbook(64, 32, gen(22)))
    probe = init_cluster_probe(27, 90, gen(23))
    assert probe.shape == (27, 90) and probe.dtype == torch.float32
    assert probe.abs().max() <= 1 / 27 and probe.min() < -0.9 / 27 and probe.max() > 0.9 / 27


def test_device_generator_is_seeded_by_one_draw_of_its_parent():
    parent, twin = gen(5), gen(5)
    child = device_generator(parent, "cpu")
    seed = torch.randint(0, 2**62, (1,), generator=twin, dtype=torch.int64)
    assert torch.equal(torch.rand(4, generator=child), torch.rand(4, generator=torch.Generator().manual_seed(int(seed))))
    assert torch.equal(torch.rand(3, generator=parent), torch.rand(3, generator=twin))  # the parent moved on by exactly one draw
