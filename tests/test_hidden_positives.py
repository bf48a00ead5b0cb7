"""HP's losses (spec successors/hp.md §2–3) against hand values and loop references written from the spec."""

import math

import numpy as np
import pytest
import torch

from stegoscope.ops.hidden_positives import (
    NEIGHBOUR_OFFSETS,
    attention_neighbour_weights,
    consistency_loss,
    hidden_positive_loss,
    lambda_ramp,
    neighbour_mix,
    pool_thresholds,
)

# ---------------------------------------------------------------- references (plain loops, float64)


def ref_attention_weights(logits, grid, prefix, sigma=28.0, clip=(0.1, 0.9)):
    """Spec §2 step by step, one row at a time."""
    logits = np.asarray(logits, dtype=np.float64)
    h, w = grid
    out = np.zeros((logits.shape[0], h, w, 9))
    for b in range(logits.shape[0]):
        a = logits[b, :, prefix:, prefix:].mean(axis=0)
        for i in range(h * w):
            row = a[i]
            row = np.minimum(np.maximum(row, np.quantile(row, clip[0])), np.quantile(row, clip[1]))
            row = np.exp(row - row.max())
            row = sigma * row / row.sum()
            row = np.where(row < row.mean(), 0.0, row)
            y, x = divmod(i, w)
            for k, (dy, dx) in enumerate([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    out[b, y, x, k] = row[(y + dy) * w + (x + dx)]
    return out


def ref_neighbour_mix(code, weights):
    code, weights = np.asarray(code, dtype=np.float64), np.asarray(weights, dtype=np.float64)
    bsz, d, h, w = code.shape
    out = np.zeros_like(code)
    for b in range(bsz):
        for y in range(h):
            for x in range(w):
                acc, count = np.zeros(d), 0
                for k, (dy, dx) in enumerate([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]):
                    if 0 <= y + dy < h and 0 <= x + dx < w:
                        acc += weights[b, y, x, k] * code[b, :, y + dy, x + dx]
                        count += 1
                out[b, :, y, x] = acc / count
    return out


def ref_hp_loss(z, z_mix, feats, ema, pool_f, pool_c, rand_neg, lam, tau, base=0.07, reweighting=True,
                sp_in_denominator=False, drop_without_ag=True):
    """L_HP of spec §3 with explicit loops; the two keyword switches build the *wrong* variants that
    the quirk tests must tell apart. Returns (loss, stats)."""
    z, z_mix, feats, ema = (np.asarray(t, dtype=np.float64) for t in (z, z_mix, feats, ema))
    pool_f, pool_c, rand_neg = np.asarray(pool_f, dtype=np.float64), np.asarray(pool_c, dtype=np.float64), np.asarray(rand_neg)
    bsz, p, _ = z.shape
    n = bsz * p
    zs, zms, fs, es = z.reshape(n, -1), z_mix.reshape(n, -1), feats.reshape(n, -1), ema.reshape(n, -1)
    r = [max(float(fs[i] @ q) for q in pool_f) for i in range(n)]
    rb = [max(float(es[i] @ q) for q in pool_c) for i in range(n)]
    stats = {"kept": 0, "dropped": 0, "dropped_with_sp": 0, "sp_outside_den": 0, "empty_blocks": 0}
    total = 0.0
    for b in range(bsz):
        anchors = []
        for il in range(p):
            i = b * p + il
            m_ag = [j != i and (fs[i] @ fs[j] > r[i] or fs[i] @ fs[j] > r[j]) for j in range(n)]
            m_sp = [j != i and (es[i] @ es[j] > rb[i] or es[i] @ es[j] > rb[j]) for j in range(n)]
            wts = [float(m_ag[j]) + lam * float(m_sp[j]) for j in range(n)]
            if (not any(m_ag)) if drop_without_ag else sum(wts) == 0:
                stats["dropped"] += 1
                stats["dropped_with_sp"] += any(m_sp)
                continue
            den = [j != i and (m_ag[j] or bool(rand_neg[il, j]) or (sp_in_denominator and m_sp[j])) for j in range(n)]
            stats["kept"] += 1
            stats["sp_outside_den"] += sum(m_sp[j] and not den[j] for j in range(n))
            anchors.append((i, wts, den))
        if not anchors:
            stats["empty_blocks"] += 1
            continue
        mean_w = np.mean([sum(wts) for _, wts, _ in anchors])
        for zz in (zs, zms):
            terms = []
            for i, wts, den in anchors:
                logit = [float(zz[i] @ zz[j]) / tau for j in range(n)]
                lse = math.log(sum(math.exp(logit[k]) for k in range(n) if den[k]))
                ell = sum(wts[j] * (logit[j] - lse) for j in range(n)) / sum(wts)
                omega = sum(wts) / mean_w if reweighting else 1.0
                terms.append(omega * ell)
            total += -(tau / base) * np.mean(terms)
    return total / (2 * bsz), stats


def unit(t):
    return t / t.norm(dim=-1, keepdim=True)


def random_case(seed, bsz=2, p=4, d=3, c=5, s=3, rho=0.3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return dict(
        z=unit(torch.randn(bsz, p, d, generator=g, dtype=dtype)),
        z_mix=unit(torch.randn(bsz, p, d, generator=g, dtype=dtype)),
        feats=unit(torch.randn(bsz, p, c, generator=g, dtype=dtype)),
        ema_codes=unit(torch.randn(bsz, p, d, generator=g, dtype=dtype)),
        pool_feats=unit(torch.randn(s, c, generator=g, dtype=dtype)),
        pool_codes=unit(torch.randn(s, d, generator=g, dtype=dtype)),
        random_negatives=torch.rand(p, bsz * p, generator=g) < rho,
    )


def ref_of(case, lam, tau, **kw):
    return ref_hp_loss(case["z"], case["z_mix"], case["feats"], case["ema_codes"], case["pool_feats"], case["pool_codes"],
                       case["random_negatives"], lam, tau, **kw)


def isolated_case(seed=0, bsz=2, p=4):
    """Block-0 anchor 0 gets feature e1, every other feature lives in span(e2..e5) and the pool holds e1:
    its threshold is 1 and every sim to it is exactly 0 ≤ the partner's threshold → no task-agnostic
    positive. Its EMA code equals another patch's, so it does have a task-specific positive."""
    case = random_case(seed, bsz=bsz, p=p, rho=0.4)
    feats = case["feats"].clone()
    feats[..., 0] = 0
    feats = unit(feats)
    feats[0, 0] = torch.tensor([1.0, 0, 0, 0, 0], dtype=feats.dtype)
    case["feats"] = feats
    case["pool_feats"] = torch.cat([torch.tensor([[1.0, 0, 0, 0, 0]], dtype=feats.dtype), case["pool_feats"]])
    ema = case["ema_codes"].clone()
    ema[0, 0] = ema[1, 2]
    case["ema_codes"] = ema
    return case


# ---------------------------------------------------------------- attention weights


def test_neighbour_offsets_raster_order():
    assert NEIGHBOUR_OFFSETS == ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1))


def test_attention_weights_hand_value():
    # 2×2 grid, rows [0, 0, 0, c] (keys in raster order): q90 = 0.7·c = ln 3 clamps the last key, so the softmax
    # is [1/6, 1/6, 1/6, 1/2]; × σ=4 → [2/3, 2/3, 2/3, 2], mean 1 → [0, 0, 0, 2]. Key 3 = patch (1, 1).
    c = math.log(3) / 0.7
    logits = torch.zeros(1, 2, 5, 5)
    logits[..., 1:, 4] = c
    logits[..., 0, :] = 50.0  # CLS row and column: must be dropped
    logits[..., :, 0] = -50.0
    out = attention_neighbour_weights(logits, (2, 2), prefix=1, sigma=4.0)
    expect = torch.zeros(1, 2, 2, 9)
    for (y, x) in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        expect[0, y, x, NEIGHBOUR_OFFSETS.index((1 - y, 1 - x))] = 2.0
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grid,prefix,heads", [((3, 3), 1, 2), ((3, 4), 5, 3)])
def test_attention_weights_match_loop_reference(grid, prefix, heads):
    g = torch.Generator().manual_seed(1)
    t = prefix + grid[0] * grid[1]
    logits = torch.randn(2, heads, t, t, generator=g) * 2
    logits[:, :, :prefix] += 10.0  # prefix rows/columns (CLS + registers) would dominate if kept
    logits[:, :, :, :prefix] += 10.0
    out = attention_neighbour_weights(logits, grid, prefix=prefix)
    ref = ref_attention_weights(logits.numpy(), grid, prefix)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
    # out-of-grid neighbours are exactly zero: top-left corner has no (-1, ·) or (·, -1) neighbours
    corner = out[:, 0, 0]
    assert torch.all(corner[:, [0, 1, 2, 3, 6]] == 0)
    # some in-grid neighbours are zeroed by the below-mean rule, and exactly where the reference zeroes them
    in_grid = np.zeros((grid[0], grid[1], 9), dtype=bool)
    for y in range(grid[0]):
        for x in range(grid[1]):
            for k, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
                in_grid[y, x, k] = 0 <= y + dy < grid[0] and 0 <= x + dx < grid[1]
    zeroed = (ref == 0) & in_grid
    assert zeroed.sum() > 0 and ((ref > 0) & in_grid).sum() > 0
    assert np.array_equal(out.numpy() == 0, (ref == 0) | ~in_grid)


def test_attention_weights_reject_wrong_token_count():
    with pytest.raises(ValueError):
        attention_neighbour_weights(torch.zeros(1, 1, 10, 10), (3, 3), prefix=5)


# ---------------------------------------------------------------- neighbour mixing


def test_neighbour_mix_matches_loop_reference():
    g = torch.Generator().manual_seed(2)
    code = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64)
    weights = torch.rand(2, 3, 4, 9, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(neighbour_mix(code, weights).numpy(), ref_neighbour_mix(code.numpy(), weights.numpy()), rtol=1e-12)


def test_neighbour_mix_hand_value_and_gradient_reaches_neighbours():
    code = torch.arange(9, dtype=torch.float64).reshape(1, 1, 3, 3).requires_grad_(True)
    weights = torch.zeros(1, 3, 3, 9, dtype=torch.float64)
    weights[0, 0, 0, 4] = 1.0  # self
    weights[0, 0, 0, 8] = 2.0  # (+1, +1) → patch (1, 1), value 4
    weights[0, 1, 1, :] = 1.0  # interior: plain mean of all 9
    out = neighbour_mix(code, weights)
    assert out[0, 0, 0, 0].item() == pytest.approx((1 * 0 + 2 * 4) / 4)  # corner: |N| = 4
    assert out[0, 0, 1, 1].item() == pytest.approx(36 / 9)
    out[0, 0, 0, 0].backward()
    grad = code.grad[0, 0]
    assert grad[1, 1].item() == pytest.approx(2 / 4)  # the neighbour's code gets a gradient
    assert grad[0, 0].item() == pytest.approx(1 / 4)
    assert grad[2, 2].item() == 0 and grad[0, 1].item() == 0


# ---------------------------------------------------------------- small helpers


def test_pool_thresholds_hand_values():
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    pool = torch.tensor([[0.0, 1.0], [0.8, 0.6]])
    torch.testing.assert_close(pool_thresholds(x, pool), torch.tensor([0.8, 0.96]))


def test_lambda_ramp():
    assert lambda_ramp(0, 100, 1100) == 0.0
    assert lambda_ramp(100, 100, 1100) == 0.0
    assert lambda_ramp(101, 100, 1100) == pytest.approx(0.001)
    assert lambda_ramp(600, 100, 1100) == pytest.approx(0.5)
    assert lambda_ramp(1100, 100, 1100) == 1.0
    assert lambda_ramp(5000, 100, 1100) == 1.0


def test_consistency_loss_value():
    z = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]], dtype=torch.float64)
    z_aug = torch.tensor([[[0.0, 1.0], [0.6, 0.8]]], dtype=torch.float64)
    eps = 1e-6
    expect = (math.hypot(1 + eps, -1 + eps) + math.hypot(eps, eps)) / 2
    assert consistency_loss(z, z_aug).item() == pytest.approx(expect, rel=1e-12)


