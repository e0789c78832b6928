"""DrPO: Drifting Preference Optimization for one- and few-step text-to-image generators (arXiv 2606.02521).

A single-file reference implementation for SD-Turbo and SDXL-Turbo; DMD2, SDXL-Lightning, SANA-Sprint,
FLUX.1-schnell and SD3.5-Large-Turbo go through the same step and loop (docs/models.md).

    python drpo.py --model sd-turbo --reward hpsv3          # the paper's setting but 2 defaults (section 5)
    python drpo.py --model tiny --reward brightness --max-steps 100 --lr 1e-3 --grad-accum 1   # offline demo
    torchrun --nproc_per_node 4 drpo.py --model sd-turbo --reward hpsv3 --grad-accum 8        # the paper's 4 GPUs
    python drpo.py --model sdxl-turbo --pairs pairs.jsonl     # offline: preference pairs instead of a reward

One DrPO step, for each prompt c (drpo_step in section 2):
  1. Sample:     K noises z; x = G_theta(z, c) (LoRA on) and, on the same noises, r = G_0(z, c) (LoRA off).
  2. Rank:       decode x and score it with the reward (never differentiated): the top n_pos are positives,
                 the bottom n_neg negatives (offline, --pairs: the prompt's chosen / rejected images).
  3. Featurize:  per feature key k, the sets phi_k(x) (with gradient), phi_k(positives), phi_k(negatives), phi_k(r).
  4. Field:      on the detached phi_k(x): the dipole preference field V_pref (toward the positives, away from the
                 negatives) in units of its scale sigma_p, and the reference drift V_ref (toward phi_k(r)) in sigma_r.
  5. Regress:    L = sum_k [ MSE(phi_k(x)/sigma_p, sg(phi_k(x)/sigma_p + V_pref))
                             + lambda_ref * MSE(phi_k(x)/sigma_r, sg(phi_k(x)/sigma_r + V_ref)) ], into the LoRA only.

Sections: 1. the method's settings and the drift field (pure torch); 2. one step, drpo_step, and the run around
it, train; 3. what they call: sampling, features, rewards, LoRA, generator (ports of other people's networks live
beside this file in rewards/, features/ and generators/, one file each); 4. plumbing; 5. the command line.
"""

import argparse
import contextlib
import difflib
import functools
import hashlib
import importlib
import io
import json
import math
import os
import re
import signal
import sys
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------
# 1. The method's settings and the drift field. Pure torch: copy this section into your own trainer.
# ----------------------------------------------------------------------------------------

# The method's settings at the paper's SD-Turbo values; the field's defaults and the CLI read them (docs/choices.md).
METHOD = {  # name: (the paper's value, what it is)
    "candidates": (24, "K: samples per prompt per step; each prompt's K samples (all their tokens) form one set"),
    "n_pos": (8, "positives: the n_pos best-ranked of a prompt's K samples"),
    "n_neg": (8, "negatives: its n_neg worst-ranked, disjoint from the positives"),
    "pos_weight": (3000.0, "weight of each positive (an attractor); each current sample weighs 1 and repels"),
    "neg_weight": (3000.0, "weight of each negative (a repeller), against the current samples' 1"),
    "ref_weight": (3000.0, "reference drift: weight of each base sample G_0(z) (an attractor)"),
    "ref_neg_weight": (3000.0, "reference drift: weight of each current sample as a repeller (its own copy masked)"),
    "lambda_ref": (0.2, "weight of the reference term in L, which pulls the samples toward the base's and apart"),
    "radii": ((0.02, 0.05, 0.2), "kernel radii of the preference field, as fractions of its scale s"),
    "ref_radii": ((0.02, 0.05, 0.2), "kernel radii of the reference drift, as fractions of its scale s"),
    "kernel": ("laplacian", "affinity: laplacian exp(-d/(s tau)), rbf exp(-(d/(s tau))^2/2) or cosine exp(cos/tau)"),
}
PAPER = {name: value for name, (value, _) in METHOD.items()}
FIELD = ("pos_weight", "neg_weight", "ref_weight", "ref_neg_weight", "lambda_ref", "radii", "ref_radii", "kernel")
KERNELS = ("laplacian", "exponential", "rbf", "cosine")  # exponential: another name for laplacian


def _anchor_weights(w, B, n, name, device):
    """A float, or a per-anchor tensor of shape (n,) or (B, n), as a float32 (B, n) tensor."""
    w = torch.as_tensor(w, dtype=torch.float32, device=device)
    if w.shape not in ((), (n,), (B, n)):
        raise ValueError(f"{name} has shape {tuple(w.shape)}; pass a float or a tensor of shape ({n},) or ({B}, {n})")
    return w.expand(B, n)


def drift_field(gen, pos, neg, *, pos_weight, neg_weight, radii=PAPER["radii"], kernel=PAPER["kernel"],
                mask_neg_self=False):
    """The drift field V on gen (B,N,D), and the scale sigma it is measured in: pos (B,P,D) attract, neg (B,M,D) and
    gen itself repel, each gen vector with weight 1 (pos_weight / neg_weight: a float, or one weight per anchor, (P,)
    or (B,P)). V (B,N,D), in units of sigma, and sigma (0-d) are detached: V is a target, never differentiated. The B
    sets of a call share the scale s and each radius's normalization (means over the whole tensor, as in the authors'
    code), so a set's field depends on the others: to keep prompts independent, call it once per prompt (B = 1), as
    drpo.py does by default (--prompts-per-step 1, the paper's setting)."""
    _check_sets(gen, pos, neg, radii, kernel)
    X = gen.detach().float()
    Yn, Yp = neg.detach().float(), pos.detach().float()
    B, N, D = X.shape
    M = Yn.shape[1]
    w_neg = _anchor_weights(neg_weight, B, M, "neg_weight", X.device)
    w_pos = _anchor_weights(pos_weight, B, Yp.shape[1], "pos_weight", X.device)

    # Targets T = [X, Y-, Y+] with weights [1, w-, w+].
    T = torch.cat([X, Yn, Yp], dim=1)
    omega = torch.cat([torch.ones(B, N, device=X.device), w_neg, w_pos], dim=1)

    # Pairwise distances; rounding can make d(x, x)^2 slightly negative, hence the clamp before the sqrt.
    sq = (X * X).sum(-1, keepdim=True) + (T * T).sum(-1).unsqueeze(1) - 2 * X @ T.transpose(1, 2)
    d = sq.clamp_min(1e-8).sqrt()  # (B, N, N+M+P)

    # Two scales from one number: s, the weighted mean distance, sets the kernel radii (tau is a fraction of s);
    # sigma = s / sqrt(D), the typical size of one coordinate, is the unit of X, T and V (a D-free loss scale).
    s = ((d * omega.unsqueeze(1)).mean() / omega.mean()).clamp_min(1e-3)
    sigma = (s / math.sqrt(D)).clamp_min(1e-3)
    Xs, Ts = X / sigma, T / sigma

    if kernel == "cosine":
        cos = F.normalize(X, dim=-1) @ F.normalize(T, dim=-1).transpose(1, 2)
    idx = torch.arange(N, device=X.device)
    V = torch.zeros_like(Xs)
    for tau in radii:
        if kernel in ("laplacian", "exponential"):
            logits = -d / (s * tau)
        elif kernel == "rbf":
            logits = -0.5 * (d / (s * tau)) ** 2
        else:
            logits = cos / tau
        # A sample never interacts with itself (with mask_neg_self, nor with its own copy among the repellers): those
        # logits sink, so the affinity below falls to its floor, 1e-3 x the target's weight. Such a target exerts no
        # force (it sits where the sample is), but its floor still counts in the masses (3.0 at weight 3000).
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
        # Each radius's force at unit RMS, whatever the features' scale, so every radius counts alike. Their sum V
        # has an RMS between 0 and len(radii), as the forces align; the loss mean(V^2) moves within that band, not
        # with the reward. What the regression follows is V's direction.
        V = V + force / force.pow(2).mean().clamp_min(1e-8).sqrt()
    return V, sigma


def drift_loss(gen, pos, neg, *, pos_weight, neg_weight, radii=PAPER["radii"], kernel=PAPER["kernel"],
               mask_neg_self=False):
    """Regress gen onto sg(gen + V) in units of sigma (step 5), for one field. Returns the B per-set losses. The
    gradient w.r.t. gen is exactly -2 V / (sigma N D) per set: descent moves along the field."""
    V, sigma = drift_field(gen, pos, neg, pos_weight=pos_weight, neg_weight=neg_weight,
                           radii=radii, kernel=kernel, mask_neg_self=mask_neg_self)
    goal = gen.detach().float() / sigma + V
    return (gen.float() / sigma - goal).pow(2).mean(dim=(1, 2))


def preference_field(gen, pos, neg, *, pos_weight=PAPER["pos_weight"], neg_weight=PAPER["neg_weight"],
                     radii=PAPER["radii"], kernel=PAPER["kernel"]):
    """The dipole preference field: attract to the reward's positives, repel from its negatives."""
    return drift_field(gen, pos, neg, pos_weight=pos_weight, neg_weight=neg_weight, radii=radii, kernel=kernel)


def reference_drift(gen, ref, *, ref_weight=PAPER["ref_weight"], ref_neg_weight=PAPER["ref_neg_weight"],
                    radii=PAPER["ref_radii"], kernel=PAPER["kernel"]):
    """The reference drift: attract to the base generator's samples on the same noises, repel from the current
    samples themselves (each sample's own copy masked). With ref equal to gen it is not zero: it spreads the samples."""
    return drift_field(gen, ref, gen, pos_weight=ref_weight, neg_weight=ref_neg_weight, radii=radii,
                       kernel=kernel, mask_neg_self=True)


def drpo_targets(gen_feats, pos_feats, neg_feats, ref_feats, *, pos_weight=PAPER["pos_weight"],
                 neg_weight=PAPER["neg_weight"], ref_weight=PAPER["ref_weight"],
                 ref_neg_weight=PAPER["ref_neg_weight"], lambda_ref=PAPER["lambda_ref"], radii=PAPER["radii"],
                 ref_radii=PAPER["ref_radii"], kernel=PAPER["kernel"]):
    """The regression targets of the DrPO objective for every feature key. Each argument is a dict key -> (B, set
    size, D) tensor. Returns (targets, stats): targets[key] lists the (weight, sigma, goal) of each term, the
    preference term with weight 1 and the reference term with weight lambda_ref; regression_loss() makes them L."""
    if not (gen_feats.keys() == pos_feats.keys() == neg_feats.keys() == ref_feats.keys()):
        raise ValueError("gen, pos, neg and ref feature dicts must have the same keys")
    targets = {}
    stats = dict.fromkeys(("loss_pref", "loss_ref", "field_rms", "dist_pos", "dist_neg", "dist_ref"), 0.0)
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
        stats["field_rms"] += Vp.pow(2).mean().sqrt().item() / len(gen_feats)
        for name, y in (("dist_pos", pos_feats[key]), ("dist_neg", neg_feats[key]), ("dist_ref", ref_feats[key])):
            stats[name] += torch.cdist(x, y.float()).mean().item() / len(gen_feats)
    return targets, stats


