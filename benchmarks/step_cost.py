"""What a DrPO update costs next to a reward-gradient (DRaFT-style) update, and how cost grows with K.

Both updates use the same generator (LoRA on the UNet), the same differentiable reward network
with random weights, the same K candidates of one prompt and the same resolution:

- DrPO: exactly the training loop, `drpo.main` with the reward passed as `step_cost:pil_reward`;
  its per-phase times come from the loop's own stopwatch (metrics.jsonl, `phases_s`).
- reward gradient: loss = -mean reward(decode(G_theta(z))), backpropagated through the reward
  network and the VAE decoder into the LoRA, then the same AdamW step.

    python benchmarks/step_cost.py --preset tiny-cpu --json benchmarks/results/step_cost_tiny-cpu.json
    python benchmarks/step_cost.py --preset sd-turbo --reward-arch qwen2vl-7b --json cost.json   # GPU

Scaling (`--parts scaling`): each method runs in its own process, once without and once with --grad-chunk, K ascending;
the first updates are warm-up, then the mean of each phase over the timed updates is reported
and `total_s` is their sum. Peak memory: CUDA max-allocated (reset per configuration) or the
process's peak RSS (Linux VmHWM, reset per configuration through /proc/self/clear_refs).

Update structures (`--parts structures`): at K = 24 one update three ways, each with the teacher-UNet
and the latent-MAE features (the tiny random MAE of fixtures/mae_tiny), the weight-free
brightness reward and grad-accum 1, median of the timed updates:
- this project at --grad-chunk 0 (= K: one pass, backpropagating through the sampling pass);
- this project at --grad-chunk 8 (the generator and the features recomputed in chunks of 8);
- the authors' trainer's structure (`authors_update`): G_theta sampled with gradient once and its
  graph kept, the reference from a deep-copied frozen UNet, the positives' and negatives' features
  recomputed from their latents, one backward;
- with `--against DIR` also this project's update as the drpo.py in DIR computes it (a git worktree
  of an earlier commit), at --grad-chunk 0.
The reward is the same for all of them and costs the same in each (K images scored without
gradient), so the weight-free one leaves what the structures differ in.

    git worktree add /tmp/before HEAD~1
    python benchmarks/step_cost.py --preset tiny-cpu --parts structures --against /tmp/before

Sampler steps (`--parts steps`): at K = 24 the update for N = 1, 2, 4 sampling steps, backpropagating
through all N or only the last (--grad-steps 1), each with and without --gradient-checkpointing.

    python benchmarks/step_cost.py --preset tiny-cpu --parts steps --json benchmarks/results/step_cost_steps.json

FLUX size (`--parts flux`): the same loop on FLUX.1-schnell's architecture with random weights (its 12 B
transformer and its VAE at full size; the text encoders at their real widths but one layer each, since they run
once per prompt without gradient), bf16, its 4 steps, K = 8 candidates at 512 px, teacher features,
--gradient-checkpointing, through all 4 steps and through the last one (--grad-steps 1). On a CPU (tiny-cpu) the
tiny FLUX stands in, to check the plumbing.

    python benchmarks/step_cost.py --preset sd-turbo --parts flux --json flux.json    # GPU: 24 GB of weights

Reward architectures: `tiny` is a small ViT whose depth was chosen so that scoring one image
costs many tiny-UNet forwards (16-18x on the machine it was sized on, 7x on another), as HPSv3
(~13 TFLOP per image: Qwen2-VL-7B over ~800 tokens) relates to the SD-Turbo UNet (~0.7 TFLOP at
512 px); the measured ratio is printed and saved. `qwen2vl-7b` is HPSv3's architecture (Qwen2-VL-7B
+ the reward head) with random weights, fed 448 x 448 images and a prompt of HPSv3's length;
`qwen2vl-tiny` is the same code at toy size.
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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("STEP_COST_DRPO") or str(REPO))  # --against: another checkout's drpo.py
import drpo  # noqa: E402
from examples.tiny_model import make_tiny  # noqa: E402

PRESETS = {
    "tiny-cpu": dict(resolution=128, candidates=(8, 16, 24, 32), chunk=8, steps=2, warmup=1, reward_arch="tiny",
                     structure_steps=10, structure_features=("teacher", "mae"), flux_resolution=128),
    "sd-turbo": dict(resolution=512, candidates=(8, 16, 24, 32), chunk=8, steps=4, warmup=1, reward_arch="tiny",
                     structure_steps=5, structure_features=("teacher",), flux_resolution=512),
}
MAE_TINY = REPO / "fixtures" / "mae_tiny" / "mae_latent_tiny.pth"  # random weights in the published layout
PHASES = ("sample", "reference", "decode", "reward", "features", "field", "backward", "optimizer")
HPSV3_TEXT_TOKENS = 560  # the HPSv3 instruction, prompt and chat template, in Qwen2 tokens (about)
QWEN2VL = {
    "qwen2vl-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, image_token_id=151655,
                       rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                       vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4)),
    "qwen2vl-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         bos_token_id=0, eos_token_id=1,
                         num_key_value_heads=2, vocab_size=1000, image_token_id=999,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)),
}


# ------------------------------------------------------------------ generator ----------------

def make_sd_turbo_architecture(out_dir):
    """The SD-Turbo (SD 2.1) architecture with random weights, saved like the real model."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tiny = make_tiny(Path(out_dir) / "tiny")  # borrow its byte-level tokenizer
    tokenizer = StableDiffusionPipeline.from_pretrained(tiny).tokenizer
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=(320, 640, 1280, 1280),
                                attention_head_dim=(5, 10, 20, 20),
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