# ---------------------------------------------------------------- hidden-positive loss


@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("reweighting", [True, False])
@pytest.mark.parametrize("lam", [0.0, 0.4])
def test_loss_matches_loop_reference(lam, reweighting, chunk):
    """Whatever number of anchor blocks go through a kernel together (B = 2 here: 3 = all)."""
    case = random_case(3)
    ref, stats = ref_of(case, lam, 0.6, reweighting=reweighting)
    assert stats["kept"] > 0 and stats["sp_outside_den"] > 0  # the case exercises the quirks
    out = hidden_positive_loss(**case, lam=lam, tau=0.6, reweighting=reweighting, blocks_per_chunk=chunk)
    assert out.item() == pytest.approx(ref, rel=1e-10)


def test_loss_float32_matches_reference():
    case = random_case(4, dtype=torch.float32)
    ref, _ = ref_of(case, 0.3, 0.8)
    out = hidden_positive_loss(**case, lam=0.3, tau=0.8)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("chunk", [1, 2])
def test_random_negatives_shared_across_blocks(chunk):
    case = isolated_case()
    # make block 0 contribute nothing at all, so the loss is block 1's alone
    case["feats"][0] = 0
    case["feats"][0, :, 0] = 1.0
    ref0, stats = ref_of(case, 0.5, 0.6)
    assert stats["empty_blocks"] == 1
    # flipping a negative in a row of the single (P, N) draw changes block 1's anchor of that row
    flipped = dict(case, random_negatives=case["random_negatives"].clone())
    flipped["random_negatives"][1, 0] = ~flipped["random_negatives"][1, 0]
    ref1, _ = ref_of(flipped, 0.5, 0.6)
    out0 = hidden_positive_loss(**case, lam=0.5, tau=0.6, blocks_per_chunk=chunk)  # 2: the empty block shares a chunk
    out1 = hidden_positive_loss(**flipped, lam=0.5, tau=0.6, blocks_per_chunk=chunk)
    assert ref0 != pytest.approx(ref1)
    assert out0.item() == pytest.approx(ref0, rel=1e-10)
    assert out1.item() == pytest.approx(ref1, rel=1e-10)
    with pytest.raises(ValueError):
        hidden_positive_loss(**dict(case, random_negatives=torch.ones(8, 8, dtype=torch.bool)), lam=0.5, tau=0.6)


