"""Offline preference pairs on the tiny model (README "Offline preference pairs").

Writes synthetic pairs (chosen = bright textures, rejected = dark ones), trains once on the
pairs and once on the same pairs swapped, then measures, with the plain diffusers pipeline and
independently of the training code, how far the held-out one-step latents of each LoRA lie along
u = mean VAE latent of the chosen images - mean VAE latent of the rejected ones (docs/pairs.md:
both runs drift toward the anchors as a whole; the dipole shows in their difference).

    python benchmarks/pairs_check.py --out /tmp/pairs           # on `--model tiny`
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import drpo  # noqa: E402

TRAIN = ["a quiet street at noon", "a bowl of soup", "a mountain lake", "a portrait of a dog"]
HELD_OUT = ["a harbor with fishing boats", "a plate of pancakes", "an owl on a branch", "a car on a country road"]


def write_texture_pairs(folder, side=128, per_prompt=2, seed=0):
    """PNG textures (bright: mean ~0.75, dark: ~0.25) and two pairs files: pairs.jsonl and the
    same pairs swapped (swapped.jsonl). Returns both paths."""
    from PIL import Image

    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    lines, swapped = [], []
    for i, prompt in enumerate(TRAIN):
        for j in range(per_prompt):
            names = []
            for kind, level in (("bright", 0.75), ("dark", 0.25)):
                blur = torch.nn.functional.avg_pool2d(torch.rand(1, 3, side, side, generator=g), 5, 1, 2)
                pixels = ((level + 0.6 * (blur[0] - 0.5)).clamp(0, 1) * 255).round().byte().permute(1, 2, 0)
                names.append(f"img/{kind}_{i}_{j}.png")
                Image.fromarray(pixels.numpy()).save(folder / names[-1])
            lines.append({"prompt": prompt, "chosen": names[0], "rejected": names[1]})
            swapped.append({"prompt": prompt, "chosen": names[1], "rejected": names[0]})
    for name, rows in (("pairs.jsonl", lines), ("swapped.jsonl", swapped)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "pairs.jsonl", folder / "swapped.jsonl"


@torch.no_grad()
def direction(model, pairs_file):
    """u = mean latent of the chosen images - mean latent of the rejected ones, by diffusers' VAE."""
    import numpy as np
    from diffusers import AutoPipelineForText2Image
    from PIL import Image

    vae = AutoPipelineForText2Image.from_pretrained(model).vae
    rows = [json.loads(line) for line in Path(pairs_file).read_text().splitlines()]

    def mean_latent(key):
        img = torch.stack([torch.from_numpy(np.asarray(Image.open(Path(pairs_file).parent / r[key]).convert("RGB"),
                                                       dtype=np.float32)).permute(2, 0, 1) for r in rows])
        return (vae.encode(img / 127.5 - 1).latent_dist.mean * vae.config.scaling_factor).mean(0)

    return mean_latent("chosen") - mean_latent("rejected")


@torch.no_grad()
def heldout_along(model, u, lora=None, seeds=range(4)):
    """Mean projection of held-out one-step latents on u/|u|, and the std of the base latents
    (all entries), from the plain diffusers pipeline."""
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    z = torch.cat([torch.randn((1, *u.shape), generator=torch.Generator().manual_seed(1000 + s)) for s in seeds])
    x = torch.cat([pipe([p] * len(z), latents=z, num_inference_steps=1, guidance_scale=0.0,
                        output_type="latent").images for p in HELD_OUT])
    return (x.flatten(1) @ (u.flatten() / u.norm())).mean().item(), x.std().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny",
                    help="tiny model: the `tiny` alias or a folder from examples/tiny_model.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    model = drpo.resolve_model(args.model)
    pairs, swapped = write_texture_pairs(Path(args.out) / "data")
    u = direction(model, pairs)
    base, spread = heldout_along(model, u)
    result = {"base_along_u": base, "base_latent_std": spread}
    for name, file in (("pairs", pairs), ("swapped", swapped)):
        t0 = time.time()
        drpo.main(["--model", model, "--pairs", str(file), "--max-steps", str(args.steps), "--lr", "1e-3",
                   "--grad-accum", "1", "--n-pos", "2", "--n-neg", "2", "--seed", "0", "--sample-every", "0",
                   "--output-dir", str(Path(args.out) / name), "--overwrite"])
        result[name] = {"along_u": heldout_along(model, u, Path(args.out) / name)[0], "train_s": time.time() - t0}
    result["difference_in_base_std"] = (result["pairs"]["along_u"] - result["swapped"]["along_u"]) / spread
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
