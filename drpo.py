"""DrPO: Drifting Preference Optimization for one-step text-to-image generators.

A single-file reference implementation of arXiv 2606.02521 for SD-Turbo.

    python drpo.py --model sd-turbo --reward hpsv3          # the paper's setting
    python drpo.py --make-tiny /tmp/tiny                    # offline demo model
    python drpo.py --model /tmp/tiny --reward brightness --max-steps 100 --lr 1e-3 --grad-accum 1

One training step, per prompt c (DESIGN.md section 1):
  1. Sample:     K noises z, x = G_theta(z, c) (LoRA on), r = G_0(z, c) (LoRA off).
  2. Rank:       decode x, score with the reward (never differentiated), top n_pos / bottom n_neg.
  3. Featurize:  feature sets phi(x), phi(positives), phi(negatives), phi(r).
  4. Field:      dipole preference field V_pref and reference drift V_ref on detached phi(x).
  5. Regress:    L = sum_k MSE(phi(x)/sigma, sg(phi(x)/sigma + V)), backprop into the LoRA only.

Reading order: the drift field (pure torch, copy it into your own trainer), models and
one-step sampling, rewards, feature maps, the training loop, the command line.
"""

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# 1. The drift field (DESIGN.md section 2). Pure torch: these functions need nothing else.
# ----------------------------------------------------------------------------------------

KERNELS = ("laplacian", "exponential", "rbf", "cosine")


def _anchor_weights(w, B, n, name, device):
    """A float, or a per-anchor tensor of shape (n,) or (B, n), as a float32 (B, n) tensor."""
    if not torch.is_tensor(w):
        return torch.full((B, n), float(w), device=device)
    w = w.to(device=device, dtype=torch.float32)
    if w.dim() == 0:
        return w.expand(B, n)
    if w.shape == (n,):
        return w.expand(B, n)
    if w.shape == (B, n):
        return w
    raise ValueError(f"{name} has shape {tuple(w.shape)}; pass a float or a tensor of shape ({n},) or ({B}, {n})")


def _check_sets(gen, pos, neg, radii, kernel):
    for name, t in (("gen", gen), ("pos", pos), ("neg", neg)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be a (B, set size, D) tensor, got shape {tuple(t.shape)}")
    B, _, D = gen.shape
    for name, t in (("pos", pos), ("neg", neg)):
        if t.shape[0] != B or t.shape[2] != D:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but gen has {tuple(gen.shape)}: "
                             f"batch (dim 0) and feature size (dim 2) must match")
        if t.shape[1] == 0:
            raise ValueError(f"{name} is empty: the field needs at least one {name} anchor per set")
    if gen.shape[1] == 0:
        raise ValueError("gen is empty: the field needs at least one generated sample per set")
    if len(radii) == 0 or any(not (r > 0) for r in radii):
        raise ValueError(f"radii must be a non-empty list of positive numbers, got {tuple(radii)}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")