def regression_loss(gen_feats, targets, start=0, n_total=None):
    """L = sum over keys and terms of weight * mean over sets of MSE(gen/sigma, goal). With start / n_total,
    gen_feats hold only the candidates start.. of the n_total per set (each candidate's tokens contiguous); the
    chunk losses then add up to the full loss."""
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


def drpo_objective(gen_feats, pos_feats, neg_feats, ref_feats, **field):
    """The DrPO loss: sum_k [L_pref,k + lambda_ref * L_ref,k], mean over sets. gen_feats carry the gradient;
    everything else is a constant. field: drpo_targets' settings (default: the paper's). Returns (loss, stats):
    preference and reference losses, the preference field's RMS, and the mean feature distances from the samples
    to the positives, the negatives and the base samples."""
    targets, stats = drpo_targets(gen_feats, pos_feats, neg_feats, ref_feats, **field)
    return regression_loss(gen_feats, targets), stats


def select_pos_neg(scores, n_pos, n_neg):
    """Indices of the n_pos highest and n_neg lowest scores of each row, disjoint. scores (K,) or (B, K). Ties
    break by candidate index (stable sort), so the result is deterministic. Positives best first, negatives worst
    first."""
    scores = torch.as_tensor(scores)
    _check_scores(scores, n_pos, n_neg)
    K = scores.shape[-1]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :n_pos], order[..., K - n_neg:].flip(-1)


def feature_sets(fx, fr, pos_idx, neg_idx, fa=None):
    """The four feature sets of one step, {key: (B, set size, D)}, detached: gen (a prompt's K samples), pos / neg
    (its top / bottom ones), ref (the base samples on the same noises). fx, fr: {key: (B*K, T, D)} features of the
    samples and the base samples, prompt by prompt; fa: of as many anchors per prompt (images outside the samples
    that the ranking may pick) or None; pos_idx, neg_idx: (B, n) indices into a prompt's K samples, then its anchors."""
    B = pos_idx.shape[0]
    i = torch.arange(B, device=pos_idx.device)[:, None]  # each prompt's row
    gen, pos, neg, ref = {}, {}, {}, {}
    for key, f in fx.items():
        f = f.detach().view(B, -1, *f.shape[1:])  # (B, K, T, D)
        gen[key], ref[key] = f.flatten(1, 2), fr[key].reshape(B, -1, f.shape[-1])
        if fa is not None:  # each prompt's anchors follow its K samples
            f = torch.cat([f, fa[key].view(B, -1, *f.shape[2:])], 1)
        pos[key], neg[key] = f[i, pos_idx].flatten(1, 2), f[i, neg_idx].flatten(1, 2)
    return gen, pos, neg, ref


def regress(fx, targets, K, chunk, refeaturize, accum=1):
    """Step 5: backward() of L / accum, through the graph of fx = phi(x); or, with chunk < K, with the features of
    `chunk` candidates per prompt at a time recomputed with gradient by refeaturize(part) (part: their rows of a
    (B*K, ...) tensor): memory flat in K, the same gradient (the targets are constants, so L sums over candidates)."""
    B = next(iter(targets.values()))[0][2].shape[0]
    for c0 in range(0, K, chunk):
        if chunk < K:
            fx = refeaturize(lambda t: t.view(B, K, *t.shape[1:])[:, c0:c0 + chunk].flatten(0, 1))
        fc = {k: v.reshape(B, -1, v.shape[-1]) for k, v in fx.items()}
        (regression_loss(fc, targets, start=c0, n_total=K) / accum).backward()


def rows(cond, f):
    """f (repeat or slice rows) applied to every tensor of a conditioning, nested too (SDXL's added_cond_kwargs)."""
    return {k: rows(v, f) if isinstance(v, dict) else f(v) for k, v in cond.items()}


# ----------------------------------------------------------------------------------------
# 2. One DrPO step, and the run around it
# ----------------------------------------------------------------------------------------


def drpo_step(G, G0, phi, ranker, cond, z, feat_noise, field, chunk=None, accum=1, lap=lambda phase: None):
    """One micro-step on B prompts, K candidates each: the five steps, ending in backward() of L / accum (the loop
    adds accum micro-steps' gradients into one update). Its inputs:

    G(z, cond), G0(z, cond): latents from unit noises, through the sampler's steps, with the LoRA (G_theta) and with
        it off (the frozen base G_0). SD-Turbo's one step: x0 = sigma (z - eps(sqrt(1 - a) z, 999, c)) (step_recipe).
    phi(latents, noise, cond) -> {key: (n, T, D)}: the frozen feature map, T tokens of D numbers per latent. noise
        is a unit draw like the latents (the teacher adds 0.1 x it), passed so that a latent featurized twice (here,
        then in chunked regression) sees the same draw; cond: the latents' conditioning rows.
    ranker(x, cond) -> (pos_idx, neg_idx, anchors, scores): (B, n_pos) / (B, n_neg) indices into each prompt's K
        candidates, then its anchors; anchors: None, or (latents, noise, cond) of images outside the candidates
        that the indices may pick; scores: (B, K) or None, for the logs (reward_ranker, pairs_ranker).
    cond: the network's conditioning, a row per prompt; z: (B, K, draws, C, h, w) unit noises (the start, then each
    step's fresh noise if the sampler adds any); feat_noise: (B, K, C, h, w). field: drpo_targets' settings.
    chunk: candidates per regression pass (None or 0: all K, through step 1's graph). lap(phase): a phase has ended.
    Returns the field's statistics, the ranking and the candidates' feature sets, for the loop's logs.
    """
    B, K = z.shape[:2]
    z, feat_noise, chunk = z.flatten(0, 1), feat_noise.flatten(0, 1), chunk or K
    cond_k = rows(cond, lambda v: v.repeat_interleave(K, 0))  # a row per candidate

    # 1. Sample K candidates per prompt from G_theta (with the graph that step 5 backpropagates, unless it
    #    recomputes them in chunks), and from the frozen base G_0 on the same noises.
    with torch.set_grad_enabled(chunk >= K):
        x = G(z, cond_k)
    lap("sample")
    with torch.no_grad():
        r = G0(z, cond_k)
    lap("reference")

    # 2. Rank each prompt's candidates into positives and negatives (a reward is never differentiated).
    pos_idx, neg_idx, anchors, scores = ranker(x, cond)
    lap("reward")

    # 3. Featurize: phi(x) keeps x's graph; the positives, negatives and base samples are constants.
    fx = phi(x, feat_noise, cond_k)
    with torch.no_grad():
        fr = phi(r, feat_noise, cond_k)
        fa = phi(*anchors) if anchors else None
    gen, pos, neg, ref = feature_sets(fx, fr, pos_idx, neg_idx, fa)
    lap("features")

    # 4. Field: the dipole preference field and the reference drift on the detached features, as targets.
    targets, stats = drpo_targets(gen, pos, neg, ref, **field)
    lap("field")

    # 5. Regress phi(x) onto sg(phi(x) + V) of both terms: backward() into the LoRA.
    refeaturize = lambda part: phi(G(part(z), rows(cond_k, part)), part(feat_noise), rows(cond_k, part))
    regress(fx, targets, K, chunk, refeaturize, accum)
    lap("backward")
    return stats, (pos_idx, neg_idx, scores), gen


def reward_ranker(reward, decode, n_pos, n_neg, batch_size):
    """Step 2 by a reward: a ranker (prompts, anchor_noise, lap, x, cond) that decodes each prompt's K candidates,
    scores them under no_grad (reward: list of PIL images, list of prompts -> (n,) scores; load_reward) and takes
    the top n_pos as positives, the bottom n_neg as negatives; no anchors. The loop binds prompts, anchor_noise, lap."""
    def rank(prompts, anchor_noise, lap, x, cond):
        with torch.no_grad():
            images = [im for i in range(0, len(x), batch_size) for im in decode(x[i:i + batch_size])]
        lap("decode")
        K = len(x) // len(prompts)
        scores = torch.stack([reward(images[b * K:(b + 1) * K], [p] * K) for b, p in enumerate(prompts)])
        return *select_pos_neg(scores, n_pos, n_neg), None, scores
    rank.counts = reward.counts  # a VLM's requests and invalid answers since the last update (rewards/vlm.py)
    return rank


def pairs_ranker(pairs, latent_of, n_pos, n_neg):
    """Step 2 from offline preference pairs (--pairs): a prompt's chosen images are its positives and its rejected
    ones its negatives, at most n_pos / n_neg (as many for every prompt of the step), appended to its K candidates
    as anchors: their latents (latent_of: image path -> latent), feature noise and conditioning rows."""
    def rank(prompts, anchor_noise, lap, x, cond):
        B, K = len(prompts), len(x) // len(prompts)
        P = min(n_pos, *(len(pairs[p][0]) for p in prompts))
        M = min(n_neg, *(len(pairs[p][1]) for p in prompts))
        latents = torch.stack([torch.stack([latent_of[f] for f in pairs[p][0][:P] + pairs[p][1][:M]])
                               for p in prompts]).flatten(0, 1).to(x.device, x.dtype)
        anchors = (latents, anchor_noise[:, :P + M].flatten(0, 1), rows(cond, lambda v: v.repeat_interleave(P + M, 0)))
        pos_idx = torch.arange(K, K + P, device=x.device).expand(B, P)
        return pos_idx, torch.arange(K + P, K + P + M, device=x.device).expand(B, M), anchors, None
    rank.counts = dict
    return rank