FLUX_SCHNELL = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=False,
                    axes_dims_rope=(16, 56, 56))  # its transformer's config


def make_flux_architecture(out_dir, device="cuda", transformer=FLUX_SCHNELL):
    """FLUX.1-schnell's architecture with random weights in bf16, saved like the real model: its transformer (19
    double- and 38 single-stream blocks, 3072 wide) and VAE as published, its CLIP-L and T5-XXL at their widths
    but one layer each. Built on the GPU (random init of 12 B parameters on a CPU takes minutes)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = FluxPipeline.from_pretrained(make_tiny(Path(out_dir) / "tiny", arch="flux")).tokenizer  # byte-level
    vocab = len(tokenizer)
    with torch.device(device):
        transformer = FluxTransformer2DModel(**transformer).to(torch.bfloat16)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                            shift_factor=0.1159, sample_size=1024).to(torch.bfloat16)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=1, num_attention_heads=12, projection_dim=768,
                                            eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                                            bos_token_id=vocab - 2)).to(torch.bfloat16)
        t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=4096, d_kv=64, d_ff=10240, num_layers=1,
                                     num_heads=64)).to(torch.bfloat16)
    FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae, text_encoder=clip,
                 tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=tokenizer, transformer=transformer
                 ).save_pretrained(Path(out_dir) / "flux")
    del transformer, vae, clip, t5
    torch.cuda.empty_cache()
    return str(Path(out_dir) / "flux")


# ------------------------------------------------------------------ reward networks ----------

class TinyViT(torch.nn.Module):
    """A random ViT-S-like scorer on 224 x 224 images: the stand-in for a big reward model."""

    def __init__(self, width=384, depth=9):
        super().__init__()
        self.patch = torch.nn.Conv2d(3, width, 16, 16)
        self.pos = torch.nn.Parameter(torch.randn(1, 196, width) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, 1)

    def forward(self, images):  # (B, 3, H, W) in [0, 1]
        x = F.interpolate(images, size=(224, 224), mode="bilinear", antialias=False) * 2 - 1
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.blocks(x).mean(1))[:, 0]


class Qwen2VLScorer(torch.nn.Module):
    """HPSv3's computation on random weights: Qwen2-VL vision tower on a 448 x 448 image, its tokens
    scattered into a prompt of HPSv3's length, the language model with sequential positions, and
    the float32 reward head at the last token."""

    def __init__(self, arch, dtype):
        super().__init__()
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        self.config = Qwen2VLConfig.from_dict({"model_type": "qwen2_vl", "tie_word_embeddings": False, **QWEN2VL[arch]})
        self.model = Qwen2VLForConditionalGeneration._from_config(self.config, dtype=dtype)
        H = self.config.text_config.hidden_size
        self.head = torch.nn.Sequential(torch.nn.Linear(H, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 16),
                                        torch.nn.ReLU(), torch.nn.Linear(16, 2))
        n_image = (448 // 28) ** 2  # 256 merged image tokens
        ids = torch.randint(0, 1000, (HPSV3_TEXT_TOKENS + n_image,), generator=torch.Generator().manual_seed(0))
        ids[20:20 + n_image] = self.config.image_token_id
        self.register_buffer("ids", ids, persistent=False)

    def forward(self, images):
        B, v = len(images), self.config.vision_config
        mean = torch.tensor([0.4815, 0.4578, 0.4082], device=images.device)[:, None, None]
        std = torch.tensor([0.2686, 0.2613, 0.2758], device=images.device)[:, None, None]
        x = (F.interpolate(images, size=(448, 448), mode="bicubic") - mean) / std
        # the processor's patch layout: (t, h/m, w/m, m, m) patches of (C, t_patch, p, p) values
        g, m, p = 448 // v.patch_size, v.spatial_merge_size, v.patch_size
        x = x[:, None].expand(B, v.temporal_patch_size, 3, 448, 448).to(self.model.dtype)
        x = x.reshape(B, v.temporal_patch_size, 3, g // m, m, p, g // m, m, p)
        pixels = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(B * g * g, -1)
        grid = torch.tensor([[1, g, g]] * B, device=images.device)
        vis = self.model.model.visual(pixels, grid_thw=grid).pooler_output
        ids = self.ids.expand(B, -1)
        embeds = self.model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == self.config.image_token_id)[..., None], vis.to(embeds.dtype))
        positions = torch.arange(ids.shape[1], device=ids.device).expand(3, B, -1)
        hidden = self.model.model.language_model(inputs_embeds=embeds, position_ids=positions).last_hidden_state
        return self.head(hidden[:, -1].float())[:, 0]


_NET = {}


def reward_net(arch=None, device=None):
    """The process's reward network (built once, seed 0); frozen, as reward models are."""
    if not _NET:
        arch = arch or os.environ["STEP_COST_REWARD_ARCH"]
        device = torch.device(device or os.environ.get("STEP_COST_DEVICE", "cpu"))
        dtype = drpo.precision_dtype("auto", device)
        torch.manual_seed(0)
        with torch.device(device):
            net = TinyViT() if arch == "tiny" else Qwen2VLScorer(arch, dtype)
        _NET["net"] = net.to(device).eval().requires_grad_(False)
    return _NET["net"]