def drift_field(gen, pos, neg, *, pos_weight, neg_weight, radii=(0.02, 0.05, 0.2),
                kernel="laplacian", mask_neg_self=False):
    """The drift field V on the generated set, and the scale sigma it is measured in.

    gen (B,N,D) generated features, pos (B,P,D) attractors, neg (B,M,D) repellers; the current
    sample cloud gen is always a repeller too. Returns V (B,N,D) in units of sigma, and sigma
    (a 0-d tensor). Nothing here carries a gradient.
    """
    _check_sets(gen, pos, neg, radii, kernel)
    X = gen.detach().float()
    Yn, Yp = neg.detach().float(), pos.detach().float()
    B, N, D = X.shape
    M = Yn.shape[1]
    w_neg = _anchor_weights(neg_weight, B, M, "neg_weight", X.device)
    w_pos = _anchor_weights(pos_weight, B, Yp.shape[1], "pos_weight", X.device)

    # Targets T = [X, Y-, Y+] with weights [1, w-, w+] (step 1).
    T = torch.cat([X, Yn, Yp], dim=1)
    omega = torch.cat([torch.ones(B, N, device=X.device), w_neg, w_pos], dim=1)

    # Pairwise distances, clamped before the sqrt so that d(x, x) has a finite gradient (step 2).
    sq = (X * X).sum(-1, keepdim=True) + (T * T).sum(-1).unsqueeze(1) - 2 * X @ T.transpose(1, 2)
    dist = sq.clamp_min(1e-8).sqrt()  # (B, N, N+M+P)

    # One scale for the whole batch: the weighted mean distance (step 3).
    s = ((dist * omega.unsqueeze(1)).mean() / omega.mean()).clamp_min(1e-3)
    sigma = (s / math.sqrt(D)).clamp_min(1e-3)
    Xs, Ts = X / sigma, T / sigma

    if kernel == "cosine":
        cos = F.normalize(X, dim=-1) @ F.normalize(T, dim=-1).transpose(1, 2)
    idx = torch.arange(N, device=X.device)
    V = torch.zeros_like(Xs)
    for tau in radii:  # step 4
        if kernel in ("laplacian", "exponential"):
            logits = -dist / (s * tau)
        elif kernel == "rbf":
            logits = -0.5 * (dist / (s * tau)) ** 2
        else:
            logits = cos / tau
        # A sample never interacts with itself (nor with its own copy among the negatives).
        logits = logits.clone()
        logits[:, idx, idx] -= 100.0 / tau
        if mask_neg_self:
            logits[:, idx, N + idx] -= 100.0 / tau
        # Affinity: geometric mean of the softmax over targets and over generated samples.
        A = (logits.softmax(dim=-1) * logits.softmax(dim=-2)).clamp_min(1e-6).sqrt() * omega.unsqueeze(1)
        A_neg, A_pos = A[..., : N + M], A[..., N + M:]
        m_pos, m_neg = A_pos.sum(-1, keepdim=True), A_neg.sum(-1, keepdim=True)
        # Dipole: repulsion weighted by the positive mass, attraction by the negative mass.
        c = torch.cat([-A_neg * m_pos, A_pos * m_neg], dim=-1)
        force = c @ Ts - c.sum(-1, keepdim=True) * Xs
        V = V + force / force.pow(2).mean().clamp_min(1e-8).sqrt()
    return V, sigma


def drift_loss(gen, pos, neg, *, pos_weight, neg_weight, radii=(0.02, 0.05, 0.2),
               kernel="laplacian", mask_neg_self=False):
    """Regress gen onto sg(gen + V), in units of sigma (step 5). Returns the B per-set losses.

    The gradient w.r.t. gen is exactly -2 V / (sigma N D) per set: descent moves along the field.
    """
    V, sigma = drift_field(gen, pos, neg, pos_weight=pos_weight, neg_weight=neg_weight,
                           radii=radii, kernel=kernel, mask_neg_self=mask_neg_self)
    goal = gen.detach().float() / sigma + V
    return (gen.float() / sigma - goal).pow(2).mean(dim=(1, 2))


def preference_field(gen, pos, neg, *, pos_weight=3000.0, neg_weight=3000.0,
                     radii=(0.02, 0.05, 0.2), kernel="laplacian"):
    """The dipole preference field: attract to the reward's positives, repel from its negatives."""
    return drift_field(gen, pos, neg, pos_weight=pos_weight, neg_weight=neg_weight, radii=radii, kernel=kernel)


def reference_drift(gen, ref, *, ref_weight=3000.0, ref_neg_weight=3000.0, radii=(0.02, 0.05, 0.2),
                    kernel="laplacian"):
    """The reference drift: attract to the base generator's samples on the same noises, repel
    from the current samples themselves (each sample's own copy masked)."""
    return drift_field(gen, ref, gen, pos_weight=ref_weight, neg_weight=ref_neg_weight, radii=radii,
                       kernel=kernel, mask_neg_self=True)


