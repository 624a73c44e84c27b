"""Grounding scores: agreement with straightforward re-implementations, hand cases, edge cases."""

import math

import numpy as np
import pytest
import torch

from hf_vgrefine import metrics as M

# --------------------------------------------------------------------------------------------------
# independent references: one map [N] (list of floats), one region given as per-token weights w [N]
# --------------------------------------------------------------------------------------------------


def ref_ar(m, w):
    n = len(m)
    inside = sum(wi * mi for wi, mi in zip(w, m))
    return inside / ((sum(m) / n) * sum(w) + 1e-8)


def ref_p(m):
    tot = sum(m) + 1e-8
    return [x / tot for x in m]


def ref_g(w):
    tot = sum(w)
    return [x / tot for x in w]


def ref_kl(m, w):
    p, g = ref_p(m), ref_g(w)
    out = 0.0
    for pi, gi in zip(p, g):
        pi = min(max(pi, 1e-12), 1.0)
        gi = min(max(gi, 1e-12), 1.0)
        out += gi * math.log(gi / pi)
    return out


def ref_js(m, w):
    p, g = ref_p(m), ref_g(w)
    a = b = 0.0
    for pi, gi in zip(p, g):
        mid = (pi + gi) / 2
        a += pi * math.log((pi + 1e-8) / (mid + 1e-8))
        b += gi * math.log((gi + 1e-8) / (mid + 1e-8))
    return 0.5 * a + 0.5 * b


def ref_soft_dice(m, w):
    p, g = ref_p(m), ref_g(w)
    inter = sum(pi * gi for pi, gi in zip(p, g))
    union = sum(((pi + gi) / 2) ** 2 for pi, gi in zip(p, g))
    return inter / union


def ref_epg(m, w):
    return sum(wi * pi for wi, pi in zip(w, ref_p(m)))


def ref_pointing(m, w, grid=None, tol=0, ties="first"):
    best = max(m)
    winners = [i for i, x in enumerate(m) if x == best]
    if ties == "first":
        winners = winners[:1]
    region = [i for i, x in enumerate(w) if x > 0]
    for i in winners:
        if tol == 0:
            if i in region:
                return 1.0
            continue
        r, c = divmod(i, grid[1])
        for j in region:
            rj, cj = divmod(j, grid[1])
            if max(abs(r - rj), abs(c - cj)) <= tol:
                return 1.0
    return 0.0


def ref_threshold_set(m, w, mode, q=0.1, theta=0.5):
    n = len(m)
    desc = sorted(m, reverse=True)
    if mode == "oracle_size":
        thr = desc[sum(1 for x in w if x > 0) - 1]
    elif mode == "top_frac":
        thr = desc[math.ceil(round(q * n, 9)) - 1]
    elif mode == "mean":
        thr = sum(m) / n
        thr = min(thr, max(m))
    elif mode == "fixed":
        lo, hi = min(m), max(m)
        z = [(x - lo) / (hi - lo) if hi > lo else 1.0 for x in m]
        return {i for i, x in enumerate(z) if x >= theta}
    elif mode == "otsu":  # brute force over every candidate threshold (each distinct value)
        best, thr = -1.0, min(m)
        for t in sorted(set(m))[1:]:
            lo_c = [x for x in m if x < t]
            hi_c = [x for x in m if x >= t]
            w0, w1 = len(lo_c) / n, len(hi_c) / n
            var = w0 * w1 * (sum(lo_c) / len(lo_c) - sum(hi_c) / len(hi_c)) ** 2
            if var > best + 1e-15:
                best, thr = var, t
    return {i for i, x in enumerate(m) if x >= thr}


def ref_thresholded(m, w, mode, metric="iou", **kw):
    sel = ref_threshold_set(m, w, mode, **kw)
    region = {i for i, x in enumerate(w) if x > 0}
    inter = len(sel & region)
    if metric == "iou":
        return inter / len(sel | region)
    return 2 * inter / (len(sel) + len(region))


def ref_auroc(m, w):
    pos = [x for x, wi in zip(m, w) if wi > 0]
    neg = [x for x, wi in zip(m, w) if wi == 0]
    wins = 0.0
    for a in pos:
        for b in neg:
            wins += 1.0 if a > b else (0.5 if a == b else 0.0)
    return wins / (len(pos) * len(neg))


