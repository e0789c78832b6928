"""Checks of DrPO: the drift field on toy tensors, then the models, rewards and loop on tiny models."""

import math

import pytest
import torch

import drpo

RADII = (0.02, 0.05, 0.2)


# ---------------------------------------------------------------- the drift field ---------

def naive_field(X, Yp, Yn, wp, wn, radii, kernel="laplacian", mask_pairs=()):
    """DESIGN.md section 2 evaluated entry by entry in float64, written independently of drpo.py.

    wp, wn: (B, P) / (B, M) weights. mask_pairs: extra (i, column) pairs whose logits are masked.
    Returns V (B, N, D) and sigma.
    """
    X, Yp, Yn = X.double(), Yp.double(), Yn.double()
    B, N, D = X.shape
    T = torch.cat([X, Yn, Yp], 1)
    w = torch.cat([torch.ones(B, N, dtype=torch.float64), wn.double(), wp.double()], 1)
    J, M = T.shape[1], Yn.shape[1]
    d = torch.zeros(B, N, J, dtype=torch.float64)
    for b in range(B):
        for i in range(N):
            for j in range(J):
                sq = X[b, i] @ X[b, i] + T[b, j] @ T[b, j] - 2 * X[b, i] @ T[b, j]
                d[b, i, j] = math.sqrt(max(sq.item(), 1e-8))
    s = max((d * w[:, None, :]).mean().item() / w.mean().item(), 1e-3)
    sig = max(s / math.sqrt(D), 1e-3)
    V = torch.zeros(B, N, D, dtype=torch.float64)
    for tau in radii:
        Fr = torch.zeros(B, N, D, dtype=torch.float64)
        for b in range(B):
            lg = torch.zeros(N, J, dtype=torch.float64)
            for i in range(N):
                for j in range(J):
                    if kernel == "laplacian":
                        lg[i, j] = -d[b, i, j] / (s * tau)
                    elif kernel == "rbf":
                        lg[i, j] = -0.5 * (d[b, i, j] / (s * tau)) ** 2
                    else:
                        lg[i, j] = (X[b, i] @ T[b, j]) / (X[b, i].norm() * T[b, j].norm()) / tau
            for i in range(N):
                lg[i, i] -= 100 / tau
            for i, j in mask_pairs:
                lg[i, j] -= 100 / tau
            row = torch.exp(lg - lg.max(1, keepdim=True).values)
            row = row / row.sum(1, keepdim=True)
            col = torch.exp(lg - lg.max(0, keepdim=True).values)
            col = col / col.sum(0, keepdim=True)
            A = torch.sqrt(torch.clamp(row * col, min=1e-6)) * w[b][None, :]
            for i in range(N):
                mp = A[i, N + M:].sum()
                mn = A[i, : N + M].sum()
                for j in range(J):
                    c = -A[i, j] * mp if j < N + M else A[i, j] * mn
                    Fr[b, i] += c * (T[b, j] / sig - X[b, i] / sig)
        Fr = Fr / math.sqrt(max((Fr ** 2).mean().item(), 1e-8))
        V += Fr
    return V, sig


def toy(B=2, N=6, P=3, M=3, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, N, D, generator=g), torch.randn(B, P, D, generator=g) + 1.0,
            torch.randn(B, M, D, generator=g) - 1.0)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("kernel", ["laplacian", "rbf", "cosine"])
def test_field_matches_entrywise_evaluation(kernel):
    X, Yp, Yn = toy()
    wp = torch.tensor([[1000.0, 3000.0, 500.0], [2000.0, 10.0, 3000.0]])
    wn = torch.tensor([700.0, 3000.0, 50.0])
    V, sigma = drpo.drift_field(X, Yp, Yn, pos_weight=wp, neg_weight=wn, radii=RADII, kernel=kernel)
    Vn, sn = naive_field(X, Yp, Yn, wp, wn.expand(2, 3), RADII, kernel)
    assert sigma.item() == pytest.approx(sn, rel=1e-5)
    torch.testing.assert_close(V.double(), Vn, rtol=1e-4, atol=1e-4)


def test_gradient_is_minus_two_v_over_sigma_n_d():
    X, Yp, Yn = toy(N=7, D=4)
    X.requires_grad_(True)
    loss = drpo.drift_loss(X, Yp, Yn, pos_weight=3000.0, neg_weight=3000.0)
    V, sigma = drpo.drift_field(X, Yp, Yn, pos_weight=3000.0, neg_weight=3000.0)
    loss.sum().backward()
    N, D = X.shape[1:]
    torch.testing.assert_close(X.grad, -2 * V / (sigma * N * D), rtol=1e-5, atol=1e-7)
    # and the loss value is mean(V^2) per set, since gen/sigma - goal = -V at this point
    torch.testing.assert_close(loss, V.pow(2).mean(dim=(1, 2)))


