"""How much --reward-quantize changes a reward's ranking (docs/rewards.md, "Quantized rewards").

Candidate sets as training draws them: K images of the tiny SD model on K seeds for one prompt, sets over several
prompts. Each set is scored by the full-precision reward and by its int8 (or float8) copy; reported: how many of
the full reward's top n and bottom n the quantized one picks too (the positives and negatives DrPO trains on), the
Spearman correlation within a set, and the score difference against the set's spread. The rewards are the
fixtures' tiny checkpoints (random weights, made by the published code): weak evidence for the real models.

    python benchmarks/reward_quantize.py --json benchmarks/results/reward_quantize.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import drpo  # noqa: E402
from eval import sample_images  # noqa: E402

FIX = ROOT / "fixtures"
REWARDS = {"hpsv3": dict(hpsv3_ckpt=FIX / "hpsv3_tiny" / "HPSv3.safetensors", hpsv3_base=FIX / "hpsv3_tiny" / "base"),
           "imagereward": dict(imagereward_ckpt=FIX / "imagereward_tiny" / "ImageReward_tiny.pt",
                               imagereward_config=FIX / "imagereward_tiny" / "med_config.json",
                               imagereward_tokenizer=FIX / "imagereward_tiny" / "tokenizer")}


def ranks(x):
    return x.argsort().argsort().float()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", type=int, default=32, help="candidate sets (one prompt each)")
    ap.add_argument("--candidates", type=int, default=24)
    ap.add_argument("--n", type=int, default=8, help="positives = negatives per set (the paper's 8 of 24)")
    ap.add_argument("--quantize", default="int8,float8")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = drpo.load_generator("tiny")
    prompts = drpo.read_prompts(None) * (args.sets // 16 + 1)
    noises = torch.randn(args.candidates, *drpo.latent_shape(model, 64), generator=torch.Generator().manual_seed(0))
    sets = [(p, sample_images(model, [p], noises)) for p in prompts[:args.sets]]  # differ by prompt and noise
    result = {"sets": args.sets, "candidates": args.candidates, "n": args.n, "rewards": {}}
    for name, paths in REWARDS.items():
        full = drpo.load_reward(name, "cpu", **paths)
        ref = [full(images, [p] * len(images)) for p, images in sets]
        for q in args.quantize.split(","):
            t0 = time.time()
            reward = drpo.load_reward(name, "cpu", quantize=q, **paths)
            got = [reward(images, [p] * len(images)) for p, images in sets]
            top = [len(set(a.topk(args.n).indices.tolist()) & set(b.topk(args.n).indices.tolist())) / args.n
                   for a, b in zip(ref, got)]
            bottom = [len(set((-a).topk(args.n).indices.tolist()) & set((-b).topk(args.n).indices.tolist())) / args.n
                      for a, b in zip(ref, got)]
            rho = [torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1].item() for a, b in zip(ref, got)]
            moved = [((b - b.mean()) - (a - a.mean())).abs().mean().item() / a.std().item() for a, b in zip(ref, got)]
            row = {"top_n_agreement": sum(top) / len(top), "bottom_n_agreement": sum(bottom) / len(bottom),
                   "min_top_n_agreement": min(top), "min_bottom_n_agreement": min(bottom),
                   "spearman_mean": sum(rho) / len(rho), "spearman_min": min(rho),
                   "centered_score_change_over_set_std": sum(moved) / len(moved), "seconds": time.time() - t0}
            result["rewards"][f"{name} {q}"] = row
            print(name, q, json.dumps({k: round(v, 3) for k, v in row.items()}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