REFS = {
    "attention_ratio": ref_ar,
    "kl_gt_attention": ref_kl,
    "js_divergence": ref_js,
    "soft_dice_ratio": ref_soft_dice,
    "energy_pointing_game": ref_epg,
    "pointing_game": ref_pointing,
    "thresholded_iou": lambda m, w: ref_thresholded(m, w, "oracle_size"),
    "thresholded_dice": lambda m, w: ref_thresholded(m, w, "oracle_size", "dice"),
    "auroc": ref_auroc,
}


def random_case(rng, n, kind):
    """A map [n] and a binary region [n] of a given flavour."""
    if kind == "dense":
        m = rng.random(n)
    elif kind == "peaky":
        m = rng.random(n) ** 8
    elif kind == "sparse":  # zeros and exact ties
        m = rng.integers(0, 4, n).astype(float)
        m[0] = 5.0
    else:  # softmax-like
        x = rng.normal(size=n) * 3
        m = np.exp(x) / np.exp(x).sum()
    f = rng.uniform(0.05, 0.6)
    w = rng.random(n) < f
    w[rng.integers(n)] = True
    w[rng.integers(n)] = False
    if w.all():
        w[0] = False
    return m, w


@pytest.mark.parametrize("kind", ["dense", "peaky", "sparse", "softmax"])
def test_batched_scores_match_reference_loops(kind):
    rng = np.random.default_rng({"dense": 0, "peaky": 1, "sparse": 2, "softmax": 3}[kind])
    n = 36
    maps, masks = zip(*(random_case(rng, n, kind) for _ in range(24)))
    m, w = np.stack(maps).reshape(4, 6, n), np.stack(masks).reshape(4, 6, n)
    got = M.grounding_scores(m, w)
    assert set(got) == set(M.ALL)
    for name, ref in REFS.items():
        assert got[name].shape == (4, 6)
        want = np.array([ref(list(a), list(b.astype(float))) for a, b in zip(maps, masks)]).reshape(4, 6)
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("mode", ["oracle_size", "top_frac", "mean", "otsu", "fixed"])
@pytest.mark.parametrize("metric", ["iou", "dice"])
def test_thresholded_modes_match_reference(mode, metric):
    rng = np.random.default_rng(7)
    for kind in ["dense", "sparse", "peaky"]:
        for _ in range(6):
            m, w = random_case(rng, 30, kind)
            got = M.thresholded_iou(m, w, mode=mode, q=0.2, theta=0.3, metric=metric)
            kw = {"q": 0.2} if mode == "top_frac" else {"theta": 0.3} if mode == "fixed" else {}
            want = ref_thresholded(list(m), list(w.astype(float)), mode, metric, **kw)
            assert got == pytest.approx(want, abs=1e-12), (kind, mode, metric)


def test_auroc_matches_brute_force_with_ties():
    rng = np.random.default_rng(11)
    for n in (2, 5, 17, 64):
        for levels in (2, 3, 1000):
            m = rng.integers(1, levels + 1, size=(20, n)).astype(float)  # Σm > 0
            w = rng.random((20, n)) < 0.4
            w[:, 0], w[:, -1] = True, False
            got = M.auroc(m, w)
            want = [ref_auroc(list(a), list(b)) for a, b in zip(m, w)]
            np.testing.assert_allclose(got, want, atol=1e-12)


def test_pointing_game_tolerance_and_ties():
    rng = np.random.default_rng(5)
    grid = (5, 7)
    for _ in range(40):
        m = rng.integers(0, 3, 35).astype(float)
        w = np.zeros(35, bool)
        w[rng.integers(35)] = True
        for tol in (0, 1, 2):
            for ties in ("first", "any"):
                got = M.pointing_game(m, w, tolerance=tol, grid=grid, ties=ties)
                assert got == ref_pointing(list(m), list(w), grid, tol, ties), (tol, ties)
    # grid inferred from an [R, C] mask, and from a square N
    m = np.zeros((4, 4))
    m[0, 0] = 1
    gt = np.zeros((4, 4), bool)
    gt[2, 2] = True
    assert M.pointing_game(m.ravel(), gt, tolerance=1) == 0.0
    assert M.pointing_game(m.ravel(), gt, tolerance=2) == 1.0
    assert M.pointing_game(m.ravel(), gt.ravel(), tolerance=2) == 1.0
    with pytest.raises(ValueError, match="grid"):
        M.pointing_game(np.ones(6), [0], tolerance=1)