def test_field_points_from_negatives_to_positives():
    g = torch.Generator().manual_seed(1)
    e = torch.zeros(8)
    e[0] = 1.0
    X = 0.1 * torch.randn(1, 16, 8, generator=g)
    Yp = 3 * e + 0.1 * torch.randn(1, 4, 8, generator=g)
    Yn = -3 * e + 0.1 * torch.randn(1, 4, 8, generator=g)
    V, _ = drpo.preference_field(X, Yp, Yn)
    assert (V[0] @ e > 0).all()                     # every sample is pushed towards +e
    assert cosine(V.mean(1), e[None]) > 0.9          # and the mean field is aligned with it


def test_swapping_positives_and_negatives_flips_the_field():
    X, Yp, Yn = toy(B=1, N=10, P=4, M=4, D=6, seed=3)
    V1, _ = drpo.preference_field(X, Yp, Yn)
    V2, _ = drpo.preference_field(X, Yn, Yp)
    assert cosine(V1, V2) < -0.99


def test_reference_drift_pulls_back_to_shifted_base():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(1, 12, 6, generator=g)
    delta = torch.zeros(6)
    delta[2] = 0.8
    V, _ = drpo.reference_drift(X, X + delta)
    proj = (V[0] @ delta) / delta.norm()
    assert proj.mean() > 0.3 * V[0].norm(dim=-1).mean()  # clearly positive, not marginally


def test_reference_drift_with_identical_base_spreads_samples():
    X = torch.randn(1, 12, 6, generator=torch.Generator().manual_seed(5))
    V, sigma = drpo.reference_drift(X, X.clone())
    assert V.abs().max() > 0.1                      # not zero
    before = torch.pdist(X[0]).mean()
    after = torch.pdist(X[0] + 0.01 * sigma * V[0]).mean()
    assert after > before


def test_laplacian_field_is_scale_invariant():
    X, Yp, Yn = toy(seed=6)
    V1, s1 = drpo.preference_field(X, Yp, Yn)
    V2, s2 = drpo.preference_field(7.5 * X, 7.5 * Yp, 7.5 * Yn)
    torch.testing.assert_close(V1, V2, rtol=1e-4, atol=1e-4)
    assert s2.item() == pytest.approx(7.5 * s1.item(), rel=1e-5)


def test_uniform_anchor_weights_equal_scalar_weight():
    X, Yp, Yn = toy(seed=7)
    V, _ = drpo.drift_field(X, Yp, Yn, pos_weight=1234.0, neg_weight=99.0)
    V1, _ = drpo.drift_field(X, Yp, Yn, pos_weight=torch.full((3,), 1234.0), neg_weight=torch.full((2, 3), 99.0))
    torch.testing.assert_close(V, V1)
    # and a non-uniform weight does change it (the weights are really used)
    V2, _ = drpo.drift_field(X, Yp, Yn, pos_weight=torch.tensor([1234.0, 1.0, 1234.0]), neg_weight=99.0)
    assert (V - V2).abs().max() > 1e-3


