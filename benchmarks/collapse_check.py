"""What a collapse looks like in the diversity figures (docs/running.md, "Watching a run").

Trains the tiny offline model toward a reward that prizes one fixed look (every pixel mid-gray, so
the best image is the same for every prompt and noise) and, as the control, toward the random
reward, then prints both diversity figures of each run: spread_candidates (the feature spread of a
prompt's K training candidates, every update) and eval/spread_seeds_vs_base (the held-out spread
over seeds, relative to the base model's).

    python benchmarks/collapse_check.py --out /tmp/collapse              # on `--model tiny`
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import drpo  # noqa: E402


def one_look(images, prompts):
    """Minus the mean squared distance of the image to flat mid-gray: one look for every prompt and noise."""
    import numpy as np
    return torch.tensor([-((np.asarray(im.convert("RGB"), dtype=np.float64) / 255 - 0.5) ** 2).mean()
                         for im in images])


def figures(out, window=5):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "spread_candidates" in r]
    held = [r for r in rows if "eval/spread_seeds" in r]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    return {"spread_candidates_first": mean(train[:window], "spread_candidates"),
            "spread_candidates_last": mean(train[-window:], "spread_candidates"),
            "spread_seeds_vs_base": {r["step"]: round(r["eval/spread_seeds_vs_base"], 4) for r in held},
            "training_reward_first": mean(train[:window], "reward_mean"),
            "training_reward_last": mean(train[-window:], "reward_mean")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="tiny model: the `tiny` alias or a folder from "
                    "examples/tiny_model.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", default="1e-2")
    ap.add_argument("--features", default="latent", help="drpo.py --features (the tiny model learns this reward "
                    "with the latent map, not with its random teacher)")
    args = ap.parse_args()
    result = {}
    for reward in ("collapse_check:one_look", "random"):
        out = Path(args.out) / reward.split(":")[-1]
        assert drpo.main(["--model", args.model, "--reward", reward, "--max-steps", str(args.steps), "--lr", args.lr,
                          "--grad-accum", "1", "--features", args.features, "--output-dir", str(out), "--seed", "0", "--overwrite",
                          "--eval-every", str(args.steps // 4), "--eval-reward", "brightness",
                          "--sample-every", "0"]) == 0
        result[out.name] = figures(out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
