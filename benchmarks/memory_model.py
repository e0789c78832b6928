"""Which recipes fit one 24 GB card, on paper (docs/cost.md, "One 24 GB card").

Weight memory: each real architecture is built on PyTorch's meta device from its published config (no download,
no memory), its parameters counted, times the bytes per parameter of its precision (bf16 2; in Linear layers int8
and float8 1, their per-channel scales neglected, nf4 0.5 plus one absmax per 64 weights). The LoRA (rank 16 on the
attention projections) adds 16 bytes per parameter: fp32 weight, gradient and AdamW's two moments. Activations:
the terms measured on an H200 (benchmarks/results/step_cost_sd-turbo_h200.json, gpu_check_flux_h200.json) minus the
weights that were on the GPU in those runs; where nothing was measured the row says so.

    python benchmarks/memory_model.py --json benchmarks/results/memory_model.json
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.step_cost import FLUX_SCHNELL, QWEN2VL  # noqa: E402

GiB = 2 ** 30
BYTES = {"bf16": 2.0, "int8": 1.0, "float8": 1.0, "nf4": 0.5 + 2 / 64}  # per weight of a quantized Linear
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

SD21_UNET = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True, layers_per_block=2)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, layers_per_block=2)
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768)
OPENCLIP_H = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                  num_attention_heads=16, projection_dim=1024)
OPENCLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                  num_attention_heads=20, projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")


def vae(channels):
    from diffusers import AutoencoderKL
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=channels,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def count(build):
    """(parameters, of them in Linear layers, LoRA parameters at rank 16 on TARGETS) of a module built on meta."""
    with torch.device("meta"):
        net = build()
    linear = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    lora = sum(16 * (m.in_features + m.out_features) for name, m in net.named_modules()
               if isinstance(m, torch.nn.Linear) and name.endswith(TARGETS))
    return sum(p.numel() for p in net.parameters()), sum(m.weight.numel() for m in linear), lora


def architectures():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration, T5Config, T5EncoderModel)
    clip = lambda cfg, proj=False: (CLIPTextModelWithProjection if proj else CLIPTextModel)(CLIPTextConfig(**cfg))
    qwen = Qwen2VLConfig.from_dict({"model_type": "qwen2_vl", "tie_word_embeddings": False, **QWEN2VL["qwen2vl-7b"]})
    return {
        "sd-turbo unet": lambda: UNet2DConditionModel(**SD21_UNET),
        "sdxl-turbo unet": lambda: UNet2DConditionModel(**SDXL_UNET),
        "flux-schnell transformer": lambda: FluxTransformer2DModel(**FLUX_SCHNELL),
        "sd3.5-large transformer": lambda: SD3Transformer2DModel(**SD35_LARGE),
        "openclip-h text": lambda: clip(OPENCLIP_H),
        "clip-l text": lambda: clip(CLIP_L, True),
        "openclip-g text": lambda: clip(OPENCLIP_G, True),
        "t5-xxl encoder": lambda: T5EncoderModel(T5Config(**T5_XXL)),
        "vae 4ch": lambda: vae(4),
        "vae 16ch": lambda: vae(16),
        "hpsv3 (qwen2-vl-7b)": lambda: Qwen2VLForConditionalGeneration._from_config(qwen),
    }


def weights_gib(n, linear, precision):
    """A network's weights in GiB: its Linear layers at the precision, everything else in bf16."""
    return ((n - linear) * 2 + linear * BYTES[precision]) / GiB


# (recipe, generator, text encoders, vae, reward or None, measured activation term in GiB or None, its source)
RECIPES = {
    "sd-turbo + hpsv3, K=24, --grad-chunk 8": ("sd-turbo unet", ["openclip-h text"], "vae 4ch", "hpsv3 (qwen2-vl-7b)"),
    "sdxl-turbo, K=24, 512 px": ("sdxl-turbo unet", ["clip-l text", "openclip-g text"], "vae 4ch", None),
    "flux-schnell, K=8, 512 px, latent features": ("flux-schnell transformer", ["clip-l text", "t5-xxl encoder"],
                                                   "vae 16ch", None),
    "flux-schnell, K=8, 512 px, teacher features": ("flux-schnell transformer", ["clip-l text", "t5-xxl encoder"],
                                                    "vae 16ch", None),
    "sd3.5-large-turbo, K=8, 512 px": ("sd3.5-large transformer", ["clip-l text", "openclip-g text",
                                                                    "t5-xxl encoder"], "vae 16ch", None),
}