def pil_reward(images, prompts):
    """The reward network behind drpo's (images, prompts) interface, for the DrPO update."""
    import numpy as np

    net = reward_net()
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    device = next(net.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return net(x.to(device).float() / 255)


# ------------------------------------------------------------------ measurement --------------

def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def drpo_update(model, K, chunk, steps, resolution, device, reward="step_cost:pil_reward", features="teacher",
                extra=()):
    """`steps` updates of the real training loop; returns the per-update phase times."""
    n = str(min(8, K // 3))  # the published 8 / 8 where K allows
    features = "unet" if features == "teacher" and "unet" in drpo.FEATURES else features  # --against an old checkout
    mae = ["--mae-ckpt", str(MAE_TINY)] if features == "mae" else []
    with tempfile.TemporaryDirectory() as out:
        rc = drpo.main(["--model", model, "--reward", reward, "--candidates", str(K), "--features", features, *mae,
                        "--grad-chunk", str(chunk), "--reward-batch", str(chunk or K), "--n-pos", n, "--n-neg", n,
                        "--grad-accum", "1", "--max-steps", str(steps), "--resolution", str(resolution),
                        "--device", str(device), "--sample-every", "0", "--save-every", "1000000",
                        "--output-dir", out, "--overwrite", *extra])
        if rc != 0:
            raise RuntimeError(f"drpo.main exited with {rc}")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        return [r["phases_s"] for r in rows if "phases_s" in r]  # not the held-out evaluation's lines


def adam_step(params, optimizer):
    """The training loop's optimizer step: clip the gradient norm to 1, AdamW, clear."""
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def reward_grad_update(model, K, chunk, steps, resolution, device):
    """`steps` reward-gradient updates: loss = -mean reward(decode(G_theta(z))), through reward and decoder."""
    dtype = drpo.precision_dtype("auto", device)
    gen = drpo.load_generator(model, dtype, device)
    pipe = gen.pipe
    torch.manual_seed(0)
    params = drpo.add_lora(pipe.unet, 16, 16, ["to_q", "to_k", "to_v", "to_out.0"])
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    net = reward_net()
    recipe = gen.recipe
    shape = drpo.latent_shape(gen, resolution)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    C = chunk or K
    rows = []
    for _ in range(steps):
        times, lap = drpo.stopwatch(device)
        z = torch.randn((K, *shape)).to(device, dtype)
        cond = gen.conditioning(["a photo of a cat"], shape[-1] * pipe.vae_scale_factor)
        for c0 in range(0, K, C):
            n = len(z[c0:c0 + C])
            with autocast:
                x = drpo.generate(pipe.unet, z[c0:c0 + C], drpo.rows(cond, lambda v: v.repeat_interleave(n, 0)),
                                  recipe)
                lap("sample")
                images = drpo.decode(pipe.vae, x)
                lap("decode")
                loss = -net(images).float().sum() / K
            lap("reward")
            loss.backward()
            lap("backward")
        adam_step(params, optimizer)
        lap("optimizer")
        rows.append(times)
    return rows


def authors_update(model, K, chunk, steps, resolution, device, reward="brightness", features="teacher"):
    """`steps` updates in the structure of the authors' SD-Turbo trainer, with this file's generator, feature
    map, reward and field: G_theta with gradient once (graph kept), the reference from a deep copy of the
    frozen UNet, the positives' and negatives' features recomputed from their latents, one backward."""
    import copy

    dtype = drpo.precision_dtype("auto", device)
    gen = drpo.load_generator(model, dtype, device)
    pipe = gen.pipe
    reference = copy.deepcopy(pipe.unet)  # the frozen base generator as a second UNet
    torch.manual_seed(42)
    params = drpo.add_lora(pipe.unet, 16, 16, ["to_q", "to_k", "to_v", "to_out.0"])
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    phi = drpo.load_features(features, gen, mae_ckpt=str(MAE_TINY), device=device)
    score = drpo.load_reward(reward, device)
    recipe = gen.recipe
    shape = drpo.latent_shape(gen, resolution)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    n, rng, rows = min(8, K // 3), torch.Generator().manual_seed(42), []
    for _ in range(steps):
        times, lap = drpo.stopwatch(device)
        z, noise = (torch.randn((K, *shape), generator=rng).to(device, dtype) for _ in range(2))
        cond = drpo.rows(gen.conditioning(["a photo of a cat"], shape[-1] * pipe.vae_scale_factor),
                         lambda v: v.repeat_interleave(K, 0))
        with autocast:
            x = drpo.generate(pipe.unet, z, cond, recipe)  # with gradient, kept for the one backward
        lap("sample")
        with torch.no_grad(), autocast:
            r = drpo.generate(reference, z, cond, recipe)
        lap("reference")
        with torch.no_grad(), autocast:
            images = drpo.to_pil(drpo.decode(pipe.vae, x.detach()))
        lap("decode")
        pos_idx, neg_idx = (i[0] for i in drpo.select_pos_neg(score(images, ["a photo of a cat"] * K)[None], n, n))
        lap("reward")
        with autocast:
            fx = phi(x, noise, cond)
            with torch.no_grad():  # the references, and the ranked latents featurized again
                fr = phi(r, noise, cond)
                rows_of = lambda idx: drpo.rows(cond, lambda v: v[idx])
                fp = phi(x.detach()[pos_idx], noise[pos_idx], rows_of(pos_idx))
                fn = phi(x.detach()[neg_idx], noise[neg_idx], rows_of(neg_idx))
        sets = lambda f: {k: v.reshape(1, -1, v.shape[-1]) for k, v in f.items()}
        lap("features")
        targets, _ = drpo.drpo_targets(sets(fx), sets(fp), sets(fn), sets(fr))
        lap("field")
        drpo.regression_loss(sets(fx), targets).backward()
        lap("backward")
        adam_step(params, optimizer)
        lap("optimizer")
        rows.append(times)
    return rows


UPDATES = {"drpo": drpo_update, "reward_grad": reward_grad_update, "authors": authors_update}


def structure_worker(method, model, K, chunk, steps, warmup, resolution, device, features):
    """One update structure in this process at one K: median phases and total over the timed updates."""
    device = torch.device(device)
    reset_peak(device)
    rows = UPDATES[method](model, K, chunk, warmup + steps, resolution, device, reward="brightness",
                           features=features)[warmup:]
    totals = [sum(r.values()) for r in rows]
    print(json.dumps({"method": method, "candidates": K, "grad_chunk": chunk or K, "features": features,
                      "total_s": statistics.median(totals), "totals_s": totals, "peak_mb": peak_mb(device),
                      "phases_s": {p: statistics.median(r.get(p, 0.0) for r in rows) for p in PHASES}}), flush=True)


def steps_worker(model, K, N, grad_steps, ckpt, steps, warmup, resolution, device, features="teacher"):
    """One sampler setting (N steps, the last grad_steps with a graph, checkpointing) in this process."""
    device = torch.device(device)
    reset_peak(device)
    extra = ["--inference-steps", str(N), "--grad-steps", str(grad_steps), "--eval-every", "0"] + (
        ["--gradient-checkpointing"] if ckpt else [])
    rows = drpo_update(model, K, 0, warmup + steps, resolution, device, reward="brightness", features=features,
                       extra=extra)[warmup:]
    totals = [sum(r.values()) for r in rows]
    print(json.dumps({"inference_steps": N, "grad_steps": grad_steps, "gradient_checkpointing": ckpt,
                      "features": features,
                      "candidates": K, "total_s": statistics.median(totals), "totals_s": totals,
                      "peak_mb": peak_mb(device),
                      "phases_s": {p: statistics.median(r.get(p, 0.0) for r in rows) for p in PHASES}}), flush=True)


def worker(method, model, arch, candidates, chunk, steps, warmup, resolution, device):
    """One process per method and chunk setting, K ascending; one JSON line per configuration."""
    sys.modules.setdefault("step_cost", sys.modules["__main__"])  # `step_cost:pil_reward` is this module
    os.environ["STEP_COST_REWARD_ARCH"], os.environ["STEP_COST_DEVICE"] = arch, device
    device = torch.device(device)
    reward_net()
    for K in [k for k in candidates if not chunk or chunk < k]:  # chunk >= K is the unchunked run
        reset_peak(device)
        fn = UPDATES[method]
        row = {"method": method, "candidates": K, "grad_chunk": chunk or K}
        try:
            rows = fn(model, K, chunk, warmup + steps, resolution, device)[warmup:]
        except torch.OutOfMemoryError:  # report it and go on with the next configuration
            torch.cuda.empty_cache()
            print(json.dumps({**row, "error": "out of memory"}), flush=True)
            continue
        phases = {p: statistics.fmean(r.get(p, 0.0) for r in rows) for p in PHASES}
        print(json.dumps({**row, "total_s": sum(phases.values()), "phases_s": phases, "peak_mb": peak_mb(device)}),
              flush=True)


def forward_ratio(model, arch, resolution, device, n=4):
    """Seconds of one reward-network forward per image over one UNet forward per sample."""
    gen = drpo.load_generator(model, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    net = reward_net(arch, device)
    z = torch.randn((n, *drpo.latent_shape(gen, resolution)), device=device, dtype=gen.net.dtype)
    cond = drpo.rows(gen.conditioning(["a photo of a cat"], z.shape[-1] * gen.pipe.vae_scale_factor),
                     lambda v: v.repeat_interleave(n, 0))
    images = torch.rand((n, 3, resolution, resolution), device=device)

    def best(f):
        f()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            f()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return best(lambda: net(images)) / best(lambda: gen.net(z, timestep=torch.full((n,), 999.0, device=device),
                                                                **cond))


def run_worker(spec, against=None, keep_going=False):
    """One worker process (its own peak memory); its JSON lines. `against`: import drpo from that checkout.
    keep_going: a failed worker is reported and gives no lines, instead of ending the benchmark."""
    env = {**os.environ, "STEP_COST_DRPO": str(against)} if against else None
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                         env=env)
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        print(f"{spec} failed:\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
        if not keep_going:
            sys.exit(1)
    return lines


def scaling(args, preset, model, arch, device, candidates):
    """DrPO against the reward-gradient update, K ascending, unchunked and chunked."""
    ratio = forward_ratio(model, arch, preset["resolution"], device)
    _NET.clear()
    print(f"reward forward per image / UNet forward per sample: {ratio:.1f}x", flush=True)
    results = []
    for method in ("drpo", "reward_grad"):
        for chunk in (0, preset["chunk"]):
            results += run_worker(dict(method=method, model=model, arch=arch, candidates=candidates, chunk=chunk,
                                       steps=preset["steps"], warmup=preset["warmup"],
                                       resolution=preset["resolution"], device=str(device)))
    print(f"\n{'method':12s} {'K':>3s} {'chunk':>5s} {'s/update':>9s} {'peak MB':>9s}  " +
          " ".join(f"{p[:8]:>8s}" for p in PHASES))
    for r in sorted(results, key=lambda r: (r["method"], r["grad_chunk"] < r["candidates"], r["candidates"])):
        head = f"{r['method']:12s} {r['candidates']:3d} {r['grad_chunk']:5d}"
        print(f"{head} {r['error']}" if "error" in r else f"{head} {r['total_s']:9.3f} {r['peak_mb']:9.0f}  " +
              " ".join(f"{r['phases_s'][p]:8.3f}" for p in PHASES))
    K = 24 if 24 in candidates else max(candidates)  # compare at the published K, unchunked where it fits
    pick = {m: min((r for r in results if r["method"] == m and r["candidates"] == K and "error" not in r),
                   key=lambda r: -r["grad_chunk"], default=None) for m in ("drpo", "reward_grad")}
    if None in pick.values():
        sys.exit(f"no K={K} result for {[m for m, r in pick.items() if r is None]} (out of memory?)")
    summary = {
        "drpo": {k: pick["drpo"][k] for k in ("total_s", "phases_s", "peak_mb")},
        "reward_grad": {k: pick["reward_grad"][k] for k in ("total_s", "phases_s", "peak_mb")},
        "ratio": pick["reward_grad"]["total_s"] / pick["drpo"]["total_s"],
        "settings": {"reward_arch": arch, "candidates": K, "grad_chunk": {m: r["grad_chunk"] for m, r in pick.items()},
                     "timed_updates": preset["steps"], "warmup_updates": preset["warmup"],
                     "reward_to_unet_forward": ratio},
        "scaling": results,
    }
    print(f"\nK={K}: reward-gradient update {summary['reward_grad']['total_s']:.3f} s, DrPO update "
          f"{summary['drpo']['total_s']:.3f} s: DrPO is {summary['ratio']:.2f}x faster")
    return summary


def commit(repo):
    """The checkout's commit, and + when it has uncommitted changes."""
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (head.stdout.strip() or "unknown") + ("+" if dirty else "")


def structures(args, preset, model, device):
    """One update at K = 24: this project unchunked and at --grad-chunk 8, the authors' structure, and with
    --against the drpo.py of another checkout; each with every feature map of the preset."""
    K, rows = 24, []
    for features in preset["structure_features"]:
        configs = [("drpo", 0, None), ("drpo", preset["chunk"], None), ("authors", 0, None)]
        for method, chunk, against in configs + ([("drpo", 0, args.against)] if args.against else []):
            spec = dict(part="structure", method=method, model=model, K=K, chunk=chunk, features=features,
                        steps=preset["structure_steps"], warmup=preset["warmup"], resolution=preset["resolution"],
                        device=str(device))
            code = {"code": commit(against or REPO), "against": bool(against)}
            rows += [{**r, **code} for r in run_worker(spec, against)]
    print(f"\nK={K}, brightness reward, median of {preset['structure_steps']} updates")
    print(f"{'features':8s} {'structure':32s} {'s/update':>9s} {'peak MB':>8s}  " +
          " ".join(f"{p[:8]:>8s}" for p in PHASES))
    for r in rows:
        name = ("authors' structure" if r["method"] == "authors" else f"C = {r['grad_chunk']}") + \
            (f" ({r['code']}, --against)" if r["against"] else "")
        print(f"{r['features']:8s} {name:32s} {r['total_s']:9.3f} {r['peak_mb']:8.0f}  " +
              " ".join(f"{r['phases_s'][p]:8.3f}" for p in PHASES))
    return {"structures": rows}


def sampler_steps(args, preset, model, device, K=24):
    """The update against the sampler's steps N, the steps K it backpropagates through (--grad-steps) and
    --gradient-checkpointing (each step recomputed in backward), at the published K = 24 candidates, unchunked."""
    rows = []
    for N in (1, 2, 4):
        for grad_steps in sorted({N, 1}, reverse=True):
            for ckpt in (False, True):
                rows += run_worker(dict(part="steps", model=model, K=K, N=N, grad_steps=grad_steps, ckpt=ckpt,
                                        steps=preset["structure_steps"], warmup=preset["warmup"],
                                        resolution=preset["resolution"], device=str(device)))
    print(f"\nK={K} candidates, brightness reward, teacher features, median of {preset['structure_steps']} updates")
    print(f"{'N':>2s} {'grad':>4s} {'ckpt':>4s} {'s/update':>9s} {'peak MB':>8s}  " +
          " ".join(f"{p[:8]:>8s}" for p in PHASES))
    for r in rows:
        print(f"{r['inference_steps']:2d} {r['grad_steps']:4d} {'yes' if r['gradient_checkpointing'] else 'no':>4s} "
              f"{r['total_s']:9.3f} {r['peak_mb']:8.0f}  " + " ".join(f"{r['phases_s'][p]:8.3f}" for p in PHASES))
    return {"sampler_steps": rows}


def flux_size(args, preset, device, K=8):
    """The update on FLUX.1-schnell's architecture (make_flux_architecture; the tiny FLUX on a CPU) at its 4 steps,
    through all of them and through the last one, with --gradient-checkpointing, K candidates (or --candidates'
    first); with teacher features, then the latents' (no network) through all steps."""
    K = int(args.candidates.split(",")[0]) if args.candidates else K
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        model = make_flux_architecture(tmp) if device.type == "cuda" else str(make_tiny(Path(tmp) / "f", arch="flux"))
        built_s = time.time() - t0
        for features, grad_steps in (("latent", 4), ("teacher", 4), ("teacher", 1)):
            rows += run_worker(dict(part="steps", model=model, K=K, N=4, grad_steps=grad_steps, ckpt=True,
                                    steps=2, warmup=1, resolution=preset["flux_resolution"], device=str(device),
                                    features=features), keep_going=True)
    print(f"\nFLUX size: K={K} candidates at {preset['flux_resolution']} px, 4 steps, brightness reward, "
          f"checkpointing, median of 2 updates (built in {built_s:.0f} s)")
    for r in rows:
        print(f"{r['features']}, grad-steps {r['grad_steps']}: {r['total_s']:.2f} s/update, "
              f"peak {r['peak_mb']:.0f} MB  " +
              " ".join(f"{p} {r['phases_s'][p]:.2f}" for p in PHASES))
    return {"flux": rows, "flux_resolution": preset["flux_resolution"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="tiny-cpu")
    ap.add_argument("--parts", default="scaling,structures",
                    help="comma list: scaling (DrPO against the reward gradient, K ascending), structures (three "
                         "update structures at K = 24), steps (the update against the sampler's steps N, "
                         "--grad-steps and checkpointing), flux (the update at FLUX.1-schnell's size); the last "
                         "two not in the default")
    ap.add_argument("--reward-arch", choices=("tiny", *QWEN2VL),
                    help="reward network of scaling (default: the preset's)")
    ap.add_argument("--candidates", help="comma list of K for scaling (default: the preset's)")
    ap.add_argument("--against", metavar="DIR", help="structures: also time the drpo.py of this checkout, e.g. a git "
                    "worktree of an earlier commit")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        part = spec.pop("part", None)
        return {"structure": structure_worker, "steps": steps_worker}.get(part, worker)(**spec)
    preset = PRESETS[args.preset]
    parts = args.parts.split(",")
    if set(parts) - {"scaling", "structures", "steps", "flux"}:
        sys.exit(f"--parts {args.parts}: choose from scaling, structures, steps, flux")
    arch = args.reward_arch or preset["reward_arch"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if arch == "qwen2vl-7b" and device.type != "cuda" and "scaling" in parts:
        sys.exit("--reward-arch qwen2vl-7b needs a GPU (16.6 GB of weights in bf16)")
    candidates = [int(k) for k in args.candidates.split(",")] if args.candidates else list(preset["candidates"])
    t0, summary = time.time(), {}
    with tempfile.TemporaryDirectory() as tmp:
        model = None if parts == ["flux"] else make_sd_turbo_architecture(tmp) if args.preset == "sd-turbo" else \
            str(make_tiny(Path(tmp) / "tiny"))
        if "scaling" in parts:
            summary.update(scaling(args, preset, model, arch, device, candidates))
        if "structures" in parts:
            summary.update(structures(args, preset, model, device))
        if "steps" in parts:
            summary.update(sampler_steps(args, preset, model, device))
        if "flux" in parts:
            summary.update(flux_size(args, preset, device))
    summary.update(device=torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
                   preset=args.preset, resolution=preset["resolution"],
                   precision="bf16" if device.type == "cuda" else "fp32", date=time.strftime("%Y-%m-%d"),
                   wall_s=time.time() - t0)
    print(f"(total {summary['wall_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
