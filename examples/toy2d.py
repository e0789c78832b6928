"""DrPO in two dimensions: the picture of the field.

    python examples/toy2d.py --out toy2d/      # writes toy2d/toy2d.png and toy2d/toy2d.gif (~15 s on 2 CPU cores)

A small generator network maps 2-D noise to 2-D points; a frozen copy of it at initialization is
the base generator. The reward is a black box (closeness to a ring) that is only used to rank
K samples per step. Features are the points themselves. Each step runs drpo.py's own functions:
select_pos_neg ranks, drpo_targets builds the dipole preference field and the reference drift,
regression_loss regresses the samples onto sg(x + V). The frames show the samples (blue), the
step's positives (green) and negatives (red), the base samples (grey) and the field's arrows.

What the picture shows: the samples drift onto the ring, and the reference drift holds them apart.
The last panel is the same run without it (lambda_ref = 0): the samples collapse onto one point of
the ring. A larger --lambda-ref keeps them more spread and nearer the base's samples, with less reward
(200 steps, measured: lambda_ref 0 / 0.5 / 1 / 3: mean pairwise distance 0.04 / 0.20 / 0.51 / 1.00, the
base's 0.83; mean reward -0.01 / -0.11 / -0.38 / -0.82, the base's -0.84).
"""
import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from drpo import drpo_targets, regression_loss, select_pos_neg  # noqa: E402

RING_CENTER, RING_RADIUS = torch.tensor([1.4, 0.5]), 0.8


def reward(x):
    """Closeness to a ring: minus the distance to the circle. Used to rank only, never differentiated."""
    return -((x - RING_CENTER).norm(dim=-1) - RING_RADIUS).abs()