def train(args, stop_asked=()):
    """The run around drpo_step. Setup, then per update: this process's share of grad_accum x world micro-steps, one
    AdamW step of the LoRA, and what a run writes. stop_asked: a list that signals append to (run_folder's
    deferred_signals): the loop then saves, stops and returns that signal (None when it ends at --max-steps)."""
    from tqdm import tqdm

    # Setup: every setting is checked before any model loads; an error in any process stops them all.
    rank, world, local_rank = init_distributed()  # one process, or one of `world` under torchrun (docs/scaling.md)
    folder, memory = beside("run_folder"), beside("memory")  # one owner, whole saves, resume; the memory levers
    with all_or_none(world):
        check_args(args, world)
        lock = folder.own(args.output_dir) if rank == 0 else None  # the folder is this run's while lock is open
    device, dtype = run_device(args.device, args.precision, local_rank)
    amp = lambda fn: torch.autocast(device.type, dtype, enabled=dtype != torch.float32)(fn)  # fn's passes in dtype
    with all_or_none(world):
        model = load_generator(args.model, dtype, device, args.inference_steps, args.timesteps, args.quantize)
        torch.manual_seed(args.seed)  # the LoRA's random A matrices, the same in every process
        # the trainable LoRA; its B matrices start at zero, so G_theta = G_0 at update 0
        params = add_lora(model.net, args.lora_rank, args.lora_alpha, args.lora_targets.split(","))
        if args.gradient_checkpointing:
            model.net.enable_gradient_checkpointing()
        phi = amp(load_features(args.features, model, mae_ckpt=args.mae_ckpt, dinov2=args.dinov2, device=device,
                                dtype=dtype, layers=args.teacher_layers and args.teacher_layers.split(",")))
        prompts, ranker, reward = load_ranking(args, model, device, local_rank, amp)
        side = latent_shape(model, args.resolution)[-1] * model.pipe.vae_scale_factor  # of the images, in pixels
        if args.cache_conditioning:  # each prompt's conditioning once; then the text encoders leave the GPU
            memory.cache_conditioning(model, prompts + beside("eval").heldout_prompts(args), side)
    # G_theta and G_0 as drpo_step calls them: (z, cond) -> latents through the sampler's steps, LoRA on / off
    G = amp(functools.partial(generate, model.net, recipe=model.recipe, grad_steps=args.grad_steps))
    G0 = amp(lora_off(model.net)(functools.partial(generate, model.net, recipe=model.recipe)))
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay)
    field = {name: getattr(args, name) for name in FIELD}
    rng = torch.Generator().manual_seed(args.seed)  # all randomness of the loop: prompt order and noises
    step, order, tracker = folder.start_or_resume(args, model, optimizer, rng, rank, world)  # tracker: --report-to
    watch = args.eval_every and beside("eval").Watch(args, model, phi, reward, step, rank, world, stop_asked, tracker)
    save = functools.partial(folder.save_outputs, args, model, optimizer, rng, order, watch, prompts, amp, tracker)
    n_micro = args.grad_accum * world
    bar = tqdm(total=args.max_steps, initial=step, desc="DrPO", dynamic_ncols=True, disable=rank != 0)

    stop = False
    try:  # the bar and the folder's lock are released however the loop ends
        while step < args.max_steps:
            times, lap = stopwatch(device)  # seconds per phase of this update, logged in metrics.jsonl
            log, start = {"scores": [], "pos": [], "neg": []}, (rng.get_state(), list(order))  # its figures; its start
            for first in range(0, n_micro, world):  # grad_accum rounds of micro-steps, one per process side by side
                if stop := any_process(stop_asked, world):  # a signal: drop this update, save the last whole one
                    break
                with all_or_none(world), memory.explain_out_of_memory(lap, device, args.output_dir):  # errors: all stop
                    for micro in range(first, first + world):
                        batch, z, feat_noise, anchor_noise = draw(rng, order, prompts, args, model, device, dtype)
                        if micro % world == rank:  # this process's; the others' are drawn too, so all stay in step
                            out = drpo_step(G, G0, phi, functools.partial(ranker, batch, anchor_noise, lap),
                                            model.conditioning(batch, side), z, feat_noise, field, args.grad_chunk,
                                            n_micro, lap)
                            add_to_log(log, *out, args.candidates, n_micro)
            if stop:  # back to the update's start: a resumed run redoes it, as the uninterrupted run does
                rng.set_state(start[0])
                order[:] = start[1]
                optimizer.zero_grad(set_to_none=True)
                if rank == 0:
                    save(step, stop, False)
                break
            log |= ranker.counts()  # a VLM's requests
            all_reduce_update(params, log, world)  # one process's share of the update -> all of it, on every process
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)  # before clipping
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with all_or_none(world):  # nothing non-finite is written: a NaN stops the run here, before any save
                check_update(log, grad_norm, params, step + 1, args.output_dir)
            lap("optimizer")
            step += 1
            if rank == 0:
                folder.write_metrics(Path(args.output_dir), step, log, grad_norm, optimizer, times, bar, tracker)
            try:
                best = watch and watch(step)  # when due: held-out scores; True if the best so far (its snapshot saved)
            except Stopped:  # a signal cut the evaluation short: --resume evaluates this update first
                best, stop = False, True
            if rank == 0:  # one writer
                save(step, stop, best)
            if stop:
                break
        if stop and world > 1:
            dist.barrier()  # rank 0 has saved before any process leaves
    finally:
        bar.close()
        tracker.close()
        if lock:
            lock.close()  # the folder is free for another run
    signum = (stop_asked or [signal.SIGTERM])[0] if stop else None
    if signum and rank == 0:
        print(f"\nstopped by {signal.Signals(signum).name} after update {step}; the LoRA and a checkpoint of that "
              f"update are in {args.output_dir}: continue with the same command and --resume", file=sys.stderr)
    return signum


# ----------------------------------------------------------------------------------------
# 3. What the step and the loop call: the loop's parts, sampling, feature maps, rewards, the LoRA, the generator
# ----------------------------------------------------------------------------------------


def run_device(device, precision, local_rank):
    """--device (default: this process's GPU, else the CPU) and --precision -> (device, dtype of the frozen weights)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device, precision_dtype(precision, device)


def load_ranking(args, model, device, local_rank, amp):
    """The training prompts, each step's ranker (reward_ranker or pairs_ranker, unbound) and the reward (or None)."""
    side = latent_shape(model, args.resolution)[-1] * model.pipe.vae_scale_factor
    if args.pairs:  # {prompt: (chosen paths, rejected paths)}, each image VAE-encoded once, kept in memory
        pairs = beside("rewards.pairs").read_pairs(args.pairs)
        return list(pairs), pairs_ranker(pairs, beside("rewards.pairs").latents_of(pairs, model, side), args.n_pos,
                                         args.n_neg), None
    reward_device = reward_device_of(args.reward_device, device, local_rank)
    reward = load_reward(args.reward, reward_device, args.reward_batch,
                         precision_dtype(args.reward_precision, reward_device), geneval_metadata=args.prompts,
                         quantize=args.reward_quantize, offload=args.offload, **reward_options(args))
    to_images = amp(lambda x: to_pil(decode(model.pipe.vae, x)))
    ranker = reward_ranker(reward, to_images, args.n_pos, args.n_neg, args.reward_batch)
    return read_prompts(args.prompts), ranker, reward


def draw(rng, order, prompts, args, model, device, dtype):
    """A micro-step's randomness, all from rng in a fixed order (every process and a resumed run draw alike): B prompts
    (a fresh random order of all each epoch), their K noises each (start, fresh), feature noise, --pairs' anchors'."""
    B, K, shape = args.prompts_per_step, args.candidates, latent_shape(model, args.resolution)
    while len(order) < B:
        order += torch.randperm(len(prompts), generator=rng).tolist()
    batch, order[:] = [prompts[i] for i in order[:B]], order[B:]  # order is the run's: kept in checkpoints
    z = torch.randn((B, K, noise_draws(model.recipe), *shape), generator=rng).to(device, dtype)
    feat_noise = torch.randn((B, K, *shape), generator=rng).to(device, dtype)
    anchors = torch.randn((B, args.n_pos + args.n_neg, *shape), generator=rng).to(device, dtype) if args.pairs else None
    return batch, z, feat_noise, anchors


def add_to_log(log, stats, ranking, gen, K, n_micro):
    """A micro-step's figures into the update's log: its scores (all, the positives', the negatives'), the field's
    statistics and the candidates' diversity (spread), these as means over the update's n_micro micro-steps."""
    pos_idx, neg_idx, scores = ranking
    if scores is not None:
        log["scores"].append(scores.flatten())
        log["pos"].append(scores.gather(1, pos_idx).flatten())
        log["neg"].append(scores.gather(1, neg_idx).flatten())
    samples = {k: v.unflatten(1, (K, -1)).flatten(0, 1) for k, v in gen.items()}  # (B*K, T, D): sample by sample
    stats["spread_candidates"] = spread(samples, K).mean().item()
    for k in ("loss_pref", "loss_ref", "field_rms", "dist_pos", "dist_neg", "dist_ref", "spread_candidates"):
        log[k] = log.get(k, 0.0) + stats[k] / n_micro


def check_update(log, grad_norm, params, step, out):
    """Stop the run at an update whose field (preference or reference term), gradient or new LoRA weights are NaN or
    infinite, before anything of it is written. One bad micro-step stops the run: its cause rarely goes away."""
    terms = [term for term, key in (("preference", "loss_pref"), ("reference", "loss_ref"))
             if not math.isfinite(log[key])]
    if terms:
        cause = f"the {' and the '.join(terms)} term's field is NaN or infinite: the features are (the feature map?)"
    elif not torch.isfinite(grad_norm):
        cause = "the gradient is NaN or infinite (the feature map's backward, or a LoRA already far out of range)"
    elif not all(torch.isfinite(p).all() for p in params):
        cause = "the optimizer step made LoRA weights NaN or infinite: --lr is far too large"
    else:
        return
    raise ValueError(f"update {step}: {cause}. Nothing of that update was saved; the last checkpoint and LoRA in {out}"
                     f" are as they were (after a fix: --resume)")


def spread(feats, n):
    """Diversity: for each group of n samples (consecutive rows: a prompt's K candidates, or its held-out seeds), the
    mean feature distance between two different samples, token by matching token, averaged over the feature keys.
    It falls toward 0 when a prompt's samples collapse onto one look. feats: {key: (groups * n, T, D)} -> (groups,)."""
    total = 0.0
    for f in feats.values():
        f = f.detach().float().unflatten(0, (-1, n)).transpose(1, 2)  # (groups, T, n, D)
        total = total + torch.cdist(f, f).mean(1).sum((1, 2)) / (n * (n - 1) * len(feats))
    return total


# Sampling: the stock pipeline's steps as the loop's generate(), and what turns latents into images


