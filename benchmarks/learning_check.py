"""Held-out evidence that DrPO learns on the tiny offline model (README "Offline demo").

Trains with the brightness reward and with the random-reward control, then measures mean
brightness of the plain diffusers pipeline (base, and with each LoRA) on fixed noises and
prompts that were not used in training.

    python benchmarks/learning_check.py --out /tmp/learn           # on `--model tiny`
    python benchmarks/learning_check.py --out /tmp/learn --model tiny-sana   # (or tiny-sdxl)
    python benchmarks/learning_check.py --out /tmp/learn --vlm   # ranked by a scripted VLM server that
                                                                 # prefers the brighter image of each pair
    python benchmarks/learning_check.py --out /tmp/learn --model tiny-sdxl --inference-steps 4 [--grad-steps 1]
                                         # SDXL-Turbo's scheduler at 4 steps, trained through all or the last one
    python benchmarks/learning_check.py --out /tmp/learn --model tiny-flux --inference-steps 4 --resolution 128
                                         # FLUX.1-schnell's layout at its 4 steps (or tiny-sd3)
    python benchmarks/learning_check.py --out /tmp/learn --quantize int8   # trained on the int8 base; held out on
                                         # the full-precision base (QLoRA's convention) and on the int8 one
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import drpo  # noqa: E402
import memory  # noqa: E402

HELD_OUT = ["a quiet harbor with fishing boats", "a plate of pancakes with berries",
            "a snowy owl on a branch", "a vintage car on a country road"]


def heldout_brightness(model_dir, lora_dir=None, seeds=range(4), steps=1, side=None, quantize=None, images=None):
    """Mean and spread of the held-out images' brightness (quantize: of the base's network; images: a list that
    collects the images)."""
    import diffusers

    name = json.loads((Path(model_dir) / "model_index.json").read_text())["_class_name"]
    quant = quantize and memory.pipeline_config(quantize, "unet" if name in drpo.PIPELINES else "transformer",
                                                torch.float32)
    pipe = diffusers.DiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32, **(quant or {}))  # its class
    pipe.set_progress_bar_config(disable=True)
    if lora_dir:
        pipe.load_lora_weights(lora_dir)
    net = getattr(pipe, "unet", None) or pipe.transformer
    side = side or net.config.sample_size * pipe.vae_scale_factor
    # a plain call of the stock pipeline: SANA-Sprint at its defaults, the others without guidance, at `steps` steps;
    # the generator draws the latents (and a sampler's fresh noise between steps), the same for every prompt
    one = (dict(intermediate_timesteps=None, use_resolution_binning=False)
           if isinstance(pipe, diffusers.SanaSprintPipeline) else dict(guidance_scale=0.0))
    vals = []
    for s in seeds:
        for p in HELD_OUT:
            img = pipe(p, generator=torch.Generator().manual_seed(1000 + s), num_inference_steps=steps, height=side,
                       width=side, output_type="pt", **one).images
            vals.append(img.mean().item())
            if images is not None:
                images.append(img)
    return torch.tensor(vals).mean().item(), torch.tensor(vals).std().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny",
                    help="tiny model: the `tiny` alias or a folder from examples/tiny_model.py")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", default="1e-3")
    ap.add_argument("--inference-steps", type=int, default=1, help="drpo.py's --inference-steps, and the held-out "
                    "pipeline's")
    ap.add_argument("--grad-steps", type=int, help="drpo.py's --grad-steps (default: all steps)")
    ap.add_argument("--resolution", type=int, help="drpo.py's --resolution, and the held-out images' side (default: "
                    "the model's; the tiny FLUX needs 128)")
    ap.add_argument("--vlm", action="store_true", help="train with --reward vlm against examples/scripted_vlm.py "
                    "(on a free port) instead of the brightness reward")
    ap.add_argument("--quantize", choices=("int8", "float8"), help="drpo.py's --quantize; the held-out images are "
                    "then measured on both bases, and how far the quantized base's images are from the full one's")
    args = ap.parse_args()
    vlm = []
    if args.vlm:
        import threading

        from examples import scripted_vlm
        server = scripted_vlm.make_server(0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        vlm = ["--reward-url", f"http://127.0.0.1:{server.server_address[1]}/v1", "--reward-model", "scripted",
               "--eval-every", "0"]
    model = drpo.resolve_model(args.model)
    steps = ["--inference-steps", str(args.inference_steps)] + (["--grad-steps", str(args.grad_steps)]
                                                                 if args.grad_steps else []) + \
        (["--resolution", str(args.resolution)] if args.resolution else [])
    full, quantized = [], []
    base, spread = heldout_brightness(model, steps=args.inference_steps, side=args.resolution, images=full)
    result = {"base": base, "base_std_over_images": spread}
    q = dict(steps=args.inference_steps, side=args.resolution, quantize=args.quantize)
    if args.quantize:  # the quantized base's images against the full base's, same prompts and noises
        result["quantized_base"] = heldout_brightness(model, **q, images=quantized)[0]
        diff = torch.stack([(a - b).abs().mean() for a, b in zip(full, quantized)]).mean().item()
        result["quantized_vs_full_pixel_diff"] = diff  # mean |difference| of pixels in [0, 1]
        result["full_pixel_diff_between_noises"] = torch.stack(
            [(a - b).abs().mean() for a, b in zip(full, full[len(HELD_OUT):])]).mean().item()  # for scale
    for reward in ("vlm" if args.vlm else "brightness", "random"):
        out = Path(args.out) / reward
        t0 = time.time()
        drpo.main(["--model", model, "--reward", reward, "--max-steps", str(args.steps), "--lr", args.lr,
                   "--grad-accum", "1", "--output-dir", str(out), "--seed", "0", "--overwrite",
                   *steps, *(vlm if reward == "vlm" else []),
                   *(["--quantize", args.quantize] if args.quantize else [])])
        heldout = heldout_brightness(model, out, steps=args.inference_steps, side=args.resolution)[0]
        result[reward] = {"heldout": heldout, "train_s": time.time() - t0}
        result[reward]["gain"] = result[reward]["heldout"] - base
        if args.quantize:  # the LoRA on the base it trained on
            result[reward]["heldout_quantized_base"] = heldout_brightness(model, out, **q)[0]
            result[reward]["gain_quantized_base"] = result[reward]["heldout_quantized_base"] - result["quantized_base"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