class Generator(torch.nn.Module):
    """z (n, 2) -> points (n, 2): 0.5 z plus a small MLP, so the base generator (this network at
    initialization) draws a round blob and training can bend it anywhere."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                                       torch.nn.SiLU(), torch.nn.Linear(64, 2))
        with torch.no_grad():
            self.mlp[-1].weight.mul_(0.1)

    def forward(self, z):
        return 0.5 * z + self.mlp(z)


def train(steps=200, K=64, n_pos=16, n_neg=16, lambda_ref=0.5, lr=1e-3, seed=0, frames=0):
    """Run DrPO; returns per-step mean reward and mean distance to the base samples, and `frames`
    snapshots (step, samples, positives, negatives, base samples, field) for drawing."""
    G = Generator(seed)
    G0 = Generator(seed).requires_grad_(False)  # the base generator: G at initialization
    opt = torch.optim.Adam(G.parameters(), lr=lr)
    rng = torch.Generator().manual_seed(seed + 1)
    history, snaps = {"reward": [], "dist_ref": []}, []
    snap_at = {round(i * (steps - 1) / max(frames - 1, 1)) for i in range(frames)}
    for step in range(steps):
        z = torch.randn((K, 2), generator=rng)
        with torch.no_grad():  # 1. sample, on the same noises from the base
            x, r = G(z), G0(z)
        scores = reward(x)  # 2. rank
        pos_idx, neg_idx = select_pos_neg(scores, n_pos, n_neg)
        feats = {"xy": x[None]}  # 3. identity features: one set of K points
        targets, _ = drpo_targets(feats, {"xy": x[pos_idx][None]}, {"xy": x[neg_idx][None]}, {"xy": r[None]},
                                  lambda_ref=lambda_ref)  # 4. the field
        loss = regression_loss({"xy": G(z)[None]}, targets)  # 5. regress onto sg(x + V)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["reward"].append(scores.mean().item())
        history["dist_ref"].append((x - r).norm(dim=-1).mean().item())
        if step in snap_at:
            # the total field in data units: each term's goal minus the sample, weighted as in the loss
            field = sum(w * sigma * goal[0] - w * x for w, sigma, goal in targets["xy"])
            snaps.append((step, x, x[pos_idx], x[neg_idx], r, field))
    return history, snaps


def draw(snap, history, ax, note=""):
    step, x, pos, neg, base, field = snap
    t = torch.linspace(0, 2 * math.pi, 200)
    ax.plot(RING_CENTER[0] + RING_RADIUS * t.cos(), RING_CENTER[1] + RING_RADIUS * t.sin(), color="orange",
            lw=6, alpha=0.3, label="high reward")
    ax.scatter(*base.T, s=8, color="grey", alpha=0.5, label="base samples")
    ax.scatter(*x.T, s=10, color="tab:blue", label="samples")
    ax.scatter(*pos.T, s=22, facecolors="none", edgecolors="green", label="positives")
    ax.scatter(*neg.T, s=22, facecolors="none", edgecolors="red", label="negatives")
    arrows = field * 0.12 / field.norm(dim=-1).mean().clamp_min(1e-8)  # direction and relative size
    ax.quiver(*x.T, *arrows.T, angles="xy", scale_units="xy", scale=1, width=0.004, color="black", alpha=0.6)
    ax.set_title(f"step {step}{note}: mean reward {history['reward'][step]:.3f}", fontsize=9)
    ax.set_xlim(-1.8, 2.6)
    ax.set_ylim(-1.8, 1.8)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def main(argv=None):
    ap = argparse.ArgumentParser(description="DrPO on 2-D points: writes OUT/toy2d.png and OUT/toy2d.gif.")
    ap.add_argument("--out", default="toy2d", help="output folder")
    ap.add_argument("--steps", type=int, default=200, help="DrPO updates")
    ap.add_argument("--lambda-ref", type=float, default=0.5, help="weight of the reference drift")
    ap.add_argument("--frames", type=int, default=30, help="frames of the GIF")
    ap.add_argument("--seed", type=int, default=0, help="seed")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.frames < 1 or args.lambda_ref < 0:
        ap.error("--steps and --frames must be at least 1, --lambda-ref 0 or more")
    import matplotlib
    import numpy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    history, snaps = train(args.steps, lambda_ref=args.lambda_ref, seed=args.seed, frames=args.frames)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for snap in snaps:
        fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=80)
        draw(snap, history, ax)
        fig.tight_layout()
        fig.canvas.draw()
        images.append(Image.fromarray(numpy.asarray(fig.canvas.buffer_rgba())).convert("RGB"))
        plt.close(fig)
    images[0].save(out / "toy2d.gif", save_all=True, append_images=images[1:], duration=150, loop=0)
    panels = [(snap, history, "") for snap in (snaps[0], snaps[len(snaps) // 2], snaps[-1])]
    title = (f"DrPO in 2-D: ranked samples drift onto the ring and the reference drift (lambda_ref = {args.lambda_ref})"
             f" holds them apart; without it (right) they collapse onto one point")
    if args.lambda_ref > 0:  # the same run without the reference drift, for comparison
        free, free_snaps = train(args.steps, lambda_ref=0.0, seed=args.seed, frames=2)
        panels.append((free_snaps[-1], free, ", lambda_ref 0"))
    else:
        title = "DrPO in 2-D without the reference drift (lambda_ref = 0): the samples collapse onto one point"
    fig, axes = plt.subplots(1, len(panels), figsize=(3.7 * len(panels), 3.8), dpi=80)
    for ax, (snap, hist, note) in zip(axes, panels):
        draw(snap, hist, ax, note)
    axes[0].legend(loc="lower left", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "toy2d.png")
    print(f"wrote {out / 'toy2d.png'} and {out / 'toy2d.gif'}; mean reward {history['reward'][0]:.3f} -> "
          f"{history['reward'][-1]:.3f}, mean distance between samples {torch.pdist(snaps[-1][1]).mean():.3f} "
          f"(at step 0: {torch.pdist(snaps[0][1]).mean():.3f}), to the base samples {history['dist_ref'][-1]:.3f}")


if __name__ == "__main__":
    main()