def test_anchor_without_task_agnostic_positive_is_dropped():
    case = isolated_case()
    ref, stats = ref_of(case, 0.5, 0.6)
    assert stats["dropped_with_sp"] >= 1  # block-0 anchor 0: only task-specific positives
    keeping, _ = ref_of(case, 0.5, 0.6, drop_without_ag=False)
    assert keeping != pytest.approx(ref)
    assert hidden_positive_loss(**case, lam=0.5, tau=0.6).item() == pytest.approx(ref, rel=1e-10)


def test_task_specific_positives_only_in_weights_not_denominator():
    case = random_case(5, rho=0.0)
    faithful, stats = ref_of(case, 0.7, 0.5)
    assert stats["sp_outside_den"] > 0
    in_den, _ = ref_of(case, 0.7, 0.5, sp_in_denominator=True)
    assert in_den != pytest.approx(faithful)
    assert hidden_positive_loss(**case, lam=0.7, tau=0.5).item() == pytest.approx(faithful, rel=1e-10)
    # λ = 0 removes M_sp entirely; the loss then does not depend on the EMA codes
    no_sp, _ = ref_of(case, 0.0, 0.5)
    assert no_sp != pytest.approx(faithful)
    other_ema = dict(case, ema_codes=unit(torch.randn(case["ema_codes"].shape, dtype=torch.float64)))
    assert hidden_positive_loss(**other_ema, lam=0.0, tau=0.5).item() == pytest.approx(no_sp, rel=1e-10)