@torch.no_grad()
def unet_conditioning(pipe, prompts, side):
    """The UNet's keyword inputs besides the noisy latent and the timestep, a row per prompt, as the stock pipeline
    computes them: the one place SD and SDXL differ. SD takes CLIP text embeddings; SDXL the embeddings of two text
    encoders, the pooled embedding and the size/crop "time ids" (side x side, no crop)."""
    if type(pipe).__name__ == "StableDiffusionXLPipeline":
        emb, _, pooled, _ = pipe.encode_prompt(list(prompts), device=pipe.text_encoder.device,
                                               do_classifier_free_guidance=False)
        ids = torch.tensor([side, side, 0, 0, side, side], dtype=emb.dtype, device=emb.device)
        return {"encoder_hidden_states": emb,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.repeat(len(prompts), 1)}}
    tok = pipe.tokenizer(list(prompts), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")
    return {"encoder_hidden_states": pipe.text_encoder(tok.input_ids.to(pipe.text_encoder.device))[0]}


def by_prompt(conditioning, device):
    """conditioning(prompts, side) computed one prompt at a time, rows joined on device: a prompt's rows never
    depend on the others in its batch (batched, SDXL's and SD3's pooled projections differ in the last bit), so the
    rows --cache-conditioning keeps, cond.cache {(prompt, side): rows on the host}, are bitwise what it replaces."""
    def join(parts):  # nested too (SDXL's added_cond_kwargs)
        return {k: join([c[k] for c in parts]) if isinstance(v, dict) else torch.cat([c[k] for c in parts]).to(device)
                for k, v in parts[0].items()}

    def cond(prompts, side=None):
        return join([cond.cache.get((p, side)) or conditioning([p], side) for p in prompts])
    cond.cache = {}
    return cond


def step_recipe(scheduler, steps=1, timesteps=None):
    """The stock pipeline's steps as [(t, c_in, c_x, c_out, c_eps)]: the network sees c_in * x at timestep t, and
    the step gives c_x * x + c_out * its output + c_eps * fresh unit noise, from x = z (unit noise; init_noise_sigma
    folded into step 1). Read off a copy of the scheduler set for num_inference_steps=steps (or timesteps: DMD2's 399,
    or 999,749,499,249), so prediction type, input scaling and fresh noise (LCM, Euler-ancestral; 0 elsewhere) are
    the scheduler's. SD-Turbo (Euler, trailing spacing; a = alphas_cumprod[999]): c_in = sqrt(1 - a) = 0.998 and
    c_x = -c_out = sigma = sqrt((1 - a) / a) = 14.61, so x0 = sigma (z - eps(sqrt(1 - a) z)). The textbook's
    (z - sqrt(1 - a) eps(z)) / sqrt(a) has 1 and 14.65: that scheduler starts from sigma z, not sqrt(sigma^2 + 1) z,
    and the recipe follows it, so what trains is what the stock pipeline samples."""
    import copy
    s, recipe, name = copy.deepcopy(scheduler), [], type(scheduler).__name__
    s.set_timesteps(steps) if timesteps is None else s.set_timesteps(timesteps=list(timesteps))
    if len(s.timesteps) > 1 and any(hasattr(s, a) for a in ("model_outputs", "ets", "state_in_first_order")):
        raise ValueError(f"{name} remembers earlier steps (a multistep solver), so its steps are not one affine "
                         f"map each; use an Euler, Euler-ancestral, LCM or DDIM scheduler, as the few-step models do")
    scale, e = s.init_noise_sigma, torch.randn(5, generator=torch.Generator().manual_seed(0))  # e: the probes' noise
    for t in s.timesteps:
        c_in = float(s.scale_model_input(torch.ones(1) * scale, t))
        # One step on the probes (x, output) = (1, 0), (0, 1), then (1, 1), (2, 3) to check that it is affine, and
        # (0, 0), which leaves the fresh noise alone; the step draws e from the generator, as in the stock pipeline.
        x = s.step(torch.tensor([0.0, 1, 1, 3, 0]), t, torch.tensor([1.0, 0, 1, 2, 0]) * scale,
                   generator=torch.Generator().manual_seed(0)).prev_sample.double()
        c_eps = float(x[4] / e[4])
        c_x, c_out = (x[:2] - c_eps * e[:2]).tolist()
        if (x[2:4] - c_eps * e[2:4] - torch.tensor([c_x + c_out, 2 * c_x + 3 * c_out])).abs().max() > \
                1e-5 * (abs(c_x) + abs(c_out) + abs(c_eps)):
            raise ValueError(f"{name}'s step is not affine in the noise and the network's output (thresholding or "
                             f"clipping?); use an Euler or LCM scheduler, as the one- and few-step models do")
        recipe.append((float(t), c_in, c_x, c_out, c_eps))
        scale = 1.0
    return recipe


def noise_draws(recipe):
    """Unit noises per sample: the start, then one per step if the scheduler adds fresh noise between steps."""
    return 1 + len(recipe) if any(step[4] for step in recipe) else 1


def generate(net, z, cond, recipe, grad_steps=None):
    """x0 = G(z): the recipe's steps from unit noise z, as the stock pipeline computes them on the same noises.
    z: (n, C, h, w), or (n, noise_draws, C, h, w): z[:, 0] starts, z[:, 1 + i] is step i's fresh noise; cond: the
    network's keywords, a row per sample. With grad enabled, only the last grad_steps steps (None: all) keep a
    graph; with gradient checkpointing on, each step is recomputed in backward: memory near one step's at any N."""
    from torch.utils.checkpoint import checkpoint
    z = z[:, None] if z.dim() == 4 else z
    x, n, grad = z[:, 0].float(), len(recipe), torch.is_grad_enabled()
    for i, (t, c_in, c_x, c_out, c_eps) in enumerate(recipe):
        call = lambda x, t=t, c_in=c_in: net((c_in * x).to(net.dtype), timestep=torch.full(
            (len(x),), t, device=x.device), **cond).sample.float()  # (a checkpoint's recompute: this step's t)
        with torch.set_grad_enabled(grad and i >= n - (grad_steps or n)):
            per_step = n > 1 and torch.is_grad_enabled() and net.is_gradient_checkpointing
            x = c_x * x + c_out * (checkpoint(call, x, use_reentrant=False) if per_step else call(x))
        if c_eps:
            x = x + c_eps * z[:, 1 + i].float()
    return x


def decode(vae, latents):
    """Latents -> images in [0, 1], (B, 3, H, W) float32."""
    shift = getattr(vae.config, "shift_factor", None) or 0  # FLUX's and SD3's VAEs shift the latents too
    img = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return (img.float() / 2 + 0.5).clamp(0, 1)


def to_pil(images):
    """(B, 3, H, W) in [0, 1] -> PIL images, rounded like the diffusers pipeline."""
    from PIL import Image
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


@contextlib.contextmanager
def lora_off(net):
    """The frozen base generator G_0: the same network with its adapter switched off,
    so no second copy of it is needed. Nested (the teacher features inside), the outermost switches it back on."""
    outer, net.lora_is_off = not getattr(net, "lora_is_off", False), True
    net.disable_adapters()
    try:
        yield
    finally:
        if outer:
            net.lora_is_off = False
            net.enable_adapters()


def map_stats(fmap, prefix):
    """Mean/std over all positions and over p x p patches (row-major) of a (B, C, h, w) map."""
    B, C, h, w = fmap.shape
    fmap = fmap.to(torch.promote_types(fmap.dtype, torch.float32))  # fp32, or fp64 if given
    out = {f"{prefix}_mean": fmap.mean((2, 3))[:, None],
           f"{prefix}_std": (fmap.var((2, 3), unbiased=False) + 1e-6).sqrt()[:, None]}
    for p in (p for p in (2, 4) if h % p == 0 and w % p == 0):
        patches = fmap.reshape(B, C, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C, p * p)
        out[f"{prefix}_mean_{p}"] = patches.mean(-1)
        out[f"{prefix}_std_{p}"] = (patches.var(-1, unbiased=False) + 1e-6).sqrt()
    return out


def teacher_features(net, layers, t=100, c_in=1.0, item=0, noise_level=0.1):
    """Teacher features: outputs of blocks of the frozen base network (LoRA off) on c_in * (latent + noise_level *
    noise) at timestep t, average-pooled to 4x4 (a transformer's tokens as their square grid), one vector per block
    (of a tuple output, the image's item: 0 for UNet blocks, -1 for FLUX's and SD3's). Conditioned on the latent's own
    prompt (cond), as the published SDXL-Turbo trainer does; the caller passes the noise, so a latent featurized twice
    sees the same draw. SD/SDXL: t = 100, c_in = 1, the published blocks (down_blocks.-1 = down_blocks.2 on SDXL)."""
    from torch.utils.checkpoint import checkpoint

    class _StopForward(Exception):  # raised by the last hook: the network's layers after it are not needed
        pass

    child = lambda m, part: m[int(part)] if part.lstrip("-").isdigit() else getattr(m, part)  # "down_blocks.-1"
    modules = {name: functools.reduce(child, name.split("."), net) for name in layers}
    grid = lambda o: o if o.dim() == 4 else o.transpose(1, 2).unflatten(2, (math.isqrt(o.shape[1]),) * 2)

    def teacher(x, cond):
        outs, checkpointing = {}, net.is_gradient_checkpointing

        def hook(module, inputs, output):
            outs[module] = output[item] if isinstance(output, tuple) else output
            if len(outs) == len(modules):
                raise _StopForward

        handles = [m.register_forward_hook(hook) for m in modules.values()]
        try:
            if checkpointing:  # backward recomputes each block with the LoRA off, as it ran here (the plain
                # checkpoint would recompute it with the LoRA on: another function); one block's activations at a time
                net.enable_gradient_checkpointing(lambda block, *a: checkpoint(lora_off(net)(block.__call__), *a,
                                                                               use_reentrant=False))
            with lora_off(net), contextlib.suppress(_StopForward):
                net((c_in * x).to(net.dtype), timestep=torch.full((len(x),), t, device=x.device), **cond)
        finally:
            for h in handles:
                h.remove()
            if checkpointing:
                net.enable_gradient_checkpointing()
        return [outs[m] for m in modules.values()]

    def phi(latents, noise, cond):
        outs = teacher(latents + noise_level * noise, cond)
        return {f"teacher.{n}": F.adaptive_avg_pool2d(grid(o).float(), 4).flatten(1)[:, None]
                for n, o in zip(modules, outs)}

    return phi


FEATURES = ("teacher", "mae", "latent", "dinov2")


def load_features(name, model=None, *, layers=None, mae_ckpt=None, dinov2=None, device="cpu", dtype=torch.float32):
    """A feature map phi(latents, noise, cond) -> {key: (B, T, D)} (its contract: drpo_step) for the generator model:
    one of FEATURES or `module.path:function` (custom_code). layers: the teacher's blocks (None: the model's own).
    The networks of `mae` and `dinov2` are ports in features/; their maps become mean/std tokens."""
    if name == "teacher":  # the frozen generator's own network: the UNet or the transformer
        t, c_in, default, item = model.teacher
        return teacher_features(model.net, layers or default, t, c_in, item)
    if name == "latent":  # the latents themselves: an ablation the paper finds worse than the base model
        return lambda latents, noise, cond: map_stats(latents, "latent")
    if name == "mae":  # the paper's: the latent-MAE encoder's last map
        encode = beside("features.mae").mae_encoder(mae_ckpt, device)
        return lambda latents, noise, cond: map_stats(encode(latents), "layer4")
    if name == "dinov2":  # decode with the VAE (with gradient), then DINOv2's CLS token and patch statistics
        vae = model.pipe.vae
        encode = beside("features.dinov2").dinov2_encoder(dinov2 or "facebook/dinov2-base", device, vae.dtype)

        def phi(latents, noise, cond):
            cls, grid = encode(decode(vae, latents))
            return {"dinov2_cls": cls, **map_stats(grid, "dinov2")}
        return phi
    if ":" in name:
        return checked_features(custom_code(name, "--features")(device, dtype), f"--features {name}")
    raise ValueError(f"--features {name}: unknown feature map; choose one of {', '.join(FEATURES)}, or "
                     f"`module.path:function` for your own (docs/features.md)")


def checked_features(phi, flag):
    """The user's feature map, its result checked on every call against its contract (drpo_step's docstring): a
    non-empty dict of finite (n, T, D) tensors, n the latents', that carry the latents' gradient when they have one."""
    def checked(latents, noise, cond):
        feats, problem = phi(latents, noise, cond), None
        if not isinstance(feats, dict) or not feats:
            problem = "an empty dict" if isinstance(feats, dict) else f"a {type(feats).__name__}"
        for key, f in feats.items() if not problem else ():
            if not (torch.is_tensor(f) and f.dim() == 3 and len(f) == len(latents)):
                problem = f"{key!r} of shape {tuple(getattr(f, 'shape', ()))} for {len(latents)} latents"
            elif not torch.isfinite(f).all():
                problem = f"{key!r} with NaN or infinite values"
        if not problem and latents.requires_grad and torch.is_grad_enabled() and not any(
                f.requires_grad for f in feats.values()):
            problem = "features without the latents' gradient (detached?)"
        if problem:
            raise ValueError(f"{flag} returned {problem}; a feature map returns {{key: (n, T, D) tensor}} computed "
                             f"from the n latents, with their gradient (docs/features.md)")
        return feats
    return checked


class UserCodeError(RuntimeError):
    """An exception raised in the user's own reward or feature map, chained to it: Python shows its traceback."""


def custom_code(spec, flag):
    """`module.path:function` of --reward / --features, imported now -> make(device, dtype): the function, or for
    `module.path:factory()` what factory(device=..., dtype=...) returns (the run's, e.g. to place a network once).
    A missing module or function is a one-line error; an exception in the user's code, a UserCodeError."""
    module, _, attr = spec.removesuffix("()").partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr, None)
    except Exception as e:  # unless the module itself is missing, its own code (or an import of it) failed
        if not (isinstance(e, ModuleNotFoundError) and f"{module}.".startswith(f"{e.name}.")):
            raise UserCodeError(f"{flag} {spec}: importing {module} raised {type(e).__name__}: {e}") from e
        raise ValueError(f"{flag} {spec}: no module {module!r} on the Python path; run from its folder or add that "
                         f"folder to PYTHONPATH") from e
    if not callable(fn):
        raise ValueError(f"{flag} {spec}: {module} has no function {attr!r}; name one of its functions after the colon")
    users = lambda f: functools.partial(call_users_code, f, f"{flag} {spec}")
    return lambda device, dtype: users(users(fn)(device=device, dtype=dtype) if spec.endswith("()") else fn)