def test_soft_ground_truth_matches_reference():
    rng = np.random.default_rng(3)
    n = 25
    for _ in range(10):
        m = rng.random(n) ** 3
        w = np.clip(rng.random(n) * 1.6 - 0.6, 0, 1)
        got = M.grounding_scores(m, w)
        for name in ("attention_ratio", "kl_gt_attention", "js_divergence", "soft_dice_ratio", "energy_pointing_game"):
            assert got[name] == pytest.approx(REFS[name](list(m), list(w)), rel=1e-6), name
        # set-based scores use the support {w > 0}
        assert got["auroc"] == pytest.approx(ref_auroc(list(m), list(w)))
        assert got["thresholded_iou"] == pytest.approx(REFS["thresholded_iou"](list(m), list(w)))
    # soft AR = (Σ w m / Σ w) / mean(m) up to the 1e-8 constant
    ar = M.attention_ratio(m, w)
    assert ar == pytest.approx((w @ m / w.sum()) / m.mean(), rel=1e-6)


def test_hand_computed_3x3():
    # map on a 3x3 grid, region = top-left 2x2 block (f = 4/9)
    m = np.array([[4.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    gt = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
    s = M.grounding_scores(m.ravel(), gt)
    # Σm = 10, inside = 9: AR = 9 / (10/9 * 4) = 2.025 ; EPG = 0.9
    assert s["attention_ratio"] == pytest.approx(9 / (40 / 9 + 1e-8))
    assert s["energy_pointing_game"] == pytest.approx(0.9)
    # KL(g||p): g = 1/4 on the block, p = m/10 = [.4 .2 0; .2 .1 0; 0 0 .1]
    # = ¼(ln(.25/.4) + 2 ln(.25/.2) + ln(.25/.1)) = ln 1.25, plus the clipped zeros of g:
    # four tokens with p = 0 (1e-12·ln 1) and token 8 (1e-12·ln(1e-12/.1)); the 1e-8 of p's
    # denominator (Σm + 1e-8 = 10 + 1e-8) adds ln(1 + 1e-9)
    kl = math.log(1.25) + 1e-12 * math.log(1e-11) + math.log1p(1e-9)
    assert s["kl_gt_attention"] == pytest.approx(kl, abs=1e-12)
    # JS, M = (p+g)/2 = [.325 .225 0; .225 .175 0; 0 0 .05]
    js = 0.5 * (0.4 * math.log(0.4 / 0.325) + 0.25 * math.log(0.25 / 0.325))
    js += 2 * 0.5 * (0.2 * math.log(0.2 / 0.225) + 0.25 * math.log(0.25 / 0.225))
    js += 0.5 * (0.1 * math.log(0.1 / 0.175) + 0.25 * math.log(0.25 / 0.175))
    js += 0.5 * 0.1 * math.log(2)
    assert js == pytest.approx(0.0627768, abs=1e-7)
    assert s["js_divergence"] == pytest.approx(js, abs=1e-6)
    # soft-Dice ratio: I = Σ p g = 0.9/4 = 0.225; U = Σ ((p+g)/2)² = .105625 + 2·.050625 + .030625 + .0025 = .24
    assert s["soft_dice_ratio"] == pytest.approx(0.225 / 0.24, rel=1e-6)
    # argmax = token 0 in the region
    assert s["pointing_game"] == 1.0
    # oracle size |B| = 4: the 4 largest values are 4, 2, 2, 1 and ties at 1 (tokens 4 and 8) are kept
    # -> S = {0, 1, 3, 4, 8}: IoU = 4/5, Dice = 8/9
    assert s["thresholded_iou"] == pytest.approx(4 / 5)
    assert s["thresholded_dice"] == pytest.approx(8 / 9)
    # AUROC: positives 4,2,2,1 vs negatives 0,0,0,0,1 -> wins = 5 + 5 + 5 + (4 + 0.5) = 19.5 / 20
    assert s["auroc"] == pytest.approx(19.5 / 20)
    # other thresholds on the same case: mean = 10/9 -> S = {0, 1, 3}; Otsu: between-class variance
    # w0·w1·(μ0−μ1)² is 80/81 at θ=1, 882/729 at θ=2, 8/81·3.25² at θ=4 -> θ = 2, S = {0, 1, 3}
    assert M.thresholded_iou(m.ravel(), gt, mode="mean") == pytest.approx(3 / 4)
    assert M.thresholded_iou(m.ravel(), gt, mode="otsu") == pytest.approx(3 / 4)
    assert M.thresholded_iou(m.ravel(), gt, mode="otsu", metric="dice") == pytest.approx(6 / 7)
    assert M.thresholded_iou(m.ravel(), gt, mode="fixed", theta=0.5) == pytest.approx(3 / 4)
    assert M.thresholded_iou(m.ravel(), gt, mode="top_frac", q=0.2) == pytest.approx(3 / 4)  # k = 2: 4, 2, 2


def test_uniform_attention_is_chance():
    n = 24
    gt = np.zeros(n, bool)
    gt[:6] = True  # f = 1/4
    f = 0.25
    s = M.grounding_scores(np.full(n, 0.3), gt)
    chance = M.chance_levels(f)
    assert s["attention_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert s["energy_pointing_game"] == pytest.approx(f, rel=1e-6)
    for name in ("attention_ratio", "kl_gt_attention", "js_divergence", "soft_dice_ratio", "energy_pointing_game", "auroc"):
        assert s[name] == pytest.approx(chance[name], rel=1e-6, abs=1e-7), name
    assert chance["kl_gt_attention"] == pytest.approx(math.log(4))
    assert chance["soft_dice_ratio"] == pytest.approx(4 * f / (1 + 3 * f))


def test_all_mass_in_region_is_perfect():
    n = 30
    gt = np.zeros(n, bool)
    gt[[3, 4, 5, 10, 11]] = True
    f = 5 / 30
    m = gt * 0.2  # uniform on the region
    s = M.grounding_scores(m, gt)
    assert s["attention_ratio"] == pytest.approx(1 / f, rel=1e-6)
    assert s["energy_pointing_game"] == pytest.approx(1.0, rel=1e-6)
    assert s["kl_gt_attention"] == pytest.approx(0.0, abs=1e-6)
    assert s["js_divergence"] == pytest.approx(0.0, abs=1e-6)
    assert s["soft_dice_ratio"] == pytest.approx(1.0, rel=1e-6)
    for name in ("pointing_game", "thresholded_iou", "thresholded_dice", "auroc"):
        assert s[name] == 1.0, name
    # all mass in the region but not uniform on it: AR still maximal, KL > 0
    m2 = m.copy()
    m2[3] = 5.0
    s2 = M.grounding_scores(m2, gt)
    assert s2["attention_ratio"] == pytest.approx(1 / f, rel=1e-6)
    assert s2["kl_gt_attention"] > 0.1


def test_ground_truth_forms_agree():
    rng = np.random.default_rng(0)
    m = rng.random(12)
    idx = [1, 5, 6, 11]
    mask = np.zeros(12, bool)
    mask[idx] = True
    ref = M.grounding_scores(m, mask)
    for gt in (idx, tuple(idx), set(idx), np.array(idx), mask.reshape(3, 4), mask.astype(float),
               mask.reshape(3, 4).astype(np.int64), torch.tensor(mask), torch.tensor(idx)):
        got = M.grounding_scores(m, gt)
        for name in ref:
            assert got[name] == pytest.approx(ref[name]), (type(gt), name)
    got = M.grounding_scores(torch.tensor(m, dtype=torch.float32), mask)
    assert got["attention_ratio"] == pytest.approx(ref["attention_ratio"], rel=1e-6)
    assert M.grounding_scores(m.tolist(), idx)["auroc"] == ref["auroc"]


def test_broadcasting_layers_heads_and_batches():
    rng = np.random.default_rng(1)
    m = rng.random((3, 4, 5, 16))  # [B, L, H, N]
    gt = rng.random((3, 1, 1, 16)) < 0.3
    gt[..., 0] = True
    got = M.attention_ratio(m, gt)
    assert got.shape == (3, 4, 5)
    for b in range(3):
        for layer in range(4):
            for h in range(5):
                assert got[b, layer, h] == pytest.approx(ref_ar(list(m[b, layer, h]), list(gt[b, 0, 0].astype(float))))
    # one region for every layer/head
    got1 = M.grounding_scores(m[0], [0, 3, 4])
    assert got1["auroc"].shape == (4, 5)
    # one map scored against several regions
    regions = np.eye(16, dtype=bool)[:3]
    assert M.energy_pointing_game(m[0, 0, 0], regions).shape == (3,)
    assert isinstance(M.auroc(m[0, 0, 0], [1, 2]), np.floating)


def test_nan_policy():
    m = np.array(
        [
            [1.0, 2.0, 3.0, 4.0],  # fine
            [0.0, 0.0, 0.0, 0.0],  # Σm = 0
            [1.0, np.nan, 1.0, 1.0],  # non-finite
            [1.0, np.inf, 1.0, 1.0],  # non-finite
            [1.0, 2.0, 3.0, 4.0],  # empty region (below)
            [1.0, -np.inf, 1.0, 1.0],  # non-finite (negative infinity is not a "negative value" error)
        ]
    )
    gt = np.array([[1, 1, 0, 0]] * 4 + [[0, 0, 0, 0]] + [[1, 0, 0, 0]], dtype=bool)
    with np.errstate(all="raise"):  # no floating-point warnings escape either
        s = M.grounding_scores(m, gt)
    for name, v in s.items():
        assert np.isfinite(v[0]), name
        assert np.isnan(v[1:]).all(), name
    # AUROC is NaN when the region covers every token
    assert np.isnan(M.auroc([1.0, 2.0, 3.0], [0, 1, 2]))
    assert np.isnan(M.attention_ratio([1.0, 2.0], []))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="does not match"):
        M.attention_ratio(np.ones(10), np.ones(9, bool))
    with pytest.raises(ValueError, match="does not match"):
        M.attention_ratio(np.ones(10), np.ones((3, 4), bool))
    with pytest.raises(ValueError, match="broadcast"):
        M.attention_ratio(np.ones((2, 10)), np.ones((3, 10), bool))
    with pytest.raises(ValueError, match="negative"):
        M.kl_gt_attention(np.array([0.5, -0.1, 0.6]), [0])
    with pytest.raises(ValueError, match="negative"):
        M.auroc(np.array([[0.5, np.nan, 0.6], [0.1, -1.0, np.nan]]), [0])
    with pytest.raises(ValueError, match="indices"):
        M.attention_ratio(np.ones(4), [0, 7])
    with pytest.raises(ValueError, match="duplicate"):
        M.attention_ratio(np.ones(4), np.array([0, 1, 1, 0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.attention_ratio(np.ones(4), np.array([0.0, 1.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="NaN"):
        M.attention_ratio(np.ones(4), np.array([0.0, np.nan, 0.0, 0.0]))
    with pytest.raises(ValueError, match="unknown score"):
        M.grounding_scores(np.ones(4), [0], scores=["iou"])
    with pytest.raises(ValueError, match="threshold mode"):
        M.thresholded_iou(np.ones(4), [0], mode="median")
    with pytest.raises(ValueError, match="scalar"):
        M.attention_ratio(3.0, [0])


def test_aliases_and_chance_levels():
    rng = np.random.default_rng(2)
    m, w = rng.random(20), rng.random(20) < 0.3
    w[0] = True
    s = M.grounding_scores(m, w, ["vgmed_iou", "relevance_mass_ratio"])
    assert s["vgmed_iou"] == M.soft_dice_ratio(m, w) == M.vgmed_iou(m, w)
    assert s["relevance_mass_ratio"] == M.energy_pointing_game(m, w)
    f = np.array([0.0, 0.1, 0.5, 1.0])
    c = M.chance_levels(f)
    assert np.isnan(c["attention_ratio"][0]) and c["attention_ratio"][1] == 1.0
    np.testing.assert_allclose(c["thresholded_iou"][1:3], f[1:3] / (2 - f[1:3]))
    assert np.isnan(c["auroc"][3]) and c["auroc"][2] == 0.5
    js = c["js_divergence"][1]
    assert js == pytest.approx(0.5 * (0.1 * math.log(0.2 / 1.1) + 0.9 * math.log(2) + math.log(2 / 1.1)))
    # JS chance agrees with uniform attention
    gt = np.zeros(20, bool)
    gt[:2] = True
    assert M.js_divergence(np.ones(20), gt) == pytest.approx(js, rel=1e-6)
    cq = M.chance_levels(0.2, threshold_mode="top_frac", q=0.2)
    assert cq["thresholded_dice"] == pytest.approx(0.2)


def test_relative_attention():
    q = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    g = np.array([0.4, 0.3, 0.3])
    np.testing.assert_allclose(M.relative_attention(q, g), q / (g + 1e-10))
    r = M.relative_attention(torch.tensor(q), torch.tensor(g), eps=0.0)
    np.testing.assert_allclose(r, q / g)
    z = M.relative_attention(np.array([0.5, 0.5]), np.array([0.0, 1.0]), eps=0.0)
    assert np.isinf(z[0])
    assert np.isnan(M.attention_ratio(z, [0]))
    with pytest.raises(ValueError, match="broadcast"):
        M.relative_attention(np.ones(3), np.ones(4))


def test_aggregate_statistics():
    rng = np.random.default_rng(0)
    v = rng.normal(1.0, 0.5, size=200)
    v[[3, 7]] = np.nan
    f = rng.uniform(0.1, 0.3, size=200)
    f[5] = 0.0
    agg = M.aggregate({"attention_ratio": v}, f=f, n_boot=500, seed=0)["attention_ratio"]
    ok = v[np.isfinite(v)]
    assert agg["mean"] == pytest.approx(ok.mean())
    assert agg["median"] == pytest.approx(np.median(ok))
    assert agg["n"] == 198 and agg["n_nan"] == 2
    assert agg["ci_low"] < agg["mean"] < agg["ci_high"]
    se = ok.std(ddof=1) / math.sqrt(len(ok))
    assert agg["ci_high"] - agg["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert agg["chance"] == 1.0 and agg["n_skipped_empty_gt"] == 1
    again = M.aggregate({"attention_ratio": v}, f=f, n_boot=500, seed=0)["attention_ratio"]
    assert again == agg  # seeded
    # per-layer arrays keep their trailing shape; chance = mean of per-sample chance values
    per_layer = rng.random((50, 3))
    fl = np.full(50, 0.25)
    agg2 = M.aggregate({"energy_pointing_game": per_layer, "kl_gt_attention": per_layer}, f=fl, n_boot=100)
    assert agg2["energy_pointing_game"]["mean"].shape == (3,)
    np.testing.assert_allclose(agg2["energy_pointing_game"]["mean"], per_layer.mean(0))
    assert agg2["energy_pointing_game"]["chance"] == pytest.approx(0.25)
    assert agg2["kl_gt_attention"]["chance"] == pytest.approx(math.log(4))
    # no f -> chance NaN
    assert math.isnan(M.aggregate({"auroc": [0.5, 0.7]}, n_boot=10)["auroc"]["chance"])


def test_compute_from_maps_variable_sizes():
    rng = np.random.default_rng(4)
    preds, refs = [], []
    for shape in [(4, 6), (8, 3), (4, 6), (5, 5)]:
        preds.append(rng.random(shape))
        r = np.zeros(shape)
        r[1:3, 1:3] = 1
        refs.append(r.tolist())
    res = M.compute_from_maps(preds, refs, return_per_sample=True)
    for name in M.ALL:
        per = [M.grounding_scores(p.ravel(), np.asarray(r, bool), [name])[name] for p, r in zip(preds, refs)]
        np.testing.assert_allclose(res["per_sample"][name], per)
        assert res[name] == pytest.approx(np.mean(per))
    assert res["n"] == 4 and res["n_nan"]["auroc"] == 0
    with pytest.raises(ValueError, match="sample 1"):
        M.compute_from_maps([np.ones((2, 2)), np.ones((2, 3))], [np.ones((2, 2)), np.ones((3, 2))])


def test_large_batch_blocks_and_threads_agree():
    rng = np.random.default_rng(9)
    m = rng.random((3000, 64)) ** 4
    m[::7] = np.round(m[::7], 1)  # some rows with ties
    gt = rng.random((3000, 64)) < 0.2
    one = M.grounding_scores(m, gt, n_threads=1)
    two = M.grounding_scores(m, gt, n_threads=2)
    for name in one:
        np.testing.assert_array_equal(one[name], two[name])
    sub = M.grounding_scores(m[1234], gt[1234])
    for name in one:
        assert one[name][1234] == pytest.approx(sub[name], rel=1e-12, abs=1e-15)


def test_float32_torch_inputs_and_region_fraction():
    rng = np.random.default_rng(8)
    m = rng.random((500, 36)).astype(np.float32)
    gt = rng.random((500, 36)) < 0.3
    a = M.grounding_scores(m, gt)
    b = M.grounding_scores(m.astype(np.float64), gt)
    c = M.grounding_scores(torch.from_numpy(m), torch.from_numpy(gt))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a[name], c[name])
    np.testing.assert_allclose(M.region_fraction(m, gt), gt.mean(-1))
    assert M.region_fraction(m[0], [1, 2, 3]) == pytest.approx(3 / 36)
    assert M.region_fraction(m[0], np.full(36, 0.5)) == pytest.approx(0.5)