def test_mask_neg_self_masks_exactly_the_pairs_i_n_plus_i():
    g = torch.Generator().manual_seed(8)
    X = torch.randn(1, 5, 3, generator=g)
    ref = torch.randn(1, 5, 3, generator=g)
    w = torch.full((1, 5), 3000.0)
    V, _ = drpo.reference_drift(X, ref)
    N = 5
    Vn, _ = naive_field(X, ref, X, w, w, RADII, mask_pairs=[(i, N + i) for i in range(N)])
    torch.testing.assert_close(V.double(), Vn, rtol=1e-4, atol=1e-4)
    # masking other pairs (or none) gives a different field, so the mask is where it should be
    Vshift, _ = naive_field(X, ref, X, w, w, RADII, mask_pairs=[(i, N + (i + 1) % N) for i in range(N)])
    Vnone, _ = drpo.drift_field(X, ref, X, pos_weight=3000.0, neg_weight=3000.0)
    assert (Vshift - Vn).abs().max() > 1e-2
    assert (Vnone.double() - Vn).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_finite_float32_losses(dtype):
    X, Yp, Yn = (t.to(dtype) for t in toy(seed=9))
    X.requires_grad_(True)
    loss = drpo.drift_loss(X, Yp, Yn, pos_weight=3000.0, neg_weight=3000.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert X.grad.dtype == dtype and torch.isfinite(X.grad.float()).all()
    ref = drpo.drift_loss(X.detach().float(), Yp.float(), Yn.float(), pos_weight=3000.0, neg_weight=3000.0)
    torch.testing.assert_close(loss.detach(), ref, rtol=0.05, atol=0.05)


def test_objective_is_preference_plus_lambda_reference_and_chunks_add_up():
    g = torch.Generator().manual_seed(10)
    K, T = 6, 2  # 6 candidates with 2 tokens each, pooled into a set of 12
    gen = {"a": torch.randn(2, K * T, 4, generator=g), "b": torch.randn(2, K, 3, generator=g)}
    pos = {k: v[:, :4] + 1 for k, v in gen.items()}
    neg = {k: v[:, -4:] - 1 for k, v in gen.items()}
    ref = {k: v + 0.3 for k, v in gen.items()}
    gen = {k: v.requires_grad_(True) for k, v in gen.items()}
    loss, stats = drpo.drpo_objective(gen, pos, neg, ref, lambda_ref=0.2)
    expect = sum(drpo.drift_loss(gen[k], pos[k], neg[k], pos_weight=3000.0, neg_weight=3000.0).mean()
                 + 0.2 * drpo.drift_loss(gen[k], ref[k], gen[k].detach(), pos_weight=3000.0, neg_weight=3000.0,
                                         mask_neg_self=True).mean() for k in gen)
    torch.testing.assert_close(loss, expect)
    assert stats["loss_pref"] + 0.2 * stats["loss_ref"] == pytest.approx(loss.item(), rel=1e-5)
    assert stats["dist_pos"] > 0 and stats["dist_ref"] > 0
    full = torch.autograd.grad(loss, list(gen.values()))
    # the same targets, regressed two candidates at a time, give the same value and gradient
    targets, _ = drpo.drpo_targets(gen, pos, neg, ref, lambda_ref=0.2)
    total = 0.0
    grads = [torch.zeros_like(v) for v in gen.values()]
    for c in range(0, K, 2):
        chunk = {"a": gen["a"][:, c * T:(c + 2) * T], "b": gen["b"][:, c:c + 2]}
        part = drpo.regression_loss(chunk, targets, start=c, n_total=K)
        for acc, gr in zip(grads, torch.autograd.grad(part, list(gen.values()))):
            acc += gr
        total += part.item()
    assert total == pytest.approx(loss.item(), rel=1e-5)
    for a, b in zip(grads, full):
        torch.testing.assert_close(a, b)


def test_select_pos_neg_is_disjoint_ordered_and_deterministic():
    scores = torch.tensor([[0.5, 3.0, -1.0, 3.0, 0.0, 2.0, -1.0, 1.0]])
    pos, neg = drpo.select_pos_neg(scores, 3, 3)
    assert pos.tolist() == [[1, 3, 5]]               # best first; the tie 1/3 broken by index
    assert neg.tolist() == [[6, 2, 4]]               # worst first
    assert not set(pos[0].tolist()) & set(neg[0].tolist())
    p1, n1 = drpo.select_pos_neg(scores[0], 4, 4)    # K = n_pos + n_neg still disjoint
    assert sorted(p1.tolist() + n1.tolist()) == list(range(8))


@pytest.mark.parametrize("scores,n_pos,n_neg,match", [
    (torch.randn(8), 5, 4, "exceeds"),
    (torch.tensor([1.0, float("nan"), 0.0, 2.0]), 1, 1, "NaN"),
    (torch.tensor([1.0, float("inf"), 0.0, 2.0]), 1, 1, "NaN or infinite"),
    (torch.randn(8), 0, 2, "at least 1"),
    (torch.randn(2, 3, 4), 1, 1, "shape"),
])
def test_select_pos_neg_rejects_bad_input(scores, n_pos, n_neg, match):
    with pytest.raises(ValueError, match=match):
        drpo.select_pos_neg(scores, n_pos, n_neg)


@pytest.mark.parametrize("change,match", [
    (dict(gen=torch.randn(6, 5)), "gen must be"),
    (dict(pos=torch.randn(3, 3, 5)), "batch"),
    (dict(neg=torch.randn(2, 3, 4)), "feature size"),
    (dict(pos=torch.randn(2, 0, 5)), "pos is empty"),
    (dict(neg=torch.randn(2, 0, 5)), "neg is empty"),
    (dict(radii=(0.1, 0.0)), "radii"),
    (dict(radii=()), "radii"),
    (dict(kernel="gaussian"), "unknown kernel"),
    (dict(pos_weight=torch.ones(4)), "pos_weight"),
    (dict(neg_weight=torch.ones(3, 3)), "neg_weight"),
])
def test_drift_loss_rejects_bad_input(change, match):
    X, Yp, Yn = toy()
    args = dict(gen=X, pos=Yp, neg=Yn, pos_weight=1.0, neg_weight=1.0, radii=RADII, kernel="laplacian")
    args.update(change)
    with pytest.raises(ValueError, match=match):
        drpo.drift_loss(**args)