def call_users_code(fn, where, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except torch.OutOfMemoryError:
        raise  # out of GPU memory, wherever: memory.explain_out_of_memory says what to do
    except Exception as e:
        raise UserCodeError(f"{where} raised {type(e).__name__}: {e}") from e


def brightness_reward(images, prompts):
    """Mean pixel value in [0, 1]: a toy reward with an obvious optimum, for demos and tests."""
    import numpy as np
    return torch.tensor([float(np.asarray(im.convert("RGB"), dtype=np.float32).mean() / 255) for im in images])


def jpeg_reward(images, prompts):
    """Minus the JPEG size at quality 95, in kB: the classic non-differentiable reward."""
    sizes = []
    for im in images:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
        sizes.append(-buf.tell() / 1000)
    return torch.tensor(sizes)


def random_reward(images, prompts):
    """Uniform noise from a hash of the pixels: the control run that shows gains come from the
    reward. Deterministic in the image, so resumed runs see the same scores."""
    import hashlib
    return torch.tensor([int.from_bytes(hashlib.sha256(im.tobytes()).digest()[:8], "little") / 2 ** 64
                         for im in images])


def beside(module):
    """A module of this repository, imported on first use: rewards.NAME, features.NAME and generators.NAME (ports
    of other projects' models, one self-contained file each), examples.tiny_model (the offline demo models), eval."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:  # drpo imported from another folder
        sys.path.append(here)
    sys.modules.setdefault("drpo", sys.modules[__name__])  # eval.py's `import drpo` is this module, run as a script
    return importlib.import_module(module)


# name -> constructor(device, dtype, paths); paths: the weight-file flags below (None = from the hub).
REWARDS = {
    "hpsv3": lambda device, dtype, p: beside("rewards.hpsv3").hpsv3_reward(device, p.get("hpsv3_ckpt"),
                                                                        p.get("hpsv3_base"), dtype),
    "pickscore": lambda device, dtype, p: beside("rewards.clip").pickscore_reward(device, dtype),
    "clip": lambda device, dtype, p: beside("rewards.clip").clip_reward(device=device, dtype=dtype),
    "aesthetic": lambda device, dtype, p: beside("rewards.clip").aesthetic_reward(device=device, dtype=dtype),
    "imagereward": lambda device, dtype, p: beside("rewards.imagereward").imagereward_reward(
        device, p.get("imagereward_ckpt"), p.get("imagereward_config"), p.get("imagereward_tokenizer"), dtype),
    "geneval": lambda device, dtype, p: beside("rewards.geneval").geneval_reward(
        p.get("geneval_metadata"), device, p.get("geneval_detector"), p.get("geneval_clip"), dtype),
    "brightness": lambda *_: brightness_reward, "jpeg": lambda *_: jpeg_reward, "random": lambda *_: random_reward,
    "vlm": lambda device, dtype, p: beside("rewards.vlm").vlm_reward(**p),  # a VLM server ranks (OpenAI protocol)
    "vlm-rating": lambda device, dtype, p: beside("rewards.vlm").vlm_reward(**p, mode="rating")}


# Weight files of the ported rewards: load_reward keyword (and --flag) -> what it is.
REWARD_PATHS = {
    "hpsv3_ckpt": "HPSv3.safetensors (default: hub MizzenAI/HPSv3)",
    "hpsv3_base": "Qwen2-VL-7B-Instruct folder for its config, tokenizer and image processor (default: hub)",
    "imagereward_ckpt": "ImageReward.pt (default: hub THUDM/ImageReward)",
    "imagereward_config": "ImageReward's med_config.json (default: hub THUDM/ImageReward)",
    "imagereward_tokenizer": "bert-base-uncased tokenizer folder (default: hub bert-base-uncased)",
    "geneval_detector": "Mask2Former folder (default: hub facebook/mask2former-swin-small-coco-instance)",
    "geneval_clip": "CLIP ViT-L/14 folder that names object colours (default: hub openai/clip-vit-large-patch14)",
}


def add_reward_path_flags(group):
    for key, what in REWARD_PATHS.items():
        group.add_argument("--" + key.replace("_", "-"), metavar="PATH", help=f"local {what}")
    beside("rewards.vlm").add_flags(group)  # --reward-url, --reward-model, ... of the served rewards


def reward_options(args):
    """load_reward's keywords from the parsed arguments: the weight files and the served rewards' settings."""
    return {k: getattr(args, k) for k in [*REWARD_PATHS, *beside("rewards.vlm").FLAGS]}


def parse_reward_spec(spec):
    """--reward -> [(name, constructor, weight)], checked without loading any model: every name is known
    or an importable `module:function` (its constructor returns that function), every weight a number."""
    parsed = []
    for member in filter(None, (m.strip() for m in spec.split(","))):
        name, weight = member, 1.0
        head, _, tail = member.rpartition(":")
        number = re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail)
        if head and (number or head in REWARDS) and not ("//" in head and head.count(":") == 1):  # not a URL's port
            name, weight = head, float(tail) if number else math.nan  # NAME:WEIGHT; a known name takes only numbers
            if not math.isfinite(weight) or weight == 0:
                raise ValueError(f"--reward {member}: a weight is a finite number other than 0, got {tail}")
        if name in REWARDS:
            parsed.append((name, REWARDS[name], weight))
        elif name.startswith(("http://", "https://")):  # a reward service, `python -m rewards.serve`
            parsed.append((name, lambda d, t, p, url=name: beside("rewards.remote").served_reward(url, **p), weight))
        elif ":" in name:
            parsed.append((name, lambda device, dtype, _, make=custom_code(name, "--reward"): make(device, dtype),
                           weight))
        else:
            raise ValueError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}, "
                             f"or `module.path:function` for your own, or a comma list of these")
    if not parsed:
        raise ValueError("--reward is empty; name a reward such as brightness, jpeg or hpsv3")
    return parsed


def load_reward(spec, device="cpu", batch_size=8, dtype=None, quantize=None, offload=False, **paths):
    """A reward callable (images: list of PIL, prompts: list of str) -> 1-D float tensor. spec: a reward name,
    `module.path:function` (custom_code), or a comma list of `NAME[:WEIGHT]` (each member z-scored over the call's
    images, then weighted and summed). Scores are computed under no_grad in batches of batch_size images; NaN stops.
    dtype: None = bf16 on CUDA, fp32 otherwise. paths: weight files by REWARD_PATHS name, served rewards' settings
    (reward_options), geneval_metadata=FILE.jsonl for geneval. reward.members: {name: each member alone,
    unweighted}; reward.combine: their scores -> the reward's; reward.counts(): a VLM's requests since last asked.
    quantize, offload: --reward-quantize and --offload, applied to each member's networks (memory.py)."""
    if set(paths) - {*REWARD_PATHS, *beside("rewards.vlm").FLAGS, "geneval_metadata"}:
        raise TypeError(f"load_reward got {sorted(set(paths) - set(REWARD_PATHS))}; see reward_options for its keys")
    dtype = dtype or precision_dtype("auto", device)
    fns = [(name, make(device, dtype, paths), w) for name, make, w in parse_reward_spec(spec)]
    if quantize or offload:
        fns = [(name, beside("memory").reward_levers(fn, name, quantize, offload and device), w) for name, fn, w in fns]

    @torch.no_grad()
    def score(name, fn, images, prompts):
        if len(images) != len(prompts):
            raise ValueError(f"reward got {len(images)} images but {len(prompts)} prompts")
        n = getattr(fn, "batch_size", batch_size) or len(images)  # served: None, the whole call in one request
        with getattr(fn, "on_device", contextlib.nullcontext)():  # --offload: its weights come once per call
            s = torch.cat([as_scores(name, fn(images[i:i + n], prompts[i:i + n])) for i in range(0, len(images), n)])
        if s.numel() != len(images):
            raise ValueError(f"reward {name!r} returned {s.numel()} scores for {len(images)} images; return "
                             f"one float per image")
        if not torch.isfinite(s).all():
            raise ValueError(f"reward {name!r} returned NaN or infinite scores {s.tolist()}; fix the reward "
                             f"(training stops rather than rank on invalid scores)")
        return s

    def combine(scores):  # each member's scores of the same images -> the reward (one member: its scores x weight)
        return fns[0][2] * scores[0] if len(scores) == 1 else sum(
            w * (s - s.mean()) / s.std(unbiased=False).clamp_min(1e-8) for (_, _, w), s in zip(fns, scores))

    reward = lambda images, prompts: combine([score(name, fn, images, prompts) for name, fn, _ in fns])
    reward.combine, reward.members = combine, {name: functools.partial(score, name, fn) for name, fn, _ in fns}
    reward.counts = lambda: {k: v for _, fn, _ in fns for k, v in getattr(fn, "counts", dict)().items()}  # a VLM's
    return reward


def as_scores(name, out):
    """What a reward returned, as float32 scores; anything else is a one-line error that names the reward."""
    try:
        s = torch.as_tensor(out, dtype=torch.float64).detach().cpu().flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"--reward {name} returned {type(out).__name__}; a reward returns one float per image, as a "
                         f"list or a 1-D tensor") from None
    if torch.isfinite(s).all() and not torch.isfinite(s.float()).all():
        raise ValueError(f"--reward {name} returned scores up to {s.abs().max():.3g}, beyond float32; rescale them")
    return s.float()


