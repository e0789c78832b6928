"""Cost of a DrPO update, and how it grows with K, with and without --grad-chunk.

Each configuration runs the real training loop (`drpo.main`) in a fresh subprocess for a few
updates (grad-accum 1, brightness reward, default `unet` features) and reports the median
seconds per update (first update excluded as warm-up) and the peak memory: CUDA's
max-allocated on a GPU, the process's peak RSS on the CPU.

    python benchmarks/step_cost.py --preset tiny-cpu --json /tmp/cost.json
    python benchmarks/step_cost.py --preset sd-turbo --json cost.json     # GPU: SD-Turbo architecture, random weights, 512 px

Not measured yet: the reward-gradient (DRaFT-style) update the paper compares against.
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import drpo  # noqa: E402

PRESETS = {  # (candidates, grad_chunk) pairs, steps per configuration
    "tiny-cpu": dict(configs=[(8, 0), (24, 0), (64, 0), (24, 8), (64, 8)], steps=3, extra=["--resolution", "256"]),
    "sd-turbo": dict(configs=[(8, 0), (16, 0), (24, 0), (24, 8), (32, 8)], steps=4, extra=[]),
}


def make_sd_turbo_architecture(out_dir):
    """The SD-Turbo (SD 2.1) architecture with random weights, saved like the real model."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny = drpo.make_tiny(Path(out_dir) / "tiny")  # borrow its byte-level tokenizer
    tokenizer = StableDiffusionPipeline.from_pretrained(tiny).tokenizer
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                                cross_attention_dim=1024, use_linear_projection=True, layers_per_block=2)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                                num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu",
                                                projection_dim=1024))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="trailing", steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(Path(out_dir) / "model")
    return str(Path(out_dir) / "model")


def worker(model, K, chunk, steps, extra):
    n = str(min(8, K // 3))  # the published 8 / 8 where K allows
    with tempfile.TemporaryDirectory() as out:
        rc = drpo.main(["--model", model, "--reward", "brightness", "--candidates", str(K), "--grad-chunk", str(chunk),
                        "--n-pos", n, "--n-neg", n,
                        "--grad-accum", "1", "--max-steps", str(steps), "--sample-every", "0", "--save-every", "1000000",
                        "--output-dir", out, "--overwrite", *extra])
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rc": rc, "step_s": statistics.median(r["seconds"] for r in rows[1:]), "peak_mb": peak}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="tiny-cpu")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "K", "CHUNK", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--extra", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        model, K, chunk, steps = args.worker
        return worker(model, int(K), int(chunk), int(steps), args.extra.split())
    preset = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        model = make_sd_turbo_architecture(tmp) if args.preset == "sd-turbo" else str(drpo.make_tiny(Path(tmp) / "tiny"))
        results = []
        for K, chunk in preset["configs"]:
            cmd = [sys.executable, __file__, "--worker", model, str(K), str(chunk), str(preset["steps"]),
                   "--extra=" + " ".join(preset["extra"])]
            out = subprocess.run(cmd, capture_output=True, text=True)
            last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "{}"
            res = {"candidates": K, "grad_chunk": chunk or K, **json.loads(last)}
            if not res.get("step_s"):
                res["error"] = out.stderr[-2000:]
            results.append(res)
            print(f"K={K:3d} chunk={chunk or K:3d}  {res.get('step_s', float('nan')):7.3f} s/update  "
                  f"peak {res.get('peak_mb', float('nan')):9.0f} MB", flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    summary = {"device": device, "preset": args.preset, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