def drpo_targets(gen_feats, pos_feats, neg_feats, ref_feats, *, pos_weight=3000.0, neg_weight=3000.0,
                 ref_weight=3000.0, ref_neg_weight=3000.0, lambda_ref=0.2,
                 radii=(0.02, 0.05, 0.2), ref_radii=(0.02, 0.05, 0.2), kernel="laplacian"):
    """The regression targets of the DrPO objective for every feature key.

    Each argument is a dict key -> (B, set size, D) tensor. Returns (targets, stats) where
    targets[key] is a list of (weight, sigma, goal) terms: the preference term with weight 1
    and the reference term with weight lambda_ref. regression_loss() turns them into L.
    """
    if not (gen_feats.keys() == pos_feats.keys() == neg_feats.keys() == ref_feats.keys()):
        raise ValueError("gen, pos, neg and ref feature dicts must have the same keys")
    targets = {}
    stats = dict.fromkeys(("loss_pref", "loss_ref", "dist_pos", "dist_neg", "dist_ref"), 0.0)
    for key, x in gen_feats.items():
        x = x.detach().float()
        Vp, sp = preference_field(x, pos_feats[key], neg_feats[key], pos_weight=pos_weight,
                                  neg_weight=neg_weight, radii=radii, kernel=kernel)
        Vr, sr = reference_drift(x, ref_feats[key], ref_weight=ref_weight, ref_neg_weight=ref_neg_weight,
                                 radii=ref_radii, kernel=kernel)
        targets[key] = [(1.0, sp, x / sp + Vp), (lambda_ref, sr, x / sr + Vr)]
        # At the current point gen/sigma - goal = -V, so each term's loss value is mean(V^2).
        stats["loss_pref"] += Vp.pow(2).mean().item()
        stats["loss_ref"] += Vr.pow(2).mean().item()
        for name, y in (("dist_pos", pos_feats[key]), ("dist_neg", neg_feats[key]), ("dist_ref", ref_feats[key])):
            stats[name] += torch.cdist(x, y.float()).mean().item() / len(gen_feats)
    return targets, stats


def regression_loss(gen_feats, targets, start=0, n_total=None):
    """L = sum over keys and terms of weight * mean over sets of MSE(gen/sigma, goal).

    With start / n_total, gen_feats hold only the candidates start.. of the n_total per set
    (each candidate's tokens contiguous); the chunk losses then add up to the full loss.
    """
    loss = 0.0
    for key, x in gen_feats.items():
        B, n, D = x.shape
        for weight, sigma, goal in targets[key]:
            N = goal.shape[1]
            if n_total is not None:
                t = N // n_total  # tokens per candidate
                goal = goal[:, start * t: start * t + n]
            loss = loss + weight * (x.float() / sigma - goal).pow(2).sum() / (B * N * D)
    return loss


def drpo_objective(gen_feats, pos_feats, neg_feats, ref_feats, **field_kwargs):
    """The DrPO loss: sum_k [L_pref,k + lambda_ref * L_ref,k], mean over sets (DESIGN.md 2).

    gen_feats carry the gradient; everything else is a constant. field_kwargs are those of
    drpo_targets. Returns (loss, stats): preference and reference losses, and the mean feature
    distances from the samples to the positives, the negatives and the base samples.
    """
    targets, stats = drpo_targets(gen_feats, pos_feats, neg_feats, ref_feats, **field_kwargs)
    return regression_loss(gen_feats, targets), stats


def select_pos_neg(scores, n_pos, n_neg):
    """Indices of the n_pos highest and n_neg lowest scores of each row, disjoint.

    scores (K,) or (B, K). Ties break by candidate index (stable sort), so the result is
    deterministic. Positives come best first, negatives worst first.
    """
    scores = torch.as_tensor(scores)
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must have shape (K,) or (B, K), got {tuple(scores.shape)}")
    K = scores.shape[-1]
    if n_pos < 1 or n_neg < 1:
        raise ValueError(f"n_pos={n_pos} and n_neg={n_neg} must both be at least 1")
    if n_pos + n_neg > K:
        raise ValueError(f"n_pos + n_neg = {n_pos + n_neg} exceeds the {K} candidates per prompt; "
                         f"lower --n-pos/--n-neg or raise --candidates")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values; check the reward model "
                         "(nothing is selected from invalid scores)")
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    pos_idx = order[..., :n_pos]
    neg_idx = order[..., K - n_neg:].flip(-1)
    return pos_idx, neg_idx