def test_blocks_without_kept_anchor_contribute_zero():
    case = random_case(6)
    # every feature orthogonal to every other and present in the pool: thresholds 1, sims 0 → no positives
    feats = torch.zeros(2, 4, 8, dtype=torch.float64)
    feats.view(8, 8).copy_(torch.eye(8, dtype=torch.float64))
    case = dict(case, feats=feats, pool_feats=torch.eye(8, dtype=torch.float64))
    z = case["z"].clone().requires_grad_(True)
    out = hidden_positive_loss(**dict(case, z=z), lam=1.0, tau=0.6)
    assert out.item() == 0.0
    out.backward()
    assert torch.all(z.grad == 0)


def test_gradients_reach_only_projections():
    case = random_case(3)
    for key in case:
        if key != "random_negatives":
            case[key] = case[key].clone().requires_grad_(True)
    out = hidden_positive_loss(**case, lam=0.4, tau=0.6)
    out.backward()
    assert case["z"].grad is not None and case["z"].grad.abs().sum() > 0
    assert case["z_mix"].grad is not None and case["z_mix"].grad.abs().sum() > 0
    for key in ("feats", "ema_codes", "pool_feats", "pool_codes"):
        assert case[key].grad is None, key
    # the blockwise checkpointed backward agrees with finite differences of the loss
    rest = {k: v.detach() for k, v in case.items() if k not in ("z", "z_mix")}
    zz = case["z"].detach().clone().requires_grad_(True)
    zm = case["z_mix"].detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: hidden_positive_loss(a, b, **rest, lam=0.4, tau=0.6), (zz, zm))
    # no-grad evaluation gives the same value
    with torch.no_grad():
        assert (hidden_positive_loss(**{k: v.detach() for k, v in case.items()}, lam=0.4, tau=0.6).item()
                == pytest.approx(out.item(), rel=1e-12))