def add_lora(net, rank, alpha, targets):
    """Freeze the network and give it a trainable LoRA whose B matrices start at zero (G_theta = G_0)."""
    from peft import LoraConfig
    net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights="gaussian",
                               target_modules=list(targets)))
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:  # fp32 master weights for the LoRA even when the base is bf16
        p.data = p.data.float()
    return params


def lora_state(net):
    from peft.utils import get_peft_model_state_dict
    return {k: v.detach().cpu() for k, v in get_peft_model_state_dict(net).items()}


def save_lora(model, out_dir, card):
    """pytorch_lora_weights.safetensors in diffusers format, written by the pipeline class's own
    save_lora_weights: `pipe.load_lora_weights(out_dir)` reads it (every family); and its model card README.md.
    Both are written aside and renamed into place, readable as the run's other files (safetensors makes them 0600)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    tmp, umask = Path(out_dir) / ".saving-lora", os.umask(0)
    os.umask(umask)
    tmp.mkdir(exist_ok=True)
    type(model.pipe).save_lora_weights(tmp, **{f"{model.name}_lora_layers": convert_state_dict_to_diffusers(
        lora_state(model.net)), f"{model.name}_lora_adapter_metadata": model.net.peft_config["default"].to_dict()})
    (tmp / "README.md").write_text(card)
    for name in ("pytorch_lora_weights.safetensors", "README.md"):
        os.chmod(tmp / name, 0o666 & ~umask)
        os.replace(tmp / name, Path(out_dir) / name)
    tmp.rmdir()


MODEL_ALIASES = {"sd-turbo": "stabilityai/sd-turbo", "sdxl-turbo": "stabilityai/sdxl-turbo",
                 "sana-sprint": "Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers",
                 "flux-schnell": "black-forest-labs/FLUX.1-schnell",
                 "sd3.5-large-turbo": "stabilityai/stable-diffusion-3.5-large-turbo"}
TINY_MODELS = {"tiny": "sd", "tiny-sdxl": "sdxl", "tiny-sana": "sana-sprint", "tiny-flux": "flux", "tiny-sd3": "sd3"}
TINY_STAND_IN = {"tiny-flux": "flux-schnell", "tiny-sd3": "sd3.5-large-turbo"}  # whose model card settings they take
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
FAMILIES = {"SanaSprintPipeline": "generators.sana", "FluxPipeline": "generators.flux",  # pipeline class -> file
            "StableDiffusion3Pipeline": "generators.sd3"}
TURBO_SIDE = 512  # SDXL-Turbo's trained image side, although its UNet config says 1024 (model card)


def resolve_model(model):
    """--model (an alias, a hub id or a folder) -> what from_pretrained takes; tiny* are built into the cache once."""
    if model in TINY_MODELS:
        return str(beside("examples.tiny_model").cached(TINY_MODELS[model]))
    local = Path(path := MODEL_ALIASES.get(model, model)).expanduser()  # path: a hub id or a folder
    if (local / "model_index.json").is_file():
        return str(local)
    if not local.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return path  # a hub id, owner/name
    near = "".join(f" (did you mean {m}?)" for m in difflib.get_close_matches(model, [*MODEL_ALIASES, *TINY_MODELS], 1))
    missing = "no such folder" + ("" if "/" in model else f"{near}; DMD2, Lightning: docs/models.md")  # a bare name
    problem = "is a file" if local.is_file() else "is not a diffusers pipeline" if local.exists() else missing
    raise FileNotFoundError(f"--model {model}: {problem}. Pass a diffusers pipeline folder (the one "
                            f"`pipe.save_pretrained` writes, with model_index.json), a hub id, or an alias: "
                            f"{', '.join([*MODEL_ALIASES, *TINY_MODELS])} (`tiny`: the offline demo model)")


def model_error(model, path, e):
    return OSError(f"could not load --model {model} ({path}): {str(e).splitlines()[0]}\n  Known aliases: "
                   f"{', '.join([*MODEL_ALIASES, *TINY_MODELS])}. Hub models download on first use; offline, "
                   f"fetch it on a machine with internet (`hf download {path} --local-dir DIR`) and pass "
                   f"--model DIR. For an offline demo: --model tiny.")


def model_class(model):
    """What from_pretrained takes for --model and its pipeline class name (as model_index.json names it,
    never guessed from the model's name), read without weights; families DrPO cannot train are refused."""
    from diffusers import DiffusionPipeline
    path = resolve_model(model)
    try:
        name = DiffusionPipeline.load_config(path)["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise model_error(model, path, e) from e
    if name not in (*PIPELINES, *FAMILIES):
        raise ValueError(f"--model {model} is a {name}, which DrPO has no generator for. It trains "
                         f"{', '.join([*PIPELINES, *FAMILIES])}: SD-Turbo, SDXL-Turbo, few-step SDXL UNets (DMD2, "
                         f"Lightning), SANA-Sprint, FLUX.1-schnell, SD3.5-Large-Turbo (docs/models.md)")
    return path, name


def load_generator(model, dtype=torch.float32, device="cpu", steps=None, timesteps=None, quantize=None):
    """--model as the loop sees a generator: the pipeline class the folder names, every weight frozen (the LoRA is all
    that trains), with the fields of unet_generator (SD, SDXL) or of its family's file in generators/.
    steps, timesteps: --inference-steps, --timesteps (None: the model's own, one step for the UNets); quantize: the
    network's --quantize (memory.py)."""
    import diffusers
    path, name = model_class(model)
    extra = dict(safety_checker=None, requires_safety_checker=False) if name == "StableDiffusionPipeline" else {}
    if quantize:
        extra |= beside("memory").pipeline_config(quantize, "unet" if name in PIPELINES else "transformer", dtype)
    try:
        pipe = getattr(diffusers, name).from_pretrained(path, dtype=dtype, **extra)
    except (OSError, ValueError) as e:
        raise model_error(model, path, e) from e
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False)
    if model in TINY_STAND_IN:  # a tiny model samples with its real model's card settings (steps, tokens)
        pipe.register_to_config(_name_or_path=MODEL_ALIASES[TINY_STAND_IN[model]])
    model = (beside(FAMILIES[name]).generator if name in FAMILIES else unet_generator)(pipe.to(device), steps,
                                                                                      timesteps)
    model.conditioning = by_prompt(model.conditioning, device)
    return model


def unet_generator(pipe, steps=None, timesteps=None):
    """SD or SDXL as the generator the loop uses; generators/NAME.py give other families the same fields. net: the
    trainable network, pipe.<name>; conditioning(prompts, side): its keywords, a row per prompt; recipe: step_recipe's;
    teacher: (t, c_in, default blocks, item) of teacher_features; encode: images in [-1, 1] -> latents before the VAE's
    scaling factor; stock_call: the stock pipeline's call keywords that sample what generate does (but size, prompt)."""
    return types.SimpleNamespace(pipe=pipe, net=pipe.unet, name="unet", conditioning=functools.partial(
                                 unet_conditioning, pipe), recipe=step_recipe(pipe.scheduler, steps or 1, timesteps),
                                 teacher=(100, 1.0, ("down_blocks.-1", "mid_block", "up_blocks.0"), 0),
                                 encode=lambda images: pipe.vae.encode(images).latent_dist.mean,
                                 stock_call=dict(guidance_scale=0.0, **{"num_inference_steps": steps or 1} if
                                                 timesteps is None else {"timesteps": list(timesteps)}))


def precision_dtype(precision, device):
    """A --precision value -> dtype; auto = bf16 on CUDA, fp32 elsewhere."""
    auto = "bf16" if torch.device(device).type == "cuda" else "fp32"
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[auto if precision == "auto" else precision]


def latent_shape(model, resolution=None):
    """(C, h, w) of the generator's latents for square images. None = the native side: the network
    config's, at most TURBO_SIDE for SDXL (SDXL-Turbo is trained at 512 px)."""
    f = model.pipe.vae_scale_factor
    side = resolution or model.net.config.sample_size * f
    if resolution is None and type(model.pipe).__name__ == "StableDiffusionXLPipeline":
        side = min(side, TURBO_SIDE)
    return (model.net.config.in_channels, side // f, side // f)


def init_distributed():
    """(rank, world size, local rank). Under torchrun (WORLD_SIZE > 1) this process joins the job:
    NCCL on GPUs, gloo on CPU processes. A plain `python drpo.py` is a job of one."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world, local_rank


def reward_device_of(spec, device, local_rank, flag="--reward-device"):
    """--reward-device (or flag): None = device; `cuda:+N` = N GPUs after this process's own (rank-relative under
    torchrun); anything else as given. Refused, naming flag, if this torch cannot use it."""
    try:
        found = spec and (torch.device("cuda", local_rank + int(spec[6:])) if spec.startswith("cuda:+") else
                          torch.device(spec))
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{flag} {spec}: not a torch device ({str(e)[:50]}...); use e.g. cpu, cuda or cuda:1") from e
    if found and found.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {spec}: this torch build sees no CUDA GPU; use cpu or install a CUDA build of torch")
    return found or device


class PeerFailed(RuntimeError):
    """Another process of the job failed and reported it; this one stops quietly."""


class Stopped(Exception):
    """A stop signal cut a held-out evaluation short: the run saves its last update and stops."""


@contextlib.contextmanager
def all_or_none(world):
    """Run a block on every process; if any raises, all raise at its end (one small all-reduce), so none
    is left waiting in a collective. The lowest failing rank raises its error, the others PeerFailed."""
    error = None
    try:
        yield
    except Exception as e:
        if world == 1:
            raise
        error = e
    if world > 1:  # 1: an error, 2: a stop (Stopped); an error wins
        failed = torch.zeros(world, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        failed[dist.get_rank()] = 0 if error is None else 2 if isinstance(error, Stopped) else 1
        dist.all_reduce(failed)
        if (failed == 1).any():
            first = int((failed == 1).nonzero()[0])
            if dist.get_rank() == first:
                raise error
            raise PeerFailed(f"process {first} failed")
        if failed.any():
            raise Stopped("a stop signal during the held-out evaluation")


def any_process(asked, world):
    """Whether any process has been asked to stop (a signal in its list): one all-reduce, so all act on it at once."""
    if world == 1:
        return bool(asked)
    flag = torch.tensor([float(bool(asked))], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag)
    return flag.item() > 0


def all_reduce_update(params, log, world):
    """Sum the LoRA gradients over the processes (one all-reduce: the LoRA is all that trains, so
    this is all DDP would do) and pool their logs, so every process holds the whole update."""
    if world == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)
    logs = [None] * dist.get_world_size()
    dist.all_gather_object(logs, log)  # a few numbers and score tensors per process
    for key, value in log.items():  # score lists joined in rank order, statistics summed
        log[key] = sum((other[key] for other in logs), [] if isinstance(value, list) else 0.0)


def stopwatch(device):
    """lap(name) adds the seconds since the previous lap to times[name] (CUDA synchronized first)."""
    times, last = {}, [time.perf_counter()]

    def lap(name):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - last[0]
        last[0], lap.last = now, name
    lap.last = None
    return times, lap


DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "train.txt"  # 16 built-in training prompts


def read_prompts(path, flag="--prompts"):
    """--prompts (or flag): one prompt per line, or for a .jsonl file each line's "prompt" (GenEval's metadata)."""
    path = path or DEFAULT_PROMPTS
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file; give a text file with one prompt per line")
    try:
        prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    if str(path).endswith(".jsonl"):
        try:
            prompts = [json.loads(line)["prompt"] for line in prompts]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{flag} {path}: every line of a .jsonl file must be an object with a \"prompt\" "
                             f"({e!r})") from e
    bad = next((n for n, p in enumerate(prompts, 1) if not (isinstance(p, str) and p.strip())), None)
    if bad:
        raise ValueError(f"{flag} {path}: prompt {bad} is {prompts[bad - 1]!r}; every prompt is a non-empty string")
    if not prompts:
        raise ValueError(f"{flag} {path} has no prompts; write one prompt per line")
    return prompts


def atomic_write(path, write):
    """Write through a temporary file and rename, so an interrupt never leaves half a file."""
    tmp = Path(f"{path}.tmp")
    write(tmp)
    os.replace(tmp, path)


def check_model(model, resolution=None, steps=None, timesteps=None, features=None, layers=None):
    """The settings that depend on the architecture, on --model's configs only (no weights); returns its steps."""
    import diffusers
    path, name = model_class(model)
    if steps and timesteps and steps != len(timesteps):
        raise ValueError(f"--inference-steps {steps} and --timesteps {','.join(map(str, timesteps))} ({len(timesteps)} "
                         f"steps) disagree; give one of them")
    if name in FAMILIES:  # a tiny stand-in takes its real model's card settings (TINY_STAND_IN)
        return beside(FAMILIES[name]).check_model(path, resolution, steps, timesteps, features, layers,
                                                  MODEL_ALIASES.get(TINY_STAND_IN.get(model), path))
    try:
        unet, vae, scheduler = (getattr(diffusers, c).load_config(path, subfolder=f) for c, f in (
            ("UNet2DConditionModel", "unet"), ("AutoencoderKL", "vae"), ("DDPMScheduler", "scheduler")))
    except (OSError, ValueError) as e:
        raise model_error(model, path, e) from e
    T = scheduler["num_train_timesteps"]
    if timesteps and not (list(timesteps) == sorted(set(timesteps), reverse=True) and 0 <= timesteps[-1]
                          and timesteps[0] < T):
        raise ValueError(f"--timesteps {','.join(map(str, timesteps))}: give decreasing timesteps in 0 .. {T - 1}, "
                         f"one per step (DMD2: 399, or 999,749,499,249 for its 4-step UNet)")
    if (steps or 1) > T:
        raise ValueError(f"--inference-steps {steps}: this model's scheduler has {T} timesteps; give 1-8 steps")
    try:  # the steps read off the scheduler's config: what it cannot take (LCM beyond 50 steps, ...) is said now
        step_recipe(getattr(diffusers, scheduler["_class_name"]).from_config(scheduler), steps or 1, timesteps)
    except (ValueError, IndexError) as e:
        raise ValueError(f"--model {model} with {steps or len(timesteps or [1])} step(s): {e}") from e
    factor = 2 ** (len(vae["block_out_channels"]) - 1) * 2 ** (len(unet["down_block_types"]) - 1)
    if resolution is not None and (resolution < factor or resolution % factor):
        raise ValueError(f"--resolution {resolution}: this model needs a multiple of {factor} (VAE and UNet "
                         f"downsampling), e.g. {max(factor, round(resolution / factor) * factor)}")
    n = len(unet["down_block_types"])
    blocks = ["mid_block", *(f"{b}.{i}" for b in ("down_blocks", "up_blocks") for i in range(-n, n))]
    for layer in layers.split(",") if features == "teacher" and layers else ():
        if not any(layer == b or layer.startswith(b + ".") for b in blocks):
            raise ValueError(f"--teacher-layers: {layer!r} is not a block of this UNet; use mid_block, "
                             f"down_blocks.I or up_blocks.I with I in {-n}..{n - 1}")
    return steps or len(timesteps or [1])


