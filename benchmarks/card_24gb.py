"""One 24 GB card, measured (docs/cost.md, "One 24 GB card"): each recipe at its real architecture's size with random
weights, 3 updates under torch.cuda.set_per_process_memory_fraction capped to 24 GiB of the card, and the same run
without levers or cap, for the time per update and, for exact levers, a bitwise equal LoRA (lora_equal). The peak
is torch.cuda.max_memory_allocated(). --size toy runs the same commands on the tiny models on a CPU (no cap there,
and no --offload: it checks that every recipe's other flags run).

    python benchmarks/card_24gb.py --json benchmarks/results/card_24gb_h100.json          # GPU (gpu_check.sh 24gb)
    python benchmarks/card_24gb.py --size toy --json /tmp/card_24gb_toy.json              # CPU
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import drpo  # noqa: E402
from benchmarks import memory_model, step_cost  # noqa: E402
from examples.tiny_model import make_tiny  # noqa: E402

CAP_GIB = 24.0
COMMON = ["--grad-accum", "1", "--max-steps", "3", "--eval-every", "0", "--sample-every", "0", "--save-every", "100",
          "--save-lora-every", "100", "--lr", "1e-4", "--seed", "0"]
# recipe: (architecture, its flags, the levers that fit it in 24 GiB)
RECIPES = {
    "sd-turbo + hpsv3": ("sd", ["--candidates", "24", "--grad-chunk", "8", "--resolution", "512",
                                "--reward", "benchmarks.card_24gb:hpsv3_architecture()"],
                         ["--cache-conditioning", "--quantize", "int8", "--reward-quantize", "int8"]),
    "sd-turbo + hpsv3 exact": ("sd", ["--candidates", "24", "--grad-chunk", "8", "--resolution", "512",
                                       "--reward", "benchmarks.card_24gb:hpsv3_architecture()"],
                                ["--cache-conditioning", "--offload"]),
    "sdxl-turbo": ("sdxl", ["--candidates", "24", "--grad-chunk", "8", "--resolution", "512", "--reward", "brightness"],
                   ["--cache-conditioning", "--quantize", "int8"]),
    "flux-schnell": ("flux", ["--candidates", "8", "--resolution", "512", "--inference-steps", "4", "--features",
                              "latent", "--gradient-checkpointing", "--reward", "brightness"],
                     ["--cache-conditioning", "--quantize", "int8"]),
    "sd3.5-large-turbo": ("sd3", ["--candidates", "8", "--resolution", "512", "--inference-steps", "4", "--features",
                                  "latent", "--gradient-checkpointing", "--reward", "brightness"],
                          ["--cache-conditioning", "--quantize", "int8"]),
}
TOY = {"--candidates": "8", "--grad-chunk": "4", "--resolution": "64"}  # toy size: these flags' values instead


def toy(flags):
    """A recipe's flags at toy size (TOY's values, 3 positives and negatives of 8)."""
    return [TOY.get(prev, f) for prev, f in zip([None, *flags], flags)] + ["--n-pos", "3", "--n-neg", "3"]


def hpsv3_architecture(device, dtype):
    """HPSv3's computation on random weights (step_cost.Qwen2VLScorer) as a drpo reward whose .networks are what
    --reward-quantize quantizes: the Qwen2-VL model, not the float32 head."""
    os.environ["STEP_COST_DEVICE"] = str(device)
    net = step_cost.reward_net(os.environ.get("CARD_REWARD_ARCH", "qwen2vl-7b"), device)
    score = lambda images, prompts: step_cost.pil_reward(images, prompts)
    score.networks = (net.model,)
    return score


def build(arch, out, size):
    """A pipeline folder of arch at full size with random weights (bf16, built on the GPU), or the tiny one."""
    if size == "toy":
        return str(make_tiny(Path(out) / arch, arch=arch))
    if arch == "sd":
        return step_cost.make_sd_turbo_architecture(out)
    if arch == "flux":
        return step_cost.make_flux_architecture(out)
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
    pipe = diffusers.DiffusionPipeline.from_pretrained(make_tiny(Path(out) / "tiny", arch=arch))  # its tokenizers
    vocab = len(pipe.tokenizer)
    clip = lambda width, cls: cls(CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=4 * width,
                                                 num_hidden_layers=1, num_attention_heads=width // 64,
                                                 projection_dim=width, eos_token_id=vocab - 1,
                                                 pad_token_id=vocab - 1, bos_token_id=vocab - 2))
    with torch.device("cuda"):  # text encoders at their real widths, one layer deep (--cache-conditioning sends
        if arch == "sdxl":      # them off the GPU; memory_model.py counts their full weights)
            parts = dict(unet=diffusers.UNet2DConditionModel(**memory_model.SDXL_UNET), vae=memory_model.vae(4),
                         text_encoder=clip(768, CLIPTextModel), text_encoder_2=clip(1280, CLIPTextModelWithProjection))
        else:
            parts = dict(transformer=diffusers.SD3Transformer2DModel(**memory_model.SD35_LARGE),
                         vae=memory_model.vae(16), text_encoder=clip(768, CLIPTextModelWithProjection),
                         text_encoder_2=clip(1280, CLIPTextModelWithProjection),
                         text_encoder_3=T5EncoderModel(T5Config(vocab_size=vocab, d_model=4096, d_kv=64, d_ff=10240,
                                                                num_layers=1, num_heads=64)))
    if arch == "sd3":
        parts["vae"].register_to_config(scaling_factor=1.5305, shift_factor=0.0609)
    pipe.register_modules(**{k: v.to(torch.bfloat16) for k, v in parts.items()})
    pipe.save_pretrained(Path(out) / arch)
    del pipe, parts
    torch.cuda.empty_cache()
    return str(Path(out) / arch)


def worker(argv, cap):
    """One run in this process: capped, its peak and seconds per update (the median of updates 2 and 3)."""
    if cap and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2 ** 30 / torch.cuda.get_device_properties(0)
                                                       .total_memory))
    rc = drpo.main(argv)
    out = Path(argv[argv.index("--output-dir") + 1])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if rc == 0 else []
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None
    print("RESULT " + json.dumps(dict(rc=rc, peak_gib=peak, s_per_update=statistics.median(r["seconds"] for r in
                                                                                         rows[1:]) if rows else None)))


def run(argv, cap, timeout):
    t0 = time.time()
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps([argv, cap])], capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return dict(rc="timeout", wall_s=time.time() - t0)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    result = json.loads(line[7:]) if line else dict(rc=done.returncode)
    if result.get("rc") != 0:
        result["error"] = done.stderr.strip().splitlines()[-3:]
    return {**result, "wall_s": time.time() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("full", "toy"), default="full")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma list of " + ", ".join(RECIPES))
    ap.add_argument("--timeout", type=int, default=240, help="seconds per run")
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*json.loads(args.worker))
    if args.size == "full" and not torch.cuda.is_available():
        sys.exit("--size full needs a CUDA GPU (the architectures' weights); on a CPU use --size toy")
    os.environ["CARD_REWARD_ARCH"] = "qwen2vl-7b" if args.size == "full" else "qwen2vl-tiny"
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "size": args.size,
               "cap_gib": CAP_GIB, "date": time.strftime("%Y-%m-%d"), "recipes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes.split(","):
            arch, flags, levers = RECIPES[name]
            if args.size == "toy":
                flags = toy(flags)
            t0 = time.time()
            model = build(arch, tmp, args.size)
            if args.size == "toy":  # a CPU has no GPU to offload from
                levers = [f for f in levers if f != "--offload"]
            row = {"levers": " ".join(levers), "built_s": time.time() - t0}
            for key, extra, cap in (("capped", levers, CAP_GIB), ("unconstrained", [], None)):
                argv = ["--model", model, *flags, *extra, *COMMON, "--output-dir", f"{tmp}/{name}-{key}"]
                row[key] = run(argv, cap, args.timeout)
                print(name, key, row[key], flush=True)
            loras = [Path(tmp, f"{name}-{k}", "pytorch_lora_weights.safetensors") for k in ("capped", "unconstrained")]
            if all(f.is_file() for f in loras):  # exact levers: bitwise the same LoRA (tensors: the metadata's
                a, b = (load_file(f) for f in loras)  # target-module set is in a per-process order)
                row["lora_equal"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            results["recipes"][name] = row
            if args.json:  # after each recipe: what finished is kept if the device's time runs out
                Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