def measured_activations(counts):
    """GiB beyond the weights in the H200 runs: their peak minus the weights (bf16) that were on the GPU."""
    out = {}
    root = Path(__file__).resolve().parent / "results"
    sd = json.loads((root / "step_cost_sd-turbo_h200.json").read_text())["results"]
    peak = next(r["peak_mb"] for r in sd if r["candidates"] == 24 and r["grad_chunk"] == 8) / 1024
    w = sum(weights_gib(*counts[k][:2], "bf16") for k in ("sd-turbo unet", "openclip-h text", "vae 4ch"))
    out["sd-turbo + hpsv3, K=24, --grad-chunk 8"] = (peak - w, "step_cost_sd-turbo_h200.json: K=24, chunk 8, "
                                                     f"{peak:.1f} GiB with a brightness reward")
    flux = {r["features"] + str(r["grad_steps"]): r["peak_mb"] / 1024
            for r in json.loads((root / "gpu_check_flux_h200.json").read_text())["flux"]}
    # that run's text encoders were one layer deep: its CLIP-L and T5 are counted as their embeddings + 1 layer
    one_layer = (49408 * 768 + 7.1e6 + 32128 * 4096 + 4096 * 4096 * 4 + 3 * 4096 * 10240) * 2 / GiB
    w = weights_gib(*counts["flux-schnell transformer"][:2], "bf16") + weights_gib(*counts["vae 16ch"][:2], "bf16")
    for f in ("latent", "teacher"):
        out[f"flux-schnell, K=8, 512 px, {f} features"] = (flux[f + "4"] - w - one_layer,
                                                          f"gpu_check_flux_h200.json: {f}, grad-steps 4, "
                                                          f"{flux[f + '4']:.1f} GiB")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the table here")
    ap.add_argument("--card", type=float, default=24.0, help="GiB of the card")
    args = ap.parse_args()
    counts = {name: count(build) for name, build in architectures().items()}
    for name, (n, linear, lora) in counts.items():
        print(f"{name:26s} {n / 1e9:6.3f} B parameters ({linear / n:.0%} in Linear layers), {n * 2 / GiB:5.1f} GiB "
              f"in bf16" + (f"; LoRA rank 16: {lora / 1e6:.1f} M" if name.endswith(("unet", "transformer")) else ""))
    acts = measured_activations(counts)
    rows = []
    print("\nGiB; load: the weights while loading (text encoders included); act: the measured activation term "
          "(the reward's own activations not included)")
    print(f"{'recipe':44s} {'levers':62s} {'load':>5s} {'weights':>7s} {'act':>5s} {'total':>6s}  fits "
          f"{args.card:.0f} GiB")
    for recipe, (gen, texts, v, reward) in RECIPES.items():
        act, source = acts.get(recipe, (None, "not measured"))
        for quant, rquant, cached, offload in (("bf16", "bf16", False, False), ("bf16", "bf16", True, False),
                                               ("bf16", "bf16", True, True), ("int8", "int8", True, False),
                                               ("nf4", "int8", True, False)):
            if reward is None and (offload or rquant != quant and quant != "nf4"):
                continue
            w = {"generator": weights_gib(*counts[gen][:2], quant),
                 "text encoders": 0.0 if cached else sum(weights_gib(*counts[t][:2], "bf16") for t in texts),
                 "vae": weights_gib(*counts[v][:2], "bf16"),
                 "lora + adam": counts[gen][2] * 16 / GiB,
                 "reward": weights_gib(*counts[reward][:2], rquant) if reward else 0.0}
            # --offload: the reward's weights are on the GPU only in the reward phase, whose own activations (the
            # reward's, not counted) replace the regression's; the peak is the larger of the two phases
            total = max(sum(w.values()) - w["reward"] + (act or 0), sum(w.values())) if offload else \
                sum(w.values()) + (act or 0)
            load = sum(w.values()) + sum(weights_gib(*counts[t][:2], "bf16") for t in texts) * cached
            levers = ", ".join(filter(None, ["--cache-conditioning" if cached else "", "--offload" if offload else "",
                                             f"--quantize {quant}" if quant != "bf16" else "",
                                             f"--reward-quantize {rquant}" if reward and rquant != "bf16" else ""]))
            fits = "unknown (activations)" if act is None else "yes" if total <= args.card else "no"
            rows.append(dict(recipe=recipe, levers=levers or "none", weights_gib=w, load_gib=load, activations_gib=act,
                             activations_source=source, total_gib=None if act is None else total, fits=fits))
            print(f"{recipe[:44]:44s} {levers or 'none':62s} {load:5.1f} {sum(w.values()):7.1f} "
                  f"{'?' if act is None else f'{act:.1f}':>5s} {'?' if act is None else f'{total:.1f}':>6s}  {fits}")
    if args.json:
        Path(args.json).write_text(json.dumps({"parameters": {k: dict(zip(("total", "in_linear", "lora_r16"), v))
                                                              for k, v in counts.items()},
                                               "card_gib": args.card, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