def check_reward_paths(a, rewards):
    """The weight-file flags (REWARD_PATHS) given in a (vars of the arguments): each exists, a used reward's."""
    for key in (k for k in REWARD_PATHS if a[k]):
        if key.split("_")[0] not in rewards:
            raise ValueError(f"--{key.replace('_', '-')} is a weight file of the {key.split('_')[0]} reward, which no "
                             f"--reward uses; drop it or add {key.split('_')[0]} to the rewards")
        if not Path(a[key]).exists():
            raise FileNotFoundError(f"--{key.replace('_', '-')} {a[key]}: no such file or folder")
    beside("rewards.vlm").check_flags(a, rewards)  # --reward-url, --reward-model, ...: given only when used


def check_args(args, world=1):
    """Check every setting and file before any model loads (custom code is imported): seconds, not a download."""
    a = vars(args)
    for names, ok, rule in (
            (("candidates", "n_pos", "n_neg", "max_steps", "grad_accum", "prompts_per_step", "reward_batch",
              "lora_rank", "save_every", "grid_prompts", "grid_noises", "eval_seeds", "save_lora_every"),
             lambda v: v >= 1, "at least 1"),
            (("lora_alpha", "max_grad_norm"), lambda v: v > 0, "positive"),
            (("lr",), lambda v: 0 < v <= 1, "positive and at most 1"),  # bounds past which a run can only fail
            (("pos_weight", "neg_weight", "ref_weight", "ref_neg_weight"), lambda v: 0 < v <= 1e6,
             "positive, at most 1e6 (the paper's: 3000)"),
            (("resolution",), lambda v: v is None or v <= 4096, "a side of at most 4096 pixels"),
            (("lambda_ref", "grad_chunk", "sample_every", "eval_every", "weight_decay"), lambda v: v is None or v >= 0,
             "0 (off) or positive"), (("adam_beta1", "adam_beta2"), lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.9"),
            (("inference_steps", "grad_steps"), lambda v: v is None or v >= 1, "at least 1"),
            (("radii", "ref_radii"), lambda v: v and all(r > 0 for r in v), "positive numbers, e.g. 0.02,0.05,0.2")):
        for name in (n for n in names if not ok(a[n])):
            raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {a[name]}")
    resolve_model(args.model)  # a misspelt --model is said at once, before the slower checks import diffusers
    if args.n_pos + args.n_neg > args.candidates:
        raise ValueError(f"--n-pos {args.n_pos} + --n-neg {args.n_neg} exceeds --candidates {args.candidates}: "
                         f"positives and negatives must be disjoint candidates")
    if args.force and not args.resume:
        raise ValueError("--force only overrides the settings check of --resume; add --resume or drop --force")
    out = Path(args.output_dir)
    for flag in ("device", "reward_device"):  # a bad --device or --reward-device, said now
        reward_device_of(a[flag], None, 0, "--" + flag.replace("_", "-"))
    if args.pairs and (args.reward or args.prompts):
        raise ValueError("--pairs replaces --reward and --prompts (the file holds the prompts and the preferences); "
                         "drop " + " and ".join(f for f in ("--reward", "--prompts") if getattr(args, f[2:])))
    if args.pairs:
        beside("rewards.pairs").read_pairs(args.pairs)
    args.reward = None if args.pairs else "hpsv3" if args.reward is None else args.reward
    rewards = [name for name, _, _ in parse_reward_spec(args.reward)] if args.reward is not None else []
    beside("memory").check(args, run_device(args.device, "auto", 0)[0])  # --quantize, ...: possible here?
    if "geneval" in rewards and not str(args.prompts).endswith(".jsonl"):
        raise ValueError("--reward geneval finds each prompt's checks in the GenEval metadata: pass --prompts "
                         "evaluation_metadata.jsonl (from the GenEval repository's prompts/ folder; docs/geneval.md)")
    beside("eval").check_watch(args)  # --eval-*: the held-out evaluation's settings and files
    check_reward_paths(a, [n for r in (args.reward, args.eval_reward) if r for n, _, _ in parse_reward_spec(r)])
    if args.features not in FEATURES:  # a custom map is imported now; an unknown name is refused by load_features
        custom_code(args.features, "--features") if ":" in args.features else load_features(args.features)
    for flag, features in (("mae_ckpt", "mae"), ("teacher_layers", "teacher"), ("dinov2", "dinov2")):
        if a[flag] and args.features != features:
            raise ValueError(f"--{flag.replace('_', '-')} is for --features {features}, not {args.features}: drop it")
    if args.dinov2 and args.dinov2.startswith((".", "/", "~")) and not Path(args.dinov2).expanduser().is_dir():
        raise FileNotFoundError(f"--dinov2 {args.dinov2}: no such folder; pass a DINOv2 folder or a hub id")
    if args.features == "mae":
        beside("features.mae").check_ckpt(args.mae_ckpt)
    read_prompts(args.prompts)
    n = check_model(args.model, args.resolution, args.inference_steps, args.timesteps, args.features,
                    args.teacher_layers)  # the sampler's steps
    if (args.grad_steps or 1) > n:
        raise ValueError(f"--grad-steps {args.grad_steps} exceeds the sampler's {n} step(s); give at most {n}, or "
                         f"drop it")
    beside("eval").check_targets(args.model, args.lora_targets)  # from the network's config, without weights
    args.data_sha256 = hashlib.sha256(Path(args.pairs or args.prompts or DEFAULT_PROMPTS).read_bytes()).hexdigest()
    beside("run_folder").check_output_dir(args, out, world)  # resume, or start in a folder that is this run's



def _check_sets(gen, pos, neg, radii, kernel):
    """drift_field's inputs: three (B, set size, D) tensors of one B and D, none empty; positive radii; a kernel."""
    for name, t in (("gen", gen), ("pos", pos), ("neg", neg)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be a (B, set size, D) tensor, got shape {tuple(t.shape)}")
        if t.shape[0] != gen.shape[0] or t.shape[2] != gen.shape[2]:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but gen has {tuple(gen.shape)}: "
                             f"batch (dim 0) and feature size (dim 2) must match")
        if t.shape[1] == 0:
            raise ValueError(f"{name} is empty: the field needs at least one {name} vector per set")
    if len(radii) == 0 or any(not (r > 0) for r in radii):
        raise ValueError(f"radii must be a non-empty list of positive numbers, got {tuple(radii)}")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")


def _check_scores(scores, n_pos, n_neg):
    """select_pos_neg's input: (K,) or (B, K) finite scores, at least one positive and one negative, disjoint."""
    if scores.dim() not in (1, 2):
        raise ValueError(f"scores must have shape (K,) or (B, K), got {tuple(scores.shape)}")
    if n_pos < 1 or n_neg < 1:
        raise ValueError(f"n_pos={n_pos} and n_neg={n_neg} must both be at least 1")
    if n_pos + n_neg > scores.shape[-1]:
        raise ValueError(f"n_pos + n_neg = {n_pos + n_neg} exceeds the {scores.shape[-1]} candidates per prompt; "
                         f"lower --n-pos/--n-neg or raise --candidates")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values; check the reward model "
                         "(nothing is selected from invalid scores)")


# ----------------------------------------------------------------------------------------
# 5. Command line. Defaults are the published SD-Turbo setting but two: --features teacher (no extra download; the
# paper's mae needs --mae-ckpt) and --grad-accum 8, the paper's per GPU (it ran 4 GPUs; one GPU: 32). docs/choices.md
# ----------------------------------------------------------------------------------------


def floats(text):
    return tuple(float(v) for v in text.split(","))


def ints(text):
    return tuple(int(v) for v in text.split(","))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none to show."""
    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(description="DrPO: finetune a one- or few-step text-to-image generator toward a reward "
                                "that is only used to rank samples.", formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="sd-turbo", help=f"an alias ({', '.join([*MODEL_ALIASES, *TINY_MODELS])}; tiny*: "
                   "offline demos), a hub id, or a diffusers pipeline folder (docs/models.md)")
    g.add_argument("--resolution", type=int, help="image side in pixels (default: native; 512 for the Turbo models)")
    g.add_argument("--inference-steps", type=int, help="N: the generator's sampling steps, all trained through "
                   "(default: 1 for the UNets; the stock call's for FLUX and SD3, 4 for their aliases; docs/models.md)")
    g.add_argument("--timesteps", "--timestep", type=ints, help="a UNet scheduler's timesteps, one per step (default: "
                   "the stock pipeline's for N steps; DMD2: 399, its 4-step UNet: 999,749,499,249)")
    g.add_argument("--grad-steps", type=int, help="backpropagate through the last K of the N steps only, the earlier "
                   "ones without a graph (default: all N; docs/cost.md)")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="frozen weights and autocast dtype; auto = bf16 on CUDA, fp32 on CPU; LoRA weights stay fp32")
    g.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    g.add_argument("--cache-conditioning", action="store_true", help="each training and held-out prompt's text "
                   "conditioning once, kept in host memory; the text encoders then leave the GPU (the same update)")
    g.add_argument("--quantize", choices=("int8", "float8", "nf4"), help="load the UNet or transformer quantized, "
                   "the LoRA in full precision on top (QLoRA; nf4: CUDA and bitsandbytes only; docs/cost.md)")
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=16, help="LoRA rank")
    g.add_argument("--lora-alpha", type=float, default=16, help="LoRA alpha (scale = alpha / rank)")
    g.add_argument("--lora-targets", default="to_q,to_k,to_v,to_out.0", help="comma list of module names of the "
                   "generator's network (the UNet or the transformer): by default its attention projections")
    g = p.add_argument_group("the method (METHOD in drpo.py; the paper's values; the four weights are what the paper "
                             "calls the velocity scale)")
    kinds = {int: dict(type=int), float: dict(type=float), tuple: dict(type=floats), str: dict(choices=KERNELS)}
    for name, (value, meaning) in METHOD.items():  # each default written once, in METHOD
        g.add_argument("--" + name.replace("_", "-"), default=value, help=meaning, **kinds[type(value)])
    g = p.add_argument_group("reward")
    g.add_argument("--reward", help=f"{', '.join(REWARDS)}, `module:function`, http://HOST:PORT (a service), or a "
                   "weighted list like `hpsv3:1,pickscore:0.5` (docs/rewards.md); default: hpsv3, or none with --pairs")
    g.add_argument("--pairs", metavar="FILE.jsonl", help='offline preference pairs instead of a reward: {"prompt", '
                   '"chosen", "rejected"} per line; chosen images attract, rejected repel (docs/pairs.md)')
    g.add_argument("--reward-batch", type=int, default=8, help="images per reward call (and per VAE decode)")
    g.add_argument("--reward-device", help="device of the reward model (default: the training device); `cuda:+N`: "
                   "the GPU N after this process's own (docs/scaling.md); one copy for all: serve it (docs/rewards.md)")
    g.add_argument("--reward-precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="dtype of the reward network; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--reward-quantize", choices=("int8", "float8"), help="quantize the reward model's network "
                   "(hpsv3, imagereward and the CLIP rewards; docs/rewards.md measures what it changes)")
    g.add_argument("--offload", action="store_true", help="the reward model's weights wait in host memory except "
                   "while it scores: the same update, one copy to the GPU per call (GPU runs; docs/cost.md)")
    add_reward_path_flags(g)
    g = p.add_argument_group("features")
    g.add_argument("--features", default="teacher", help=f"feature map phi: {', '.join(FEATURES)} or `module:function` "
                   "(docs/features.md); teacher: blocks of the frozen generator; mae, the paper's, needs --mae-ckpt")
    g.add_argument("--mae-ckpt", help="path of mae_latent_256_torch.pth for --features mae")
    g.add_argument("--teacher-layers", help="blocks for --features teacher (default: SD/SDXL down_blocks.-1,mid_block,"
                   "up_blocks.0; SANA-Sprint, FLUX, SD3: blocks at 1/4, 1/2, 3/4 depth)")
    g.add_argument("--dinov2", help="DINOv2 hub id or folder for --features dinov2 (default: facebook/dinov2-base)")
    g = p.add_argument_group("optimization")
    g.add_argument("--max-steps", type=int, default=1000, help="optimizer updates")
    g.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip")
    g.add_argument("--grad-accum", type=int, default=8, help="micro-steps per update (the paper: 8 on each of 4 GPUs)")
    g.add_argument("--prompts-per-step", type=int, default=1, help="B: prompts per micro-step")
    g.add_argument("--grad-chunk", type=int, default=0, help="0 = all K in one pass (fastest); C < K: recompute and "
                   "regress C candidates at a time, the same update in flat memory (docs/cost.md)")
    g.add_argument("--prompts", help="one prompt per line, or .jsonl with a \"prompt\" per line (e.g. GenEval's "
                   "evaluation_metadata.jsonl, needed by --reward geneval); default: prompts/train.txt, 16 prompts")
    g.add_argument("--seed", type=int, default=42, help="seed of the LoRA initialization, prompt order and noises")
    g = p.add_argument_group("outputs")
    g.add_argument("--output-dir", default="runs/drpo", help="LoRA, config, metrics, curves, sample grids, checkpoint")
    g.add_argument("--sample-every", type=int, default=50, help="sample grid and curves every N steps; 0 = no grids")
    g.add_argument("--grid-prompts", type=int, default=4, help="rows of the sample grid (the first prompts)")
    g.add_argument("--grid-noises", type=int, default=2, help="columns of the sample grid (fixed noises)")
    g.add_argument("--save-every", type=int, default=100, help="save the LoRA and a checkpoint every N steps")
    g.add_argument("--save-lora-every", type=int, default=100, help="keep the LoRA of every N-th update (and of the "
                   "last) in loras/step_N/, a folder to load or upload, with its model card")
    g.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint; "
                   "refused if a setting that shapes the run changed (docs/running.md)")
    g.add_argument("--force", action="store_true", help="with --resume: continue anyway, recorded in config.json")
    g.add_argument("--overwrite", action="store_true", help="start a new run in a non-empty --output-dir")
    g.add_argument("--report-to", choices=("tensorboard", "wandb"), help="also log metrics and images there "
                   "(pip install tensorboard or wandb; W&B offline: WANDB_MODE=offline; docs/running.md)")
    g = p.add_argument_group("held-out evaluation (docs/running.md, \"Watching a run\")")
    g.add_argument("--eval-every", type=int, help="every N updates, score fixed held-out (prompt, seed) images as "
                   "eval.py does (the base at update 0), best in loras/best; 0 = off (default: 25; with --pairs 0)")
    g.add_argument("--eval-prompts", metavar="FILE", help="held-out prompts, one per line (default: "
                   "prompts/heldout.txt, none of them a built-in training prompt)")
    g.add_argument("--eval-reward", help="rewards to watch, a --reward spec, each member logged as eval/NAME; the "
                   "first picks loras/best (default: the training reward, vlm-rating for vlm; required with --pairs)")
    g.add_argument("--eval-seeds", type=int, default=4, help="noises per held-out prompt: seeds 0 .. N-1, as eval.py's")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    rank, world, _ = init_distributed()
    try:
        with beside("run_folder").deferred_signals() as stop_asked:
            stopped_by = train(args, stop_asked)
    except PeerFailed:
        return 2
    except (ValueError, OSError, ImportError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if rank == 0:
            print(f"\ninterrupted; the last checkpoint in {args.output_dir} is intact: continue with --resume",
                  file=sys.stderr)
        return 130
    finally:
        if world > 1:
            dist.destroy_process_group()
    if stopped_by:
        return 128 + stopped_by  # the shell's code for that signal: 143 SIGTERM, 130 SIGINT, 138 SIGUSR1
    if rank == 0:
        print(f"done: LoRA in {Path(args.output_dir) / 'pytorch_lora_weights.safetensors'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
